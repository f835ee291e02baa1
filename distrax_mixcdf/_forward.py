"""The forward map ``y = Φ⁻¹(F(x))`` and ``log T'(x)``: values only, no derivatives.

Pure functions of ``(x, log_weights, means, log_scales)``; the parameters have
shape ``[..., K]`` and broadcast against ``x``. Derivatives come from the
closed-form rule in `_tangents.py`, which wraps `forward_primal`.
`forward_primal` takes unnormalised log-weights (logits) and normalises them
inside the component loops (`_normalised`); the other functions here take
normalised ones.

The forward runs in two passes:

* **bulk** (always): sums the component probabilities (`survival`, one per
  component) in linear space, on the side of the smaller tail, and inverts
  the sum on cells of ``|y|`` located by `ndtri`. In float32 this keeps ``y``
  at ~1 ulp, where a log-space sum rounds at ``ulp(log w)``; every rounded
  operation is monotone in ``x``, so ``y`` never steps back between
  neighbouring floats.
* **tail** (only for elements whose smaller tail mass is below
  `smallest_bulk_tail`, and only when the batch has any): the same map in log
  space with Mills ratios, exact out to ``|x - μ| = 1e4·σ`` and beyond, run
  on the flagged elements only.

``log f`` is a max-shifted logsumexp, so the log-det stays exact between
far-apart components where ``f`` itself underflows.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.scipy.special import ndtri

from distrax_mixcdf import _chunks
from distrax_mixcdf._components import fold, logsumexp_components
from distrax_mixcdf._gaussian import (
    log_mills_asymptotic,
    log_survival_and_log_mills,
    ndtri_exp,
    root_on_cells,
    survival,
)

__all__ = [
    "cdf_bracket",
    "forward_primal",
    "forward_with_curvature",
    "log_density",
    "log_det_slope",
    "quantile_average",
    "smallest_bulk_tail",
]

Params = tuple[jax.Array, jax.Array, jax.Array]

_SQRT_2PI = math.sqrt(2.0 * math.pi)


def smallest_bulk_tail(dtype) -> float:
    """Smallest tail mass the linear-space bulk pass resolves exactly.

    float32: `survival` is within an ulp down to 1.8e-33 and within 1.2e-38
    absolute below (products under the smallest normal number flush to zero),
    which moves a sum of at least 1e-28 by under 1e-8 relative even at
    K = 64; `ndtri` is accurate to 1e-37. float64: both are accurate to well
    below 1e-250.
    """
    return 1e-250 if jnp.dtype(dtype) == jnp.float64 else 1e-28


# The bulk pass marks elements whose tail mass underflows with this finite
# sentinel rather than a second output: XLA's CPU backend splits a fusion with
# several outputs into many memory-bound kernels. It lies outside the bulk's
# range (|y| < 34) and is finite, so nothing downstream sees inf.
_Y_SENTINEL = 1e3


def _batch_shape(x, params) -> tuple[int, ...]:
    return tuple(np.broadcast_shapes(jnp.shape(x), params[0].shape[:-1]))


# Around the side switch at y = 0 the smaller tail is taken from the
# difference of the two sums, ``1/2 - |upper - lower|/2``, the same on both
# sides; elsewhere from the smaller sum, which resolves small tails to an ulp.
# A clip joins them, keeping the difference-based value within
# ``(smaller - 7/16)/32`` of the smaller sum: a clip of a monotone value
# between monotone bounds stays monotone, where a blend did not.
_CENTRAL_TAIL_START = 7.0 / 16.0
_CENTRAL_SLACK_PER_TAIL = 1.0 / 32.0


def _normalised(body, log_norm):
    """A `fold` body that sees ``log_weight - log_norm`` (unchanged for ``None``).

    Subtracting per component inside the loop, rather than normalising the
    ``[N, K]`` logits up front, saves a library reduction and an ``[N, K]``
    copy when every element has its own logits.
    """
    if log_norm is None:
        return body
    return lambda carry, log_weight, *rest: body(carry, log_weight - log_norm, *rest)


def _bulk_signed_tail(x, params, log_norm=None):
    """The smaller tail mass ``min(F, 1-F)``, signed: negative on the lower side.

    Linear-space sums of one monotone `survival` per component, which gives
    both tails exactly (the smaller of ``Φ(z)`` and ``Q(z)`` directly, the
    other as one minus it).
    """

    def add_component(sums, log_weight, mean, log_scale):
        lower, upper = sums
        weight = jnp.exp(log_weight)
        z = (x - mean) * jnp.exp(-log_scale)
        smaller_tail = survival(jnp.abs(z))
        left = z < 0
        lower = lower + weight * jnp.where(left, smaller_tail, 1.0 - smaller_tail)
        upper = upper + weight * jnp.where(left, 1.0 - smaller_tail, smaller_tail)
        return lower, upper

    zero = jnp.zeros((), x.dtype)
    lower, upper = fold(
        _normalised(add_component, log_norm),
        (zero, zero),
        params,
        _batch_shape(x, params),
    )
    difference = upper - lower
    smaller = jnp.minimum(lower, upper)
    central = 0.5 - 0.5 * jnp.abs(difference)
    slack = _CENTRAL_SLACK_PER_TAIL * jnp.maximum(smaller - _CENTRAL_TAIL_START, 0.0)
    # Only if the sums' rounding exceeded the slack could the tail pass 1/2
    # and put y on the wrong side of 0.
    tail = jnp.minimum(jnp.clip(central, smaller - slack, smaller + slack), 0.5)
    # A tail that underflowed to 0 keeps its side's sign.
    tail = jnp.maximum(tail, jnp.finfo(x.dtype).tiny)
    return jnp.where(difference < 0, tail, -tail)


def _offset_in_cell(tail, edge, cell_width):
    """Distance from ``edge`` to ``Q⁻¹(tail)``, clipped to ``[0, cell_width]``.

    With ``s = (Q(a) - tail)/φ(a)``, the inverse series of ``Q(a + e)`` is
    ``e = s + a s²/2 + (2a² + 1) s³/6``: for ``s ≥ 0`` every term, and every
    rounded operation, is non-decreasing in ``s``.
    """
    # 1/φ(a) as an exp, not a division: XLA's CPU backend materialises a
    # division with several users as a kernel of its own.
    inverse_density = jnp.exp(0.5 * jnp.square(edge)) * _SQRT_2PI
    s = (survival(edge) - tail) * inverse_density
    cubic = (2.0 * jnp.square(edge) + 1.0) / 6.0
    offset = s + jnp.square(s) * (0.5 * edge + s * cubic)
    return jnp.clip(offset, 0.0, cell_width)


def _magnitude_from_tail(tail):
    """``m ≥ 0`` with ``Q(m) = tail`` for ``0 < tail ≤ 1/2``, monotone in ``tail``.

    `ndtri` is off by up to 3 ulps in float32 and not monotone, so it only
    locates ``m`` to a quarter cell; ``m`` is then the sum of clipped offsets
    from the two nearest cell edges (`root_on_cells`).
    """

    def offsets_from_edges(edge, width):
        return (
            _offset_in_cell(tail, edge, width),
            _offset_in_cell(tail, edge + width, width),
        )

    return root_on_cells(-ndtri(tail), offsets_from_edges)


def _latent_from_signed_tail(signed_tail):
    """``y`` from the signed tail mass; ``±_Y_SENTINEL`` where it is too small."""
    tail = jnp.abs(signed_tail)
    in_tail = tail < smallest_bulk_tail(tail.dtype)
    safe_tail = jnp.where(in_tail, 0.25, tail)
    magnitude = jnp.where(in_tail, _Y_SENTINEL, _magnitude_from_tail(safe_tail))
    # NaN stays NaN: only a strictly positive signed tail is the upper side.
    return jnp.where(
        signed_tail > 0, magnitude, jnp.where(signed_tail <= 0, -magnitude, signed_tail)
    )


def _log_density_term(x, log_weight, mean, log_scale):
    """``(log w_k - log σ_k - z_k²/2, z_k/σ_k)``: a component's log-density + log √(2π).

    ``1/σ²`` is its own ``exp``, not the square of the bulk pass's ``1/σ``:
    XLA would otherwise materialise the shared ``1/σ_k`` as one array per
    component when the parameters are per element.
    """
    inv_variance = jnp.exp(-2.0 * log_scale)
    offset = x - mean
    term = log_weight - log_scale - 0.5 * (jnp.square(offset) * inv_variance)
    return term, offset * inv_variance


def _log_density_sums(x, params, with_slope, log_norm=None):
    r"""``log f(x) + log √(2π)`` and, optionally, ``Σ_k ρ_k z_k/σ_k``.

    A logsumexp shifted by the largest term keeps ``log f`` exact between
    far-apart components, where ``f`` itself underflows while ``y`` may still
    be in the bulk. The shift comes from the same rounded terms it shifts: at
    ``|z| ~ 1e9`` two formulas for ``z²`` differ by far more than 1.
    """
    shape = _batch_shape(x, params)
    largest = fold(
        _normalised(
            lambda m, *component: jnp.maximum(m, _log_density_term(x, *component)[0]),
            log_norm,
        ),
        jnp.asarray(-jnp.inf, x.dtype),
        params,
        shape,
    )
    shift = jnp.where(jnp.isfinite(largest), largest, 0.0)

    def add_component(sums, *component):
        total, weighted = sums
        term, slope = _log_density_term(x, *component)
        responsibility = jnp.exp(term - shift)
        if with_slope:
            weighted = weighted + responsibility * slope
        return total + responsibility, weighted

    zero = jnp.zeros((), x.dtype)
    total, weighted = fold(
        _normalised(add_component, log_norm), (zero, zero), params, shape
    )
    return shift + jnp.log(total), weighted / total


def log_density(x: jax.Array, params: Params) -> jax.Array:
    """``log f(x) + log √(2π)``, exact between far-apart components."""
    return _log_density_sums(x, params, with_slope=False)[0]


def _tail_pass(x, params, upper_side):
    """Exact log-space ``(y, log_det)`` for every element (used only in tails).

    With ``u_k = ±z_k`` pointing into the smaller tail, the tail mass is
    ``log S = logsumexp_k(log w_k + log Q(u_k))`` and ``y = ∓ndtri_exp(log S)``.
    The log-det is ``log f - log φ(y) = log(f/S) + log R(|y|)``: the hazard
    ``f/S = Σ_k π_k e^{d_k}`` with ``π = softmax(log w + log Q(u))`` and
    ``d_k = -log σ_k - log R(u_k)`` involves no ``O(y²)`` cancellation.

    ``params`` are per element (``[n, K]``); the components are an array
    axis here: this pass runs on few elements, and its long log-space code is
    compiled once whatever ``K`` is.
    """
    # Components on the leading axis: sums and maxima over them are then
    # elementwise vector operations.
    log_weights, means, log_scales = (jnp.moveaxis(p, -1, 0) for p in params)
    sign = jnp.where(upper_side, 1.0, -1.0).astype(x.dtype)
    u = sign * (x - means) * jnp.exp(-log_scales)
    log_q, log_mills = log_survival_and_log_mills(u)
    log_masses = log_weights + log_q
    max_log_mass = _finite_max(log_masses)
    mass_sum = jnp.sum(jnp.exp(log_masses - max_log_mass), axis=0)
    # The hazard sum in log space too: where the tail's dominant component
    # lies far on its other side, its hazard underflows while log f does not.
    log_hazard_terms = (log_masses - max_log_mass) - log_scales - log_mills
    max_log_hazard = _finite_max(log_hazard_terms)
    hazard_sum = jnp.sum(jnp.exp(log_hazard_terms - max_log_hazard), axis=0)
    log_tail = max_log_mass + jnp.log(mass_sum)
    # Every element here lies beyond the bulk's largest |y|; the floor keeps
    # y monotone across the switch where the two passes' roundings disagree.
    largest_bulk = _magnitude_from_tail(
        jnp.asarray(smallest_bulk_tail(x.dtype), x.dtype)
    )
    magnitude = jnp.maximum(-ndtri_exp(log_tail), largest_bulk)
    # `magnitude` is past the asymptotic series' start, so the series alone
    # gives log R there.
    log_det = (
        max_log_hazard
        + jnp.log(hazard_sum)
        - jnp.log(mass_sum)
        + log_mills_asymptotic(magnitude)
    )
    return sign * magnitude, log_det


def _finite_max(terms):
    """Maximum over the leading (component) axis; 0 where it is not finite."""
    largest = jnp.max(terms, axis=0)
    return jnp.where(jnp.isfinite(largest), largest, 0.0)


def gather_rows(values, flat_index, batch_shape, trailing):
    """Entries ``flat_index`` of ``values`` broadcast to ``batch_shape``.

    ``values`` has ``trailing`` non-batch axes at the end (1 for parameters, 0
    for inputs). Gathers from the un-broadcast array, so a parameter shared by
    a million inputs is never materialised a million times.
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


# Elements per block of the tail pass's compaction: flagged elements are found
# block by block, so finding them costs a pass over one flag per block, not a
# compaction of the whole batch; a flagged block runs whole through the tail.
_TAIL_BLOCK = 64


def _tail_pass_in_chunks(y, log_det, x, params, needs_tail, log_norm=None):
    """``(y, log_det)`` with the flagged entries replaced by the tail pass's.

    The blocks of `_TAIL_BLOCK` elements holding a flagged element are
    gathered ``chunk`` blocks at a time, run through the tail pass and written
    over the bulk pass's outputs where flagged: the work is proportional to
    the flagged blocks, and one copy of the tail code serves any count.
    """
    batch_shape = needs_tail.shape
    size = needs_tail.size
    if size == 0:
        return y, log_det
    block = min(_TAIL_BLOCK, size)
    blocks = -(-size // block)
    padding = blocks * block - size
    budget = _chunks.chunk_elements("tail", params[0].shape[-1])
    chunk = max(
        1, blocks // 16 if budget is None else min(blocks // 16, budget // block)
    )
    flags = jnp.pad(needs_tail.ravel(), (0, padding))
    block_flags = jnp.any(flags.reshape(blocks, block), axis=1)
    count = jnp.sum(block_flags)
    # Padding entries point one past the last block: their writes are dropped.
    (flagged,) = jnp.nonzero(block_flags, size=blocks, fill_value=blocks)
    x_flat = jnp.broadcast_to(x, batch_shape).ravel()
    upper_flat = (y > 0).ravel()
    offsets = jnp.arange(block)

    def run_chunk(index_of_chunk, outputs):
        # `dynamic_slice` clamps the last chunk into range, so it may redo a
        # few flagged blocks: identical inputs, identical writes.
        block_index = lax.dynamic_slice(flagged, (index_of_chunk * chunk,), (chunk,))
        # Entries past the batch (padding, or past the last block) are clipped
        # when read and, being unflagged, never written.
        index = (block_index[:, None] * block + offsets).ravel()
        clipped = jnp.minimum(index, size - 1)
        subset = tuple(gather_rows(p, clipped, batch_shape, trailing=1) for p in params)
        if log_norm is not None:
            norm = gather_rows(log_norm, clipped, batch_shape, trailing=0)
            subset = (subset[0] - norm[..., None], *subset[1:])
        y_subset, log_det_subset = _tail_pass(
            x_flat.at[index].get(mode="clip"),
            subset,
            upper_flat.at[index].get(mode="clip"),
        )
        y_out, log_det_out = outputs
        # Only flagged entries are written; the others point past the end.
        flagged_here = flags.at[index].get(mode="fill", fill_value=False)
        target = jnp.where(flagged_here, index, size)
        return (
            y_out.at[target].set(y_subset, mode="drop"),
            log_det_out.at[target].set(log_det_subset, mode="drop"),
        )

    chunks = (count + chunk - 1) // chunk
    y_out, log_det_out = lax.fori_loop(
        0, chunks, run_chunk, (y.ravel(), log_det.ravel())
    )
    return y_out.reshape(batch_shape), log_det_out.reshape(batch_shape)


def log_det_slope(x: jax.Array, params: Params, y: jax.Array, log_det: jax.Array):
    r"""Curvature ``d log T'(x)/dx = T''/T'`` of the forward map.

    .. math:: \frac{d}{dx}\big(\log f(x) - \log\varphi(y)\big)
              = -\sum_k r_k \frac{z_k}{\sigma_k} + y\,e^{\text{log\_det}},
        \qquad r_k \propto w_k \varphi(z_k)/\sigma_k .

    Differentiable; the root finder's own loop takes it from
    `forward_with_curvature` instead, in the same pass as the forward.
    """
    return y * jnp.exp(log_det) - _log_density_sums(x, params, with_slope=True)[1]


def _forward_and_sums(x, params, with_slope, log_norm=None):
    """``(y, log_det, Σ ρ_k z_k/σ_k)`` on the canonical layout (`_chunks.canonical`).

    The last is zero unless ``with_slope``. ``log_norm`` (`logsumexp_components`)
    is subtracted from the log-weights where they are unnormalised.
    """
    signed_tail = _bulk_signed_tail(x, params, log_norm)
    y_bulk = _latent_from_signed_tail(signed_tail)
    log_f, weighted_slope = _log_density_sums(x, params, with_slope, log_norm)
    log_det_bulk = log_f + 0.5 * jnp.square(y_bulk)
    needs_tail = jnp.abs(y_bulk) >= _Y_SENTINEL
    y, log_det = lax.cond(
        jnp.any(needs_tail),
        lambda: _tail_pass_in_chunks(
            y_bulk, log_det_bulk, x, params, needs_tail, log_norm
        ),
        lambda: (y_bulk, log_det_bulk),
    )
    return y, log_det, weighted_slope


def forward_with_curvature(x: jax.Array, params: Params):
    r"""``(y, log T'(x), T''/T')`` in the passes of the forward alone (no derivatives).

    For the root finder's Newton steps; see `log_det_slope` for the formula.
    Runs on the layout it is given (the solver's chunks are canonical already).
    """
    y, log_det, weighted_slope = _forward_and_sums(x, params, with_slope=True)
    return y, log_det, y * jnp.exp(log_det) - weighted_slope


@_chunks.vmap_as_batch
def forward_primal(x: jax.Array, params: Params) -> tuple[jax.Array, jax.Array]:
    r"""The exact Gaussianizing map of a Gaussian mixture and its log-derivative.

    .. math::
        y = \Phi^{-1}\Big(\sum_k w_k \Phi\big(\tfrac{x-\mu_k}{\sigma_k}\big)\Big),
        \qquad \log\frac{dy}{dx} = \log f(x) - \log\varphi(y).

    Values only (see `_tangents.forward_and_log_det` for the differentiable
    map). Under ``vmap`` it runs on the whole batch at once, so the tail pass's
    batch-level ``cond`` sees every element.

    Args:
      x: Inputs, broadcastable against ``params[i].shape[:-1]``.
      params: ``(log_weights, means, log_scales)``, each ``[..., K]``; the log
        weights may be unnormalised (logits): ``w = softmax(log_weights)``.

    Returns:
      ``(y, log_det)``, both of the broadcast batch shape.
    """
    x, params, layout = _chunks.canonical(x, params)
    log_norm = logsumexp_components(params[0])
    y, log_det, _ = _forward_and_sums(x, params, with_slope=False, log_norm=log_norm)
    return layout.restore(y), layout.restore(log_det)


def cdf_bracket(y: jax.Array, params: Params) -> tuple[jax.Array, jax.Array]:
    r"""Closed-form bracket of the root ``x*`` of ``F(x) = Φ(y)``.

    .. math:: x^* \in \big[\min_k(\mu_k + \sigma_k y),\ \max_k(\mu_k + \sigma_k y)\big]

    At the left end every component CDF is at most ``Φ(y)``, at the right end
    at least; so is their weighted average. Valid for every finite ``y``.
    """

    def widen(bounds, log_weight, mean, log_scale):
        del log_weight
        candidate = mean + jnp.exp(log_scale) * y
        return jnp.minimum(bounds[0], candidate), jnp.maximum(bounds[1], candidate)

    inf = jnp.asarray(jnp.inf, y.dtype)
    return fold(widen, (inf, -inf), params, _batch_shape(y, params))


def quantile_average(y: jax.Array, params: Params) -> jax.Array:
    r"""Start ``Σ_k w_k (μ_k + σ_k y)`` for the root find (inside the bracket)."""
    return fold(
        lambda s, lw, mean, ls: s + jnp.exp(lw) * (mean + jnp.exp(ls) * y),
        jnp.zeros((), y.dtype),
        params,
        _batch_shape(y, params),
    )
