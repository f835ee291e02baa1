"""Conditional density benchmark with a known answer: ours against flowjax's.

How to run (from the repository root, after ``pip install -e ".[bench]"``)::

    python benchmarks/conditional/run.py            # full run
    python benchmarks/conditional/run.py --quick    # few steps, fewer rows

Writes ``results.md``, ``results.json`` and the figure ``gaps.png`` next to
this file (``--quick`` adds a ``_quick`` suffix; ``--out`` elsewhere).

**Tasks.** Every task has a true conditional density in closed form, so a
model's held-out conditional NLL can be compared with the truth's on the same
rows; the difference is the expected KL divergence from the truth to the
model, :math:`E_c\\,\\mathrm{KL}(p(\\cdot\\mid c)\\,\\|\\,q(\\cdot\\mid c))`,
in nats (per example, not per dimension).

* ``mixture-1d``: :math:`c \\sim U(-1, 1)`; :math:`x \\mid c` is a two-part
  mixture, weight :math:`s(3c)` on :math:`\\mathcal N(2c, 0.2^2)` and the
  rest on a skew-normal (shape 4) at :math:`c^2 - 1` with scale
  :math:`0.1 + 0.3|c|`: heteroscedastic, bimodal in the middle, skewed.
* ``linear-gaussian-6d``: the posterior :math:`p(\\theta \\mid x)` of a linear
  simulator, :math:`\\theta \\sim \\mathcal N(0, I_6)`,
  :math:`x = A\\theta + \\varepsilon`, :math:`\\varepsilon \\sim
  \\mathcal N(0, 0.5^2 I_6)`, a fixed random :math:`A`. The posterior is
  Gaussian with covariance :math:`(I + A^\\top A / \\sigma^2)^{-1}` and a mean
  linear in :math:`x` (the context); the flows learn :math:`\\theta` given
  :math:`x`.
* ``ring-2d``: :math:`c \\sim U(-1, 1)`; :math:`x \\mid c` is uniform in
  angle on a ring whose radius is log-normal with median :math:`1.5 + c` and
  log-scale :math:`0.05 + 0.15|c|`, so
  :math:`p(x \\mid c) = p_r(|x|) / (2\\pi |x|)`: a hole in the middle whose
  size and sharpness move with the context.

**Models**, every one trained at the same budget (Adam, lr 1e-3, the same
number of steps, minibatches of 256, restore-best on validation rows checked
every 50 steps): our ``coupling_flow`` and ``autoregressive_flow`` with
``context_dim`` (4 layers, K = 8, two hidden layers of 32), flowjax's
conditional ``coupling_flow`` with a rational-quadratic spline transformer
(RQ-NSF, 8 knots on [-4, 4]) and ``masked_autoregressive_flow`` (MAF,
affine), both with ``cond_dim`` and 4 layers, their hidden width chosen so
their parameter count is closest to our coupling flow's. Data and contexts are
used as simulated (the contexts are roughly standardised by construction).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import stats
from scipy.special import expit

import distrax_mixcdf as dm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: shared
from flowjax_peers import flowjax_model, train_flowjax

HERE = Path(__file__).resolve().parent
LAYERS, K, HIDDEN = 4, 8, (32, 32)
LR, BATCH, EVAL_EVERY = 1e-3, 256, 50


# -- tasks ---------------------------------------------------------------------------


class Mixture1D:
    """Heteroscedastic, bimodal and skewed p(x | c) with scalar x and c."""

    name, dim, context_dim = "mixture-1d", 1, 1

    def simulate(self, n, rng):
        c = rng.uniform(-1.0, 1.0, n)
        first = rng.uniform(size=n) < expit(3 * c)
        skewed = stats.skewnorm.rvs(
            4.0, loc=c**2 - 1, scale=0.1 + 0.3 * np.abs(c), random_state=rng
        )
        x = np.where(first, 2 * c + 0.2 * rng.normal(size=n), skewed)
        return x[:, None], c[:, None]

    def log_prob(self, x, c):
        x, c = x[:, 0], c[:, 0]
        w = expit(3 * c)
        return np.logaddexp(
            np.log(w) + stats.norm.logpdf(x, 2 * c, 0.2),
            np.log1p(-w)
            + stats.skewnorm.logpdf(x, 4.0, c**2 - 1, 0.1 + 0.3 * np.abs(c)),
        )


class LinearGaussian:
    """The posterior p(θ | x) of x = Aθ + ε: Gaussian, mean linear in x."""

    name, dim, context_dim = "linear-gaussian-6d", 6, 6
    noise = 0.5

    def __init__(self):
        rng = np.random.default_rng(123)
        self.a = rng.normal(size=(6, 6)) / np.sqrt(6)
        precision = np.eye(6) + self.a.T @ self.a / self.noise**2
        self.cov = np.linalg.inv(precision)
        self.gain = self.cov @ self.a.T / self.noise**2  # mean = gain @ x

    def simulate(self, n, rng):
        theta = rng.normal(size=(n, 6))
        x = theta @ self.a.T + self.noise * rng.normal(size=(n, 6))
        return theta, x

    def log_prob(self, theta, x):
        mean = x @ self.gain.T
        return stats.multivariate_normal(np.zeros(6), self.cov).logpdf(theta - mean)


class Ring2D:
    """A 2-D ring whose radius and width depend on c: a hole no affine map makes."""

    name, dim, context_dim = "ring-2d", 2, 1

    @staticmethod
    def _radius(c):
        return 1.5 + c, 0.05 + 0.15 * np.abs(c)  # median radius, log-scale width

    def simulate(self, n, rng):
        c = rng.uniform(-1.0, 1.0, n)
        median, width = self._radius(c)
        r = median * np.exp(width * rng.normal(size=n))
        angle = rng.uniform(0.0, 2 * np.pi, n)
        return np.stack([r * np.cos(angle), r * np.sin(angle)], -1), c[:, None]

    def log_prob(self, x, c):
        # Polar change of variables: p(x) = p(r) / (2π r), r = |x|.
        median, width = self._radius(c[:, 0])
        r = np.hypot(x[:, 0], x[:, 1])
        return stats.lognorm.logpdf(r, width, scale=median) - np.log(2 * np.pi * r)


TASKS = (Mixture1D(), LinearGaussian(), Ring2D())


# -- models --------------------------------------------------------------------------


def train_ours(flow, data, steps, key):
    (x, c), (x_val, c_val) = data
    return dm.fit(
        flow,
        x,
        optax.adam(LR),
        context=c,
        validation_data=x_val,
        validation_context=c_val,
        steps=steps,
        batch_size=BATCH,
        eval_every=EVAL_EVERY,
        key=key,
        show_progress=False,
    ).model


@eqx.filter_jit
def _fj_log_prob(dist, x, c):
    return dist.log_prob(x, condition=c)


@jax.jit
def _ours_log_prob(flow, x, c):
    return flow.log_prob(x, c)


# -- the run -------------------------------------------------------------------------


def run_task(task, steps, n_train, n_test, seed):
    rng = np.random.default_rng(seed)
    data = [
        tuple(np.asarray(a, np.float32) for a in task.simulate(n, rng))
        for n in (n_train, n_train // 5, n_test)
    ]
    train, val, (x_test, c_test) = data
    true_nll = float(-np.mean(task.log_prob(x_test.astype(np.float64), c_test)))
    key = jax.random.PRNGKey(seed)
    rows = []
    builders = {
        "ours coupling": dm.coupling_flow,
        "ours autoregressive": dm.autoregressive_flow,
    }
    target = None
    for label, builder in builders.items():
        start = time.perf_counter()
        flow = builder(
            key,
            task.dim,
            context_dim=task.context_dim,
            num_layers=LAYERS,
            num_components=K,
            hidden_sizes=HIDDEN,
        )
        target = target or flow.num_params
        model = train_ours(flow, (train, val), steps, key)
        seconds = time.perf_counter() - start
        nll = float(-jnp.mean(_ours_log_prob(model, x_test, c_test)))
        rows.append((label, flow.num_params, nll, seconds))
    for label, kind in (("flowjax RQ-NSF", "rqs"), ("flowjax MAF", "maf")):
        start = time.perf_counter()
        dist, n_params, _ = flowjax_model(
            kind,
            jax.random.key(seed),
            task.dim,
            target,
            layers=LAYERS,
            context_dim=task.context_dim,
            widths=(8, 16, 24, 32, 48, 64, 96, 128),
        )
        model = train_flowjax(
            dist,
            train[0],
            val[0],
            steps=steps,
            batch=BATCH,
            optimizer=optax.adam(LR),
            key=jax.random.key(seed + 1),
            eval_every=EVAL_EVERY,
            context=train[1],
            val_context=val[1],
        )
        seconds = time.perf_counter() - start
        nll = float(-jnp.mean(_fj_log_prob(model, x_test, c_test)))
        rows.append((label, n_params, nll, seconds))
    return true_nll, rows


def render(results, steps, n_train):
    lines = [
        "# Conditional density benchmark",
        "",
        f"Held-out conditional NLL (nats per example) after {steps} Adam steps "
        f"(lr {LR}, batch {BATCH}, restore-best on validation rows), "
        f"{n_train} training rows; the gap is the model's NLL minus the true "
        "conditional density's on the same test rows (0 is a perfect fit).",
        "",
        "| task | model | parameters | test NLL | gap to truth | train s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for task, entry in results.items():
        true_nll = entry["true_nll"]
        lines.append(f"| {task} | truth | | {true_nll:.3f} | 0 | |")
        best = min(r["nll"] for r in entry["models"])
        for r in entry["models"]:
            gap = f"{r['nll'] - true_nll:.3f}"
            gap = f"**{gap}**" if r["nll"] == best else gap
            lines.append(
                f"| {task} | {r['model']} | {r['params']} | {r['nll']:.3f} | "
                f"{gap} | {r['seconds']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def figure(results, path):
    """Bar chart of every model's gap to the truth, one group per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results)
    models = [r["model"] for r in results[tasks[0]]["models"]]
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for i, model in enumerate(models):
        gaps = [
            next(r["nll"] for r in results[t]["models"] if r["model"] == model)
            - results[t]["true_nll"]
            for t in tasks
        ]
        positions = np.arange(len(tasks)) + (i - (len(models) - 1) / 2) * width
        ax.bar(positions, gaps, width, label=model)
    ax.set_xticks(np.arange(len(tasks)), tasks)
    ax.set_yscale("symlog", linthresh=1e-3)  # a gap can dip below 0 by noise
    ax.set_ylabel("gap to the true conditional NLL (nats)")
    ax.legend(fontsize=8, ncol=4, loc="lower center", bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few steps and rows")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    steps, n_train = (300, 2_000) if args.quick else (3_000, 10_000)
    results = {}
    for seed, task in enumerate(TASKS):
        true_nll, rows = run_task(task, steps, n_train, 10_000, seed)
        results[task.name] = {
            "true_nll": true_nll,
            "models": [
                dict(model=m, params=p, nll=nll, seconds=s) for m, p, nll, s in rows
            ],
        }
        for m, p, nll, seconds in rows:
            print(
                f"{task.name:<20} {m:<22} {p:>6} {nll:8.3f} "
                f"{nll - true_nll:7.3f} {seconds:6.0f}s"
            )
    suffix = "_quick" if args.quick else ""
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"results{suffix}.json").write_text(json.dumps(results, indent=1))
    (args.out / f"results{suffix}.md").write_text(render(results, steps, n_train))
    figure(results, args.out / f"gaps{suffix}.png")


if __name__ == "__main__":
    main()
