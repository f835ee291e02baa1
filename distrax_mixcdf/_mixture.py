"""Closed-form numerics of the Gaussian mixture CDF map ``y = Φ⁻¹(F(x))``.

Pure functions of ``(x, log_weights, means, log_scales)``; the parameters have
shape ``[..., K]`` and broadcast against ``x`` on the leading axes. The bijector
class (`mixture_cdf.py`) and the root finder (`_root_finding.py`) compose these.

The forward runs in two passes:

* **bulk** (always): sums the component probabilities in linear space, on the
  side of the smaller tail, and applies `ndtri` once. In float32 this keeps ``y``
  at ~1 ulp, where a pure log-space sum rounds at ``ulp(log w)``.
* **tail** (only for elements whose smaller tail mass is below 1e-20 in float32
  or 1e-250 in float64, and only when the batch has any): the same map in log
  space with Mills ratios, exact out to ``|x - μ| = 1e4·σ`` and beyond. A
  batch-level ``lax.switch`` skips it, runs it on a compacted subset (≤ 1/16 of
  the batch), or runs it everywhere. Elements the bulk resolves keep its value.

``log f`` is always a max-shifted logsumexp, so the log-det stays exact between
far-apart components where ``f`` itself underflows.

The component loop is a Python loop over the static ``K``: XLA fully unrolls it
into one fused elementwise kernel, which measured much faster on CPU than a
reduction over a small minor axis (``shared/reference/numerics.md``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy.special import erfc, ndtri

from distrax_mixcdf._gaussian import (
    _log_survival_and_log_mills,
    log_mills_ratio,
    ndtri_exp,
)

__all__ = [
    "cdf_bracket",
    "forward_and_log_det",
    "log_det_slope",
    "naive_forward_and_log_det",
    "quantile_average",
]

_INV_SQRT_2 = 1.0 / math.sqrt(2.0)


def _smallest_bulk_tail(dtype) -> float:
    """Smallest tail mass the linear-space bulk pass resolves exactly.

    float32: `erfc` keeps ~4e-6 relative accuracy down to 1e-36 and `ndtri` is
    accurate to 1e-37, but we stop at 1e-20 to stay far from denormals.
    float64: both are accurate to well below 1e-250.
    """
    return 1e-250 if jnp.dtype(dtype) == jnp.float64 else 1e-20


# The bulk pass marks the elements whose tail mass underflows with this finite
# sentinel instead of returning a second "needs tail" array: XLA's CPU backend
# splits a fusion with several outputs into many memory-bound kernels (measured
# 6x slower here), so `y` and `log_det` are each one single-output fusion. The
# sentinel lies outside the bulk's range (|y| < 34) and is finite, so gradients
# through the unselected branch stay finite.
_Y_SENTINEL = 1e3


def _components(params: tuple[jax.Array, jax.Array, jax.Array]):
    """Yields ``(log_weight, mean, log_scale)`` slices of shape ``[...]`` per k."""
    log_weights, means, log_scales = params
    for k in range(log_weights.shape[-1]):
        yield log_weights[..., k], means[..., k], log_scales[..., k]


def _bulk_y(x, params):
    """``y`` from linear-space tail sums; ``±_Y_SENTINEL`` where they underflow."""
    lower = upper = jnp.zeros((), x.dtype)
    for log_weight, mean, log_scale in _components(params):
        weight = jnp.exp(log_weight)
        z = (x - mean) * jnp.exp(-log_scale)
        # One `erfc` per component gives both tails exactly: it is the smaller.
        smaller_tail = 0.5 * erfc(jnp.abs(z) * _INV_SQRT_2)
        left = z < 0
        lower = lower + weight * jnp.where(left, smaller_tail, 1.0 - smaller_tail)
        upper = upper + weight * jnp.where(left, 1.0 - smaller_tail, smaller_tail)
    upper_side = upper < lower
    smaller = jnp.minimum(lower, upper)
    in_tail = smaller < _smallest_bulk_tail(x.dtype)
    # Double-where: `ndtri` only ever sees a probability where it is finite.
    magnitude = -ndtri(jnp.where(in_tail, 0.25, smaller))
    magnitude = jnp.where(in_tail, _Y_SENTINEL, magnitude)
    return jnp.where(upper_side, magnitude, -magnitude)


def _log_density_terms(x, params):
    """Per-component ``log w_k - log σ_k - z_k²/2`` (the density up to 1/√(2π))."""
    terms = []
    for log_weight, mean, log_scale in _components(params):
        z = (x - mean) * jnp.exp(-log_scale)
        terms.append(log_weight - log_scale - 0.5 * jnp.square(z))
    return terms


def _max_of(terms):
    largest = terms[0]
    for term in terms[1:]:
        largest = jnp.maximum(largest, term)
    # Guard the all -inf case (x = ±inf) so shifts stay finite.
    return jnp.where(jnp.isfinite(largest), largest, 0.0)


def _bulk_log_det(x, params, y_bulk):
    """``log f(x) - log φ(y)`` with ``log f`` by a max-shifted logsumexp.

    The shift keeps ``log f`` exact between far-apart components, where ``f``
    itself underflows while ``y`` is still in the bulk.
    """
    terms = _log_density_terms(x, params)
    shift = _max_of(terms)
    total = jnp.zeros((), x.dtype)
    for term in terms:
        total = total + jnp.exp(term - shift)
    # The 1/sqrt(2 pi) factors of f and φ cancel.
    return shift + jnp.log(total) + 0.5 * jnp.square(y_bulk)


def log_det_slope(
    x: jax.Array,
    params: tuple[jax.Array, jax.Array, jax.Array],
    y: jax.Array,
    log_det: jax.Array,
) -> jax.Array:
    r"""Curvature ``d log T'(x)/dx = T''/T'`` of the forward map.

    .. math:: \frac{d}{dx}\big(\log f(x) - \log\varphi(y)\big)
              = -\sum_k r_k \frac{z_k}{\sigma_k} + y\,e^{\text{log\_det}},
        \qquad r_k \propto w_k \varphi(z_k)/\sigma_k .

    The root finder uses it to predict the error left after a Newton step
    (``|c| δ²/2``), so it can stop without an extra confirming evaluation, and to
    carry the log-det from the last iterate to the returned root.
    """
    # The same terms as `_log_density_terms`, deliberately written another way:
    # if XLA's CSE merged them with the log-det's, the shared per-component
    # arrays would be materialised (one kernel each) instead of fused.
    terms, offsets = [], []
    for log_weight, mean, log_scale in _components(params):
        inv_variance = jnp.exp(-2.0 * log_scale)
        offset = x - mean
        terms.append(log_weight - log_scale - 0.5 * (jnp.square(offset) * inv_variance))
        offsets.append(offset * inv_variance)
    shift = _max_of(terms)
    total = weighted = jnp.zeros((), x.dtype)
    for term, offset in zip(terms, offsets):
        responsibility = jnp.exp(term - shift)
        total = total + responsibility
        weighted = weighted + responsibility * offset
    return y * jnp.exp(log_det) - weighted / total


def _tail_pass(x, params, upper_side):
    """Exact log-space ``(y, log_det)`` for every element (used only in tails).

    With ``u_k = ±z_k`` pointing into the smaller tail, the tail mass is
    ``log S = logsumexp_k(log w_k + log Q(u_k))`` and ``y = ∓ndtri_exp(log S)``.
    The log-det is ``log f - log φ(y) = log(f/S) + log R(|y|)``: the hazard
    ``f/S = Σ_k π_k e^{d_k}`` with ``π = softmax(log w + log Q(u))`` and
    ``d_k = -log σ_k - log R(u_k)`` involves no ``O(y²)`` cancellation.
    """
    sign = jnp.where(upper_side, 1.0, -1.0).astype(x.dtype)
    log_masses, log_hazards = [], []
    for log_weight, mean, log_scale in _components(params):
        u = sign * (x - mean) * jnp.exp(-log_scale)
        log_q, log_mills = _log_survival_and_log_mills(u)
        log_masses.append(log_weight + log_q)
        log_hazards.append(-log_scale - log_mills)
    max_log_mass = _max_of(log_masses)
    mass_sum = hazard_sum = jnp.zeros((), x.dtype)
    for log_mass, log_hazard in zip(log_masses, log_hazards):
        relative_mass = jnp.exp(log_mass - max_log_mass)
        mass_sum = mass_sum + relative_mass
        hazard_sum = hazard_sum + relative_mass * jnp.exp(log_hazard)
    log_tail = max_log_mass + jnp.log(mass_sum)
    magnitude = -ndtri_exp(log_tail)
    y = sign * magnitude
    log_det = jnp.log(hazard_sum) - jnp.log(mass_sum) + log_mills_ratio(magnitude)
    return y, log_det


def _gather_batch(values, flat_index, batch_shape, trailing):
    """Entries ``flat_index`` of ``values`` broadcast to ``batch_shape``.

    ``values`` has ``trailing`` non-batch axes at the end (1 for parameters, 0
    for inputs). Gathers straight from the un-broadcast array, so a parameter of
    shape ``[K]`` shared by a million inputs is never materialised a million times.
    """
    lead_shape = values.shape[: values.ndim - trailing]
    lead_shape = (1,) * (len(batch_shape) - len(lead_shape)) + tuple(lead_shape)
    values = values.reshape(lead_shape + values.shape[values.ndim - trailing :])
    coordinates = jnp.unravel_index(flat_index, batch_shape)
    index = tuple(
        coordinate if size > 1 else jnp.zeros_like(coordinate)
        for coordinate, size in zip(coordinates, lead_shape)
    )
    return values[index]


def _tail_pass_on_subset(x, params, upper_side, needs_tail, capacity):
    """Runs the tail pass only on (at most ``capacity``) flagged elements."""
    batch_shape = needs_tail.shape
    (flat_index,) = jnp.nonzero(needs_tail.ravel(), size=capacity, fill_value=0)
    x_subset = _gather_batch(x, flat_index, batch_shape, trailing=0)
    params_subset = tuple(
        _gather_batch(p, flat_index, batch_shape, trailing=1) for p in params
    )
    side_subset = upper_side.ravel()[flat_index]
    y_subset, log_det_subset = _tail_pass(x_subset, params_subset, side_subset)

    def scatter(values):
        # Padding entries repeat index 0 with identical inputs, hence identical
        # values, so the duplicate writes agree.
        full = jnp.zeros(needs_tail.size, values.dtype).at[flat_index].set(values)
        return full.reshape(batch_shape)

    return scatter(y_subset), scatter(log_det_subset)


def forward_and_log_det(
    x: jax.Array, params: tuple[jax.Array, jax.Array, jax.Array]
) -> tuple[jax.Array, jax.Array]:
    r"""The exact Gaussianizing map of a Gaussian mixture and its log-derivative.

    .. math::
        y = \Phi^{-1}\Big(\sum_k w_k \Phi\big(\tfrac{x-\mu_k}{\sigma_k}\big)\Big),
        \qquad \log\frac{dy}{dx} = \log f(x) - \log\varphi(y).

    The log-space tail pass runs on nothing when no element needs it, on a
    compacted subset when at most 1/16 of the batch does, and on the whole batch
    otherwise (one batch-level ``lax.switch``).

    Args:
      x: Inputs, broadcastable against ``params[i].shape[:-1]``.
      params: ``(log_weights, means, log_scales)``, each ``[..., K]``; the log
        weights must already be normalised (``logsumexp = 0``).

    Returns:
      ``(y, log_det)``, both of the broadcast batch shape.
    """
    y_bulk = _bulk_y(x, params)
    log_det_bulk = _bulk_log_det(x, params, y_bulk)
    needs_tail = jnp.abs(y_bulk) >= _Y_SENTINEL
    capacity = max(1, needs_tail.size // 16)

    def merge(y_tail, log_det_tail):
        return (
            jnp.where(needs_tail, y_tail, y_bulk),
            jnp.where(needs_tail, log_det_tail, log_det_bulk),
        )

    def bulk_only(_):
        return y_bulk, log_det_bulk

    def tail_on_subset(_):
        return merge(*_tail_pass_on_subset(x, params, y_bulk > 0, needs_tail, capacity))

    def tail_everywhere(_):
        return merge(*_tail_pass(x, params, y_bulk > 0))

    count = jnp.sum(needs_tail)
    branch = jnp.where(count == 0, 0, jnp.where(count <= capacity, 1, 2))
    return lax.switch(branch, (bulk_only, tail_on_subset, tail_everywhere), None)


def naive_forward_and_log_det(
    x: jax.Array, params: tuple[jax.Array, jax.Array, jax.Array]
) -> tuple[jax.Array, jax.Array]:
    """The textbook formula ``ndtri(Σ w ndtr(z))``, kept as a baseline.

    It saturates (``y = ±inf``) from ``|y| ≈ 5.4`` in float32 and ``≈ 8.3`` in
    float64; benchmarks and tutorials compare against it. Do not use it to model.
    """
    log_weights, means, log_scales = params
    z = (x[..., None] - means) * jnp.exp(-log_scales)
    weights = jnp.exp(log_weights)
    cdf = jnp.sum(weights * jax.scipy.special.ndtr(z), axis=-1)
    y = ndtri(cdf)
    log_density = jax.nn.logsumexp(
        log_weights - log_scales - 0.5 * jnp.square(z), axis=-1
    )
    return y, log_density + 0.5 * jnp.square(y)


def cdf_bracket(
    y: jax.Array, params: tuple[jax.Array, jax.Array, jax.Array]
) -> tuple[jax.Array, jax.Array]:
    r"""Closed-form bracket of the root ``x*`` of ``F(x) = Φ(y)``.

    .. math:: x^* \in \big[\min_k(\mu_k + \sigma_k y),\ \max_k(\mu_k + \sigma_k y)\big]

    At the left end every component CDF is at most ``Φ(y)``, at the right end at
    least ``Φ(y)``; so is their weighted average. No fixed box: the bracket is
    valid for every finite ``y``.

    Args:
      y: Latent values, broadcastable against the parameter batch shape.
      params: ``(log_weights, means, log_scales)``, each ``[..., K]``.

    Returns:
      ``(lower, upper)`` of the broadcast batch shape.
    """
    lower = upper = None
    for _, mean, log_scale in _components(params):
        candidate = mean + jnp.exp(log_scale) * y
        lower = candidate if lower is None else jnp.minimum(lower, candidate)
        upper = candidate if upper is None else jnp.maximum(upper, candidate)
    return lower, upper


def quantile_average(
    y: jax.Array, params: tuple[jax.Array, jax.Array, jax.Array]
) -> jax.Array:
    r"""Starting point ``Σ_k w_k (μ_k + σ_k y)`` for the root find (inside the bracket)."""
    start = jnp.zeros((), y.dtype)
    for log_weight, mean, log_scale in _components(params):
        start = start + jnp.exp(log_weight) * (mean + jnp.exp(log_scale) * y)
    return start
