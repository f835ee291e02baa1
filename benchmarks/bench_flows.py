"""Scoring and sampling throughput of our flows against flowjax's, side by side.

Run:  python benchmarks/bench_flows.py [--n 100000] [--dims 2 8] [--repeats 5]

For each dimension ``D`` it builds, untrained (throughput does not depend on
the fitted values, only on shapes and depth):

* ``GF``: our Gaussianization flow, 12 layers (``[D, K]`` marginals and
  Householder rotations), initialised greedily on standard-normal data;
* ``coupling``: our coupling flow, 8 layers, MLP conditioners (32, 32);
* ``autoregressive``: our MADE flow, 8 layers, hidden (32, 32);
* flowjax's ``coupling_flow`` with rational-quadratic splines (8 layers,
  8 knots, its default conditioner) and its ``masked_autoregressive_flow``
  (affine, 8 layers).

All mixtures have K = 8 components. ``log_prob`` and ``sample`` of ``--n``
points are each one jitted call; every row runs once per round, in turn,
after a warm-up, and reports the median over ``--repeats`` rounds. Ratios to
flowjax's RQ-NSF are the figures to compare across machines.
"""

from __future__ import annotations

import argparse
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from flowjax import bijections as fjb
from flowjax import distributions as fjd
from flowjax import flows as fjf

import distrax_mixcdf as dm


def round_robin(calls, repeats):
    """Median seconds of each zero-argument call, timed in turn after a warm-up."""
    for call in calls:
        jax.block_until_ready(call())
    times = [[] for _ in calls]
    for _ in range(repeats):
        for call, row in zip(calls, times):
            start = time.perf_counter()
            jax.block_until_ready(call())
            row.append(time.perf_counter() - start)
    return [statistics.median(row) for row in times]


def models(dim, key):
    """``{name: (log_prob(x), sample(key))}`` closures for every model at ``dim``."""
    keys = jax.random.split(key, 5)
    data = np.asarray(jax.random.normal(keys[0], (2_000, dim)))
    ours = {
        "GF (12 layers)": dm.gaussianization_flow(data, num_layers=12, key=keys[1]),
        "coupling (8 layers)": dm.coupling_flow(keys[2], dim, num_layers=8),
        "autoregressive (8 layers)": dm.autoregressive_flow(keys[3], dim, num_layers=8),
    }
    base = fjd.Normal(jnp.zeros(dim))
    theirs = {
        "flowjax RQ-NSF (8 layers)": fjf.coupling_flow(
            keys[4],
            base_dist=base,
            transformer=fjb.RationalQuadraticSpline(knots=8, interval=4),
        ),
        "flowjax MAF (8 layers)": fjf.masked_autoregressive_flow(
            keys[4], base_dist=base
        ),
    }
    out = {}
    for name, flow in ours.items():
        out[name] = (
            jax.jit(lambda f, x: f.log_prob(x)),
            jax.jit(
                lambda f, k, n: f.sample(seed=k, sample_shape=(n,)), static_argnums=2
            ),
            flow,
        )
    for name, dist in theirs.items():
        # flowjax models hold non-array leaves: equinox's filtered jit.
        out[name] = (
            eqx.filter_jit(lambda d, x: d.log_prob(x)),
            eqx.filter_jit(lambda d, k, n: d.sample(k, (n,))),
            dist,
        )
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(
        f"jax {jax.__version__}, backend {jax.default_backend()}, N = {args.n:.0e}, "
        f"K = 8, float32, median of {args.repeats} round-robin runs\n"
    )
    print(
        "| D | model | log_prob /s | sample /s | log_prob vs RQ-NSF "
        "| sample vs RQ-NSF |"
    )
    print("|---:|---|---:|---:|---:|---:|")
    for dim in args.dims:
        built = models(dim, jax.random.key(dim))
        x = jax.random.normal(jax.random.key(1), (args.n, dim))
        key = jax.random.key(2)
        calls = []
        for log_prob, sample, model in built.values():
            calls.append(lambda lp=log_prob, m=model, x=x: lp(m, x))
            calls.append(lambda s=sample, m=model, k=key, n=args.n: s(m, k, n))
        times = round_robin(calls, args.repeats)
        rates = {
            name: (args.n / times[2 * i], args.n / times[2 * i + 1])
            for i, name in enumerate(built)
        }
        reference = rates["flowjax RQ-NSF (8 layers)"]
        for name, (score, draw) in rates.items():
            print(
                f"| {dim} | {name} | {score:,.0f} | {draw:,.0f} | "
                f"{score / reference[0]:.2f} | {draw / reference[1]:.2f} |"
            )


if __name__ == "__main__":
    main()
