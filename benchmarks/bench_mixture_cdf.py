"""Speed and accuracy of MixtureGaussianCDF against in-run baselines.

Run:  python benchmarks/bench_mixture_cdf.py [--n 1000000] [--k 8] [--dtype float32]

The first table times one mixture shared by every element; the second the
three parameter shapes flows use, at the same number of elements: shared
``[K]``, per-dimension ``[D, K]`` on ``[N/D, D]`` (a marginal layer) and
per-element ``[N, K]`` (what a coupling conditioner emits).

Every row is measured in this process on the same data: jit warm-up first,
then `--repeats` rounds in which every row runs once, in turn
(block_until_ready), and each row reports its median. Timing the rows
round-robin rather than one after the other keeps a slow spell of this shared
machine from landing on one row only, so the ratios drift less. Ratios are the
figures to compare across machines; absolute milliseconds drift with load.

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
from distrax_mixcdf._baseline import naive_forward_and_log_det
from distrax_mixcdf._root_finding import ROOT_FINDERS


def round_robin_medians(calls, repeats):
    """Median seconds of each ``(fn, args)`` in ``calls``, timed in turn.

    Each call is compiled and warmed up first; then every round runs each call
    once, so load changes during the run spread over all rows alike.
    """
    for fn, args in calls:
        jax.block_until_ready(fn(*args))  # compile + warm-up
    times = [[] for _ in calls]
    for _ in range(repeats):
        for (fn, args), row_times in zip(calls, times):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            row_times.append(time.perf_counter() - start)
    return [statistics.median(row_times) for row_times in times]


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
    parser.add_argument("--dims", type=int, default=2, help="D of the [D, K] row")
    parser.add_argument(
        "--skip-shapes", action="store_true", help="only the shared-mixture table"
    )
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

    r = args.repeats
    naive = jax.jit(naive_forward_and_log_det)
    bisect = jax.jit(textbook_bisection)
    finders = {name: bijector_with(root_finder=name) for name in ROOT_FINDERS}
    t_naive, t_forward, t_forward_vg, *t_finders, t_vg, t_bisect = round_robin_medians(
        [
            (naive, (x, params)),
            (forward, (bijector, x)),
            (forward_value_and_grad, (bijector, x)),
            *((inverse, (b, y)) for b in finders.values()),
            (inverse_value_and_grad, (bijector, y)),
            (bisect, (y, params)),
        ],
        repeats=r,
    )

    def residual(x_hat):
        return f"{float(jnp.max(jnp.abs(forward(bijector, x_hat)[0] - y))):.1e}"

    y_naive, _ = naive(x, params)
    rows = [
        (
            "naive forward (baseline)",
            t_naive,
            "",
            f"non-finite y: {int(jnp.sum(~jnp.isfinite(y_naive)))}",
        ),
        ("forward_and_log_det (ours)", t_forward, "", ""),
        ("value_and_grad of forward NLL (ours)", t_forward_vg, "", ""),
    ]
    for (name, b), t in zip(finders.items(), t_finders):
        label = (
            "inverse_and_log_det (ours, default)"
            if name == "hybrid"
            else f"inverse_and_log_det, root_finder={name!r}"
        )
        rows.append((label, t, residual(inverse(b, y)[0]), ""))
    rows.append(("value_and_grad through inverse (ours, implicit)", t_vg, "", ""))
    rows.append(
        (
            "textbook bisection, 60 steps in [-100, 100] (baseline)",
            t_bisect,
            residual(bisect(y, params)),
            "no gradient",
        )
    )

    print(
        f"N = {args.n:.0e} {args.dtype} points, K = {args.k}, "
        f"median of {r} round-robin runs after jit warm-up"
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
    t_inverse = t_finders[0]  # hybrid, the default
    print(f"\ninverse / forward = {t_inverse / t_forward:.2f}   (target ≤ 3)")
    print(f"inverse+grad / inverse = {t_vg / t_inverse:.2f}   (target ≤ 1.5)")
    print(f"forward / naive forward = {t_forward / t_naive:.2f}   (target ≤ 1.6)")
    if not args.skip_shapes:
        shape_table(args, dtype, rng)


def shape_table(args, dtype, rng):
    """Forward, inverse and value_and_grad for the three parameter shapes."""
    n, k, d = args.n - args.n % args.dims, args.k, args.dims

    def mixture(batch):
        logits = rng.normal(size=(*batch, k))
        means = rng.normal(size=(*batch, k)) * 2.0
        log_scales = rng.normal(size=(*batch, k)) * 0.3 - 0.5
        return tuple(jnp.asarray(p, dtype) for p in (logits, means, log_scales))

    cases = {
        "shared [K] on [N]": ((), (n,)),
        f"per-dimension [{d}, K] on [N/{d}, {d}]": ((d,), (n // d, d)),
        "per-element [N, K] on [N]": ((n,), (n,)),
    }

    def inverse_loss(b, v):
        x_hat, log_det = b.inverse_and_log_det(v)
        return jnp.mean(jnp.square(x_hat)) - jnp.mean(log_det)

    forward = jax.jit(lambda b, v: b.forward_and_log_det(v))
    inverse = jax.jit(lambda b, v: b.inverse_and_log_det(v))
    value_and_grad = jax.jit(jax.value_and_grad(inverse_loss))
    naive = jax.jit(
        lambda p, v: naive_forward_and_log_det(
            v, (jax.nn.log_softmax(p[0], axis=-1), p[1], p[2])
        )
    )
    calls, labels = [], []
    for label, (param_batch, value_shape) in cases.items():
        params = mixture(param_batch)
        bijector = MixtureGaussianCDF(*params)
        x = jnp.asarray(rng.normal(size=value_shape) * 2.0, dtype)
        y = jnp.asarray(rng.normal(size=value_shape), dtype)
        labels.append(label)
        calls += [
            (naive, (params, x)),
            (forward, (bijector, x)),
            (inverse, (bijector, y)),
            (value_and_grad, (bijector, y)),
        ]
    times = round_robin_medians(calls, repeats=args.repeats)
    print(f"\nParameter shapes, N = {n:.0e} elements, K = {k}, {args.dtype}\n")
    print(
        "| parameters | naive ms | forward ms | inverse ms | value_and_grad ms "
        "| fwd/naive (≤ 1.6) | inv/fwd (≤ 3) | vg/inv (≤ 1.5) "
        "| fwd / shared fwd | inv / shared inv |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    shared_forward, shared_inverse = times[1], times[2]
    for i, label in enumerate(labels):
        t_naive, t_fwd, t_inv, t_vg = times[4 * i : 4 * i + 4]
        print(
            f"| {label} | {t_naive * 1e3:.1f} | {t_fwd * 1e3:.1f} | "
            f"{t_inv * 1e3:.1f} | {t_vg * 1e3:.1f} | {t_fwd / t_naive:.2f} | "
            f"{t_inv / t_fwd:.2f} | {t_vg / t_inv:.2f} | "
            f"{t_fwd / shared_forward:.2f} | {t_inv / shared_inverse:.2f} |"
        )


if __name__ == "__main__":
    main()
