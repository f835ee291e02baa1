r"""The tangent rule of the map: every derivative of ``y = T(x; θ)`` and ``log T'``.

Differentiating ``Φ(y) = F(x; θ)`` gives one linear relation between the
tangents of ``x``, ``y`` and the parameters (`tangents_at`). The forward's
``custom_jvp`` (`forward_and_log_det`, here) evaluates it for ``ẏ``; the
inverse's implicit rule (`_root_finding.implicit_inverse`) solves it for
``ẋ``. The rule is plain elementwise code with no branch on regular inputs,
so JAX transposes it for reverse mode and differentiates it again for higher
orders.

For reverse mode it runs over lane chunks (`_chunks.map_lane_chunks`,
rematerialised), so the backward pass recomputes each chunk's ``[chunk, K]``
coefficients in cache instead of saving ``[N, K]`` residuals.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from distrax_mixcdf import _chunks
from distrax_mixcdf._components import fold, log_normalise
from distrax_mixcdf._forward import forward_primal
from distrax_mixcdf._gaussian import LOG_SQRT_2PI, mills_ratio
from distrax_mixcdf._irregular import saturation_threshold, tail_components

__all__ = [
    "TangentCoefficients",
    "forward_and_log_det",
    "mixture_arrays",
    "tangent_coefficients",
    "tangents_at",
]

Params = tuple[jax.Array, jax.Array, jax.Array]


@jax.custom_jvp
def forward_and_log_det(x: jax.Array, params: Params) -> tuple[jax.Array, jax.Array]:
    r"""The forward map and its log-derivative, differentiable to any order.

    .. math::
        y = \Phi^{-1}\Big(\sum_k w_k \Phi\big(\tfrac{x-\mu_k}{\sigma_k}\big)\Big),
        \qquad \log\frac{dy}{dx} = \log f(x) - \log\varphi(y).

    Values from `_forward.forward_primal`; tangents from `tangents_at`.

    Args:
      x: Inputs, broadcastable against ``params[i].shape[:-1]``.
      params: ``(log_weights, means, log_scales)``, each ``[..., K]``; the log
        weights may be unnormalised (logits): ``w = softmax(log_weights)``.

    Returns:
      ``(y, log_det)``, both of the broadcast batch shape.
    """
    return forward_primal(x, params)


@forward_and_log_det.defjvp
def _forward_jvp(primals, tangents):
    x, params = primals
    x_dot, params_dot = tangents
    y, log_det = forward_and_log_det(x, params)
    _, y_dot, log_det_dot = tangents_at(
        x, y, log_det, params, x_dot, None, params_dot, solve_for="y"
    )
    return (y, log_det), (y_dot, log_det_dot)


def _capped_exp(log_value):
    """``exp`` capped at the square root of the largest float.

    Where a derivative exceeds the float range (``1/T'`` where the density
    underflows between far-apart components) a huge finite slope replaces
    ``inf``, whose products with zero cotangents would be NaN; a product of
    two capped factors still fits.
    """
    dtype = jnp.result_type(log_value)
    cap = 0.5 * math.log(float(jnp.finfo(dtype).max))
    return jnp.exp(jnp.minimum(log_value, cap))


def _broadcast_tangent(tangent: jax.Array, batch_shape) -> jax.Array:
    r"""A parameter tangent ``[..., K]`` broadcast to ``batch_shape + (K,)``.

    Written as an outer product with ones (a ``dot_general``) rather than a
    broadcast: JAX transposes a broadcast into a column reduction, which XLA's
    CPU backend runs far slower than the matrix-vector product with ones
    that the dot transposes into.
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


class Mixture(NamedTuple):
    """The per-component arrays ``[..., K]`` the tangent rule reads.

    For parameters shared by many lanes, formed once per call, outside the
    chunk loop: inside it (behind the remat barrier, which XLA does not hoist
    across) each component's constants would run as tiny kernels of their own
    in every chunk. Per-element parameters form it chunk by chunk instead.
    """

    log_weights: jax.Array
    means: jax.Array
    log_scales: jax.Array
    weights: jax.Array
    scales: jax.Array
    inv_scales: jax.Array


def mixture_arrays(params: Params) -> Mixture:
    """The `Mixture` of ``(log_weights, means, log_scales)``, log-weights normalised.

    The log-weights may be unnormalised (logits): they are normalised here,
    per chunk for per-element parameters, where the ``[chunk, K]`` arrays
    stay in cache.
    """
    log_weights, means, log_scales = params
    log_weights = log_normalise(log_weights)
    return Mixture(
        log_weights,
        means,
        log_scales,
        jnp.exp(log_weights),
        jnp.exp(log_scales),
        jnp.exp(-log_scales),
    )


def _softmax_tangent(logit_dot, weights):
    """The tangent of ``log_softmax``: ``l̇_k - Σ_j w_j l̇_j`` (zero-sum under ``w``)."""
    return logit_dot - _sum_components(weights * logit_dot)[..., None]


def _sum_components(terms):
    """Sum over the last (component) axis as a matrix-vector product with ones.

    ``jnp.sum`` over a short minor axis is several times slower on XLA's CPU
    backend.
    """
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


def _largest_log_term(x, mixture: Mixture, shape):
    """``max_k(log w_k - log σ_k - z_k²/2)``, a finite shift (0 where all -inf)."""

    def larger(m, log_weight, mean, log_scale, inv_scale):
        z = (x - mean) * inv_scale
        return jnp.maximum(m, log_weight - log_scale - 0.5 * jnp.square(z))

    largest = fold(
        larger,
        jnp.asarray(-jnp.inf, x.dtype),
        (mixture.log_weights, mixture.means, mixture.log_scales, mixture.inv_scales),
        shape,
    )
    return jnp.where(jnp.isfinite(largest), largest, 0.0)


def tangent_coefficients(x, mixture: Mixture, y, log_det, per) -> TangentCoefficients:
    r"""Per-element pieces of every first derivative of ``T`` and ``log T'``.

    With ``s = sign(y)`` pointing into the smaller tail and ``z_k = (x-μ_k)/σ_k``:

    .. math::
        \rho_k = \frac{w_k\varphi(z_k)/\sigma_k}{f(x)}, \qquad
        W_k = \frac{w_k Q(s z_k)}{f(x)}\ \text{(per="density")}
        \ \text{or}\ \frac{w_k Q(s z_k)}{\varphi(y)}\ \text{(per="latent")},

    the density responsibilities and the tail masses per unit density of ``x``
    (what the inverse needs) or of ``y`` (the forward: finite even where
    ``f`` underflows between far-apart components).

    ``W`` needs no ``erfc``: with ``u_k = s z_k``, ``w_k Q(|u_k|)/f = ρ_k σ_k
    R(|u_k|)`` (`mills_ratio`), exact in any tail once ``ρ`` is; where
    ``u_k < 0``, ``w_k Q(u_k)/f = w_k/f - ρ_k σ_k R(|u_k|)`` (at most a factor
    2 of cancellation). The components are shifted by their largest log term,
    so ``1 ≤ Σ_k e^{t_k - shift} ≤ K`` for every ``x``: ``ρ`` and ``log f``
    are exact without a test or a branch, between far-apart components and
    in either tail.

    Args:
      x: Points of the forward map.
      mixture: The per-component arrays (`mixture_arrays`).
      y: ``T(x)``.
      log_det: ``log T'(x)``; read only for ``per="latent"``.
      per: ``"density"`` or ``"latent"`` (see above).

    Returns:
      The coefficients; ``ρ`` and ``s W`` of the broadcast batch shape plus
      ``K``, the curvature of the broadcast batch shape.
    """
    shape = jnp.broadcast_shapes(
        jnp.shape(x), jnp.shape(y), mixture.log_weights.shape[:-1]
    )
    x, y, log_det = (jnp.broadcast_to(v, shape) for v in (x, y, log_det))
    # A numerical device only: ρ and log f do not depend on it (its
    # derivatives cancel), so it needs no stop_gradient, which JAX cannot
    # transpose where vmap and remat put it on the linear side.
    shift = jax.lax.stop_gradient(_largest_log_term(x, mixture, shape))
    z = (x[..., None] - mixture.means) * mixture.inv_scales
    shifted = jnp.exp(
        mixture.log_weights
        - mixture.log_scales
        - 0.5 * jnp.square(z)
        - shift[..., None]
    )
    total = _sum_components(shifted)
    sign = jnp.where(y > 0, 1.0, -1.0).astype(x.dtype)
    density_resp = shifted * (1.0 / total)[..., None]
    u = sign[..., None] * z
    # w_k Q(|u_k|) per unit f.
    near_tail = density_resp * mixture.scales * mills_ratio(jnp.abs(u))
    if per == "latent":
        # Per unit φ(y) instead: times f/φ(y) = T' = e^{log_det}.
        log_factor = LOG_SQRT_2PI + 0.5 * jnp.square(y)
        near_tail = near_tail * _capped_exp(log_det)[..., None]
    else:
        # 1/f = sqrt(2 pi) e^{-(shift + log total)}.
        log_factor = LOG_SQRT_2PI - (shift + jnp.log(total))
    whole = mixture.weights * _capped_exp(log_factor)[..., None]
    tail_weights = jnp.where(u < 0, whole - near_tail, near_tail)
    # ρ z first: where ρ = 0 its product with a huge 1/σ must stay 0.
    curvature = _sum_components(density_resp * z * mixture.inv_scales)
    return TangentCoefficients(density_resp, sign[..., None] * tail_weights, curvature)


def tangents_at(x, y, log_det, params, x_dot, y_dot, params_dot, solve_for):
    r"""Linear tangent relations of ``y = T(x; θ)`` and ``log T'(x; θ)``.

    Differentiating ``Φ(y) = F(x; θ)`` and dividing by ``φ(y)``:

    .. math::
        \dot y = T'(x)\Big[\dot x - \sum_k \rho_k\big(\dot\mu_k
              + (x-\mu_k)\,\dot{\log\sigma_k}\big)\Big]
              - \sum_k s\,\frac{w_k Q(s z_k)}{\varphi(y)}\,\dot{\log w_k},

    which the forward evaluates as written and the inverse solves for ``ẋ``
    (the implicit function theorem). The log-weights may be unnormalised
    logits ``l``: their tangents enter as those of ``log_softmax(l)``,
    ``\dot{\log w_k} = \dot l_k - \sum_j w_j \dot l_j``, so the weight term
    may use ``Σ_k w_k \dot{\log w_k} = 0``. Then

    .. math::
        \dot{\text{log\_det}} = \sum_k \rho_k\big(\dot{\log w_k}
            + \tfrac{z_k}{\sigma_k}\dot\mu_k + (z_k^2-1)\dot{\log\sigma_k}\big)
            - \dot x\sum_k \rho_k\tfrac{z_k}{\sigma_k} + y\,\dot y .

    For the inverse (``solve_for="x"``) ``log_det`` is the inverse's own,
    ``-log T'(x)``, and so is the returned tangent. Elements whose ``y`` is
    NaN, ``±inf`` or beyond `saturation_threshold` got
    `_irregular.inverse_far`'s closed forms from the solver; their tangents
    are those of the closed forms (`_inverse_far_tangents`), and the rule's
    coefficients are evaluated at a finite stand-in there, so a zero
    cotangent never meets an infinite coefficient. Every element runs the
    same code; only with per-element parameters are the far tangents skipped
    for a chunk without irregular elements (a ``lax.cond`` whose branches agree
    there, so ``vmap``, which runs both, gives the same numbers).

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
    known_dot = x_dot if solve_for == "y" else y_dot
    shape = jnp.broadcast_shapes(jnp.shape(x), jnp.shape(y), jnp.shape(known_dot))
    x, params, layout = _chunks.canonical(jnp.broadcast_to(x, shape), params)
    y, log_det, known_dot = (layout.arrange(v) for v in (y, log_det, known_dot))
    params_dot = tuple(layout.arrange_params(p) for p in params_dot)
    elements = _chunks.chunk_elements("tangents", params[0].shape[-1])
    rows, lanes = x.shape
    # Per-element parameters: each chunk forms its own `Mixture` from its slice,
    # in cache, instead of reading six [N, K] arrays formed beforehand.
    mixture = params if _chunks.has_lanes(params[0], lanes) else mixture_arrays(params)
    if isinstance(mixture, Mixture):
        # Shared weights: project the logit tangents once, not per chunk.
        params_dot = (_softmax_tangent(params_dot[0], mixture.weights), *params_dot[1:])

    target = None if elements is None else max(1, elements // rows)
    spread = params_dot
    if target is not None and lanes >= 2 * target:
        chunk = _chunks.lane_split(lanes, target)[1]
        # Tangents shared by all lanes, broadcast to one chunk before the loop:
        # their cotangents then accumulate elementwise in the loop carry and
        # are summed over lanes once, after it.
        spread = tuple(
            p if _chunks.has_lanes(p, lanes) else _broadcast_tangent(p, (rows, chunk))
            for p in params_dot
        )
    solved_dot, log_det_dot = _chunks.map_lane_chunks(
        functools.partial(_chunk_tangents, solve_for=solve_for),
        (x, y, log_det, known_dot),
        (mixture, spread, params_dot),
        elements,
        remat=True,
    )
    if solve_for == "y":
        return x_dot, layout.restore(solved_dot), layout.restore(log_det_dot)
    return layout.restore(solved_dot), y_dot, layout.restore(log_det_dot)


def _chunk_tangents(x, y, log_det, known_dot, shared, solve_for):
    """`tangents_at` on one chunk: ``(ẏ or ẋ, log_det_dot)``.

    Everything, including the primal coefficients, is computed here from the
    chunk's inputs, so that in reverse mode nothing of size ``[..., K]`` is
    saved.
    """
    mixture, params_dot, given_params_dot = shared
    formed_here = not isinstance(mixture, Mixture)
    if formed_here:
        mixture = mixture_arrays(mixture)
    per = "latent" if solve_for == "y" else "density"
    if solve_for == "x":
        # NaN, ±inf and saturated y: the rule runs at a finite stand-in there.
        y_given = y
        regular = jnp.abs(y) <= saturation_threshold(y.dtype)
        x = jnp.where(regular, x, 0.0)
        y = jnp.where(regular, y, 0.0)
        log_det = jnp.where(regular, -log_det, 0.0)  # the forward's, from here
    coefficients = tangent_coefficients(x, mixture, y, log_det, per)
    rho = coefficients.density_resp
    shape = rho.shape[:-1]
    scales, inv_scales = mixture.scales, mixture.inv_scales
    z = (x[..., None] - mixture.means) * inv_scales
    weight_dot, mean_dot, log_scale_dot = (
        _broadcast_tangent(p, shape) for p in params_dot
    )
    if formed_here:
        weight_dot = _softmax_tangent(weight_dot, mixture.weights)
    moved = _sum_components(rho * (mean_dot + z * scales * log_scale_dot))
    weight_term = _sum_components(coefficients.signed_tail_weights * weight_dot)
    # ρ z before the second z: where ρ = 0 and z² overflows, 0, not NaN.
    rho_z = rho * z
    log_density_dot = _sum_components(
        rho * (weight_dot - log_scale_dot)
        + rho_z * (inv_scales * mean_dot + z * log_scale_dot)
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

    def with_far_tangents():
        x_far_dot, log_det_far_dot = _inverse_far_tangents(
            y_given, mixture, known_dot, *given_params_dot[1:]
        )
        return (
            jnp.where(regular, solved_dot, x_far_dot),
            jnp.where(regular, -log_det_dot, log_det_far_dot),
        )

    if mixture.log_weights.shape[-2] == 1:
        return with_far_tangents()
    # With per-element parameters the tail owners are reductions over [..., K]
    # per element: formed only in a chunk that has an irregular element.
    return lax.cond(
        jnp.all(regular), lambda: (solved_dot, -log_det_dot), with_far_tangents
    )


def _inverse_far_tangents(y, mixture: Mixture, y_dot, mean_dot, log_scale_dot):
    r"""Tangents of `_irregular.inverse_far`'s outputs, without branches.

    ``x = μ_{k*} + σ_{k*} y`` and ``log_det = log σ_{k*}`` for saturated ``y``
    (``k*`` from `_irregular.tail_components`, per parameter set), ``x = y``
    and ``log_det = max_k log σ_k`` for ``±inf``, NaN for NaN. The owning
    component is picked once per parameter set, so the batch sees
    per-element selects only.
    """

    def owner(mask, values):
        return jnp.sum(jnp.where(mask, values, 0.0), axis=-1)

    log_scales = mixture.log_scales
    widest = log_scales == jnp.max(log_scales, axis=-1, keepdims=True)
    # JAX splits the derivative of a max evenly among ties.
    widest_share = widest / jnp.sum(widest, axis=-1, keepdims=True)

    finite = jnp.isfinite(y)
    y_safe = jnp.where(finite, y, 0.0)
    saturated = finite & (jnp.abs(y) > saturation_threshold(y.dtype))
    positive = y_safe > 0
    tails = tail_components((mixture.log_weights, mixture.means, log_scales))
    mean_dot_at, log_scale_dot_at, scale_at = (
        jnp.where(positive, owner(tails[0], v), owner(tails[1], v))
        for v in (mean_dot, log_scale_dot, mixture.scales)
    )
    x_far_dot = jnp.where(
        saturated,
        mean_dot_at + scale_at * (y_safe * log_scale_dot_at + y_dot),
        y_dot,
    )
    widest_dot = jnp.sum(widest_share * log_scale_dot, axis=-1)
    log_det_far_dot = jnp.where(
        saturated, log_scale_dot_at, jnp.where(y == y, widest_dot, y_dot)
    )
    return x_far_dot, log_det_far_dot
