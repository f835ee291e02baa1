"""Peak memory (RSS) of forward, inverse and value_and_grad through the inverse.

Run: ``python benchmarks/memory.py [N] [K]`` (default N = 1e7, K = 8, float32).

Each operation runs in its own fresh subprocess. The function is compiled
first; then the baseline is the current RSS (JAX imported, layer built, input
placed), the high-water mark is reset (``/proc/self/clear_refs``, Linux), the
call runs, and the peak is ``VmHWM``. The table shows the peak, the increase
over the baseline, and that increase in units of one
``[N]`` float32 array (4N bytes) and of one ``[N, K]`` array (4NK bytes): the
claim to check is that the inverse and its gradient use O(N·K) memory (a few
``[N, K]``-sized buffers at most), not O(N·K·iterations): the bisection rows
run ~30 iterations where hybrid runs ~1, at the same memory.
"""

from __future__ import annotations

import json
import subprocess
import sys

_CHILD = r"""
import json, sys, time
import jax, jax.numpy as jnp, numpy as np
import distrax_mixcdf as dm

n, k, op, root_finder = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
rng = np.random.default_rng(0)
layer = dm.MixtureGaussianCDF(
    jnp.asarray(rng.normal(size=k), jnp.float32),
    jnp.asarray(rng.normal(size=k) * 2, jnp.float32),
    jnp.asarray(rng.normal(size=k) * 0.3 - 0.5, jnp.float32),
    root_finder=root_finder,
)
values = jax.block_until_ready(jax.random.normal(jax.random.key(0), (n,)))

def status_mb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024

if op == "forward":
    fn = jax.jit(lambda b, v: b.forward_and_log_det(v))
elif op == "inverse":
    fn = jax.jit(lambda b, v: b.inverse_and_log_det(v))
else:
    def loss(b, v):
        x, log_det = b.inverse_and_log_det(v)
        return jnp.mean(x) + jnp.mean(log_det)
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
# Compile on a small input first: compilation has its own memory peak.
jax.block_until_ready(fn(layer, values[:1024]))
compiled = fn.lower(layer, values).compile()
baseline = status_mb("VmRSS")
# Reset the high-water mark (Linux): the peak below is this call's alone, not
# the compiler's.
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
start = time.perf_counter()
out = jax.block_until_ready(compiled(layer, values))
seconds = time.perf_counter() - start
peak = status_mb("VmHWM")
del out
print("RESULT" + json.dumps(dict(baseline=baseline, peak=peak, seconds=seconds)))
"""

OPERATIONS = (
    ("forward", "hybrid", "forward_and_log_det"),
    ("inverse", "hybrid", "inverse_and_log_det (hybrid, ~1 iteration)"),
    ("inverse", "bisection", "inverse_and_log_det (bisection, ~30 iterations)"),
    ("grad", "hybrid", "value_and_grad through the inverse (hybrid)"),
    ("grad", "bisection", "value_and_grad through the inverse (bisection)"),
)


def main() -> None:
    n = int(float(sys.argv[1])) if len(sys.argv) > 1 else 10_000_000
    k = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    import jax

    print(
        f"N = {n:.0e} float32 points, K = {k}, one fresh process per row; "
        f"jax {jax.__version__}, backend {jax.default_backend()}"
    )
    print(
        f"one [N] array = {4 * n / 2**20:.0f} MiB, one [N, K] array = "
        f"{4 * n * k / 2**20:.0f} MiB\n"
    )
    print(
        "| operation | baseline MiB | peak MiB | increase MiB | × [N] | × [N, K] | s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for op, root_finder, label in OPERATIONS:
        run = subprocess.run(
            [sys.executable, "-c", _CHILD, str(n), str(k), op, root_finder],
            capture_output=True,
            text=True,
        )
        if run.returncode != 0:
            print(f"| {label} | failed: {run.stderr[-300:]!r} |")
            continue
        line = next(x for x in run.stdout.splitlines() if x.startswith("RESULT"))
        result = json.loads(line[len("RESULT") :])
        increase = result["peak"] - result["baseline"]
        print(
            f"| {label} | {result['baseline']:.0f} | {result['peak']:.0f} | "
            f"{increase:.0f} | {increase * 2**20 / (4 * n):.1f} | "
            f"{increase * 2**20 / (4 * n * k):.2f} | {result['seconds']:.1f} |"
        )


if __name__ == "__main__":
    main()
