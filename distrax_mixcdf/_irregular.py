r"""Inputs the closed-form numerics do not take: NaN, ±inf, and saturated values.

The map's numerics (`_forward.py`, `_root_finding.py`) work while ``z²`` fits
the float range. Beyond `saturation_threshold` (``sqrt(max)/16``,
1.2e18 in float32) this module gives the outputs in closed form, exact to
working precision, and it fixes what NaN and ±inf map to:

* NaN gives NaN in both outputs.
* ``±inf`` gives ``±inf`` and the limit of the log-det there,
  ``-max_k log σ_k`` (forward) or ``+max_k log σ_k`` (inverse): the widest
  component dominates both tails, so ``dy/dx → 1/σ_max``.
* A finite value beyond the threshold takes the asymptotic form of the one
  component that dominates there (`forward_saturation`, `inverse_saturation`).

``*_far`` functions return those outputs for every element of a batch (finite
garbage where the element is regular), computed at a finite stand-in where the
input is not finite, so their derivatives are finite wherever a loss masks the
element out (the double-``where`` pattern). Two mechanisms apply them:
`apply_policy` around a core (the forward, and the inverse's comparison
gradient modes), and the default inverse itself, whose solver and implicit
rule handle such elements chunk by chunk (`_root_finding`, `_tangents`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from distrax_mixcdf import _chunks
from distrax_mixcdf._components import fold, reduce_components

__all__ = [
    "apply_policy",
    "forward_far",
    "forward_reach",
    "forward_saturation",
    "forward_stand_in",
    "inverse_far",
    "inverse_reach",
    "inverse_saturation",
    "inverse_stand_in",
    "saturation_threshold",
    "tail_components",
]


def saturation_threshold(dtype) -> float:
    """``|z|`` or ``|y|`` beyond which ``z²`` overflows in the tail numerics (÷ 16)."""
    return float(math.sqrt(float(jnp.finfo(dtype).max))) / 16.0


def forward_reach(params) -> jax.Array:
    r"""Below this ``|x|`` no element can be saturated (see `forward_saturation`).

    .. math:: t\,e^{\max_k \log\sigma_k} - \max_k |\mu_k|
              \le \max_k (t\,\sigma_k - |\mu_k|):

    a valid lower bound that needs one ``exp`` per element, not one per component.
    """
    _, means, log_scales = params
    threshold = saturation_threshold(means.dtype)
    widest = threshold * jnp.exp(reduce_components(jnp.maximum, log_scales))
    return widest - reduce_components(jnp.maximum, jnp.abs(means))


def forward_saturation(x, params):
    r"""``(saturated, y, log_det)`` where every ``z_k`` lies beyond the threshold.

    When all ``z_k = (x - μ_k)/σ_k`` exceed ``t = sqrt(max float)/16`` on the same
    side (1.2e18 in float32), the component with the smallest ``|z_k|``
    dominates the tail and ``y = z_{k*}(1 + O(\log z / z^2))``,
    ``log|dy/dx| = -\log σ_{k*}(1 + O(z^{-2}))``: exact to working precision,
    where the log-space tail pass would overflow ``z²``.
    """
    _, means, _ = params
    threshold = saturation_threshold(x.dtype)
    shape = np.broadcast_shapes(x.shape, means.shape[:-1])

    def extremes(carry, log_weight, mean, log_scale):
        del log_weight
        lowest, lowest_scale, highest, highest_scale = carry
        z = (x - mean) * jnp.exp(-log_scale)
        lower, higher = z < lowest, z > highest
        return (
            jnp.where(lower, z, lowest),
            jnp.where(lower, log_scale, lowest_scale),
            jnp.where(higher, z, highest),
            jnp.where(higher, log_scale, highest_scale),
        )

    inf, zero = jnp.asarray(jnp.inf, x.dtype), jnp.zeros((), x.dtype)
    lowest, lowest_scale, highest, highest_scale = fold(
        extremes, (inf, zero, -inf, zero), params, shape
    )
    right, left = lowest > threshold, highest < -threshold
    y = jnp.where(right, lowest, highest)
    return right | left, y, -jnp.where(right, lowest_scale, highest_scale)


def inverse_reach(params) -> jax.Array:
    """Below this ``|y|`` no element is saturated (see `inverse_saturation`)."""
    return jnp.asarray(saturation_threshold(params[1].dtype), params[1].dtype)


def tail_components(params) -> tuple[jax.Array, jax.Array]:
    """One-hot ``[..., K]`` masks of the component that owns each far tail.

    The widest component (largest ``σ``); among equally wide ones, the bracket
    end: the largest mean for ``y → +∞``, the smallest for ``y → -∞``. Returned
    as ``(positive, negative)``, per parameter set: for ``|y|`` beyond the
    threshold ``μ_k + σ_k y`` is largest (smallest) for that component unless
    the means differ by ~1e18 scales.
    """
    _, means, log_scales = params
    widest = log_scales == jnp.max(log_scales, axis=-1, keepdims=True)
    masks = []
    for signed_means in (means, -means):
        tied = jnp.where(widest, signed_means, -jnp.inf)
        pick = widest & (tied == jnp.max(tied, axis=-1, keepdims=True))
        # The first of any exact ties.
        masks.append(pick & (jnp.cumsum(pick, axis=-1) == 1))
    return masks[0], masks[1]


def inverse_saturation(y, params):
    r"""``(saturated, x, log_det)`` for ``|y|`` beyond the threshold.

    There the root is the bracket end ``μ_k + σ_k y`` of the component that
    owns the tail (`tail_components`), to relative ``O(\log w / y^2)``, and the
    inverse's log-det is that component's ``\log σ``.
    """
    _, means, log_scales = params
    shape = jnp.broadcast_shapes(y.shape, means.shape[:-1])
    saturated = jnp.broadcast_to(jnp.abs(y) > inverse_reach(params), shape)

    def owner(mask, values):
        return jnp.sum(jnp.where(mask, values, 0.0), axis=-1)

    positive, negative = tail_components(params)
    upper = y > 0
    mean, log_scale = (
        jnp.where(upper, owner(positive, v), owner(negative, v))
        for v in (means, log_scales)
    )
    return saturated, mean + jnp.exp(log_scale) * y, jnp.broadcast_to(log_scale, shape)


def forward_stand_in(params) -> jax.Array:
    """The input the forward's core sees in place of an irregular one: ``μ_1``."""
    return params[1][..., 0]


def inverse_stand_in(params) -> jax.Array:
    """The input the inverse's core sees in place of an irregular one: 0."""
    return jnp.zeros((), params[1].dtype)


def _far(value, params, saturation, stand_in, sign):
    finite = jnp.isfinite(value)
    safe = jnp.where(finite, value, stand_in(params))
    saturated, out_far, log_det_far = saturation(safe, params)
    limit = sign * reduce_components(jnp.maximum, params[2])
    # `value == value` is False only for NaN, which stays NaN.
    log_det_other = jnp.where(value == value, limit, value)
    out = jnp.where(saturated, out_far, value)
    log_det = jnp.where(saturated, log_det_far, log_det_other)
    return finite & ~saturated, out, log_det


def forward_far(x, params):
    """``(regular, y, log_det)`` with the forward's outputs for irregular ``x``.

    ``regular`` marks the elements the closed-form numerics own; elsewhere
    ``y`` and ``log_det`` are this module's (see the module docstring).
    """
    return _far(x, params, forward_saturation, forward_stand_in, -1.0)


def inverse_far(y, params):
    """``(regular, x, log_det)`` with the inverse's outputs for irregular ``y``.

    The log-det is the inverse's own, ``log |dx/dy|``.
    """
    return _far(y, params, inverse_saturation, inverse_stand_in, 1.0)


def apply_policy(value, params, core, reach, far, stand_in):
    """Runs ``core`` on the regular elements; NaN, ±inf and saturated ones apart.

    ``core`` sees a harmless stand-in in every slot it does not own, and
    ``far``'s outputs replace its own there. All of that runs only when the
    batch has an element beyond ``reach`` (or a NaN): one fused reduction
    decides, and two ``lax.cond`` pass a clean batch straight through. Every
    branch is finite on every element, so under ``vmap``, where the conds
    become selects, no branch leaks NaN into another's cotangents. The
    irregular branches run in rematerialised lane chunks, so a clean batch
    saves no masks for the backward pass.

    Args:
      value: Inputs, broadcastable against the parameters' batch shape.
      params: ``(log_weights, means, log_scales)``, each ``[..., K]``.
      core: ``(value, params) -> (out, log_det)`` for regular inputs.
      reach: ``params -> bound``: below it no input is saturated.
      far: ``(value, params) -> (regular, out, log_det)`` (`forward_far`, ...).
      stand_in: ``params -> value`` the core sees in irregular slots.

    Returns:
      ``(out, log_det)`` of the broadcast batch shape.
    """
    value, params, layout = _chunks.canonical(value, params)
    elements = _chunks.chunk_elements("policy")
    # NaN compares False, so a NaN batch counts as irregular too.
    irregular = ~jnp.all(jnp.abs(value) <= reach(params))

    def regular_chunk(value, params):
        regular = far(value, params)[0]
        return jnp.where(regular, value, stand_in(params))

    # The outer checkpoint makes each branch's residuals its operands, which
    # the cond already has.
    @jax.checkpoint
    def regular_input(value, params):
        return _chunks.map_lane_chunks(
            regular_chunk, (value,), params, elements, remat=True
        )

    def combine_chunk(value, out, log_det, params):
        regular, out_far, log_det_far = far(value, params)
        return (
            jnp.where(regular, out, out_far),
            jnp.where(regular, log_det, log_det_far),
        )

    @jax.checkpoint
    def combine(value, params, out, log_det):
        return _chunks.map_lane_chunks(
            combine_chunk, (value, out, log_det), params, elements, remat=True
        )

    def keep(value, params, out, log_det):
        del value, params
        return out, log_det

    core_input = jax.lax.cond(
        irregular, regular_input, lambda value, params: value, value, params
    )
    out, log_det = core(core_input, params)
    out, log_det = jax.lax.cond(irregular, combine, keep, value, params, out, log_det)
    return layout.restore(out), layout.restore(log_det)
