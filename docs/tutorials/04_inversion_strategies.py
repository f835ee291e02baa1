# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
# ---

# %% [markdown]
# # 04 — Inversion strategies
#
# The forward map $y = T(x) = \Phi^{-1}(F(x))$ is closed form; its inverse is
# not. Sampling from the flow, or any objective that maps latents back to data,
# must solve
#
# $$
# T(x;\theta) = y \quad\text{for } x, \text{ elementwise}.
# $$
#
# $T$ is strictly increasing, so the root is unique, and it is bracketed in
# closed form: each component's CDF is at most $\Phi(y)$ at
# $\mu_k + \sigma_k y$ for the leftmost such point and at least $\Phi(y)$ at the
# rightmost, so
#
# $$
# x^* \in \Big[\min_k(\mu_k + \sigma_k y),\ \max_k(\mu_k + \sigma_k y)\Big].
# $$
#
# This page compares three ways to find $x^*$ (bisection, Newton, and the
# safeguarded hybrid the layer uses), measures them, then turns to the other
# half of the problem: **differentiating** $x^*(y, \theta)$ — unrolling the
# solver, one Newton step, or the implicit function theorem — and finally to
# solving a whole batch of different mixtures at once.

# %%
import os
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from scipy import special

import distrax_mixcdf as dm

SMALL = os.environ.get("MIXCDF_TUTORIAL_SMALL") == "1"  # CI runs the quick version
N = 20_000 if SMALL else 200_000  # points per timing
REPEATS = 5 if SMALL else 9  # timed runs after one warm-up run


def median_ms(fn, *args):
    """Median wall time of `fn(*args)` in ms, after one warm-up (compile) call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(1e3 * (time.perf_counter() - start))
    return float(np.median(times))


# Five well-separated components: the map is steep on each bump and nearly
# flat in between, which is where root finders struggle.
weights = np.array([0.3, 0.1, 0.25, 0.05, 0.3])
means = np.array([-6.0, -2.0, 0.0, 3.0, 7.0])
scales = np.array([0.5, 0.3, 1.0, 0.2, 0.8])
theta = (
    jnp.log(jnp.asarray(weights, jnp.float32)),
    jnp.asarray(means, jnp.float32),
    jnp.log(jnp.asarray(scales, jnp.float32)),
)
layer = dm.MixtureGaussianCDF(*theta)
y = jax.random.normal(jax.random.key(0), (N,), jnp.float32)

# %% [markdown]
# ## 1. The float64 reference
#
# An independent root: bisection in float64 NumPy, 100 halvings of the
# closed-form bracket, comparing the smaller tail ($F$ below the median, $1-F$
# above it) so it is exact in both tails. It shares no code with the layer and
# is reused below for finite differences.


# %%
def reference_inverse(y, log_w, mu, log_sigma, iterations=100):
    y = np.asarray(y, np.float64)[:, None]
    w, mu, sigma = np.exp(log_w - special.logsumexp(log_w)), mu, np.exp(log_sigma)
    lower = np.min(mu + sigma * y, axis=-1)
    upper = np.max(mu + sigma * y, axis=-1)
    upper_side = y[:, 0] > 0
    target = np.where(upper_side, special.ndtr(-y[:, 0]), special.ndtr(y[:, 0]))
    for _ in range(iterations):
        mid = 0.5 * (lower + upper)
        z = (mid[:, None] - mu) / sigma
        below = np.sum(w * special.ndtr(z), axis=-1) < target
        above = np.sum(w * special.ndtr(-z), axis=-1) > target
        go_right = np.where(upper_side, above, below)
        lower, upper = np.where(go_right, mid, lower), np.where(go_right, upper, mid)
    return 0.5 * (lower + upper)


theta64 = [np.asarray(p, np.float64) for p in theta]
x_ref = reference_inverse(y, *theta64)
y64 = np.asarray(y, np.float64)
# T'(x*) = f(x*) / φ(y), in logs. Errors in x are compared in y units,
# |x - x*| T'(x*) / max(1, |y|): between the bumps T is so flat that the float32
# rounding of y alone moves the root by far more than float32 epsilon in x.
z_ref = (x_ref[:, None] - means) / scales
log_slope = special.logsumexp(np.log(weights / scales) - 0.5 * z_ref**2, axis=-1)
log_slope = log_slope + 0.5 * y64**2
y_units = np.exp(log_slope) / np.maximum(1.0, np.abs(y64))


def error_in_y_units(x):
    return np.abs(np.asarray(x, np.float64) - x_ref) * y_units


print(f"reference roots for {N} latents, x in [{x_ref.min():.2f}, {x_ref.max():.2f}]")
print(f"slope T'(x*) in [{np.exp(log_slope).min():.1e}, {np.exp(log_slope).max():.1e}]")

# %% [markdown]
# ## 2. Three solvers, written out
#
# The three iterations below use only the layer's public, closed-form forward:
# `forward_and_log_det` gives the residual $r = T(x) - y$ and the slope
# $T'(x) = e^{\log\det}$.
#
# - **Bisection** halves the bracket: one bit per iteration, always.
# - **Newton** steps $x \leftarrow x - r/T'(x)$: quadratic convergence near the
#   root, but from a poor start on a nearly flat stretch of $T$ it can jump far
#   outside the bracket, cycle, or crawl.
# - **Hybrid** (safeguarded Newton, *rtsafe*): keep the Newton step only if it
#   lands strictly inside the current bracket and is at most half the step
#   before last; otherwise bisect. The residual's sign shrinks the bracket at
#   every evaluation.
#
# All three start from the weighted component quantile
# $x_0 = \sum_k w_k(\mu_k + \sigma_k y)$ (bisection from the bracket) and run
# for a fixed number of iterations, recording the error against the reference.

# %%
ITERATIONS = 40


@jax.jit
def textbook_histories(y):
    forward = layer.forward_and_log_det
    candidates = theta[1] + jnp.exp(theta[2]) * y[:, None]
    lower0, upper0 = candidates.min(-1), candidates.max(-1)
    x0 = jnp.sum(jnp.asarray(weights, jnp.float32) * candidates, axis=-1)
    width = upper0 - lower0

    def step(carry, _):
        (lo_b, hi_b), x_n, (x_h, lo_h, hi_h, last, before_last) = carry
        # bisection
        mid = 0.5 * (lo_b + hi_b)
        right = forward(mid)[0] < y
        lo_b, hi_b = jnp.where(right, mid, lo_b), jnp.where(right, hi_b, mid)
        # Newton
        t, log_det = forward(x_n)
        x_n = x_n - (t - y) * jnp.exp(-log_det)
        # hybrid
        t, log_det = forward(x_h)
        lo_h, hi_h = jnp.where(t < y, x_h, lo_h), jnp.where(t > y, x_h, hi_h)
        newton_step = -(t - y) * jnp.exp(-log_det)
        candidate = x_h + newton_step
        take = (
            (candidate > lo_h)
            & (candidate < hi_h)
            & (jnp.abs(newton_step) <= 0.5 * jnp.abs(before_last))
        )
        x_new = jnp.where(take, candidate, 0.5 * (lo_h + hi_h))
        x_new = jnp.where(t == y, x_h, x_new)
        hybrid = (x_new, lo_h, hi_h, x_new - x_h, last)
        carry = ((lo_b, hi_b), x_n, hybrid)
        return carry, (0.5 * (lo_b + hi_b), x_n, x_new)

    start = ((lower0, upper0), x0, (x0, lower0, upper0, width, width))
    return jax.lax.scan(step, start, None, length=ITERATIONS)[1]


histories = dict(
    zip(("bisection", "newton", "hybrid"), textbook_histories(y), strict=True)
)
tolerance = 1e-6  # in y units: about 8 float32 ulps of max(1, |y|)
print(
    f"{'solver':>10} | iterations until all within 1e-6 | not converged after {ITERATIONS}"
)
errors = {}
for name, history in histories.items():
    error = error_in_y_units(history)  # [iterations, N]
    error = np.where(np.isfinite(error), error, np.inf)
    errors[name] = error
    within = np.all(error <= tolerance, axis=1)
    first = int(np.argmax(within)) + 1 if within.any() else "never"
    left = int(np.sum(error[-1] > tolerance))
    print(f"{name:>10} | {first:>33} | {left}")

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 4))
colors = {"bisection": "tab:green", "newton": "tab:red", "hybrid": "tab:blue"}
steps = np.arange(1, ITERATIONS + 1)
for name, error in errors.items():
    worst = np.where(np.isfinite(error), error, 1e30).max(axis=1)
    median = np.median(error, axis=1)
    for ax, curve in zip(axes, (worst, median)):
        ax.semilogy(
            steps, np.maximum(curve, 1e-12), color=colors[name], lw=2, label=name
        )
axes[0].set(
    title="worst element of the batch",
    xlabel="iteration",
    ylabel="error in y units (non-finite at 1e30)",
)
axes[1].set(title="median element", xlabel="iteration", ylabel="error in y units")
for ax in axes:
    ax.axhline(tolerance, color="gray", ls=":", lw=1, label="tolerance")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=10)
fig.tight_layout()

# %% [markdown]
# The table and the figure show the trade-off the layer's default resolves:
#
# - **Newton** (red) is the fastest for the typical element (right panel:
#   quadratic convergence within a handful of iterations), but some elements
#   never converge: started on a flat stretch between two bumps, a step
#   overshoots, and the iterates cycle (the sawtooth in the left panel) with
#   errors of order $10^3$.
# - **Bisection** (green) gains one bit per iteration for every element alike:
#   it always converges, but even the typical element needs about as many
#   iterations as the worst one.
# - **Hybrid** (blue) converges like Newton for the typical element and, by
#   falling back to bisection, for *every* element. Its worst element lags
#   bisection by a few iterations here: an accepted Newton step only has to
#   halve the step before last, which can shrink the bracket less than a
#   bisection would.
#
# ## 3. The layer's solvers, timed
#
# The layer implements the same three iterations behind
# `root_finder="hybrid"` (default), `"newton"` and `"bisection"`, with two
# additions: it stops each element as soon as a curvature-based estimate of
# the remaining error is below tolerance (no confirming evaluation), and when
# many inputs share one parameter set it starts from a 512-knot table of roots
# with cubic Hermite interpolation instead of $x_0$ above. Its `"newton"` hands
# any element it has not converged after `max_iter` steps to the safeguarded
# solver rather than returning a wrong root. Timings are medians after a
# warm-up (compile) call, all in this run:

# %%
forward = jax.jit(lambda b, x: b.forward_and_log_det(x))
inverse = jax.jit(lambda b, y: b.inverse_and_log_det(y))
forward_ms = median_ms(forward, layer, jnp.asarray(x_ref, jnp.float32))
rows = [("forward (closed form)", forward_ms, "")]
solutions = {}
for name in ("hybrid", "newton", "bisection"):
    solver = dm.MixtureGaussianCDF(*theta, root_finder=name)
    ms = median_ms(inverse, solver, y)
    x_hat = np.asarray(inverse(solver, y)[0], np.float64)
    solutions[name] = x_hat
    err = np.max(error_in_y_units(x_hat))
    rows.append((f'inverse, root_finder="{name}"', ms, f"{err:.1e}"))

print(
    f"N = {N} float32 latents, K = {len(weights)}, median of {REPEATS} runs, "
    f"backend {jax.default_backend()}"
)
print(f"| {'operation':<30} | {'ms':>8} | {'x forward':>9} | max err (y units) |")
print(f"|{'-' * 32}|{'-' * 9}:|{'-' * 10}:|{'-' * 18}:|")
for label, ms, err in rows:
    print(f"| {label:<30} | {ms:8.2f} | {ms / forward_ms:9.2f} | {err:>17} |")

# %% [markdown]
# All three reach the same accuracy, about $10^{-6}$ in $y$ units
# (float32). On this deliberately hard mixture (narrow bumps separated by
# nearly flat stretches) plain `"newton"` is by far the slowest: the elements
# where it cycles run to `max_iter` before the safeguarded fallback finishes
# them. The inverse costs many forward evaluations here; on the smoother
# mixture of the [benchmarks](../benchmarks.md) the default inverse is a few
# forwards. (Times are from this run on a machine that may be busy; compare
# rows within the table, not across runs.)
#
# ## 4. Differentiating the inverse
#
# Gradients of $x^*(y, \theta)$ are needed whenever a loss goes through
# sampling. Three ways, all selectable with `inverse_grad=`:
#
# - `"unroll"`: differentiate through the solver's iterations (a `lax.scan` of
#   `max_iter` steps). Memory and time grow with the iterations, and a
#   bisection step $x \leftarrow (l + u)/2$ carries no information about
#   $\theta$: where the solver bisected, the gradient is wrong.
# - `"one_step"`: take the converged root $\hat x$ as a constant and
#   differentiate one Newton step from it,
#   $x = \hat x - (T(\hat x;\theta) - y)/T'(\hat x)$. At an exact root this
#   gives exact first derivatives; second derivatives are wrong.
# - `"implicit"` (default): differentiate the identity $T(x^*(y,\theta);\theta)
#   = y$, which gives
#
# $$
# \frac{\partial x^*}{\partial y} = \frac{1}{T'(x^*)},\qquad
# \frac{\partial x^*}{\partial \theta}
#   = -\frac{\partial_\theta T(x^*;\theta)}{T'(x^*)} .
# $$
#
# The layer registers this rule as a `jax.custom_jvp`, so forward mode,
# reverse mode, `vmap` and higher derivatives all use it, and it costs one
# evaluation of the forward (with its derivatives) at the root, however many
# iterations the solve took.
#
# We check each against central finite differences of the float64 reference
# root ($h = 10^{-6}$), for the gradient of $\sum_i x^*(y_i, \theta)$ with
# respect to every parameter and of each $x^*_i$ with respect to its $y_i$.

# %%
M = 500 if SMALL else 2_000  # points in the gradient check (NumPy reference)
y_small = y[:M]


def finite_differences(h=1e-6):
    grads = []
    for index, p in enumerate(theta64):
        g = np.zeros_like(p)
        for k in range(p.size):
            shifted = [q.copy() for q in theta64], [q.copy() for q in theta64]
            shifted[0][index][k] += h
            shifted[1][index][k] -= h
            plus = reference_inverse(y_small, *shifted[0]).sum()
            minus = reference_inverse(y_small, *shifted[1]).sum()
            g[k] = (plus - minus) / (2 * h)
        grads.append(g)
    y64 = np.asarray(y_small, np.float64)
    dy = (
        reference_inverse(y64 + h, *theta64) - reference_inverse(y64 - h, *theta64)
    ) / (2 * h)
    return grads, dy


fd_theta, fd_y = finite_differences()


# A cap of 40 iterations (the textbook hybrid needed about 30 above) keeps the
# unrolled version's scan short; the other two stop early anyway.
def total_x(params, y, inverse_grad):
    bijector = dm.MixtureGaussianCDF(*params, inverse_grad=inverse_grad, max_iter=40)
    return jnp.sum(bijector.inverse(y))


print(f"relative errors vs finite differences; grad timed on M = {M} points")
print(
    f"{'inverse_grad':>12} | {'logits':>7} | {'means':>7} | {'log_sc.':>7} | "
    f"{'y':>7} | {'grad ms':>7} | x inverse"
)
inverse_ms = median_ms(inverse, layer, y_small)
for mode in ("implicit", "one_step", "unroll"):
    grad_fn = jax.jit(jax.grad(total_x, argnums=(0, 1)), static_argnums=2)
    g_theta, g_y = grad_fn(theta, y_small, mode)
    errs = [
        np.max(np.abs(np.asarray(g, np.float64) - f)) / np.max(np.abs(f))
        for g, f in zip(g_theta, fd_theta)
    ]
    err_y = np.max(np.abs(np.asarray(g_y, np.float64) - fd_y) / np.abs(fd_y))
    ms = median_ms(grad_fn, theta, y_small, mode)
    print(
        f"{mode:>12} | {errs[0]:7.1e} | {errs[1]:7.1e} | {errs[2]:7.1e} | "
        f"{err_y:7.1e} | {ms:7.1f} | {ms / inverse_ms:9.2f}"
    )

# %% [markdown]
# `"implicit"` and `"one_step"` match the finite differences to float32
# accuracy and cost within a small factor of the inverse alone (these
# sub-millisecond timings are noisy): both differentiate one evaluation of $T$
# at the converged root. `"unroll"` is less accurate —
# the bisection steps inside the unrolled loop contribute no derivative — and
# far more expensive, since reverse mode has to replay all `max_iter` (here 40)
# steps.
# The implicit rule is also the only one with exact higher derivatives (the
# test suite checks `jax.hessian` through the inverse against differences of
# the gradient), which is why it is the default.
#
# ## 5. A batch of different mixtures
#
# A conditional flow (a coupling layer, say) gives every data point its own
# mixture. The layer's parameters may carry batch axes: parameters of shape
# `[B, K]` act on inputs `[..., B]` elementwise, and the whole batch is one
# `lax.while_loop` that stops when its slowest element has converged. The
# same result comes from `jax.vmap` over a batch of bijectors (the bijector is
# a pytree), which JAX turns into the same batched loop; a Python loop over
# the mixtures pays one dispatch (and solve) per mixture.

# %%
B = 32 if SMALL else 256
key_logits, key_means, key_scales, key_y = jax.random.split(jax.random.key(1), 4)
batched = dm.MixtureGaussianCDF(
    jax.random.normal(key_logits, (B, 5)),
    3.0 * jax.random.normal(key_means, (B, 5)),
    0.5 * jax.random.normal(key_scales, (B, 5)),
)
y_batch = jax.random.normal(key_y, (N // B, B))

one_call = jax.jit(lambda b, y: b.inverse(y))
vmapped = jax.jit(jax.vmap(lambda b, y: b.inverse(y), in_axes=(0, 1), out_axes=1))
single = jax.jit(lambda b, y: b.inverse(y))
members = [jax.tree.map(lambda p, i=i: p[i], batched) for i in range(B)]


def python_loop(y):
    return jnp.stack([single(m, y[:, i]) for i, m in enumerate(members)], axis=1)


x_one_call = one_call(batched, y_batch)
print(f"{B} mixtures x {N // B} latents each")
for label, fn, args in (
    ("one batched call", one_call, (batched, y_batch)),
    ("jax.vmap", vmapped, (batched, y_batch)),
    ("Python loop", python_loop, (y_batch,)),
):
    ms = median_ms(fn, *args)
    gap = float(jnp.max(jnp.abs(fn(*args) - x_one_call)))
    print(f"  {label:<16}: {ms:8.2f} ms, max |x - x_one_call| {gap:.1e}")

# %% [markdown]
# All three agree exactly. The batched call and `jax.vmap` both run one
# batched loop over everything; which of the two is ahead varies from run to
# run. The Python loop pays a dispatch and a loop per mixture and is the
# slowest.
#
# ## Recap
#
# | question | answer in this library |
# |---|---|
# | bracket | closed form, $[\min_k(\mu_k+\sigma_k y), \max_k(\mu_k+\sigma_k y)]$ |
# | solver | safeguarded Newton (`root_finder="hybrid"`), from a knot table when inputs share parameters |
# | stopping | curvature-based error estimate, no confirming evaluation |
# | gradient | implicit function theorem as a `custom_jvp` (`inverse_grad="implicit"`) |
# | batches | parameter batch axes broadcast; one loop for the whole batch; `vmap` works |
#
# **Next:** [05 — Deep flows](05_deep_flows.md) stacks these layers with
# rotations into a flow on 2-D data.
