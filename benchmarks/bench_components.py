"""Compile time, run time and peak memory of the layer by number of components K.

Run:  python benchmarks/bench_components.py [--n 100000] [--ks 8 32 128 512 1024]

Each K runs in a fresh process (so compile caches and peak memory are its
own): forward, inverse, and value_and_grad of a loss through the inverse, on
N float32 elements sharing one KDE-style mixture (K equal-weight anchors at
the normal quantiles, Silverman's bandwidth). Compile is the time of
``jit(...).lower(...).compile()``; run is the median of ``--repeats`` calls
after warm-up; peak is the process's maximum resident memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def measure(k: int, n: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from scipy.special import ndtri

    from distrax_mixcdf import MixtureGaussianCDF

    # A KDE-style mixture, the large-K use: K equal-weight anchors at the
    # normal quantiles with Silverman's bandwidth, the same shape at every K.
    rng = np.random.default_rng(0)
    anchors = ndtri((np.arange(k) + 0.5) / k)
    bijector = MixtureGaussianCDF(
        jnp.zeros(k, jnp.float32),
        jnp.asarray(anchors, jnp.float32),
        jnp.full(k, np.log(1.06 * k**-0.2), jnp.float32),
    )
    x = jnp.asarray(rng.normal(size=n) * 1.2, jnp.float32)
    y = jnp.asarray(rng.normal(size=n), jnp.float32)

    def inverse_loss(b, v):
        x_hat, log_det = b.inverse_and_log_det(v)
        return jnp.mean(jnp.square(x_hat)) - jnp.mean(log_det)

    functions = {
        "forward": (jax.jit(lambda b, v: b.forward_and_log_det(v)), x),
        "inverse": (jax.jit(lambda b, v: b.inverse_and_log_det(v)), y),
        "value_and_grad": (jax.jit(jax.value_and_grad(inverse_loss)), y),
    }
    row = {"k": k}
    for name, (fn, value) in functions.items():
        start = time.perf_counter()
        compiled = fn.lower(bijector, value).compile()
        row[f"{name}_compile_s"] = time.perf_counter() - start
        jax.block_until_ready(compiled(bijector, value))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(compiled(bijector, value))
            times.append(time.perf_counter() - start)
        row[f"{name}_ms"] = 1e3 * statistics.median(times)
    row["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--ks", type=int, nargs="+", default=[8, 32, 128, 512, 1024])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.one, args.n, args.repeats)))
        return
    rows = []
    for k in args.ks:
        command = [sys.executable, __file__, "--one", str(k), "--n", str(args.n)]
        command += ["--repeats", str(args.repeats)]
        out = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"N = {args.n:.0e} float32 elements, one shared mixture, fresh process per K")
    print()
    print(
        "| K | compile fwd s | compile inv s | compile vg s | fwd ms | inv ms "
        "| vg ms | peak MiB |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['k']} | {r['forward_compile_s']:.1f} | "
            f"{r['inverse_compile_s']:.1f} | {r['value_and_grad_compile_s']:.1f} | "
            f"{r['forward_ms']:.1f} | {r['inverse_ms']:.1f} | "
            f"{r['value_and_grad_ms']:.1f} | {r['peak_mib']:.0f} |"
        )


if __name__ == "__main__":
    main()
