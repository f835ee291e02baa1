r"""The mixture fits behind :func:`~distrax_mixcdf.initial_params`.

Quantile, EM and KDE fits of a ``K``-component Gaussian mixture to each
column of ``[D, N]`` data, as one jit-compiled function vmapped over columns,
plus the host-side checks whose errors depend on the data's values. The greedy
Gaussianization flow fits its marginals with the same functions, on latents
whose tied values it handles with its own floors (:func:`smoothing_floor`).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from distrax_mixcdf._validation import check_int

__all__ = [
    "BANDWIDTH_RULES",
    "METHODS",
    "check_options",
    "fit_columns",
    "smoothing_floor",
    "validated_columns",
]

METHODS = ("quantile", "em", "kde")
BANDWIDTH_RULES = ("scott", "silverman")

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)

# Default scale floor, relative to the data's standard deviation: three decades
# below the data's spread still resolves any structure a K-component warm start
# can represent, while keeping 1/σ (and the flow's log-det) far from overflow.
_RELATIVE_SCALE_FLOOR = 1e-3


def fit_columns(columns, num_components, method, floors, max_iter, tol, bandwidth):
    """Runs the compiled fit on checked ``[D, N]`` columns with ``[D]`` floors.

    Rule, bandwidth and floors are traced values, not static arguments, so
    changing them reuses the compiled fit.

    A floor of 0 means "the default relative floor". No distinct-value check:
    the greedy flows call this on latents whose tied values they handle with
    their own floors.
    """
    dtype = columns.dtype
    rule = BANDWIDTH_RULES.index(bandwidth) if isinstance(bandwidth, str) else -1
    return _fit(
        jnp.asarray(columns),
        jnp.asarray(max_iter, jnp.int32),
        jnp.asarray(tol, dtype),
        jnp.asarray(rule, jnp.int32),
        jnp.asarray(0.0 if isinstance(bandwidth, str) else bandwidth, dtype),
        jnp.asarray(floors, dtype),
        method=method,
        num_components=int(num_components),
    )


def smoothing_floor(columns: np.ndarray, factor: float = 0.5) -> np.ndarray:
    r"""A data-driven lower bound on component scales, one per column.

    .. math::
        \sigma_{\min,d} = \max\Big(c \cdot 1.06\,
        \min\big(\hat\sigma_d, \mathrm{IQR}_d / 1.349\big)\, N^{-1/5},\
        \delta_d\Big),

    :math:`c` times a rule-of-thumb bandwidth with a robust spread (the sample
    standard deviation if the IQR is 0), and at least the column's resolution
    :math:`\delta_d`, the smallest gap between distinct values. Why: a
    component narrower than the bandwidth that ``N`` points support, or than the
    spacing of tied or rounded values, fits single points and gives held-out
    points between them a vanishing density.

    Args:
      columns: Data ``[D, N]`` (NumPy, finite).
      factor: :math:`c`.

    Returns:
      ``[D]`` floors in the columns' units (float64, positive).
    """
    x = np.asarray(columns, np.float64)
    n = x.shape[1]
    std = x.std(axis=1)
    lower, upper = np.quantile(x, [0.25, 0.75], axis=1)
    robust = np.minimum(std, (upper - lower) / 1.349)
    spread = np.where(robust > 0, robust, std)
    gaps = np.diff(np.sort(x, axis=1), axis=1)
    resolution = np.min(np.where(gaps > 0, gaps, np.inf), axis=1, initial=np.inf)
    resolution = np.where(np.isfinite(resolution), resolution, 0.0)
    floor = np.maximum(factor * 1.06 * spread * n ** (-0.2), resolution)
    # A constant column: any positive unit relative to its magnitude.
    return np.where(floor > 0, floor, 1e-3 * (1.0 + np.abs(x[:, 0])))


# -- validation (host side: the errors depend on the data's values) ---------------


def _is_real(value: Any) -> bool:
    # bool is a number to Python, but `tol=True` is a bug, not 1.0.
    return isinstance(value, int | float | np.integer | np.floating) and not (
        isinstance(value, bool)
    )


def check_options(num_components, method, max_iter, tol, bandwidth, min_scale) -> None:
    """Raises ``ValueError`` for an invalid option, naming it and its value."""
    check_int(num_components, "num_components", 1)
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.")
    check_int(max_iter, "max_iter", 0)
    if not _is_real(tol) or not (math.isfinite(tol) and tol >= 0):
        raise ValueError(f"`tol` must be a finite float >= 0, got {tol!r}.")
    if isinstance(bandwidth, str):
        if bandwidth not in BANDWIDTH_RULES:
            raise ValueError(
                f"`bandwidth` must be one of {BANDWIDTH_RULES} or a positive "
                f"float, got {bandwidth!r}."
            )
    elif not _is_real(bandwidth) or not (math.isfinite(bandwidth) and bandwidth > 0):
        raise ValueError(
            f"`bandwidth` must be one of {BANDWIDTH_RULES} or a positive finite "
            f"float, got {bandwidth!r}."
        )
    if min_scale is not None and (
        not _is_real(min_scale) or not (math.isfinite(min_scale) and min_scale > 0)
    ):
        raise ValueError(
            f"`min_scale` must be None or a positive finite float, got {min_scale!r}."
        )


def _working_dtype(dtype: np.dtype) -> np.dtype:
    """The float dtype the fit runs in.

    Below 32 bits the EM sums lose too much to converge, so half precision is
    promoted; float64 is kept only where JAX allows it (``jax_enable_x64``).
    """
    if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits >= 32:
        return np.dtype(jax.dtypes.canonicalize_dtype(dtype))
    if jnp.issubdtype(dtype, jnp.floating):
        return np.dtype(np.float32)
    return np.dtype(jax.dtypes.canonicalize_dtype(np.float64))


def _dims_where(mask: np.ndarray) -> str:
    return str([int(i) for i in np.flatnonzero(mask)])


def validated_columns(x: Any, num_components: int) -> tuple[np.ndarray, bool]:
    """Checks the data and returns it as ``[D, N]`` in the working dtype.

    Returns:
      ``(columns, squeeze)``, ``squeeze`` being True for 1-D input.
    """
    try:
        array = np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        raise TypeError(
            "initial_params validates the data's values on the host and cannot be "
            "traced: call it outside jax.jit/vmap/grad."
        ) from None
    shape = array.shape
    is_number = jnp.issubdtype(array.dtype, jnp.floating) or jnp.issubdtype(
        array.dtype, jnp.integer
    )
    if array.dtype != np.bool_ and not is_number:
        raise ValueError(
            f"`x` must hold real numbers, got dtype {array.dtype} with shape {shape}."
        )
    if array.ndim not in (1, 2):
        raise ValueError(
            f"`x` must have shape [N] or [N, D], got a {array.ndim}-D array of "
            f"shape {shape}."
        )
    columns = array.T if array.ndim == 2 else array[None, :]
    if columns.shape[1] == 0 or columns.shape[0] == 0:
        raise ValueError(
            f"`x` must have at least one sample and one dimension, got shape {shape}."
        )
    if jnp.issubdtype(array.dtype, jnp.floating):
        # Checked before the cast, so an overflow below gets its own message.
        finite = np.isfinite(columns.astype(np.promote_types(array.dtype, np.float32)))
        _raise_if_not_finite(finite, shape, "NaN or inf")
    working = _working_dtype(array.dtype)
    with np.errstate(over="ignore"):  # reported just below, with the shape
        columns = np.ascontiguousarray(columns.astype(working))
    _raise_if_not_finite(
        np.isfinite(columns), shape, f"values that overflow {working} (inf after cast)"
    )
    distinct = 1 + np.count_nonzero(np.diff(np.sort(columns, axis=1), axis=1), axis=1)
    too_few = distinct < num_components
    if too_few.any():
        where = "" if array.ndim == 1 else f" in dimension(s) {_dims_where(too_few)}"
        counts = [int(c) for c in distinct[too_few]]
        raise ValueError(
            f"`x` has fewer than num_components={num_components} distinct "
            f"values{where} (distinct counts {counts}); shape {shape}. A "
            "K-component fit needs at least K distinct values per dimension."
        )
    return columns, array.ndim == 1


def _raise_if_not_finite(finite: np.ndarray, shape: tuple[int, ...], what: str):
    if not finite.all():
        bad_dims = np.asarray(~finite.all(axis=1))
        where = "" if len(shape) == 1 else f" in dimension(s) {_dims_where(bad_dims)}"
        raise ValueError(
            f"`x` contains {int((~finite).sum())} {what}{where}; shape {shape}."
        )


# -- the fits (pure, per dimension; vmapped over dimensions) ---------------------


def _mean_log_likelihood(x: jax.Array, params) -> jax.Array:
    r"""Mean log density of a 1-D mixture, by a max-shifted logsumexp.

    .. math::
        \bar\ell = \frac1N \sum_n \operatorname{logsumexp}_k\Big(\log w_k
        - \log\sigma_k - \tfrac12 z_{nk}^2\Big) - \log\sqrt{2\pi},\quad
        z_{nk} = \frac{x_n - \mu_k}{\sigma_k}.

    Args:
      x: Data ``[N]``.
      params: ``(logits, means, log_scales)``, each ``[K]``.

    Returns:
      The scalar :math:`\bar\ell`.
    """
    return jnp.mean(_log_responsibilities(x, params)[1])


def _log_responsibilities(x: jax.Array, params) -> tuple[jax.Array, jax.Array]:
    r"""E-step: log responsibilities ``[N, K]`` and log densities ``[N]``.

    .. math::
        \log r_{nk} = \log w_k + \log\mathcal N(x_n; \mu_k, \sigma_k^2)
        - \log f(x_n).

    Args:
      x: Data ``[N]``.
      params: ``(logits, means, log_scales)``, each ``[K]``; the logits need
        not be normalised.

    Returns:
      ``(log_r, log_f)``.
    """
    logits, means, log_scales = params
    log_weights = jax.nn.log_softmax(logits)
    z = (x[:, None] - means) * jnp.exp(-log_scales)
    terms = log_weights - log_scales - 0.5 * jnp.square(z) - _LOG_SQRT_2PI
    # logsumexp shifts by the row max, so far-out points whose every density
    # underflows still get a finite log f and well-defined responsibilities.
    log_density = jax.nn.logsumexp(terms, axis=-1)
    return terms - log_density[:, None], log_density


def _reference_scale(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    r"""Location ``c`` and spread ``s`` that standardize a dimension.

    :math:`c = \bar x`, :math:`s = \hat\sigma` (``ddof=0``). A constant column has
    no spread, so it gets :math:`c = x_1`, :math:`s = 1 + |c|`: a unit that is
    positive, finite and proportional to the value's magnitude, where float
    resolution is relative.

    Args:
      x: Data ``[N]``.

    Returns:
      ``(c, s)``, scalars.
    """
    # min == max is exact; a computed std of a constant column need not be 0.
    constant = jnp.min(x) == jnp.max(x)
    std = jnp.std(x)
    use_std = ~constant & (std > 0)
    center = jnp.where(constant, x[0], jnp.mean(x))
    return center, jnp.where(use_std, std, 1.0 + jnp.abs(center))


def _scale_floor(x: jax.Array, min_scale: jax.Array) -> jax.Array:
    r"""The smallest scale any component may get, in data units.

    .. math::
        \sigma_{\min} = \begin{cases} \text{min\_scale} & \text{if given} \\
        10^{-3}\, s & \text{otherwise,}\end{cases}

    with ``s`` from :func:`_reference_scale` (:math:`\hat\sigma`, or
    :math:`1 + |c|` for a constant column).

    Args:
      x: Data ``[N]``.
      min_scale: The user's floor, or 0 if none was given.

    Returns:
      The scalar floor.
    """
    default = _RELATIVE_SCALE_FLOOR * _reference_scale(x)[1]
    return jnp.where(min_scale > 0, min_scale, default)


def _uniform_fit(means: jax.Array, scale: jax.Array, floor: jax.Array):
    r"""Equal weights :math:`w_k = 1/K` (logits 0) and one shared, floored scale."""
    logits = jnp.zeros_like(means)
    log_scale = jnp.log(jnp.maximum(scale, floor))
    return logits, means, jnp.broadcast_to(log_scale, means.shape)


def _pooled_slice_variance(x: jax.Array, num_components: int) -> jax.Array:
    r"""Mean squared deviation of the data from its quantile-slice means.

    The sorted data is cut into ``K`` slices of (almost) equal size, slice
    :math:`S_k` with mean :math:`m_k`; then

    .. math::
        v = \frac1N \sum_k \sum_{n \in S_k} (x_n - m_k)^2,

    the maximum-likelihood shared variance when each point is assigned to its
    own slice. It is positive unless every slice is constant.

    Args:
      x: Data ``[N]``.
      num_components: ``K``.

    Returns:
      The scalar :math:`v`.
    """
    n = x.shape[0]
    slice_of = (np.arange(n) * num_components) // n
    sizes = np.bincount(slice_of, minlength=num_components)
    ordered = jnp.sort(x)
    sums = jax.ops.segment_sum(ordered, slice_of, num_segments=num_components)
    slice_means = sums / sizes.astype(ordered.dtype)
    return jnp.mean(jnp.square(ordered - slice_means[slice_of]))


def _quantile_fit(x: jax.Array, num_components: int, floor: jax.Array):
    r"""Means at the quantiles :math:`(k + 1/2)/K`, one shared scale, equal weights.

    The scale rule, with :math:`v` from :func:`_pooled_slice_variance`:

    .. math::
        \sigma^2 = \max\big(\hat\sigma^2 - \operatorname{Var}_k\mu_k,\ v\big).

    Why: an equal-weight mixture with a shared scale has variance
    :math:`\operatorname{Var}_k\mu_k + \sigma^2` (law of total variance), so the
    first term matches the data's variance. Unlike a spacing rule (mean gap
    between quantile means, or IQR/K) it gives narrow components on
    well-separated modes and wide ones on heavy tails, where a narrow component
    would give far outliers a vanishing density. But the first term vanishes, or
    turns negative, when the quantile means are as spread as the data (skewed
    bimodal data with K = 2), so it is bounded below by :math:`v`, the
    within-slice variance. On Gaussian, uniform, bimodal, Student-t(2),
    log-normal and exponential samples (N = 2000, K = 2..16) this rule's mean
    log-likelihood was within 0.1 nats/point of the best of the candidates tried
    (mean gap, IQR/K, half the median gap, either term alone) and up to
    6 nats/point better than the mean gap. For ``K = 1``,
    :math:`\sigma = \hat\sigma`.

    Args:
      x: Data ``[N]``.
      num_components: ``K``.
      floor: Scale floor.

    Returns:
      ``(logits, means, log_scales)``, each ``[K]``.
    """
    levels = (jnp.arange(num_components, dtype=x.dtype) + 0.5) / num_components
    means = jnp.quantile(x, levels)
    matched = jnp.var(x) - jnp.var(means)
    variance = jnp.maximum(matched, _pooled_slice_variance(x, num_components))
    return _uniform_fit(means, jnp.sqrt(variance), floor)


def _plug_in_bandwidth(x: jax.Array, rule: jax.Array) -> jax.Array:
    r"""Scott's or Silverman's rule-of-thumb bandwidth of a Gaussian KDE.

    .. math::
        h_{\text{Scott}} = 1.06\, s\, N^{-1/5},\qquad
        h_{\text{Silverman}} = 0.9\, \min\big(s, \mathrm{IQR}/1.34\big)\, N^{-1/5},

    with :math:`s` the sample standard deviation (``ddof=1``, as in Scott (1992)
    and ``scipy.stats.gaussian_kde``). If the IQR is 0 (over half the data tied)
    Silverman falls back to :math:`s`, like R's ``bw.nrd0``.

    Args:
      x: Data ``[N]``.
      rule: 0 for Scott, 1 for Silverman (an int array, so it is not static).

    Returns:
      The scalar bandwidth (0 for a constant column; the caller floors it).
    """
    n = x.shape[0]
    std = jnp.sqrt(jnp.sum(jnp.square(x - jnp.mean(x))) / max(n - 1, 1))
    shrink = n ** (-0.2)
    lower, upper = jnp.quantile(x, jnp.asarray([0.25, 0.75], x.dtype))
    spread = jnp.minimum(std, (upper - lower) / 1.34)
    silverman = 0.9 * jnp.where(spread > 0, spread, std) * shrink
    return jnp.where(rule == 0, 1.06 * std * shrink, silverman)


def _kde_fit(x, num_components, rule, bandwidth, floor):
    r"""``K`` evenly spaced order statistics as means, one bandwidth as scale.

    The anchors are :math:`x_{(i_k)}`, :math:`i_k = \lfloor (k + 1/2) N/K \rfloor`
    (0-based): the order statistic at each slice's middle, so no anchor sits on
    the sample's extremes, and ``K = N`` uses every point.

    Args:
      x: Data ``[N]``.
      num_components: ``K``.
      rule: 0 (Scott), 1 (Silverman) or -1 (use ``bandwidth``).
      bandwidth: The given bandwidth, used when ``rule == -1``.
      floor: Scale floor.

    Returns:
      ``(logits, means, log_scales)``, each ``[K]``.
    """
    n = x.shape[0]
    index = (np.arange(num_components) * 2 + 1) * n // (2 * num_components)
    means = jnp.sort(x)[index]
    scale = jnp.where(rule < 0, bandwidth, _plug_in_bandwidth(x, rule))
    return _uniform_fit(means, scale, floor)


def _m_step(z: jax.Array, log_r: jax.Array, params, variance_floor: jax.Array):
    r"""M-step with a variance floor and a weight floor.

    .. math::
        n_k = \sum_n r_{nk},\quad w_k = \frac{n_k}{N},\quad
        \mu_k = \frac{1}{n_k}\sum_n r_{nk} z_n,\quad
        \sigma_k^2 = \max\Big(\frac{1}{n_k}\sum_n r_{nk}(z_n-\mu_k)^2,\
        \sigma_{\min}^2\Big).

    A component with :math:`n_k \le \epsilon N` has no data to estimate from, so
    it keeps its mean and scale; its weight is floored at :math:`\epsilon` so the
    logits stay finite (a ``-inf`` logit would make training gradients NaN).

    Args:
      z: Standardized data ``[N]``.
      log_r: Log responsibilities ``[N, K]``.
      params: Current ``(log_weights, means, log_scales)``, each ``[K]``.
      variance_floor: :math:`\sigma_{\min}^2` in standardized units.

    Returns:
      The updated parameters.
    """
    _, means, log_scales = params
    n = z.shape[0]
    eps = jnp.finfo(z.dtype).eps
    resp = jnp.exp(log_r)
    counts = jnp.sum(resp, axis=0)
    occupied = counts > eps * n
    safe_counts = jnp.where(occupied, counts, 1.0)
    new_means = jnp.sum(resp * z[:, None], axis=0) / safe_counts
    # Two-pass (deviations from the new means) variance: no cancellation.
    variance = jnp.sum(resp * jnp.square(z[:, None] - new_means), axis=0) / safe_counts
    new_log_scales = 0.5 * jnp.log(jnp.maximum(variance, variance_floor))
    log_weights = jnp.log(jnp.maximum(counts, eps * n))
    return (
        log_weights - jax.nn.logsumexp(log_weights),
        jnp.where(occupied, new_means, means),
        jnp.where(occupied, new_log_scales, log_scales),
    )


def _em_fit(x, num_components, floor, max_iter, tol):
    r"""EM for a 1-D Gaussian mixture, started from :func:`_quantile_fit`.

    It runs on :math:`z = (x - c)/s` (:func:`_reference_scale`), so ``tol`` and
    the float rounding do not depend on the data's units or offset, then maps
    back: :math:`\mu = c + s\mu_z`, :math:`\log\sigma = \log s + \log\sigma_z`,
    :math:`\bar\ell = \bar\ell_z - \log s`. It iterates while

    .. math::
        |\bar\ell^{(t)} - \bar\ell^{(t-1)}| > \text{tol}
        \quad\text{and}\quad t < \text{max\_iter}.

    Args:
      x: Data ``[N]``.
      num_components: ``K``.
      floor: Scale floor in data units.
      max_iter: Iteration cap (scalar int array).
      tol: Tolerance on the mean log-likelihood (scalar).

    Returns:
      ``(log_weights, means, log_scales, mean_log_likelihood, num_iter)``.
    """
    center, spread = _reference_scale(x)
    log_spread = jnp.log(spread)
    z = (x - center) / spread
    log_weights, means, log_scales = _quantile_fit(x, num_components, floor)
    params = (log_weights, (means - center) / spread, log_scales - log_spread)
    variance_floor = jnp.square(floor / spread)

    def keep_going(state):
        _, _, ll, previous_ll, iteration = state
        return (iteration < max_iter) & (jnp.abs(ll - previous_ll) > tol)

    def update(state):
        params, log_r, ll, _, iteration = state
        params = _m_step(z, log_r, params, variance_floor)
        # The returned log-likelihood always belongs to the returned params.
        new_log_r, log_density = _log_responsibilities(z, params)
        return params, new_log_r, jnp.mean(log_density), ll, iteration + 1

    log_r, log_density = _log_responsibilities(z, params)
    no_previous = jnp.asarray(-jnp.inf, x.dtype)
    start = jnp.zeros((), jnp.int32)
    state = (params, log_r, jnp.mean(log_density), no_previous, start)
    (log_weights, means_z, log_scales_z), _, ll_z, _, num_iter = lax.while_loop(
        keep_going, update, state
    )
    means = center + spread * means_z
    return log_weights, means, log_spread + log_scales_z, ll_z - log_spread, num_iter


def _fit_column(
    x, max_iter, tol, rule, bandwidth, min_scale, *, method, num_components
):
    """Fits one column ``[N]`` (methods: :func:`~distrax_mixcdf.initial_params`)."""
    floor = _scale_floor(x, min_scale)
    if method == "em":
        return _em_fit(x, num_components, floor, max_iter, tol)
    if method == "kde":
        params = _kde_fit(x, num_components, rule, bandwidth, floor)
    else:
        params = _quantile_fit(x, num_components, floor)
    return (*params, _mean_log_likelihood(x, params), jnp.zeros((), jnp.int32))


@functools.partial(jax.jit, static_argnames=("method", "num_components"))
def _fit(
    columns: jax.Array,
    max_iter: jax.Array,
    tol: jax.Array,
    rule: jax.Array,
    bandwidth: jax.Array,
    min_scale: jax.Array,
    *,
    method: str,
    num_components: int,
):
    r"""All dimensions ``[D, N]`` at once: :func:`_fit_column` vmapped over ``D``.

    ``min_scale`` is ``[D]``, one floor per dimension (0: the default floor).

    Under ``vmap`` the EM ``while_loop`` runs until every dimension has
    converged, but each dimension's state freezes once its own condition fails,
    so the result (and ``num_iter``) equals a per-column fit.

    Returns:
      ``(logits, means, log_scales)`` ``[D, K]``, ``log_likelihood`` ``[D]``,
      ``num_iter`` ``[D]``.
    """
    fit = functools.partial(
        _fit_column,
        max_iter=max_iter,
        tol=tol,
        rule=rule,
        bandwidth=bandwidth,
        method=method,
        num_components=num_components,
    )
    return jax.vmap(fit)(columns, min_scale=min_scale)
