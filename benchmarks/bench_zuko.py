"""Our layer against zuko's GaussianizationTransform, side by side in one process.

Run:  pip install torch zuko   # optional, never a dependency
      python benchmarks/bench_zuko.py [--n 1000000] [--k 8] [--repeats 7]

zuko's transform is ``Φ⁻¹(mean_k Φ(exp(a_k) x + b_k))`` (equal weights) with a
25-step bisection on [-10, 10] as its inverse. Ours is built with the same
components (equal weights, ``μ_k = -b_k e^{-a_k}``, ``σ_k = e^{-a_k}``), so
both map the same function. Rows are timed round-robin after warm-up
(float32, CPU, torch on all cores); the gradient rows take a mean-square
loss of the inverse and its gradient with respect to the parameters.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from zuko.transforms import GaussianizationTransform

from distrax_mixcdf import MixtureGaussianCDF


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    shift = rng.normal(size=args.k).astype(np.float32)
    log_scale = (rng.normal(size=args.k) * 0.3).astype(np.float32)
    x = (rng.normal(size=args.n) * 1.5).astype(np.float32)
    y = rng.normal(size=args.n).astype(np.float32)

    shift_t = torch.tensor(shift, requires_grad=True)
    log_scale_t = torch.tensor(log_scale, requires_grad=True)
    x_t, y_t = torch.tensor(x), torch.tensor(y)

    def zuko_forward():
        with torch.no_grad():
            return GaussianizationTransform(shift_t, log_scale_t)(x_t)

    def zuko_inverse():
        with torch.no_grad():
            return GaussianizationTransform(shift_t, log_scale_t).inv(y_t)

    def zuko_value_and_grad():
        transform = GaussianizationTransform(shift_t, log_scale_t)
        loss = transform.inv(y_t).square().mean()
        return torch.autograd.grad(loss, (shift_t, log_scale_t))

    scales = np.exp(-log_scale)
    bijector = MixtureGaussianCDF(
        jnp.zeros(args.k), jnp.asarray(-shift * scales), jnp.asarray(-log_scale)
    )
    forward = jax.jit(lambda b, v: b.forward(v))
    inverse = jax.jit(lambda b, v: b.inverse(v))
    value_and_grad = jax.jit(
        jax.value_and_grad(lambda b, v: jnp.mean(jnp.square(b.inverse(v))))
    )
    xj, yj = jnp.asarray(x), jnp.asarray(y)
    rows = {
        "zuko forward": lambda: zuko_forward(),
        "zuko inverse": lambda: zuko_inverse(),
        "zuko inverse + gradient": lambda: zuko_value_and_grad(),
        "ours forward": lambda: jax.block_until_ready(forward(bijector, xj)),
        "ours inverse": lambda: jax.block_until_ready(inverse(bijector, yj)),
        "ours inverse + gradient": lambda: jax.block_until_ready(
            value_and_grad(bijector, yj)
        ),
    }
    for fn in rows.values():
        fn()
    times = {name: [] for name in rows}
    for _ in range(args.repeats):
        for name, fn in rows.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}

    ours_y, zuko_y = np.asarray(forward(bijector, xj)), zuko_forward().numpy()
    bulk = np.abs(ours_y) < 4.0  # zuko caps |y| at 4.889
    same = float(np.max(np.abs(ours_y - zuko_y)[bulk]))
    err_zuko = float(
        np.max(
            np.abs(
                GaussianizationTransform(shift_t, log_scale_t)(zuko_inverse())
                .detach()
                .numpy()
                - y
            )
        )
    )
    err_ours = float(
        np.max(np.abs(np.asarray(forward(bijector, inverse(bijector, yj))) - y))
    )
    print(
        f"N = {args.n:.0e} float32, K = {args.k}, median of {args.repeats} "
        f"round-robin runs; torch {torch.__version__} ({torch.get_num_threads()} "
        f"threads), jax {jax.__version__}\n"
    )
    print("| operation | zuko ms | ours ms | zuko / ours |")
    print("|---|---:|---:|---:|")
    for label in ("forward", "inverse", "inverse + gradient"):
        z, o = median[f"zuko {label}"], median[f"ours {label}"]
        print(f"| {label} | {z * 1e3:.1f} | {o * 1e3:.1f} | {z / o:.1f} |")
    print(
        f"\nmax |f(f⁻¹(y)) − y|: zuko {err_zuko:.1e}, ours {err_ours:.1e} "
        f"(the two forwards agree to {same:.1e} for |y| < 4)"
    )


if __name__ == "__main__":
    main()
