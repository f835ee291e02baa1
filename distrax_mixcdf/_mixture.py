"""Closed-form numerics of the Gaussian mixture CDF map ``y = Φ⁻¹(F(x))``.

Pure functions of ``(x, log_weights, means, log_scales)``; the parameters have
shape ``[..., K]`` and broadcast against ``x`` on the leading axes. The bijector
class (`mixture_cdf.py`) and the root finder (`_root_finding.py`) compose these.

The forward runs in two passes:

* **bulk** (always): sums the component probabilities (`survival`, one per
  component) in linear space, on the side of the smaller tail (near the side
  switch at y = 0, from the difference of the two sums, so ``y`` does not
  jump there), and inverts the sum on cells of ``|y|`` located by `ndtri`.
  In float32 this keeps ``y`` at ~1 ulp, where a pure log-space sum rounds at
  ``ulp(log w)``. Every rounded operation is monotone in ``x``, so ``y`` never
  steps back between neighbouring floats (`_bulk_signed_tail`,
  `_magnitude_from_tail`).
* **tail** (only for elements whose smaller tail mass is below 1e-28 in float32
  or 1e-250 in float64, and only when the batch has any): the same map in log
  space with Mills ratios, exact out to ``|x - μ| = 1e4·σ`` and beyond. A
  batch-level ``lax.cond`` skips it; otherwise it runs on the flagged elements
  only, gathered in chunks of 1/16 of the batch (at most 2^14 elements).

``log f`` is always a max-shifted logsumexp, so the log-det stays exact between
far-apart components where ``f`` itself underflows. Derivatives of the forward
come from the closed-form rule `_forward_jvp` (exact in the tails, and cheap to
compile), not from differentiating the two passes. That rule, `tangents_at`,
is shared with the inverse's implicit gradient and runs in chunks of the batch
(`_in_chunks`), with each chunk's ``[chunk, K]`` coefficients recomputed in the
backward pass rather than saved.

What you may change: thresholds and kernel layout, as long as the tests in
`tests/test_mixture_cdf.py` / `tests/float64/` and the benchmark stay green;
each single-output-fusion choice here was measured (see the comments).

The bulk's component loops are Python loops over the static ``K``: XLA fully
unrolls them into one fused elementwise kernel, which measured much faster on
CPU than a reduction over a small minor axis (``shared/reference/numerics.md``).
The tail pass instead keeps the components as a leading array axis: it runs
on few elements, and unrolled copies of its long log-space code were most of
the forward's compile time.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.scipy.special import ndtri

from distrax_mixcdf._chunks import chunk_layout, has_rows, map_row_chunks
from distrax_mixcdf._gaussian import (
    _LOG_SQRT_2PI,
    _log_mills_asymptotic,
    _log_survival_and_log_mills,
    _root_on_cells,
    mills_ratio,
    ndtri_exp,
    survival,
)
from distrax_mixcdf._irregular import saturation_threshold, tail_components

__all__ = [
    "TangentCoefficients",
    "cdf_bracket",
    "forward_and_log_det",
    "log_det_slope",
    "naive_forward_and_log_det",
    "quantile_average",
    "tangent_coefficients",
    "tangents_at",
]

_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2PI = math.sqrt(2.0 * math.pi)


def _smallest_bulk_tail(dtype) -> float:
    """Smallest tail mass the linear-space bulk pass resolves exactly.

    float32: `survival` is within an ulp down to 1.8e-33 and within 1.2e-38
    absolute below that (products under the smallest normal number flush to
    zero), which moves a sum of at least 1e-28 by under 1e-8 relative even at
    K = 64; `ndtri` is accurate to 1e-37.
    float64: both are accurate to well below 1e-250.

    It was 1e-20 in float32 when the bulk summed jax's `erfc`. With the bulk
    monotone by construction, the lower threshold also keeps more of the map
    out of the log-space pass, whose inversion (before `ndtri_exp` got its
    monotone last step) stepped back by an ulp in 88 of 80000 neighbouring
    pairs at |y| = 9.3.
    """
    return 1e-250 if jnp.dtype(dtype) == jnp.float64 else 1e-28


# The bulk pass marks the elements whose tail mass underflows with this finite
# sentinel instead of returning a second "needs tail" array: XLA's CPU backend
# splits a fusion with several outputs into many memory-bound kernels (measured
# 6x slower here), so `y` and `log_det` are each one single-output fusion. The
# sentinel lies outside the bulk's range (|y| < 34) and is finite, so gradients
# through the unselected branch stay finite.
_Y_SENTINEL = 1e3

# Elements per chunk of the tail pass: 1/16 of the batch, at most this many.
# The cap keeps a batch with a few far-tail elements from paying for a chunk of
# 1/16 of it, and (with the tail values written over the bulk pass's outputs
# rather than into fresh arrays) keeps the forward's temporaries under the
# 32 MiB above which glibc maps them afresh, page-faulting, on every call.
# Measured at N = 1e6, K = 8, float32: temp buffer 32.7 → 22.2 MiB, page
# faults per warm call 1.2k → 0; with 1000 far-tail elements 28 → 18 ms.
_TAIL_CHUNK_ELEMENTS = 1 << 14


def _components(params: tuple[jax.Array, jax.Array, jax.Array]):
    """Yields ``(log_weight, mean, log_scale)`` slices of shape ``[...]`` per k."""
    log_weights, means, log_scales = params
    for k in range(log_weights.shape[-1]):
        yield log_weights[..., k], means[..., k], log_scales[..., k]


# Around the side switch at y = 0 the smaller tail is taken from the
# difference of the two sums, ``1/2 - |upper - lower|/2``, which is the same on
# both sides there. Elsewhere it is the smaller sum, which resolves small tails
# to an ulp. The two are joined by a clip, not a blend: the difference-based
# value is kept only within ``slack = (smaller - 7/16)/32`` of the smaller sum
# (zero slack below a tail of 7/16, |y| ≥ 0.157; 0.002 at y = 0, three orders
# above the sums' rounding). Every operation is then monotone in x: the clip's
# bounds ``smaller ∓ slack`` are exact to one rounding (``smaller - 7/16`` is
# exact by Sterbenz, the factor is a power of two), and a clip of a monotone
# value between monotone bounds is monotone. A linear blend was not: it scaled
# the sums' rounding noise by a weight that moves with x, and y stepped back
# by up to 6 ulps between neighbouring floats.
_CENTRAL_TAIL_START = 7.0 / 16.0
_CENTRAL_SLACK_PER_TAIL = 1.0 / 32.0


def _bulk_signed_tail(x, params):
    """The smaller tail mass ``min(F, 1-F)``, signed: negative on the lower side.

    Linear-space sums of one monotone `survival` per component, which gives
    both tails exactly (the smaller of Φ(z) and Q(z) is computed directly, the
    other as 1 minus it). Non-decreasing (lower side) / non-increasing (upper
    side) in x between every pair of neighbouring floats.
    """
    lower = upper = jnp.zeros((), x.dtype)
    for log_weight, mean, log_scale in _components(params):
        weight = jnp.exp(log_weight)
        z = (x - mean) * jnp.exp(-log_scale)
        smaller_tail = survival(jnp.abs(z))
        left = z < 0
        lower = lower + weight * jnp.where(left, smaller_tail, 1.0 - smaller_tail)
        upper = upper + weight * jnp.where(left, 1.0 - smaller_tail, smaller_tail)
    difference = upper - lower
    smaller = jnp.minimum(lower, upper)
    central = 0.5 - 0.5 * jnp.abs(difference)
    slack = _CENTRAL_SLACK_PER_TAIL * jnp.maximum(smaller - _CENTRAL_TAIL_START, 0.0)
    # The last minimum only matters if the sums' rounding exceeded the slack:
    # a tail above 1/2 would put y on the wrong side of 0.
    tail = jnp.minimum(jnp.clip(central, smaller - slack, smaller + slack), 0.5)
    # A tail that underflowed to 0 must keep its side's sign: clamp it to the
    # smallest normal number (far below the bulk's threshold anyway).
    tail = jnp.maximum(tail, jnp.finfo(x.dtype).tiny)
    return jnp.where(difference < 0, tail, -tail)


def _offset_in_cell(tail, edge, cell_width):
    """Distance from ``edge`` to ``Q⁻¹(tail)``, clipped to ``[0, cell_width]``.

    With ``s = (Q(a) - tail)/φ(a)`` and ``Q(a + e) = Q(a) - φ(a)(e - a e²/2 +
    (a² - 1) e³/6 - ...)``, the inverse series is
    ``e = s + a s²/2 + (2a² + 1) s³/6``: for ``s ≥ 0`` every term, and every
    rounded operation, is non-decreasing in ``s``, so the result is
    non-increasing in ``tail``.
    """
    # 1/φ(a) as an exp, not a division: a division with several users is
    # materialised by XLA's CPU backend as a kernel of its own (measured
    # 13 ms instead of 5 ms for this function at 1e6 float32 elements).
    inverse_density = jnp.exp(0.5 * jnp.square(edge)) * _SQRT_2PI
    s = (survival(edge) - tail) * inverse_density
    cubic = (2.0 * jnp.square(edge) + 1.0) / 6.0
    offset = s + jnp.square(s) * (0.5 * edge + s * cubic)
    return jnp.clip(offset, 0.0, cell_width)


def _magnitude_from_tail(tail):
    """``m ≥ 0`` with ``Q(m) = tail`` for ``0 < tail ≤ 1/2``, monotone in ``tail``.

    float32 `ndtri` alone is off by up to 3 ulps (2e-7 relative, measured),
    which the inverse's 4-ulp residual budget cannot absorb, and it is not
    monotone between neighbouring inputs (it steps back for ~0.4% of them
    below 0.1). So `ndtri` only locates ``m`` to within a quarter cell
    (``2^-12`` wide in float32, ``2^-20`` in float64), and ``m`` is the sum of
    clipped offsets from the two nearest cell edges (`_root_on_cells`), each
    from a third-order series on ``Q`` (`_offset_in_cell`). The series is
    exact to well below an ulp within a cell.
    """

    def offsets_from_edges(edge, width):
        return (
            _offset_in_cell(tail, edge, width),
            _offset_in_cell(tail, edge + width, width),
        )

    # `ndtri` is good to ~1e-6 of m in float32 (the cell is 2.4e-4 wide) and
    # to ~1e-15 in float64 (the cell is 9.5e-7 wide).
    return _root_on_cells(-ndtri(tail), offsets_from_edges)


def _latent_from_signed_tail(signed_tail):
    """``y`` from the signed tail mass; ``±_Y_SENTINEL`` where it is too small."""
    tail = jnp.abs(signed_tail)
    in_tail = tail < _smallest_bulk_tail(tail.dtype)
    # Double-where: `ndtri` only ever sees a probability where it is finite.
    safe_tail = jnp.where(in_tail, 0.25, tail)
    magnitude = jnp.where(in_tail, _Y_SENTINEL, _magnitude_from_tail(safe_tail))
    # NaN stays NaN: only a strictly positive signed tail is the upper side.
    return jnp.where(
        signed_tail > 0, magnitude, jnp.where(signed_tail <= 0, -magnitude, signed_tail)
    )


def _bulk_y(x, params):
    """``y`` from linear-space tail sums; ``±_Y_SENTINEL`` where they underflow."""
    signed_tail = _bulk_signed_tail(x, params)
    # Keep the component loop and `ndtri` in separate kernels: fused together
    # they exceed XLA's fusion size and it splits the loop into per-component
    # kernels (measured 3x slower).
    signed_tail = lax.optimization_barrier(signed_tail)
    return _latent_from_signed_tail(signed_tail)


def _log_density_terms(x, params, inv_scales=None):
    """Per-component ``log w_k - log σ_k - z_k²/2`` (the density up to 1/√(2π)).

    ``inv_scales`` (``[..., K]``), when given, supplies ``1/σ_k`` formed
    outside a loop body, so that the body does not form each ``exp(-log σ_k)``
    as a kernel of its own.
    """
    terms = []
    for k, (log_weight, mean, log_scale) in enumerate(_components(params)):
        inv_scale = jnp.exp(-log_scale) if inv_scales is None else inv_scales[..., k]
        z = (x - mean) * inv_scale
        terms.append(log_weight - log_scale - 0.5 * jnp.square(z))
    return terms


def _finite_shift(largest):
    """The largest term as a shift; 0 where it is not finite (all -inf at x = ±inf)."""
    return jnp.where(jnp.isfinite(largest), largest, 0.0)


def _max_of(terms):
    """Elementwise maximum of a list of per-component terms, as a shift."""
    largest = terms[0]
    for term in terms[1:]:
        largest = jnp.maximum(largest, term)
    return _finite_shift(largest)


def _log_density(x, params):
    """``log f(x) + log sqrt(2 pi)`` by a max-shifted logsumexp over components.

    The shift keeps ``log f`` exact between far-apart components, where ``f``
    itself underflows (while ``y`` may still be in the bulk).
    """
    terms = _log_density_terms(x, params)
    shift = _max_of(terms)
    total = jnp.zeros((), x.dtype)
    for term in terms:
        total = total + jnp.exp(term - shift)
    return shift + jnp.log(total)


def _bulk_log_det(x, params, y_bulk):
    """``log f(x) - log φ(y)``; the 1/sqrt(2 pi) factors of f and φ cancel."""
    return _log_density(x, params) + 0.5 * jnp.square(y_bulk)


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

    ``params`` are gathered per element (``[n, K]``). The components are an
    array axis here, not unrolled like the bulk's loops: this pass runs on the
    few tail elements only, and one copy of its long log-space code per
    component was most of the forward's compile time. Measured, float32: the
    forward compiles in 1.0 s instead of 1.4 s at K = 8 and 3.3 s instead of
    8.6 s at K = 64 (the inverse 1.3 vs 1.6 s, 5.0 vs 10.9 s); a 1e6 batch
    with 1000 far-tail elements takes the same time (18 ms), one with every
    element in the far tail 69 ms instead of 45.
    """
    # Components on the leading axis: the sums and maxima over them are then
    # elementwise vector operations (on the last axis 119 ms above, not 69).
    log_weights, means, log_scales = (jnp.moveaxis(p, -1, 0) for p in params)
    sign = jnp.where(upper_side, 1.0, -1.0).astype(x.dtype)
    u = sign * (x - means) * jnp.exp(-log_scales)
    log_q, log_mills = _log_survival_and_log_mills(u)
    log_masses = log_weights + log_q
    max_log_mass = _max_over_components(log_masses)
    mass_sum = jnp.sum(jnp.exp(log_masses - max_log_mass), axis=0)
    # The hazard sum in log space too: where the tail's dominant component lies
    # far on its other side (x between far-apart components), its hazard
    # e^{-log R(u)} underflows while log f is an ordinary large negative number.
    log_hazards = -log_scales - log_mills
    log_hazard_terms = (log_masses - max_log_mass) + log_hazards
    max_log_hazard = _max_over_components(log_hazard_terms)
    hazard_sum = jnp.sum(jnp.exp(log_hazard_terms - max_log_hazard), axis=0)
    log_tail = max_log_mass + jnp.log(mass_sum)
    # Every element here has a bulk tail sum below the threshold, so its y lies
    # beyond the bulk's largest |y|; the floor keeps y monotone across the
    # switch even where the two passes' roundings disagree.
    largest_bulk = _magnitude_from_tail(
        jnp.asarray(_smallest_bulk_tail(x.dtype), x.dtype)
    )
    magnitude = jnp.maximum(-ndtri_exp(log_tail), largest_bulk)
    y = sign * magnitude
    log_det = (
        max_log_hazard
        + jnp.log(hazard_sum)
        - jnp.log(mass_sum)
        # `magnitude` is at least the bulk's largest |y| (11.06 / 33.8), past
        # the asymptotic series' start (10 / 20), where `log_mills_ratio`
        # would take the series anyway: calling it directly leaves the
        # direct branch's code out of every forward (0.1–0.15 s of compile).
        + _log_mills_asymptotic(magnitude)
    )
    return y, log_det


def _max_over_components(terms):
    """`_max_of` for terms stacked on the leading axis."""
    return _finite_shift(jnp.max(terms, axis=0))


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


def _tail_pass_in_chunks(y, log_det, x, params, upper_side, needs_tail, chunk_size):
    """``(y, log_det)`` with the flagged entries replaced by the tail pass's.

    Runs the tail pass on the flagged elements only, ``chunk_size`` at a time,
    writing into (copies of) the bulk pass's outputs. One copy of the tail
    code serves any count (a second, whole-batch copy doubled compile time),
    and the work is proportional to the count.
    """
    batch_shape = needs_tail.shape
    size = needs_tail.size
    count = jnp.sum(needs_tail)
    # Padding entries point one past the end: whatever is computed for them
    # is never written (out-of-range writes are dropped).
    (flagged,) = jnp.nonzero(needs_tail.ravel(), size=size, fill_value=size)
    x_full = jnp.broadcast_to(x, batch_shape).ravel()
    upper_flat = upper_side.ravel()

    def run_chunk(chunk, outputs):
        # `dynamic_slice` clamps the last chunk into range, so it may redo a few
        # flagged elements: identical inputs, identical writes.
        index = lax.dynamic_slice(flagged, (chunk * chunk_size,), (chunk_size,))
        params_subset = tuple(
            _gather_batch(p, index, batch_shape, trailing=1) for p in params
        )
        y_subset, log_det_subset = _tail_pass(
            x_full.at[index].get(mode="clip"),
            params_subset,
            upper_flat.at[index].get(mode="clip"),
        )
        y_out, log_det_out = outputs
        return (
            y_out.at[index].set(y_subset, mode="drop"),
            log_det_out.at[index].set(log_det_subset, mode="drop"),
        )

    chunks = (count + chunk_size - 1) // chunk_size
    y_out, log_det_out = lax.fori_loop(
        0, chunks, run_chunk, (y.ravel(), log_det.ravel())
    )
    return y_out.reshape(batch_shape), log_det_out.reshape(batch_shape)


@jax.custom_jvp
def forward_and_log_det(
    x: jax.Array, params: tuple[jax.Array, jax.Array, jax.Array]
) -> tuple[jax.Array, jax.Array]:
    r"""The exact Gaussianizing map of a Gaussian mixture and its log-derivative.

    .. math::
        y = \Phi^{-1}\Big(\sum_k w_k \Phi\big(\tfrac{x-\mu_k}{\sigma_k}\big)\Big),
        \qquad \log\frac{dy}{dx} = \log f(x) - \log\varphi(y).

    The log-space tail pass runs only when some element needs it (one
    batch-level ``lax.cond``), and then only on those elements, gathered in
    chunks of 1/16 of the batch (at most 2^14 elements) and written over the
    bulk pass's outputs. Derivatives come from the closed-form rule
    `_forward_jvp`, not from differentiating these branches.

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

    def with_tail_pass(_):
        chunk_size = max(1, min(needs_tail.size // 16, _TAIL_CHUNK_ELEMENTS))
        return _tail_pass_in_chunks(
            y_bulk, log_det_bulk, x, params, y_bulk > 0, needs_tail, chunk_size
        )

    def bulk_only(_):
        return y_bulk, log_det_bulk

    return lax.cond(jnp.any(needs_tail), with_tail_pass, bulk_only, None)


def _capped_exp(log_value):
    """``exp`` capped at the square root of the largest float.

    Used where a derivative exceeds the float range (``1/T'`` where the mixture
    density underflows between far-apart components): a huge finite slope
    instead of ``inf``, whose products with zero cotangents, or differences of
    two such products, would be NaN. At the square root, a product of two
    capped factors still fits.
    """
    dtype = jnp.result_type(log_value)
    cap = 0.5 * math.log(float(jnp.finfo(dtype).max))
    return jnp.exp(jnp.minimum(log_value, cap))


def _broadcast_tangent(tangent: jax.Array, batch_shape) -> jax.Array:
    r"""A parameter tangent ``[..., K]`` broadcast to ``batch_shape + (K,)``.

    Written as an outer product with ones (a ``dot_general``) rather than a
    broadcast, for reverse mode: JAX transposes a broadcast into a sum over the
    batch axes, a column reduction that XLA's CPU backend runs ~10x slower than
    the matrix-vector product with ones that the dot transposes into (measured
    on [1e6, 8] float32: 26 ms against 2.6 ms). (Stacking the three parameter
    tangents into one product measured slower.)
    """
    batch_rank = len(batch_shape)
    tangent_batch = tangent.shape[:-1]
    tangent_batch = (1,) * (batch_rank - len(tangent_batch)) + tuple(tangent_batch)
    if tuple(tangent_batch) == tuple(batch_shape):
        return tangent.reshape(tuple(batch_shape) + tangent.shape[-1:])
    letters = "abcdefghijlmnopqrstuvwxyz"[:batch_rank]
    kept = [size != 1 for size in tangent_batch]
    tangent_letters = "".join(c for c, keep in zip(letters, kept) if keep)
    ones_letters = "".join(c for c, keep in zip(letters, kept) if not keep)
    tangent = tangent.reshape(
        tuple(size for size in tangent_batch if size != 1) + tangent.shape[-1:]
    )
    ones = jnp.ones(
        tuple(size for size, keep in zip(batch_shape, kept) if not keep),
        tangent.dtype,
    )
    result = jnp.einsum(
        f"{ones_letters},{tangent_letters}k->{ones_letters}{tangent_letters}k",
        ones,
        tangent,
    )
    # einsum put the ones' axes first; restore the batch order.
    order = ones_letters + tangent_letters
    permutation = [order.index(c) for c in letters] + [batch_rank]
    return jnp.transpose(result, permutation)


class _Mixture(NamedTuple):
    """The per-component arrays ``[..., K]`` the tangent rule reads.

    Formed once per call, outside the chunk loop of `tangents_at`: computed
    inside it (behind the remat barrier, which XLA does not hoist across), each
    component's ``exp(±log σ_k)`` and ``exp(log w_k)`` ran as a tiny kernel of
    its own, more than a dozen per chunk.
    """

    log_weights: jax.Array
    means: jax.Array
    log_scales: jax.Array
    weights: jax.Array
    scales: jax.Array
    inv_scales: jax.Array
    # For the inverse's irregular elements (`_inverse_far_tangents`): the
    # components owning the far tails, and max_k log σ_k's derivative weights.
    tail_positive: jax.Array
    tail_negative: jax.Array
    widest_share: jax.Array

    @property
    def params(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        return self.log_weights, self.means, self.log_scales


def _mixture_arrays(params) -> _Mixture:
    log_weights, means, log_scales = params
    widest = log_scales == jnp.max(log_scales, axis=-1, keepdims=True)
    return _Mixture(
        log_weights,
        means,
        log_scales,
        jnp.exp(log_weights),
        jnp.exp(log_scales),
        jnp.exp(-log_scales),
        *tail_components(params),
        # JAX splits the derivative of a max evenly among ties.
        widest / jnp.sum(widest, axis=-1, keepdims=True),
    )


def _density_slope(density_resp, z, inv_scales):
    """``-f'(x)/f(x) = Σ_k ρ_k z_k/σ_k`` from the materialised ``ρ``.

    A matrix-vector product with ones: ``jnp.sum`` over the minor axis of size
    K made the whole backward pass ~5 ms slower per million elements on XLA's
    CPU backend, and a flat component loop pays one more exp per component.
    ``ρ z`` is formed first: where ``ρ = 0`` its product with a huge ``1/σ``
    must stay 0.
    """
    terms = density_resp * z * inv_scales
    return terms @ jnp.ones(terms.shape[-1], terms.dtype)


class TangentCoefficients(NamedTuple):
    r"""The per-element pieces every first derivative is made of.

    Attributes:
      density_resp: ``ρ_k = w_k φ(z_k)/(σ_k f(x))``, shape ``[..., K]``.
      signed_tail_weights: ``s W_k`` (see `tangent_coefficients`), ``[..., K]``.
      curvature: ``Σ_k ρ_k z_k/σ_k = -f'(x)/f(x)``, shape ``[...]``.
    """

    density_resp: jax.Array
    signed_tail_weights: jax.Array
    curvature: jax.Array


def _standardized_and_responsibilities(x, mixture: _Mixture, log_norm):
    """``z_k = (x - μ_k)/σ_k`` and ``w_k e^{-z_k²/2}/σ_k / e^{log_norm}``, ``[..., K]``.

    With ``log_norm = log f(x) + log sqrt(2 pi)`` the second array is the
    density responsibilities ``ρ_k = w_k φ(z_k)/(σ_k f(x))``; with another
    per-element shift it is ``ρ`` times a per-element factor.
    """
    z = (x[..., None] - mixture.means) * mixture.inv_scales
    terms = jnp.exp(
        mixture.log_weights
        - mixture.log_scales
        - 0.5 * jnp.square(z)
        - log_norm[..., None]
    )
    return z, terms


def _shifted_terms(x, mixture: _Mixture, shift):
    """``e_k = w_k e^{-z_k²/2}/σ_k / e^{shift}`` (``[..., K]``) and their sum.

    The sum is a matrix-vector product with ones: ``jnp.sum`` over the minor
    axis of size K is several times slower on XLA's CPU backend.
    """
    _, shifted = _standardized_and_responsibilities(x, mixture, shift)
    return shifted, shifted @ jnp.ones(shifted.shape[-1], shifted.dtype)


def tangent_coefficients(x, mixture: _Mixture, y, log_det, per) -> TangentCoefficients:
    r"""Per-element pieces of every first derivative of ``T`` and ``log T'``.

    With ``s = sign(y)`` pointing into the smaller tail and ``z_k = (x-μ_k)/σ_k``:

    .. math::
        \rho_k = \frac{w_k\varphi(z_k)/\sigma_k}{f(x)}, \qquad
        W_k = \frac{w_k Q(s z_k)}{f(x)}\ \text{(per="density")}
        \ \text{or}\ \frac{w_k Q(s z_k)}{\varphi(y)}\ \text{(per="latent")},

    the density responsibilities and the tail masses per unit density of ``x``
    (what the inverse needs) or of ``y`` (the forward: ``T'·W``, finite even
    where ``f`` underflows between far-apart components and ``1/f`` does not
    exist in floating point).

    ``W`` needs no `erfc`: with ``u_k = s z_k``, ``w_k Q(|u_k|)/f = ρ_k σ_k
    R(|u_k|)`` (`mills_ratio`, exp-free in float32), exact in any tail once
    ``ρ`` is; on the side ``u_k < 0``, ``w_k Q(u_k)/f = w_k/f - ρ_k σ_k
    R(|u_k|)`` (at most a factor 2 of cancellation: ``Q(u_k) ≥ 1/2`` there,
    so ``w_k/f ≤ 2 W_k``, and ``w_k ≤ 2Q(|y|)``: such components exist only
    where the tail is not far). The per-unit factors (``1/f`` or ``1/φ(y)``)
    are capped, so a zero cotangent never meets ``inf``, whose NaN would leak
    into second derivatives.

    How it stays cheap on XLA's CPU backend, which fuses freely, duplicates
    cheap producers into every consumer, and has no multi-output fusion:

    * The components are shifted by their largest log term, ``max_k t_k``,
      computed first by one flat loop over the components (quadratics and
      maxima, no `exp`, one ``[...]`` kernel; `_log_density_terms`). Then
      ``e_k = e^{t_k - shift}`` is one vectorised ``[..., K]`` kernel with
      ``1 ≤ Σe ≤ K`` whatever ``x`` (the largest term is ``e^0``), so
      ``ρ = e/Σe`` and ``log f`` are exact without any test, between
      far-apart components and in either tail, and no ``lax.cond`` is needed.
    * The sums over components are matrix-vector products with ones
      (`_shifted_terms`, `_density_slope`); the coefficients below are formed
      inline and fused into the tangent kernels that read them.

    (Before, the shift was ``log f`` as the caller knows it, ``log_det + log
    φ(y)``, with a per-chunk test of the sum and a ``lax.cond`` to an exact
    logsumexp where it failed. The test's reductions and the ``cond``, which
    made ``e`` a buffer of its own, cost more than the flat max: the backward
    pass through the inverse, N = 1e6 float32, K = 8, took 8.2 → 8.1 ms in
    this machine's normal state and 15.0 → 13.2 ms in its slow spells, over
    one 10-minute interleaved run.)

    Args:
      x: Points of the forward map.
      mixture: The per-component arrays (`_mixture_arrays`), log weights
        normalised.
      y: ``T(x)`` (the forward's output, or the inverse's input at its root).
      log_det: ``log T'(x)``; read only for ``per="latent"`` (the shift
        comes from ``x`` itself).
      per: ``"density"`` or ``"latent"`` (see above).

    Returns:
      The coefficients; ``ρ`` and ``s W`` of the broadcast batch shape plus
      ``K``, the curvature of the broadcast batch shape.
    """
    shape = jnp.broadcast_shapes(
        jnp.shape(x), jnp.shape(y), mixture.log_weights.shape[:-1]
    )
    x, y, log_det = (jnp.broadcast_to(v, shape) for v in (x, y, log_det))
    # A numerical device only: ρ and log f = shift + log Σe do not depend on
    # it, so derivatives of any order need not flow through the max.
    shift = lax.stop_gradient(
        _max_of(_log_density_terms(x, mixture.params, mixture.inv_scales))
    )
    shifted, total = _shifted_terms(x, mixture, shift)
    sign = jnp.where(y > 0, 1.0, -1.0).astype(x.dtype)
    density_resp = shifted * (1.0 / total)[..., None]
    z = (x[..., None] - mixture.means) * mixture.inv_scales
    u = sign[..., None] * z
    # w_k Q(|u_k|) per unit f.
    near_tail = density_resp * mixture.scales * mills_ratio(jnp.abs(u))
    if per == "latent":
        # Per unit φ(y) instead: times f/φ(y) = T' = e^{log_det}.
        log_factor = _LOG_SQRT_2PI + 0.5 * jnp.square(y)
        near_tail = near_tail * _capped_exp(log_det)[..., None]
    else:
        # 1/f = sqrt(2 pi) e^{-(shift + log total)}; the log of `total` is
        # taken here, fused into the kernels that need it.
        log_factor = _LOG_SQRT_2PI - (shift + jnp.log(total))
    whole = mixture.weights * _capped_exp(log_factor)[..., None]
    tail_weights = jnp.where(u < 0, whole - near_tail, near_tail)
    return TangentCoefficients(
        density_resp,
        sign[..., None] * tail_weights,
        _density_slope(density_resp, z, mixture.inv_scales),
    )


def tangents_at(x, y, log_det, params, x_dot, y_dot, params_dot, solve_for):
    r"""Linear tangent relations of ``y = T(x; θ)`` and ``log T'(x; θ)``.

    Differentiating ``Φ(y) = F(x; θ)`` and dividing by ``φ(y)``:

    .. math::
        \dot y = T'(x)\Big[\dot x - \sum_k \rho_k\big(\dot\mu_k
              + (x-\mu_k)\,\dot{\log\sigma_k}\big)\Big]
              - \sum_k s\,\frac{w_k Q(s z_k)}{\varphi(y)}\,\dot{\log w_k},

    which the forward evaluates as written and the inverse solves for ``ẋ``
    (the implicit function theorem; there the weight term is divided by
    ``T'``, giving ``W_k`` per unit ``f``). The weight term uses
    ``Σ_k w_k \dot{\log w_k} = 0``, true for tangents through ``log_softmax``
    (the bijector always normalises). Then

    .. math::
        \dot{\text{log\_det}} = \sum_k \rho_k\big(\dot{\log w_k}
            + \tfrac{z_k}{\sigma_k}\dot\mu_k + (z_k^2-1)\dot{\log\sigma_k}\big)
            - \dot x\sum_k \rho_k\tfrac{z_k}{\sigma_k} + y\,\dot y .

    This is the one place where the derivatives of the map live: the forward's
    ``custom_jvp`` and the inverse's implicit rule both call it.

    Cost, for reverse mode: the parameter terms run over the leading batch
    axis in chunks of ~64k elements (`_in_chunks`), rematerialised, so the
    backward pass recomputes the per-component coefficients chunk by chunk in
    cache instead of saving ``[..., K]`` arrays; a parameter tangent shared by
    all rows is broadcast to one chunk's shape before the loop, so its
    cotangent accumulates elementwise across chunks and is summed over rows
    once (`_broadcast_tangent`).

    For the inverse (``solve_for="x"``) ``log_det`` is the inverse's own,
    ``-log T'(x)``, and so is the returned tangent; the sign flips inside the
    chunk loop, where it costs no pass over the batch. For elements whose
    ``y`` is NaN, ``±inf`` or beyond `saturation_threshold` the root finder
    returned `_irregular.inverse_far`'s closed forms; their tangents are those
    of the closed forms (`_inverse_far_tangents`), and the rule's coefficients
    are evaluated at a finite stand-in there, so a cotangent of zero never
    meets an infinite coefficient. A ``lax.cond`` over the whole batch skips
    that per-element work when no ``y`` is irregular.

    Args:
      x: A point of the forward map.
      y: Its image ``T(x)``.
      log_det: ``log T'(x)`` (forward) or ``-log T'(x)`` (inverse).
      params: ``(log_weights, means, log_scales)``.
      x_dot: Tangent of ``x`` (used when ``solve_for="y"``, else ignored).
      y_dot: Tangent of ``y`` (used when ``solve_for="x"``, else ignored).
      params_dot: Parameter tangents.
      solve_for: ``"y"`` (forward) or ``"x"`` (inverse).

    Returns:
      ``(x_dot, y_dot, log_det_dot)``.
    """
    shape = jnp.broadcast_shapes(jnp.shape(x), jnp.shape(y), params[0].shape[:-1])
    known_dot = x_dot if solve_for == "y" else y_dot
    mixture = _mixture_arrays(params)

    def chunk_loop(irregular_rows):
        def run(x, y, log_det, known_dot, params_dot):
            return _in_chunks(
                functools.partial(
                    _chunk_tangents, solve_for=solve_for, irregular_rows=irregular_rows
                ),
                tuple(jnp.broadcast_to(v, shape) for v in (x, y, log_det, known_dot)),
                # The parameter tangents also as given, unbroadcast: irregular
                # elements use them per parameter set (`_inverse_far_tangents`).
                (mixture, params_dot),
                params_dot,
                shape,
            )

        return run

    operands = (x, y, log_det, known_dot, tuple(params_dot))
    if solve_for == "y":
        solved_dot, log_det_dot = chunk_loop(False)(*operands)
        return x_dot, solved_dot, log_det_dot
    # Irregular y are rare: only a batch that has some pays for their selects
    # and far tangents in every chunk (~1.5 ms per million elements in the
    # backward pass through the inverse, measured). One max-reduction decides
    # (NaN propagates through it and fails the test).
    has_irregular = ~(jnp.max(jnp.abs(y)) <= saturation_threshold(y.dtype))
    solved_dot, log_det_dot = lax.cond(
        has_irregular, chunk_loop(True), chunk_loop(False), *operands
    )
    return solved_dot, y_dot, log_det_dot


def _chunk_tangents(
    x, y, log_det, known_dot, shared, params_dot, solve_for, irregular_rows
):
    """`tangents_at` on one chunk: ``(ẏ or ẋ, log_det_dot)``.

    Everything, including the primal coefficients, is computed here from the
    chunk's inputs, so that in reverse mode nothing of size ``[..., K]`` is
    saved: the transposed loop recomputes it chunk by chunk. With
    ``irregular_rows`` (inverse only) some ``y`` may be NaN, ``±inf`` or
    saturated, and those rows get `_inverse_far_tangents`.
    """
    mixture, given_params_dot = shared
    per = "latent" if solve_for == "y" else "density"
    if solve_for == "x" and not irregular_rows:
        log_det = -log_det  # the forward's, from here
    elif solve_for == "x":
        # NaN, ±inf and saturated y (`_irregular`): the rule runs at a finite
        # stand-in there, and their tangents come from `inverse_far` below.
        y_given = y
        regular = jnp.abs(y) <= saturation_threshold(y.dtype)
        x = jnp.where(regular, x, 0.0)
        y = jnp.where(regular, y, 0.0)
        log_det = jnp.where(regular, -log_det, 0.0)  # the forward's, from here
    coefficients = tangent_coefficients(x, mixture, y, log_det, per)
    rho = coefficients.density_resp
    shape = rho.shape[:-1]
    scales, inv_scales = mixture.scales, mixture.inv_scales
    # z again, as `tangent_coefficients` forms it: one subtract and one
    # multiply per entry, fused into the kernels that use it.
    z = (x[..., None] - mixture.means) * inv_scales
    weight_dot, mean_dot, log_scale_dot = (
        _broadcast_tangent(p, shape) for p in params_dot
    )
    moved = jnp.sum(rho * (mean_dot + z * scales * log_scale_dot), axis=-1)
    weight_term = jnp.sum(coefficients.signed_tail_weights * weight_dot, axis=-1)
    # ρ z is formed before the second z: where ρ = 0 and z² overflows (a
    # vanishing, very narrow component far away) its product must be 0, not NaN.
    rho_z = rho * z
    log_density_dot = jnp.sum(
        rho * (weight_dot - log_scale_dot)
        + rho_z * (inv_scales * mean_dot + z * log_scale_dot),
        axis=-1,
    )
    if solve_for == "y":
        x_dot = known_dot
        y_dot = jnp.exp(log_det) * (x_dot - moved) - weight_term
        solved_dot = y_dot
    else:
        y_dot = known_dot
        x_dot = y_dot * _capped_exp(-log_det) + moved + weight_term
        solved_dot = x_dot
    log_det_dot = log_density_dot - coefficients.curvature * x_dot + y * y_dot
    if solve_for == "y":
        return solved_dot, log_det_dot
    if not irregular_rows:
        return solved_dot, -log_det_dot
    x_far_dot, log_det_far_dot = _inverse_far_tangents(
        y_given, mixture, known_dot, *given_params_dot[1:]
    )
    return (
        jnp.where(regular, solved_dot, x_far_dot),
        jnp.where(regular, -log_det_dot, log_det_far_dot),
    )


def _inverse_far_tangents(y, mixture: _Mixture, y_dot, mean_dot, log_scale_dot):
    r"""Tangents of `_irregular.inverse_far`'s outputs, without branches.

    ``x = μ_{k*} + σ_{k*} y`` and ``log_det = log σ_{k*}`` for saturated ``y``
    (``k*`` from `_irregular.tail_components`, per parameter set), ``x = y``
    and ``log_det = max_k log σ_k`` for ``±inf``, NaN for NaN.

    ``mean_dot`` and ``log_scale_dot`` are the parameter tangents as given (not
    broadcast to the batch): ``k*`` depends only on the parameter set and the
    sign of ``y``, so the component is picked once per parameter set and the
    batch sees per-element selects only. Transposed, that is a few reductions
    over the chunk (~1 ms of a ~9 ms backward pass per 1e6 elements, against
    dropping these tangents), where one-hot ``[..., K]`` terms added ~40
    operations to every entry of the accumulated parameter cotangents (the
    backward pass ~9 → ~20 ms) and `jax.jvp` of ``inverse_far`` itself (whose
    per-component slices transpose into pads) ~120 ms; a per-chunk
    ``lax.cond`` around them measured no faster. `tests/test_reliability.py`
    checks them against JAX's derivatives of ``inverse_far``.
    """

    def owner(mask, values):
        return jnp.sum(jnp.where(mask, values, 0.0), axis=-1)

    finite = jnp.isfinite(y)
    y_safe = jnp.where(finite, y, 0.0)
    saturated = finite & (jnp.abs(y) > saturation_threshold(y.dtype))
    positive = y_safe > 0
    tails = (mixture.tail_positive, mixture.tail_negative)
    mean_dot_at, log_scale_dot_at, scale_at = (
        jnp.where(positive, owner(tails[0], v), owner(tails[1], v))
        for v in (mean_dot, log_scale_dot, mixture.scales)
    )
    x_far_dot = jnp.where(
        saturated,
        mean_dot_at + scale_at * (y_safe * log_scale_dot_at + y_dot),
        y_dot,
    )
    # ±inf: the limit max_k log σ_k.
    widest_dot = jnp.sum(mixture.widest_share * log_scale_dot, axis=-1)
    log_det_far_dot = jnp.where(
        saturated, log_scale_dot_at, jnp.where(y == y, widest_dot, y_dot)
    )
    return x_far_dot, log_det_far_dot


# Elements per chunk of the rematerialised parameter terms: the per-chunk
# [chunk, K] temporaries stay in cache, and ~16 loop trips per million elements
# keep the loop overhead small.
_CHUNK_ELEMENTS = 1 << 16


def _in_chunks(body, batched, shared, spread, batch_shape):
    """``body(*batched, shared, spread)`` over rematerialised row chunks.

    `_chunks.map_row_chunks` with ``remat=True``: reverse mode saves only each
    chunk's inputs and recomputes the rest per chunk, which on XLA's CPU
    backend is faster than writing and re-reading ``[..., K]`` temporaries of
    the whole batch (their first touch alone costs a page fault per 4 KiB).

    ``spread`` leaves without the leading axis (parameter tangents shared by
    all rows) are broadcast to one chunk's shape before the loop rather than
    inside it. In reverse mode JAX then accumulates their cotangents as
    ``[chunk, ..., K]`` arrays in the loop carry, an elementwise add fused into
    the kernel that forms each term, and sums them over rows once, after the
    loop. Inside the loop that sum was a matrix-vector product per chunk and
    parameter, single-threaded on XLA's CPU backend (measured, N = 1e6,
    K = 8, page faults removed: the backward pass through the inverse
    13.1 → 11.6 ms).
    """
    rank = len(batch_shape)
    rows = batch_shape[0] if rank else 0
    per_row = math.prod(batch_shape[1:])
    target_rows = max(1, _CHUNK_ELEMENTS // max(per_row, 1))
    if rank and rows >= 2 * target_rows:
        chunk_rows = chunk_layout(rows, per_row, target_rows)[1]
        chunk_shape = (chunk_rows, *batch_shape[1:])
        spread = jax.tree_util.tree_map(
            lambda leaf: (
                leaf
                if has_rows(leaf, batch_shape)
                else _broadcast_tangent(leaf, chunk_shape)
            ),
            spread,
        )
    return map_row_chunks(
        lambda *args: body(*args[:-1], *args[-1]),
        batched,
        (shared, spread),
        batch_shape,
        _CHUNK_ELEMENTS,
        remat=True,
    )


@forward_and_log_det.defjvp
def _forward_jvp(primals, tangents):
    """Closed-form tangents of ``(y, log_det)`` via `tangents_at`.

    One elementwise pass with no branches on the elements: differentiating the
    bulk/tail switch instead made ``jax.grad`` take 15 s to compile.
    """
    x, params = primals
    x_dot, params_dot = tangents
    y, log_det = forward_and_log_det(x, params)
    _, y_dot, log_det_dot = tangents_at(
        x, y, log_det, params, x_dot, None, params_dot, solve_for="y"
    )
    return (y, log_det), (y_dot, log_det_dot)


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
    candidates = [
        mean + jnp.exp(log_scale) * y for _, mean, log_scale in _components(params)
    ]
    lower = upper = candidates[0]
    for candidate in candidates[1:]:
        lower = jnp.minimum(lower, candidate)
        upper = jnp.maximum(upper, candidate)
    return lower, upper


def quantile_average(
    y: jax.Array, params: tuple[jax.Array, jax.Array, jax.Array]
) -> jax.Array:
    r"""Start ``Σ_k w_k (μ_k + σ_k y)`` for the root find (inside the bracket)."""
    start = jnp.zeros((), y.dtype)
    for log_weight, mean, log_scale in _components(params):
        start = start + jnp.exp(log_weight) * (mean + jnp.exp(log_scale) * y)
    return start
