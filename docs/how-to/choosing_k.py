# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # Choose the number of components K
#
# `K` trades fit for cost. The forward evaluates every component at every
# point, so its cost grows linearly in $K$; the fit (held-out log-likelihood)
# improves quickly and then saturates. The practical recipe: fit EM warm
# starts for a few $K$ on a training split, score them on held-out data, and
# take the smallest $K$ near the plateau. This page runs that recipe on two
# one-dimensional samples and measures the cost side.
#
# The held-out score is the mean log-density from the change of variables,
# $\frac{1}{N}\sum_n \log\varphi(T(x_n)) + \log T'(x_n)$, i.e. the mixture's
# mean log-likelihood.

# %%
import os
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from jax.scipy.stats import norm

import distrax_mixcdf as dm

SMALL = os.environ.get("MIXCDF_TUTORIAL_SMALL") == "1"  # CI runs the quick version
N = 4_000 if SMALL else 20_000
N_TIMING = 20_000 if SMALL else 1_000_000
KS = (1, 4) if SMALL else (1, 2, 4, 8, 16, 32)
COST_KS = (8,) if SMALL else (2, 8, 32)

rng = np.random.default_rng(3)
n_gamma = int(0.7 * N)
samples = {
    "skewed + bimodal": np.concatenate(
        [rng.gamma(2.0, 1.0, n_gamma), rng.normal(7.0, 0.6, N - n_gamma)]
    ),
    "Student-t, 3 dof": rng.standard_t(3.0, N),
}


@jax.jit
def mean_log_density(layer, x):
    y, log_det = layer.forward_and_log_det(x)
    return jnp.mean(norm.logpdf(y) + log_det)


scores = {name: [] for name in samples}
print(f"{'K':>3} | " + " | ".join(f"{name:>22}" for name in samples))
for k in KS:
    row = []
    for name, data in samples.items():
        data = rng.permutation(data).astype(np.float32)
        train, test = data[: N // 2], data[N // 2 :]
        fitted = dm.MixtureGaussianCDF.from_data(train, k, method="em")
        score = float(mean_log_density(fitted, jnp.asarray(test)))
        scores[name].append(score)
        row.append(f"{score:22.4f}")
    print(f"{k:>3} | " + " | ".join(row))

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
for ax, (name, values) in zip(axes, scores.items()):
    ax.plot(KS, values, "o-", color="tab:blue")
    ax.set(
        title=name,
        xlabel="K (log scale)",
        ylabel="held-out mean log-likelihood",
        xscale="log",
        xticks=KS,
        xticklabels=[str(k) for k in KS],
    )
    ax.grid(alpha=0.3)
fig.tight_layout()

# %% [markdown]
# (The quick version CI runs fits only $K = 1$ and $4$; the full run sweeps
# $K = 1 \ldots 32$.) Both curves rise steeply over the first few components
# and then flatten;
# past the plateau, extra components buy little held-out likelihood and, with
# a small training split, can even lose some (overfitting).
#
# ## The cost side
#
# Forward (`forward_and_log_det`) and inverse (`inverse_and_log_det`) time on
# float32 standard-normal data, one shared parameter set, median of five runs
# after a warm-up (compile) call, measured in this run:


# %%
def median_ms(fn, *args, repeats=5):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(1e3 * (time.perf_counter() - start))
    return float(np.median(times))


forward = jax.jit(lambda b, x: b.forward_and_log_det(x))
inverse = jax.jit(lambda b, y: b.inverse_and_log_det(y))
x = jax.random.normal(jax.random.key(0), (N_TIMING,), jnp.float32)
print(f"N = {N_TIMING}")
print(f"{'K':>3} | {'forward ms':>10} | {'inverse ms':>10} | forward ms / K")
base = None
for k in COST_KS:
    layer = dm.MixtureGaussianCDF(
        jnp.zeros(k), jnp.linspace(-2.0, 2.0, k), jnp.full(k, -0.5)
    )
    f_ms, i_ms = median_ms(forward, layer, x), median_ms(inverse, layer, x)
    print(f"{k:>3} | {f_ms:10.2f} | {i_ms:10.2f} | {f_ms / k:.3f}")

# %% [markdown]
# At a million points the forward's time grows with $K$ (sublinearly at
# small $K$, where the per-point work that does not depend on $K$, such as the
# final `ndtri`, still weighs in); at small sizes, fixed per-call overheads
# dominate instead. The inverse's cost depends more on the mixture's shape
# than on $K$: in the full run the two-component mixture here (two separated
# bumps with a flat stretch between them) was the slowest to invert, as the
# hard mixture of [tutorial 04](../tutorials/04_inversion_strategies.md) was.
#
# ## Rules of thumb
#
# - Start with $K = 8$ per dimension for a marginal layer and check the
#   held-out likelihood at $K = 4$ and $16$; go higher only if it still
#   improves.
# - Inside a deep flow (several layers with rotations or couplings between
#   them), each layer needs fewer components: the stack, not one layer, models
#   the structure.
# - Heavy tails do not need many components: the layer is exact in the tails
#   for any $K$, and far out $y \approx (x - \mu_k)/\sigma_k$ for the widest
#   component on that side, so one wide component covers a tail.
# - The cost is per component and per point: a coupling layer whose
#   conditioner emits `[..., D, 3K]` parameters pays $K$ for every point and
#   dimension.
