"""Standard-normal tail numerics that stay exact where `ndtr`/`ndtri` saturate.

Everything here is a small pure function on arrays, written in terms of the
upper tail ``Q(u) = 1 - Φ(u)`` and the Mills ratio ``R(u) = Q(u) / φ(u)``:

* :func:`log_survival` -- ``log Q(u)`` for every real ``u``;
* :func:`log_mills_ratio` -- ``log R(u)``, the slope-carrying quantity that stays
  ``O(log u)`` where ``log Q`` and ``log φ`` are both ``O(u²)``;
* :func:`mills_ratio` -- ``R(u)`` itself for ``u ≥ 0``, exp-free in float32 (the
  backward pass evaluates it once per element and component);
* :func:`ndtri_exp` -- the inverse of ``log Φ``, which neither jax nor TFP ships;
* :func:`survival` -- ``Q(u)`` itself for ``u ≥ 0``, non-increasing between
  every pair of neighbouring floats (jax's `erfc` is not), from a table.

Why the Mills ratio: far in a tail, ``log f(x) - log φ(y)`` subtracts two numbers
of size ``y²/2`` and keeps only ``eps·y²`` of accuracy. Writing ``φ(y) = Q(y)/R(y)``
turns every such difference into a ratio of O(1) quantities. The mixture code
(`_forward.py`) relies on this; change the thresholds here only together with
`tests/numerics/test_gaussian.py` (and its float64 twin), which check them against
mpmath.
"""

from __future__ import annotations

import functools
import math
import typing

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtri

__all__ = [
    "LOG_SQRT_2PI",
    "log_mills_asymptotic",
    "log_mills_ratio",
    "log_survival",
    "log_survival_and_log_mills",
    "mills_ratio",
    "ndtri_exp",
    "root_on_cells",
    "survival",
]

LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)

# Above this argument log R(u) comes from the asymptotic series
#   R(u) ≈ (1/u) Σ_{n=0}^{8} (-1)^n (2n-1)!! / u^{2n},
# whose truncation error (≤ 17!!/u^18) is below 1e-9 at u = 10 and 1e-16 at
# u = 20. Below it, `survival` (within 2 eps of Q) is used directly: forming
# R(u) = Q(u)/φ(u) there loses at most eps·u²/2 relative, from rounding u²/2
# (6e-6 in float32 at u = 10, 4e-14 in float64 at 20), far inside the layer's
# tolerances. Both branches are short straight-line code that XLA fuses, where
# a rolled continued-fraction loop would not fuse.
_SERIES_TERMS = 8


def _series_start(dtype) -> float:
    return 20.0 if jnp.dtype(dtype) == jnp.float64 else 10.0


# Newton steps in `ndtri_exp` before its last, monotone step
# (`_polish_in_cells`); the start is already good to ~1e-3 relative, and
# convergence is quadratic, so two steps reach ~1e-12 and the last one
# float64 round-off.
_NDTRI_EXP_NEWTON_STEPS = 2


def log_mills_asymptotic(u: jax.Array) -> jax.Array:
    """Log R(u) from its asymptotic series in 1/u² (Horner form), for large u."""
    inv_u2 = 1.0 / jnp.square(u)
    series = jnp.ones_like(u)
    for n in range(_SERIES_TERMS, 0, -1):
        series = 1.0 - (2 * n - 1) * inv_u2 * series
    return jnp.log(series) - jnp.log(u)


def log_survival_and_log_mills(u: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns ``(log Q(u), log R(u))`` sharing one `survival` / asymptotic series."""
    start = _series_start(u.dtype)
    use_series = u >= start
    # Double-where: each branch only ever sees arguments where it is finite, so
    # the unselected branch cannot inject NaN into gradients.
    u_series = jnp.where(use_series, u, start)
    u_direct = jnp.where(use_series, 0.0, u)
    half_u_squared = 0.5 * jnp.square(u)

    log_mills_series = log_mills_asymptotic(u_series)
    # Q(u) = 1 - Q(|u|) below 0 (within [1/2, 1], as exact as `erfc` was).
    smaller_tail = survival(jnp.abs(u_direct))
    log_survival_direct = jnp.log(
        jnp.where(u_direct < 0, 1.0 - smaller_tail, smaller_tail)
    )

    log_survival = jnp.where(
        use_series,
        -half_u_squared - LOG_SQRT_2PI + log_mills_series,
        log_survival_direct,
    )
    log_mills = jnp.where(
        use_series,
        log_mills_series,
        log_survival_direct + half_u_squared + LOG_SQRT_2PI,
    )
    return log_survival, log_mills


# float32 Mills ratio R(u) = t G(t), t = 1/(1 + 0.4 u), u >= 0: G(t) = R(u)/t is
# smooth on t in [0, 1] (G(0) = 1/0.4, from R(u) ~ 1/u). This degree-9
# polynomial in t (a relative least-squares Chebyshev fit, converted to powers
# of t) matches it to 1.6e-7, and float32 evaluation stays within 3.9e-7 of
# R (tested against mpmath). No exp: inside the backward pass this replaces
# one `erfc` per component, and degree 9 is the lowest that holds float32.
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
    return log_survival_and_log_mills(u)[0]


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
    return log_survival_and_log_mills(u)[1]


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
        minus_two_log_tail - jnp.log(minus_two_log_tail) - 2.0 * LOG_SQRT_2PI
    )
    u = jnp.where(moderate, start_moderate, start_deep).astype(dtype)
    for _ in range(_NDTRI_EXP_NEWTON_STEPS):
        # Newton on g(u) = log Q(u) - log_tail, with g'(u) = -1/R(u).
        log_q, log_mills = log_survival_and_log_mills(u)
        u = u + (log_q - log_tail) * jnp.exp(log_mills)
    return _polish_in_cells(u, log_tail)


def _log_offset_in_cell(log_tail, edge, cell_width):
    """Distance from ``edge`` to the root of ``log Q(u) = log_tail``, in a cell.

    With ``s = (log Q(a) - log_tail)·R(a)`` and ``log Q(a + e) = log Q(a) -
    e/R(a) - (1/R(a))(1/R(a) - a) e²/2 - ...``, the root is ``e = s - k s²``
    with ``k = (1/R(a) - a)/2 ∈ (0, 1/(2a))``. Over a cell (``|s| ≲ 2^-11``)
    ``k s²`` moves by far less than an ulp of ``s`` per step of ``s``, so the
    rounded result is non-increasing in ``log_tail``.
    """
    log_q, log_mills = log_survival_and_log_mills(edge)
    s = (log_q - log_tail) * jnp.exp(log_mills)
    k = 0.5 * (jnp.exp(-log_mills) - edge)
    return jnp.clip(s - k * jnp.square(s), 0.0, cell_width)


def _polish_in_cells(u, log_tail):
    """The last step of `_upper_tail_quantile`, monotone in ``log_tail``.

    A Newton step's result moves with its start, so neighbouring ``log_tail``
    values could map to ``u`` one ulp out of order. Instead
    the root is found on cells (`root_on_cells`), located by the Newton
    iterate ``u`` (good to far better than a quarter cell).
    """

    def offsets_from_edges(edge, width):
        # Both edges in one stacked call: one copy of the log-survival code
        # (two copies added 0.36 s to the forward's compile time; this, 0.2 s).
        offsets = _log_offset_in_cell(log_tail, jnp.stack([edge, edge + width]), width)
        return offsets[0], offsets[1]

    return root_on_cells(u, offsets_from_edges)


def _cell_width(dtype) -> float:
    """Width ``h`` of the cells of `root_on_cells`: ``2^-12`` / ``2^-20``."""
    return 2.0**-20 if jnp.dtype(dtype) == jnp.float64 else 2.0**-12


def root_on_cells(guess, offsets_from_edges):
    """A root ``r ≥ 0`` computed so that it is monotone in the equation's data.

    The roots solved here (``Q(r) = tail``, ``log Q(r) = log_tail``) are
    monotone in their data, but a rounded iteration's result is not: it
    moves with its start and can come out one ulp out of order between
    neighbouring inputs. Instead, with cells ``[a_j, a_j + h)``, ``a_j = j·h``
    (`_cell_width`) and ``j = ⌊guess/h - 1/2⌋`` from a guess good to a quarter
    cell, the root lies in cell ``j`` or ``j + 1``, and

        r = (a_j + d_j) + d_{j+1},   d_i = clip(r - a_i, 0, h),

    with each ``d_i`` from a short series about the edge ``a_i``
    (``offsets_from_edges(a_j, h)`` returns ``(d_j, d_{j+1})``). If the root is
    in cell ``j``, ``d_{j+1} = 0``; if in cell ``j + 1``, ``d_j = h`` and
    ``a_j + h = a_{j+1}`` exactly. So the value does not depend on which ``j``
    the guess picked, and for a fixed ``j`` it is a sum of rounded terms each
    monotone in the data: ``r`` is monotone between every pair of
    neighbouring inputs. Users: `_forward._magnitude_from_tail` (the bulk's
    ``|y|``) and `_polish_in_cells` (`ndtri_exp`).
    """
    width = _cell_width(guess.dtype)
    cell = jnp.maximum(jnp.floor(guess * (1.0 / width) - 0.5), 0.0)
    edge = cell * width
    first, second = offsets_from_edges(edge, width)
    return (edge + first) + second


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


# `survival` tabulates Q and φ at the cell edges a_i = i/G for u in [0, end].
# Q(end) is below eps times the smallest tail the mixture's bulk pass sums
# (1.6e-37 vs 1.2e-35 in float32; 1e-284 vs 1e-266 in float64). In float32,
# beyond u = 12 (Q < 1.8e-33) the product φ(a)·(series) can fall below the
# smallest normal number, which XLA's CPU backend flushes to zero: there the
# error is bounded by 1.2e-38 absolute instead of an ulp, negligible in a sum
# of at least 1e-28. Between edges it uses the Taylor series of Q(a + e) in e with
# `terms` terms; the first omitted one, about (a/G)^terms / (G·(terms+1)!), is
# below eps/(4a) at u = end. G is a power of two, so u·G and e = u - a_i are
# exact.
class _SurvivalTable(typing.NamedTuple):
    cells_per_unit: int
    end: float
    terms: int


_SURVIVAL_TABLES = {
    "float32": _SurvivalTable(cells_per_unit=128, end=12.75, terms=5),
    "float64": _SurvivalTable(cells_per_unit=512, end=36.0, terms=9),
}


# Terms of the Mills-ratio continued fraction used to build the table for
# u ≥ 1: with 1000 terms it is within 2.2 eps of mpmath there (200 terms are
# not enough below u = 2). libm's erfc is within 1.5 eps below u = 1 but drifts
# to 780 eps beyond u = 10, because it rounds u² before exponentiating.
_CONTINUED_FRACTION_TERMS = 1000


@functools.cache
def _survival_table_values(dtype_name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(Q(a_i), φ(a_i))`` at the cell edges, in float64 rounded once to dtype.

    ``a_i = i/G`` has at most 15 significant bits, so ``a_i²/2`` is exact and
    ``φ(a_i)`` is within an ulp; ``Q = φ·R`` with ``R`` from its continued
    fraction ``1/(a + 1/(a + 2/(a + 3/(a + …))))`` evaluated backwards.
    """
    table = _SURVIVAL_TABLES[dtype_name]
    edges = np.arange(int(table.end * table.cells_per_unit) + 2) / table.cells_per_unit
    density = np.exp(-0.5 * edges**2) / math.sqrt(2.0 * math.pi)
    far = np.maximum(edges, 1.0)
    remainder = np.zeros_like(edges)
    for k in range(_CONTINUED_FRACTION_TERMS, 0, -1):
        remainder = k / (far + remainder)
    survival_far = density / (far + remainder)
    survival_near = np.array([0.5 * math.erfc(a * _INV_SQRT_2) for a in edges])
    survival_at_edges = np.where(edges >= 1.0, survival_far, survival_near)
    survival_at_edges = survival_at_edges.astype(dtype_name)
    # The clip in `survival` relies on the table decreasing strictly.
    assert np.all(np.diff(survival_at_edges) < 0), dtype_name
    return survival_at_edges, density.astype(dtype_name)


def survival(u: jax.Array) -> jax.Array:
    r"""Standard-normal upper tail ``Q(u) = 1 - Φ(u)`` for ``u ≥ 0``, monotone.

    .. math:: Q(a + e) = Q(a) - \varphi(a) \sum_{n \ge 1}
        (-1)^{n-1} \mathrm{He}_{n-1}(a)\,\frac{e^n}{n!}

    with ``a = ⌊uG⌋/G`` a table edge and ``0 ≤ e < 1/G`` (``G = 128`` in
    float32, 512 in float64), clipped below by the next edge's ``Q``.

    Why not ``erfc``: jax's float32 ``erfc`` steps up between neighbouring
    arguments for 2–10% of them below 1 (float64: up to 18% near 0.9), and a
    mixture CDF summed from it then steps back. Here every rounded operation
    is monotone in ``u``: ``e`` is exact, the series is ``e - e²·m(e)`` whose
    correction changes by far less than an ulp of ``e`` per step
    (``m ≈ a/2``, so ``e·m ≤ a/(2G) ≤ 0.05``), the table is constant within
    a cell, and the clip at ``Q(a + 1/G)`` (the value the next cell starts
    from exactly) keeps every cell at or above the next. Relative error
    ≤ 1.2e-7 in float32 for ``u ≤ 12`` (beyond, ≤ 1.2e-38 absolute, from
    flushing denormal products to zero) and ≤ 2 eps in float64, against
    mpmath (jax's ``erfc``: 1.2e-5 near u = 11 in float32, 1068 eps in
    float64).

    Args:
      u: Array of any shape and floating dtype, ``u ≥ 0``; float16 and
        bfloat16 are computed in float32 and rounded back.

    Returns:
      ``Q(u)``, same shape and dtype; ``0`` beyond the table's end (12.75 in
      float32, 36 in float64, where ``Q`` is below 1.6e-37 / 1e-284), NaN at
      NaN.
    """
    dtype_name = jnp.dtype(u.dtype).name
    if dtype_name not in _SURVIVAL_TABLES:
        # float16 / bfloat16: float32's table, the result rounded back.
        return survival(u.astype(jnp.float32)).astype(u.dtype)
    table = _SURVIVAL_TABLES[dtype_name]
    survival_at_edges, density_at_edges = (
        jnp.asarray(values) for values in _survival_table_values(dtype_name)
    )
    last_cell = survival_at_edges.shape[0] - 2
    # Beyond the end the result is 0; the series only sees arguments inside
    # the table, so its gradient stays finite there (NaN stays NaN).
    inside = jnp.minimum(u, table.end)
    cell = jnp.clip(jnp.floor(inside * table.cells_per_unit), 0, last_cell)
    edge = cell * (1.0 / table.cells_per_unit)
    offset = inside - edge
    index = cell.astype(jnp.int32)
    # Coefficients c_n = (-1)^n He_{n-1}(a)/n! of e^n in the series, n ≥ 2,
    # from the Hermite recurrence He_{k+1} = a He_k - k He_{k-1}.
    hermite_previous, hermite = jnp.ones_like(edge), edge
    coefficients = []
    for n in range(2, table.terms + 1):
        coefficients.append(((-1) ** n / math.factorial(n)) * hermite)
        hermite_previous, hermite = hermite, edge * hermite - (n - 1) * hermite_previous
    correction = coefficients[-1]
    for coefficient in coefficients[-2::-1]:
        correction = coefficient + offset * correction
    integral = offset - jnp.square(offset) * correction
    series = survival_at_edges[index] - density_at_edges[index] * integral
    # The clip moves the value by at most an ulp, at a few floats before an
    # edge; its gradient is the series' there too (the clip's own would be 0).
    # `series + (clipped - series)` is exactly `clipped`: the two are within
    # an ulp, so their difference and the sum are exact.
    clipped = jnp.maximum(series, survival_at_edges[index + 1])
    value = series + jax.lax.stop_gradient(clipped - series)
    return jnp.where(u >= table.end, 0.0, value)
