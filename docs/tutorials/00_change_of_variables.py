# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # 00 — Change of variables
#
# A normalizing flow models data $x$ through an invertible map $T$ to a latent
# $y = T(x)$ with a simple density, here the standard normal $\varphi$. The
# change-of-variables formula gives the density of the data:
#
# $$
# p_X(x) = \varphi\big(T(x)\big)\,\Big|\frac{dT}{dx}(x)\Big|,
# \qquad
# \log p_X(x) = \log\varphi(y) + \log\Big|\frac{dy}{dx}\Big| .
# $$
#
# `MixtureGaussianCDF` is the map $T(x) = \Phi^{-1}\big(F(x)\big)$ with
# $F(x) = \sum_k w_k \Phi\big((x-\mu_k)/\sigma_k\big)$ the CDF of a Gaussian
# mixture. Then $\Phi(T(x)) = F(x)$, and differentiating,
# $\varphi(y)\,T'(x) = f(x)$, the mixture density: **the density this layer
# assigns to data is exactly the mixture density.** This page checks that
# identity numerically, looks at the map, and samples through its inverse.
#
# What you will see
#
# - `forward_and_log_det` returns both terms of the formula ($y$ and
#   $\log|dy/dx|$), in closed form.
# - $\log\varphi(y) + \log|dy/dx|$ equals the mixture's log-density (checked
#   against `scipy.stats` in float64), and the log-det equals the log of the
#   autodiff derivative.
# - `dm.normalizing_flow` wraps the layer as a `distrax` distribution whose
#   `log_prob` is that sum and whose `sample` runs the inverse (a root find).

# %%
import os

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from jax.scipy.stats import norm
from scipy import stats

import distrax_mixcdf as dm

SMALL = os.environ.get("MIXCDF_TUTORIAL_SMALL") == "1"  # CI runs the quick version
N_SAMPLES = 5_000 if SMALL else 50_000

# A fixed three-component mixture: weights, means and scales.
weights = np.array([0.5, 0.3, 0.2])
means = np.array([-2.0, 0.5, 3.0])
scales = np.array([0.6, 1.0, 0.4])
layer = dm.MixtureGaussianCDF(
    logits=jnp.log(jnp.asarray(weights, jnp.float32)),
    means=jnp.asarray(means, jnp.float32),
    log_scales=jnp.log(jnp.asarray(scales, jnp.float32)),
)
print(layer)

# %% [markdown]
# ## 1. Both terms of the formula, in closed form
#
# The layer is elementwise (`event_ndims == 0`), so it maps an array of points
# to an array of latents and log-dets of the same shape.

# %%
# jit-compile what we call more than once: op-by-op (eager) dispatch of the
# layer's numerics is slower than compiling it.
forward_and_log_det = jax.jit(lambda b, x: b.forward_and_log_det(x))

x = jnp.linspace(-6.0, 6.0, 1001, dtype=jnp.float32)
y, log_det = forward_and_log_det(layer, x)
log_p = norm.logpdf(y) + log_det

# Independent float64 reference: the mixture density from scipy.
x64 = np.asarray(x, np.float64)
mixture_pdf = sum(
    w * stats.norm.pdf(x64, m, s) for w, m, s in zip(weights, means, scales)
)
print(
    f"max |log p(x) - log f_mixture(x)|      = "
    f"{np.max(np.abs(np.asarray(log_p) - np.log(mixture_pdf))):.2e}"
)

# The log-det is log T'(x): compare with the derivative from autodiff (the map
# is elementwise, so one forward-mode JVP with a tangent of ones gives T'(x)).
slope = jax.jit(lambda x: jax.jvp(layer.forward, (x,), (jnp.ones_like(x),))[1])(x)
print(
    f"max |log_det - log(dT/dx by autodiff)| = "
    f"{np.max(np.abs(np.asarray(log_det - jnp.log(slope)))):.2e}"
)

# %% [markdown]
# Both differences are at float32 rounding level: the layer's log-density *is*
# the mixture's. The map itself is monotone and maps the mixture's modes into
# the bulk of the standard normal; its slope is large where the data are dense
# and small in the gaps between components.

# %%
fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
axes[0].plot(x, y, color="tab:blue", lw=2)
axes[0].set(title=r"the map $y = T(x) = \Phi^{-1}(F(x))$", xlabel="x", ylabel="y")
axes[1].plot(x, np.exp(log_det), color="tab:green", lw=2)
axes[1].set(title=r"its slope $dT/dx$", xlabel="x", ylabel="dy/dx")
axes[2].plot(
    x64, mixture_pdf, color="black", lw=3, alpha=0.35, label="mixture pdf (scipy)"
)
axes[2].plot(
    x,
    np.exp(log_p),
    color="tab:red",
    lw=1.5,
    ls="--",
    label=r"$\varphi(T(x))\,|T'(x)|$",
)
axes[2].set(title="change of variables = mixture density", xlabel="x", ylabel="density")
axes[2].legend(fontsize=10)
for ax in axes:
    ax.grid(alpha=0.3)
fig.tight_layout()

# %% [markdown]
# ## 2. Gaussianizing data, and sampling through the inverse
#
# Data drawn from the mixture, pushed through $T$, should be standard normal.
# Going the other way, `normalizing_flow(layer)` is the density model
# `distrax.Transformed(N(0, 1), distrax.Inverse(layer))`: its `log_prob` runs
# the closed-form forward above, and its `sample` draws $y \sim \mathcal N(0,1)$
# and solves $T(x) = y$ by a root find.

# %%
rng = np.random.default_rng(0)
component = rng.choice(3, size=N_SAMPLES, p=weights)
data = jnp.asarray(rng.normal(means[component], scales[component]), jnp.float32)
latent, _ = forward_and_log_det(layer, data)
print(
    f"latent mean {float(jnp.mean(latent)):+.3f}, std {float(jnp.std(latent)):.3f}"
    f"  (standard normal: 0, 1)"
)
print(
    f"Kolmogorov-Smirnov statistic vs N(0, 1): "
    f"{stats.kstest(np.asarray(latent, np.float64), 'norm').statistic:.4f}"
)

flow = dm.normalizing_flow(layer)
sample = jax.jit(lambda key: flow.sample(seed=key, sample_shape=(N_SAMPLES,)))
samples = sample(jax.random.key(1))
print(
    f"flow.log_prob == log p above: max diff "
    f"{float(jnp.max(jnp.abs(flow.log_prob(x) - log_p))):.2e}"
)


def mixture_cdf(t):
    return sum(w * stats.norm.cdf(t, m, s) for w, m, s in zip(weights, means, scales))


ks = stats.kstest(np.asarray(samples, np.float64), mixture_cdf).statistic
print(f"KS statistic of flow samples vs the mixture CDF: {ks:.4f}")

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
grid = np.linspace(-4, 4, 200)
axes[0].hist(
    np.asarray(latent),
    bins=60,
    density=True,
    alpha=0.5,
    color="tab:blue",
    label="T(data)",
)
axes[0].plot(grid, stats.norm.pdf(grid), color="black", lw=2, label="N(0, 1)")
axes[0].set(title="data Gaussianized by the forward", xlabel="y")
axes[0].legend(fontsize=10)
axes[1].hist(
    np.asarray(samples),
    bins=80,
    density=True,
    alpha=0.5,
    color="tab:orange",
    label="flow.sample (root find)",
)
axes[1].plot(x64, mixture_pdf, color="black", lw=2, label="mixture pdf")
axes[1].set(title="samples through the inverse", xlabel="x")
axes[1].legend(fontsize=10)
for ax in axes:
    ax.grid(alpha=0.3)
fig.tight_layout()

# %% [markdown]
# The Gaussianized data match $\mathcal N(0, 1)$ and the samples match the
# mixture: forward and inverse are the same bijection, used in opposite
# directions. (The KS statistics above are at the level of sampling noise,
# about $1/\sqrt{N}$.)
#
# ## Recap
#
# | piece | formula | in code |
# |---|---|---|
# | map | $y = \Phi^{-1}(F(x))$ | `layer.forward(x)` |
# | log-density | $\log\varphi(y) + \log T'(x) = \log f(x)$ | `layer.forward_and_log_det(x)` |
# | density model | $x = T^{-1}(y)$, $y\sim\mathcal N(0,1)$ | `dm.normalizing_flow(layer)` |
#
# **Next:** [01 — Fitting a marginal](01_fitting_a_marginal.md) chooses the
# mixture parameters from data.
