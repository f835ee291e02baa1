r"""Data-driven initial parameters for :class:`~distrax_mixcdf.MixtureGaussianCDF`.

A mixture-CDF layer trains much faster (and avoids dead components) when it starts
from parameters that already roughly Gaussianize the data. :func:`initial_params`
fits the per-dimension mixture

.. math::
    f_d(x) = \sum_{k=1}^{K} w_{dk}\,\frac{1}{\sigma_{dk}}\,
    \varphi\Big(\frac{x-\mu_{dk}}{\sigma_{dk}}\Big)

to data ``[N]`` or ``[N, D]`` by one of three methods (``"quantile"``, ``"em"``,
``"kde"``) and returns ``(logits, means, log_scales)`` in the bijector's
``[..., K]`` layout, plus the fit's mean log-likelihood so methods can be compared.
:meth:`MixtureGaussianCDF.from_data` is the usual entry point.

Validation runs on the host (NumPy) because its errors depend on the data's
values; the fits themselves are one jit-compiled function, vmapped over
dimensions.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import jax
import numpy as np

from distrax_mixcdf._mixture_fit import check_options, fit_columns, validated_columns
from distrax_mixcdf._validation import renamed_arguments

__all__ = ["InitialParams", "initial_params"]


class InitialParams(NamedTuple):
    r"""Fitted mixture parameters and the fit's quality.

    The mixture per dimension is :math:`w = \operatorname{softmax}(\text{logits})`,
    :math:`\sigma = \exp(\text{log\_scales})`, and

    .. math::
        \text{log\_likelihood} = \frac{1}{N}\sum_{n=1}^{N} \log \sum_{k=1}^{K}
        w_k\,\frac{1}{\sigma_k}\,\varphi\Big(\frac{x_n-\mu_k}{\sigma_k}\Big).

    Attributes:
      logits: Unnormalised log-weights ``[K]`` or ``[D, K]``: all 0 (uniform)
        for ``"quantile"`` and ``"kde"``, the normalised ``log w`` for ``"em"``.
      means: Component means ``μ``, same shape.
      log_scales: Log standard deviations ``log σ``, same shape.
      log_likelihood: Mean per-point log density of the data under the fitted
        mixture, ``[]`` or ``[D]``, in data units (comparable across methods).
      num_iter: EM iterations used (``[]`` or ``[D]`` integer array); ``0`` for
        ``"quantile"`` and ``"kde"``. (``n_iter`` is its deprecated spelling.)
    """

    logits: jax.Array
    means: jax.Array
    log_scales: jax.Array
    log_likelihood: jax.Array
    num_iter: int | jax.Array

    @property
    def n_iter(self) -> int | jax.Array:
        """Deprecated spelling of :attr:`num_iter`."""
        warnings.warn(
            "InitialParams.n_iter is deprecated and will be removed in the next "
            "release; use `num_iter` instead.",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.num_iter


@renamed_arguments(n_components="num_components")
def initial_params(
    x: Any,
    num_components: int,
    method: str = "quantile",
    *,
    max_iter: int = 200,
    tol: float = 1e-6,
    bandwidth: str | float = "scott",
    min_scale: float | None = None,
) -> InitialParams:
    r"""Fits a ``K``-component Gaussian mixture to each dimension of the data.

    Methods (per dimension :math:`d`, data :math:`x_{1..N}`, standard deviation
    :math:`\hat\sigma`):

    * ``"quantile"`` (cheap warm start): uniform weights, means at the data
      quantiles :math:`\mu_k = Q\big(\tfrac{k + 1/2}{K}\big)`, one shared scale

      .. math::
          \sigma^2 = \max\Big(\hat\sigma^2 - \operatorname{Var}_k \mu_k,\
          \frac1N \sum_k \sum_{n \in S_k} (x_n - \bar x_{S_k})^2\Big),

      where :math:`S_k` are the ``K`` equal-size slices of the sorted data: the
      mixture's variance matches the data's, but never below the within-slice
      variance (:math:`\sigma = \hat\sigma` for :math:`K = 1`).
    * ``"em"``: maximum likelihood by expectation-maximisation, started from
      ``"quantile"``, with log-space responsibilities
      :math:`r_{nk} = \exp(\log w_k + \log\mathcal N(x_n;\mu_k,\sigma_k) -
      \operatorname{logsumexp}_j(\cdot))`; it stops when the mean log-likelihood
      changes by at most ``tol`` or after ``max_iter`` updates.
    * ``"kde"``: uniform weights, means at the order statistics
      :math:`x_{(\lfloor (k + 1/2) N / K \rfloor)}` (0-based), all with the
      plug-in bandwidth :math:`h = 1.06\,s\,N^{-1/5}` (Scott) or
      :math:`h = 0.9 \min(s, \mathrm{IQR}/1.34)\,N^{-1/5}` (Silverman), with
      :math:`s` the sample standard deviation (``ddof=1``), or a given ``h``.

    Every returned scale is at least the floor :math:`\sigma_{\min}`: ``min_scale``
    if given, else :math:`10^{-3}\hat\sigma`, or :math:`10^{-3}(1 + |c|)` for a
    constant dimension of value :math:`c` (reachable only with ``K = 1``, since
    fewer than ``K`` distinct values is an error). In EM this floor is a variance
    floor that stops components collapsing onto repeated values.

    Args:
      x: Data ``[N]`` (parameters ``[K]``) or ``[N, D]`` (parameters ``[D, K]``).
        Integers are promoted to the default float dtype, float16/bfloat16 to
        float32; float64 stays float64 only when ``jax_enable_x64`` is on.
      num_components: The number of components ``K >= 1`` (``n_components`` is
        its deprecated spelling).
      method: ``"quantile"``, ``"em"`` or ``"kde"``.
      max_iter: EM iteration cap (``>= 0``; ``0`` returns the quantile start).
      tol: EM stops once the mean log-likelihood (nats per point) changes by at
        most ``tol`` between iterations.
      bandwidth: KDE scale: ``"scott"``, ``"silverman"`` or a positive float in
        data units (shared by all dimensions; still raised to the floor).
      min_scale: Absolute scale floor in data units, replacing the default
        relative floor.

    Returns:
      The fitted :class:`InitialParams`, in the data's working dtype.

    Raises:
      ValueError: If ``x`` is not finite, has the wrong rank, is empty, is not
        real-valued, has fewer than ``K`` distinct values in some dimension, or
        an option is invalid (``K`` not a positive int, unknown ``method``, ...).
      TypeError: If ``x`` is a tracer (this function must run outside ``jit``,
        because validation needs the data's values).
    """
    check_options(num_components, method, max_iter, tol, bandwidth, min_scale)
    columns, squeeze = validated_columns(x, num_components)
    # 0 stands for "no floor given": the validated values are positive.
    floors = np.full(columns.shape[0], 0.0 if min_scale is None else min_scale)
    logits, means, log_scales, log_likelihood, num_iter = fit_columns(
        columns, num_components, method, floors, max_iter, tol, bandwidth
    )
    if squeeze:
        logits, means, log_scales = logits[0], means[0], log_scales[0]
        log_likelihood, num_iter = log_likelihood[0], num_iter[0]
    return InitialParams(
        logits=logits,
        means=means,
        log_scales=log_scales,
        log_likelihood=log_likelihood,
        num_iter=num_iter if method == "em" else 0,
    )
