"""Standard-normal tail numerics that stay exact where `ndtr`/`ndtri` saturate.

Everything here is a small pure function on arrays, written in terms of the
upper tail ``Q(u) = 1 - Φ(u)`` and the Mills ratio ``R(u) = Q(u) / φ(u)``:

* :func:`log_survival` -- ``log Q(u)`` for every real ``u``;
* :func:`log_mills_ratio` -- ``log R(u)``, the slope-carrying quantity that stays
  ``O(log u)`` where ``log Q`` and ``log φ`` are both ``O(u²)``;
* :func:`mills_ratio` -- ``R(u)`` itself for ``u ≥ 0``, exp-free in float32 (the
  backward pass evaluates it once per element and component);
* :func:`ndtri_exp` -- the inverse of ``log Φ``, which neither jax nor TFP ships.

Why the Mills ratio: far in a tail, ``log f(x) - log φ(y)`` subtracts two numbers
of size ``y²/2`` and keeps only ``eps·y²`` of accuracy. Writing ``φ(y) = Q(y)/R(y)``
turns every such difference into a ratio of O(1) quantities. The mixture code
(`_mixture.py`) relies on this; change the thresholds here only together with
`tests/test_gaussian.py` (and its float64 twin), which check them against mpmath.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.scipy.special import erfc, ndtri

__all__ = ["log_mills_ratio", "log_survival", "mills_ratio", "ndtri_exp"]

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)

# Above this argument log R(u) comes from the asymptotic series
#   R(u) ≈ (1/u) Σ_{n=0}^{8} (-1)^n (2n-1)!! / u^{2n},
# whose truncation error (≤ 17!!/u^18) is below 1e-9 at u = 10 and 1e-16 at
# u = 20. Below it, `erfc` is used directly: forming R(u) = Q(u)/φ(u) there loses
# at most eps·u²/2 relative (6e-6 in float32 at u = 10, 4e-14 in float64 at 20),
# far inside the layer's tolerances. Both branches are short straight-line code
# that XLA fuses: a rolled continued-fraction loop made gradients 10x slower.
_SERIES_TERMS = 8


def _series_start(dtype) -> float:
    return 20.0 if jnp.dtype(dtype) == jnp.float64 else 10.0


# Newton polishing steps in `ndtri_exp`; the start is already good to ~1e-3
# relative, and convergence is quadratic, so three steps reach float64 round-off.
_NDTRI_EXP_NEWTON_STEPS = 3


def _log_mills_asymptotic(u: jax.Array) -> jax.Array:
    """Log R(u) from its asymptotic series in 1/u² (Horner form), for large u."""
    inv_u2 = 1.0 / jnp.square(u)
    series = jnp.ones_like(u)
    for n in range(_SERIES_TERMS, 0, -1):
        series = 1.0 - (2 * n - 1) * inv_u2 * series
    return jnp.log(series) - jnp.log(u)


def _log_survival_and_log_mills(u: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns ``(log Q(u), log R(u))`` sharing one `erfc` / asymptotic series."""
    start = _series_start(u.dtype)
    use_series = u >= start
    # Double-where: each branch only ever sees arguments where it is finite, so
    # the unselected branch cannot inject NaN into gradients.
    u_series = jnp.where(use_series, u, start)
    u_direct = jnp.where(use_series, 0.0, u)
    half_u_squared = 0.5 * jnp.square(u)

    log_mills_series = _log_mills_asymptotic(u_series)
    log_survival_direct = jnp.log(0.5 * erfc(u_direct * _INV_SQRT_2))

    log_survival = jnp.where(
        use_series,
        -half_u_squared - _LOG_SQRT_2PI + log_mills_series,
        log_survival_direct,
    )
    log_mills = jnp.where(
        use_series,
        log_mills_series,
        log_survival_direct + half_u_squared + _LOG_SQRT_2PI,
    )
    return log_survival, log_mills


# float32 Mills ratio R(u) = t G(t), t = 1/(1 + 0.4 u), u >= 0: G(t) = R(u)/t is
# smooth on t in [0, 1] (G(0) = 1/0.4, from R(u) ~ 1/u). This degree-9
# polynomial in t (a relative least-squares Chebyshev fit, converted to powers
# of t) matches it to 1.6e-7, and float32 evaluation stays within 3.9e-7 of
# R (tested against mpmath). No exp: inside the backward pass this replaces
# one `erfc` per component, and two fewer terms than a degree-11 fit measured
# ~10% off that kernel.
_MILLS_POLYNOMIAL = (
    3.9999993511e-01,
    4.0001522510e-01,
    3.3541791218e-01,
    2.1653398357e-01,
    -1.5956903507e-02,
    1.7218848121e-01,
    -7.4427242614e-01,
    7.8260955375e-01,
    -3.5546984124e-01,
    6.2248143090e-02,
)
_MILLS_T_SCALE = 0.4


def mills_ratio(u: jax.Array) -> jax.Array:
    r"""The Mills ratio ``R(u) = Q(u)/φ(u)`` for ``u ≥ 0`` (and ``u = +inf``).

    .. math:: R(u) = \frac{1 - \Phi(u)}{\varphi(u)}
        = \sqrt{\pi/2}\;\mathrm{erfcx}\big(u/\sqrt2\big)

    float32: an exp-free rational form, ``t·G(t)`` with ``t = 1/(1 + 0.4u)``
    and ``G`` a degree-9 polynomial (relative error ≤ 4e-7);
    float64: ``exp(log_mills_ratio(u))`` (≤ 4 eps·u² relative, from rounding
    ``u²/2``).

    Args:
      u: Array of any shape and floating dtype, ``u ≥ 0``; negative ``u`` is
        outside the domain (there ``R`` grows like ``e^{u²/2}``).

    Returns:
      ``R(u)`` with the shape and dtype of ``u``; ``0`` at ``+inf``, NaN at NaN.
    """
    if jnp.dtype(u.dtype) != jnp.float32:
        return jnp.exp(log_mills_ratio(u))
    t = 1.0 / (1.0 + _MILLS_T_SCALE * u)
    poly = jnp.full_like(t, _MILLS_POLYNOMIAL[-1])
    for coefficient in _MILLS_POLYNOMIAL[-2::-1]:
        poly = coefficient + t * poly
    return t * poly


def log_survival(u: jax.Array) -> jax.Array:
    r"""Log of the standard-normal survival function, exact in both tails.

    .. math:: \log Q(u) = \log \int_u^\infty \varphi(t)\,dt

    Args:
      u: Array of any shape and floating dtype.

    Returns:
      ``log Q(u)`` with the shape and dtype of ``u``; finite for every finite
      ``u`` (about ``-u²/2`` for large ``u``, about ``-Q(-u)`` for very negative
      ``u``).
    """
    return _log_survival_and_log_mills(u)[0]


def log_mills_ratio(u: jax.Array) -> jax.Array:
    r"""Log of the Mills ratio of the standard normal.

    .. math:: \log R(u) = \log \frac{Q(u)}{\varphi(u)} \approx -\log u
       \quad (u \to \infty)

    Computed from an asymptotic series without forming ``Q`` or ``φ`` when
    ``u ≥ 10`` (float32) or ``u ≥ 20`` (float64), so it keeps full relative
    accuracy where both underflow.

    Args:
      u: Array of any shape and floating dtype.

    Returns:
      ``log R(u)``, same shape and dtype as ``u``.
    """
    return _log_survival_and_log_mills(u)[1]


def _upper_tail_quantile(log_tail: jax.Array) -> jax.Array:
    """U ≥ 0 with log Q(u) = log_tail, for log_tail ≤ log(1/2)."""
    dtype = log_tail.dtype
    moderate = log_tail > -20.0
    # Moderate tails: `ndtri` is accurate there; deep tails: the asymptotic
    # u² ≈ -2 log Q - log(-2 log Q) - log(2π), from Q(u) ≈ φ(u)/u.
    safe_moderate = jnp.where(moderate, log_tail, -1.0)
    safe_deep = jnp.where(moderate, -20.0, log_tail)
    start_moderate = -ndtri(jnp.exp(safe_moderate))
    minus_two_log_tail = -2.0 * safe_deep
    start_deep = jnp.sqrt(
        minus_two_log_tail - jnp.log(minus_two_log_tail) - 2.0 * _LOG_SQRT_2PI
    )
    u = jnp.where(moderate, start_moderate, start_deep).astype(dtype)
    for _ in range(_NDTRI_EXP_NEWTON_STEPS):
        # Newton on g(u) = log Q(u) - log_tail, with g'(u) = -1/R(u).
        log_q, log_mills = _log_survival_and_log_mills(u)
        u = u + (log_q - log_tail) * jnp.exp(log_mills)
    return u


@jax.custom_jvp
def ndtri_exp(log_p: jax.Array) -> jax.Array:
    r"""Inverse of the log standard-normal CDF: ``y`` with ``log Φ(y) = log_p``.

    .. math:: y = \Phi^{-1}(e^{\log p}),\qquad
       \frac{dy}{d\log p} = \frac{\Phi(y)}{\varphi(y)} = R(-y)

    Exact (to a few ulp) for every ``log_p < 0``, including ``log_p = -1e8``
    where ``exp(log_p)`` underflows: an asymptotic start polished by Newton steps
    on :func:`log_survival` (whichever tail is smaller is inverted).

    Args:
      log_p: Array of log-probabilities, ``log_p ≤ 0``.

    Returns:
      The standard-normal quantile, same shape and dtype as ``log_p``.
    """
    lower_half = log_p <= -math.log(2.0)
    # For p > 1/2 invert the upper tail: log Q = log(1 - p) = log(-expm1(log p)).
    safe_upper = jnp.where(lower_half, -1.0, log_p)
    log_tail = jnp.where(lower_half, log_p, jnp.log(-jnp.expm1(safe_upper)))
    u = _upper_tail_quantile(log_tail)
    return jnp.where(lower_half, -u, u)


@ndtri_exp.defjvp
def _ndtri_exp_jvp(primals, tangents):
    (log_p,) = primals
    (log_p_dot,) = tangents
    y = ndtri_exp(log_p)
    return y, jnp.exp(log_mills_ratio(-y)) * log_p_dot
