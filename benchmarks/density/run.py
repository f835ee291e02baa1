"""Density-estimation benchmark: our deep flows against flowjax's.

Trains, with fixed seeds and a train/validation/test split, on

* six 2-D densities from the flow literature (FFJORD's toy generators: two
  moons, 8 Gaussians, checkerboard, pinwheel, two spirals, rings), and
* tabular data shipped with scikit-learn (no download): diabetes (10-D, the
  binary column dequantised) and breast cancer (30-D); digits (64-D, integer
  pixels dequantised with uniform noise) with ``--datasets digits``,

the models

* ``RBIG``: our Gaussianization flow after the greedy, gradient-free init only;
* ``GF``: the same flow after joint maximum-likelihood fine-tuning (``fit``);
* ``MixCDF coupling``: our coupling flow (mixture-CDF couplings, MLP conditioner);
* ``flowjax RQ-NSF``: flowjax's coupling flow with rational-quadratic splines;
* ``flowjax MAF``: flowjax's masked autoregressive flow (affine),

all standardised with the training statistics; every trained model gets the
same optimiser (Adam, lr 1e-3), the same number of steps, the same minibatch
size and validation-based restore-best (the budget is matched by *steps*).
Parameter counts are printed and written to the table. Writes
``results.md``, ``results.json`` and PNG figures next to this file.

    python benchmarks/density/run.py            # full (~20 min on 2 busy cores)
    python benchmarks/density/run.py --quick    # 2 datasets, few steps
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import paramax
from flowjax import bijections as fjb
from flowjax import distributions as fjd
from flowjax import flows as fjf

from distrax_mixcdf import coupling_flow, fit, gaussianization_flow

HERE = Path(__file__).resolve().parent
TOY = ("moons", "8gaussians", "checkerboard", "pinwheel", "2spirals", "rings")
TABULAR = ("diabetes", "breast_cancer", "digits")  # digits: only with --datasets
MODELS = ("RBIG", "GF", "MixCDF coupling", "flowjax RQ-NSF", "flowjax MAF")


# -- data -------------------------------------------------------------------------


def toy_data(name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """FFJORD's 2-D generators (Grathwohl et al. 2019, ``toy_data.py``)."""
    if name == "moons":
        t = rng.uniform(0, np.pi, n)
        upper = rng.random(n) < 0.5
        x = np.where(upper, np.cos(t), 1 - np.cos(t))
        y = np.where(upper, np.sin(t), 0.5 - np.sin(t))
        data = np.stack([x, y], 1) + rng.normal(scale=0.1, size=(n, 2))
        return data * 2 + np.array([-1, -0.2])
    if name == "8gaussians":
        centers = [(np.cos(a), np.sin(a)) for a in np.arange(8) * np.pi / 4]
        centers = 4 * np.array(centers)
        return (
            centers[rng.integers(0, 8, n)] + rng.normal(scale=0.5, size=(n, 2))
        ) / 1.414
    if name == "checkerboard":
        x1 = rng.random(n) * 4 - 2
        x2 = rng.random(n) - rng.integers(0, 2, n) * 2
        x2 = x2 + (np.floor(x1) % 2)
        return np.stack([x1, x2], 1) * 2
    if name == "pinwheel":
        radial_std, tangential_std, classes, rate = 0.3, 0.1, 5, 0.25
        angles = np.linspace(0, 2 * np.pi, classes, endpoint=False)
        feats = rng.normal(size=(n, 2)) * np.array([radial_std, tangential_std])
        feats[:, 0] += 1.0
        labels = rng.integers(0, classes, n)
        rads = angles[labels] + rate * np.exp(feats[:, 0])
        rot = np.stack([np.cos(rads), -np.sin(rads), np.sin(rads), np.cos(rads)], 1)
        return 2 * np.einsum("ti,tij->tj", feats, rot.reshape(-1, 2, 2))
    if name == "2spirals":
        m = np.sqrt(rng.random(n // 2)) * 540 * (2 * np.pi) / 360
        d1x = -np.cos(m) * m + rng.random(n // 2) * 0.5
        d1y = np.sin(m) * m + rng.random(n // 2) * 0.5
        x = np.vstack([np.stack([d1x, d1y], 1), np.stack([-d1x, -d1y], 1)]) / 3
        return x + rng.normal(size=x.shape) * 0.1
    if name == "rings":
        radii = np.array([4, 3, 2, 1])
        which = rng.integers(0, 4, n)
        angle = rng.uniform(0, 2 * np.pi, n)
        x = np.stack([np.cos(angle), np.sin(angle)], 1) * radii[which, None] / 1.5
        return x + rng.normal(scale=0.08, size=x.shape)
    raise ValueError(name)


def tabular_data(name: str, rng: np.random.Generator) -> np.ndarray:
    """scikit-learn's bundled data; discrete columns dequantised uniformly."""
    from sklearn import datasets

    loader = {
        "diabetes": datasets.load_diabetes,
        "breast_cancer": datasets.load_breast_cancer,
        "digits": datasets.load_digits,
    }[name]
    x = np.asarray(loader().data, np.float64)
    for j in range(x.shape[1]):
        values = np.unique(x[:, j])
        if len(values) <= 20:  # a discrete column: spread over the gap width
            gap = np.min(np.diff(values)) if len(values) > 1 else 1.0
            x[:, j] = x[:, j] + rng.random(len(x)) * gap
    return x


def split(x: np.ndarray, rng: np.random.Generator, fractions=(0.6, 0.2)):
    """Shuffled train/validation/test split, standardised by train statistics."""
    x = x[rng.permutation(len(x))]
    n_train, n_val = int(fractions[0] * len(x)), int(fractions[1] * len(x))
    train, val, test = np.split(x, [n_train, n_train + n_val])
    mean, std = train.mean(0), train.std(0)
    std = np.where(std > 0, std, 1.0)
    return [((p - mean) / std).astype(np.float32) for p in (train, val, test)]


# -- models -------------------------------------------------------------------------


def count(tree) -> int:
    return int(sum(np.size(a) for a in jax.tree_util.tree_leaves(tree)))


def flowjax_params(dist):
    return eqx.partition(
        dist,
        eqx.is_inexact_array,
        is_leaf=lambda leaf: isinstance(leaf, paramax.NonTrainable),
    )


def flowjax_model(kind: str, key, dim: int, target: int, layers: int, knots: int):
    """A flowjax flow whose trainable parameter count is closest to ``target``."""
    best = None
    for width in (8, 16, 24, 32, 48, 64, 96, 128, 192, 256):
        base = fjd.Normal(jnp.zeros(dim))
        if kind == "rqs":
            dist = fjf.coupling_flow(
                key,
                base_dist=base,
                transformer=fjb.RationalQuadraticSpline(knots=knots, interval=4),
                flow_layers=layers,
                nn_width=width,
            )
        else:
            dist = fjf.masked_autoregressive_flow(
                key, base_dist=base, flow_layers=layers, nn_width=width
            )
        n = count(flowjax_params(dist)[0])
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (dist, n, width)
    return best


_STEP_CACHE: dict = {}


def train_flowjax(dist, train, val, steps, batch, lr, key, eval_every):
    """Adam on minibatches drawn like ``fit`` (uniform with replacement)."""
    params, static = flowjax_params(dist)
    optimizer = _STEP_CACHE.setdefault(("opt", lr), optax.adam(lr))

    def loss(p, x):
        return -jnp.mean(paramax.unwrap(eqx.combine(p, static)).log_prob(x))

    @eqx.filter_jit
    def step(p, state, k, data):
        idx = jax.random.randint(k, (batch,), 0, data.shape[0])
        value, grads = eqx.filter_value_and_grad(loss)(p, data[idx])
        updates, state = optimizer.update(grads, state, p)
        return eqx.apply_updates(p, updates), state, value

    eval_loss = eqx.filter_jit(loss)
    state = optimizer.init(params)
    best = (float(eval_loss(params, val)), params)
    keys = jax.random.split(key, steps)
    for i in range(steps):
        params, state, _ = step(params, state, keys[i], train)
        if (i + 1) % eval_every == 0 or i + 1 == steps:
            value = float(eval_loss(params, val))
            if value < best[0]:
                best = (value, params)
    return paramax.unwrap(eqx.combine(best[1], static))


def timed(fn, *args, repeats=3):
    out = jax.block_until_ready(fn(*args))  # warm-up / compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


@jax.jit
def _ours_sample(model, key):
    return model.sample(seed=key, sample_shape=(SAMPLE_N,))


@jax.jit
def _ours_log_prob(model, x):
    return model.log_prob(x)


@eqx.filter_jit
def _fj_sample(dist, key):
    return dist.sample(key, (SAMPLE_N,))


@eqx.filter_jit
def _fj_log_prob(dist, x):
    return dist.log_prob(x)


SAMPLE_N = 10_000


def run_dataset(name, data, cfg, key, grid=None):
    train, val, test = data
    dim = train.shape[1]
    results, densities = {}, {}
    batch = min(cfg["batch"], len(train))
    optimizer = _STEP_CACHE.setdefault(("opt", cfg["lr"]), optax.adam(cfg["lr"]))
    k_coupling, k_rqs, k_maf, k_fit, k_sample = jax.random.split(key, 5)
    k_rqs, k_maf = jax.random.wrap_key_data(k_rqs), jax.random.wrap_key_data(k_maf)

    def record(label, model, seconds, flowjax=False, n_params=None):
        log_prob = _fj_log_prob if flowjax else _ours_log_prob
        sampler = _fj_sample if flowjax else _ours_sample
        nll = -float(jnp.mean(log_prob(model, jnp.asarray(test)))) / dim
        sample_key = jax.random.key(0) if flowjax else k_sample  # flowjax: typed keys
        sample_s, samples = timed(sampler, model, sample_key)
        finite = float(np.mean(np.all(np.isfinite(np.asarray(samples)), axis=1)))
        results[label] = {
            "nll_per_dim": nll,
            "train_s": seconds,
            "samples_per_s": SAMPLE_N / sample_s,
            "finite_samples": finite,
            "params": count(model) if n_params is None else n_params,
        }
        if grid is not None:
            densities[label] = np.exp(np.asarray(log_prob(model, grid)))
        print(
            f"  {label:16s} test NLL/dim {nll:8.4f}  train {seconds:6.1f}s  "
            f"{SAMPLE_N / sample_s:9.0f} samples/s  params {results[label]['params']}",
            flush=True,
        )

    fit_kwargs = dict(
        steps=cfg["steps"],
        batch_size=batch,
        key=k_fit,
        validation_data=val,
        eval_every=cfg["eval_every"],
        show_progress=False,
    )
    # Gaussianization flow: greedy RBIG init (no gradients), then joint fine-tuning.
    t0 = time.perf_counter()
    small = dim > 2  # the tabular sets: few hundred points, regularise the greedy fit
    gf = gaussianization_flow(
        train,
        cfg["gf_layers_tab" if small else "gf_layers"],
        cfg["gf_components_tab" if small else "gf_components"],
        method="em",
        rotation="householder",
        init_options={"min_scale": cfg["gf_min_scale_tab"]} if small else None,
    )
    greedy_s = time.perf_counter() - t0
    record("RBIG", gf, greedy_s)
    t0 = time.perf_counter()
    tuned = fit(gf, train, optimizer, **fit_kwargs).model
    record("GF", tuned, greedy_s + time.perf_counter() - t0)

    t0 = time.perf_counter()
    cf = coupling_flow(
        k_coupling,
        dim,
        num_layers=cfg["cp_layers"],
        num_components=cfg["cp_components"],
        hidden_sizes=cfg["cp_hidden"],
        data=train,
        method="em",
    )
    cf = fit(cf, train, optimizer, **fit_kwargs).model
    record("MixCDF coupling", cf, time.perf_counter() - t0)

    target = count(cf)
    for label, kind, k in (
        ("flowjax RQ-NSF", "rqs", k_rqs),
        ("flowjax MAF", "maf", k_maf),
    ):
        dist, n_params, width = flowjax_model(
            kind, k, dim, target, cfg["fj_layers"], cfg["fj_knots"]
        )
        t0 = time.perf_counter()
        trained = train_flowjax(
            dist,
            jnp.asarray(train),
            jnp.asarray(val),
            cfg["steps"],
            batch,
            cfg["lr"],
            k_fit,
            cfg["eval_every"],
        )
        record(
            label, trained, time.perf_counter() - t0, flowjax=True, n_params=n_params
        )
        results[label]["nn_width"] = width
    return results, densities


# -- output -------------------------------------------------------------------------


def write_table(all_results, cfg, wall, path, suffix):
    lines = [
        "# Density-estimation benchmark",
        "",
        "Generated by `python benchmarks/density/run.py"
        + (" --quick" if cfg["quick"] else "")
        + f"` in {wall / 60:.1f} min on {platform.machine()} CPU "
        f"({os.cpu_count()} cores, shared with other jobs), jax {jax.__version__}.",
        "",
        "Held-out **test NLL in nats per dimension** (lower is better) on data "
        "standardised with the training mean and std. Split 60/20/20 (2-D: "
        f"{cfg['n_toy']} points generated per dataset), fixed seeds. "
        f"**Budget matched by optimiser steps**: every trained model gets "
        f"{cfg['steps']} Adam steps (lr {cfg['lr']}) on minibatches of "
        f"{cfg['batch']} and returns its best-validation parameters (checked every "
        f"{cfg['eval_every']} steps). RBIG is the GF's greedy, gradient-free "
        "initialisation before any step; GF = RBIG + joint fine-tuning. Best per "
        "row in bold.",
        "",
        "| dataset | D | " + " | ".join(MODELS) + " |",
        "|---|---|" + "---|" * len(MODELS),
    ]
    for name, res in all_results.items():
        best = min(res[m]["nll_per_dim"] for m in MODELS)
        cells = []
        for m in MODELS:
            v = res[m]["nll_per_dim"]
            cells.append(f"**{v:.3f}**" if v == best else f"{v:.3f}")
        lines.append(f"| {name} | {res['_dim']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Parameter counts (trainable scalars; flowjax's hidden width chosen so its "
        "count is closest to our coupling flow's), training wall-clock seconds "
        "(the first dataset of each dimension includes jit compilation; RBIG = "
        "greedy init time; GF includes it) and sampling speed (samples/s, "
        f"{SAMPLE_N} samples per jitted call, median of 3 after warm-up):",
        "",
        "| dataset | model | params | train s | samples/s |",
        "|---|---|---|---|---|",
    ]
    for name, res in all_results.items():
        for m in MODELS:
            r = res[m]
            lines.append(
                f"| {name} | {m} | {r['params']} | {r['train_s']:.1f} | "
                f"{r['samples_per_s']:.0f} |"
            )
    gains = [
        (name, res["RBIG"]["nll_per_dim"] - res["GF"]["nll_per_dim"], res["_dim"])
        for name, res in all_results.items()
    ]
    lines += [
        "",
        "Joint fine-tuning gain over greedy RBIG (nats per dimension; × D for nats "
        "per point): "
        + ", ".join(f"{n} {g:.3f} ({g * d:.2f} per point)" for n, g, d in gains)
        + ".",
        "",
        "Configuration: " + json.dumps({k: v for k, v in cfg.items() if k != "quick"}),
        "",
        f"![learned 2-D densities](density_2d{suffix}.png)",
        "",
        f"![test NLL per dataset](nll_bars{suffix}.png)",
        "",
    ]
    path.write_text("\n".join(lines))


def plot_densities(toy_sets, densities, grid_side, lim, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(densities)
    cols = ["data", *MODELS]
    fig, axes = plt.subplots(
        len(names),
        len(cols),
        figsize=(2.1 * len(cols), 2.1 * len(names)),
        squeeze=False,
    )
    for i, name in enumerate(names):
        for j, col in enumerate(cols):
            ax = axes[i, j]
            if col == "data":
                ax.hist2d(
                    *toy_sets[name].T,
                    bins=grid_side,
                    range=[[-lim, lim]] * 2,
                    cmap="magma",
                )
            else:
                ax.imshow(
                    densities[name][col].reshape(grid_side, grid_side),
                    origin="lower",
                    extent=(-lim, lim, -lim, lim),
                    cmap="magma",
                )
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(col, fontsize=9)
            if j == 0:
                ax.set_ylabel(name, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_bars(all_results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(all_results)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(names)), 3.4))
    width = 0.8 / len(MODELS)
    for j, m in enumerate(MODELS):
        values = [all_results[n][m]["nll_per_dim"] for n in names]
        ax.bar(
            np.arange(len(names)) + (j - len(MODELS) / 2 + 0.5) * width,
            values,
            width,
            label=m,
        )
    ax.set_xticks(np.arange(len(names)), names, rotation=20, fontsize=8)
    ax.set_ylabel("test NLL (nats / dim)")
    ax.axhline(0, color="k", lw=0.5)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 datasets, 100 steps")
    parser.add_argument("--out", type=Path, default=HERE, help="output folder")
    parser.add_argument("--datasets", nargs="*", help="subset of dataset names")
    args = parser.parse_args(argv)
    cfg = dict(
        quick=args.quick,
        n_toy=5000,
        steps=100 if args.quick else 1500,
        batch=256,
        lr=1e-3,
        eval_every=50,
        gf_layers=8 if args.quick else 12,
        gf_components=16,
        gf_layers_tab=8,
        gf_components_tab=4,
        gf_min_scale_tab=0.1,
        cp_layers=8,
        cp_components=8,
        cp_hidden=[32],
        fj_layers=8,
        fj_knots=8,
    )
    default = [*TOY, "diabetes", "breast_cancer"]
    names = args.datasets or (["moons", "breast_cancer"] if args.quick else default)
    args.out.mkdir(parents=True, exist_ok=True)
    lim, side = 3.0, 100
    axis = np.linspace(-lim, lim, side, dtype=np.float32)
    grid = jnp.asarray(np.stack(np.meshgrid(axis, axis), -1).reshape(-1, 2))

    start = time.perf_counter()
    all_results, all_densities, toy_sets = {}, {}, {}
    for i, name in enumerate(names):
        rng = np.random.default_rng(1000 + i)
        if name in TOY:
            data = split(toy_data(name, cfg["n_toy"], rng), rng)
            toy_sets[name] = data[2]
        else:
            data = split(tabular_data(name, rng), rng)
        print(f"{name}: D={data[0].shape[1]}, N={[len(d) for d in data]}", flush=True)
        res, dens = run_dataset(
            name, data, cfg, jax.random.PRNGKey(i), grid if name in TOY else None
        )
        res["_dim"] = data[0].shape[1]
        all_results[name] = res
        if dens:
            all_densities[name] = dens
    wall = time.perf_counter() - start
    suffix = "_quick" if args.quick else ""
    (args.out / f"results{suffix}.json").write_text(
        json.dumps({"config": cfg, "wall_s": wall, "results": all_results}, indent=1)
    )
    write_table(all_results, cfg, wall, args.out / f"results{suffix}.md", suffix)
    if all_densities:
        path = args.out / f"density_2d{suffix}.png"
        plot_densities(toy_sets, all_densities, side, lim, path)
    plot_bars(all_results, args.out / f"nll_bars{suffix}.png")
    print(f"total {wall / 60:.1f} min", file=sys.stderr)


if __name__ == "__main__":
    main()
