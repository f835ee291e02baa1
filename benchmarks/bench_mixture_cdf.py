"""Speed and accuracy of MixtureGaussianCDF against in-run baselines.

Run:  python benchmarks/bench_mixture_cdf.py [--n 1000000] [--k 8] [--dtype float32]

Every row is measured in this process on the same data: jit warm-up first,
then the median of `--repeats` runs (block_until_ready). Ratios are the figures
to compare across machines; absolute milliseconds drift with load.

Baselines:
* naive forward: ``ndtri(Σ w ndtr(z))`` with log-det (the textbook formula,
  saturating at |y| ≈ 5.4 in float32);
* textbook bisection: 60 bisection steps on the naive CDF inside a fixed
  [-100, 100] box (what the peer implementations do), no gradient.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from distrax_mixcdf import MixtureGaussianCDF
from distrax_mixcdf._mixture import naive_forward_and_log_det


def median_time(fn, *args, repeats):
    jax.block_until_ready(fn(*args))  # compile + warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def textbook_bisection(y, params, steps=60, box=100.0):
    log_weights, means, log_scales = params
    target = jax.scipy.special.ndtr(y)
    lower = jnp.full_like(y, -box)
    upper = jnp.full_like(y, box)

    def body(_, bracket):
        lower, upper = bracket
        mid = 0.5 * (lower + upper)
        z = (mid[..., None] - means) * jnp.exp(-log_scales)
        cdf = jnp.sum(jnp.exp(log_weights) * jax.scipy.special.ndtr(z), axis=-1)
        below = cdf < target
        return jnp.where(below, mid, lower), jnp.where(below, upper, mid)

    lower, upper = jax.lax.fori_loop(0, steps, body, (lower, upper))
    return 0.5 * (lower + upper)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    dtype = jnp.dtype(args.dtype)

    # A typical fitted marginal: K overlapping components.
    rng = np.random.default_rng(args.seed)
    logits = rng.normal(size=args.k)
    means = rng.normal(size=args.k) * 2.0
    log_scales = rng.normal(size=args.k) * 0.3 - 0.5
    weights = np.exp(logits) / np.exp(logits).sum()
    component = rng.choice(args.k, size=args.n, p=weights)
    x = jnp.asarray(
        rng.normal(size=args.n) * np.exp(log_scales[component]) + means[component],
        dtype,
    )
    y = jnp.asarray(rng.normal(size=args.n), dtype)

    def bijector_with(**options):
        return MixtureGaussianCDF(
            jnp.asarray(logits, dtype),
            jnp.asarray(means, dtype),
            jnp.asarray(log_scales, dtype),
            **options,
        )

    bijector = bijector_with()
    params = (
        jax.nn.log_softmax(bijector.logits),
        bijector.means,
        bijector.log_scales,
    )
    forward = jax.jit(lambda b, v: b.forward_and_log_det(v))
    inverse = jax.jit(lambda b, v: b.inverse_and_log_det(v))

    def inverse_loss(b, v):
        x_hat, log_det = b.inverse_and_log_det(v)
        return jnp.mean(jnp.square(x_hat)) - jnp.mean(log_det)

    inverse_value_and_grad = jax.jit(jax.value_and_grad(inverse_loss))
    forward_value_and_grad = jax.jit(
        jax.value_and_grad(lambda b, v: -jnp.mean(b.forward_and_log_det(v)[1]))
    )

    rows = []
    r = args.repeats
    t_naive = median_time(jax.jit(naive_forward_and_log_det), x, params, repeats=r)
    t_forward = median_time(forward, bijector, x, repeats=r)

    def add(name, seconds, error="", note=""):
        rows.append((name, seconds, error, note))

    y_naive, _ = jax.jit(naive_forward_and_log_det)(x, params)
    add(
        "naive forward (baseline)",
        t_naive,
        note=f"non-finite y: {int(jnp.sum(~jnp.isfinite(y_naive)))}",
    )
    add("forward_and_log_det (ours)", t_forward)
    add(
        "value_and_grad of forward NLL (ours)",
        median_time(forward_value_and_grad, bijector, x, repeats=r),
    )
    for finder in ("hybrid", "newton", "bisection"):
        b = bijector_with(root_finder=finder)
        t = median_time(inverse, b, y, repeats=r)
        x_hat, _ = inverse(b, y)
        residual = float(jnp.max(jnp.abs(forward(b, x_hat)[0] - y)))
        label = (
            "inverse_and_log_det (ours, default)"
            if finder == "hybrid"
            else f"inverse_and_log_det, root_finder={finder!r}"
        )
        add(label, t, f"{residual:.1e}")
    t_vg = median_time(inverse_value_and_grad, bijector, y, repeats=r)
    add("value_and_grad through inverse (ours, implicit)", t_vg)
    bisect = jax.jit(textbook_bisection)
    t_bisect = median_time(bisect, y, params, repeats=r)
    x_bisect = bisect(y, params)
    residual = float(jnp.max(jnp.abs(forward(bijector, x_bisect)[0] - y)))
    add(
        "textbook bisection, 60 steps in [-100, 100] (baseline)",
        t_bisect,
        f"{residual:.1e}",
        "no gradient",
    )

    print(
        f"N = {args.n:.0e} {args.dtype} points, K = {args.k}, "
        f"median of {r} runs after jit warm-up"
    )
    print(
        f"jax {jax.__version__}, backend {jax.default_backend()}, "
        f"{jax.device_count()} device(s)\n"
    )
    print(
        "| operation | ms | × our forward | × naive forward "
        "| max abs f(f⁻¹(y)) − y | note |"
    )
    print("|---|---:|---:|---:|---:|---|")
    for name, seconds, error, note in rows:
        print(
            f"| {name} | {seconds * 1e3:.1f} | {seconds / t_forward:.2f} | "
            f"{seconds / t_naive:.2f} | {error} | {note} |"
        )
    t_inverse = rows[3][1]
    print(f"\ninverse / forward = {t_inverse / t_forward:.2f}   (target ≤ 3)")
    print(f"inverse+grad / inverse = {t_vg / t_inverse:.2f}   (target ≤ 1.5)")
    print(f"forward / naive forward = {t_forward / t_naive:.2f}   (target ≤ 1.6)")


if __name__ == "__main__":
    main()
