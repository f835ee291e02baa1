"""The public bijector: a learnable Gaussian-mixture CDF layer for distrax.

``MixtureGaussianCDF`` maps data to a standard-normal latent,
``y = Φ⁻¹(Σ_k w_k Φ((x − μ_k)/σ_k))``. The class only validates, stores and
dispatches: the forward map is in `_forward.py`, its derivatives in
`_tangents.py`, the inverse root find and its implicit gradient in
`_root_finding.py`, and what NaN, ±inf and saturated inputs map to in
`_irregular.py`. Its pytree leaves are exactly the three parameter arrays
(solver options are static), so it works with ``jax.jit``, ``jax.vmap``,
``jax.grad``, optax and ``equinox.partition`` alike.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import distrax
import jax
import jax.numpy as jnp
import numpy as np

from distrax_mixcdf import _irregular, _root_finding, _tangents
from distrax_mixcdf._root_finding import INVERSE_GRADIENTS, ROOT_FINDERS, SolverOptions
from distrax_mixcdf._validation import renamed_arguments
from distrax_mixcdf.initialization import initial_params

__all__ = ["MixtureGaussianCDF"]

_PARAM_NAMES = ("logits", "means", "log_scales")


def _as_float_param(name: str, value: Any) -> jax.Array:
    array = jnp.asarray(value)
    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise TypeError(
            f"`{name}` must be a floating-point array, got dtype {array.dtype} "
            f"with shape {array.shape}."
        )
    if array.ndim < 1:
        raise ValueError(
            f"`{name}` must have a trailing component axis of size K >= 1, got a "
            f"scalar (shape {array.shape})."
        )
    return array


# The two maps are compiled as units (inlined when the caller is itself under
# `jit`): called eagerly, they would dispatch hundreds of small ops one by one.
@jax.jit
def _forward_with_policy(x, params):
    return _irregular.apply_policy(
        x,
        params,
        _tangents.forward_and_log_det,
        _irregular.forward_reach,
        _irregular.forward_far,
        _irregular.forward_stand_in,
    )


@functools.partial(jax.jit, static_argnames="options")
def _inverse_with_policy(y, params, options):
    inverse = functools.partial(_root_finding.inverse_and_log_det, options=options)
    if options.inverse_grad == "implicit":
        # The root finder and the implicit rule apply the policy themselves.
        shape = jnp.broadcast_shapes(y.shape, params[1].shape[:-1])
        return inverse(jnp.broadcast_to(y, shape), params)
    return _irregular.apply_policy(
        y,
        params,
        inverse,
        _irregular.inverse_reach,
        _irregular.inverse_far,
        _irregular.inverse_stand_in,
    )


class MixtureGaussianCDF(distrax.Bijector):
    r"""Gaussianizing bijector of a learnable Gaussian mixture (elementwise).

    Forward (data → latent), in closed form and exact in both tails:

    .. math::
        y = \Phi^{-1}\big(F(x)\big),\quad
        F(x) = \sum_{k=1}^{K} w_k\,\Phi\Big(\frac{x-\mu_k}{\sigma_k}\Big),\quad
        \log\Big|\frac{dy}{dx}\Big| = \log f(x) - \log\varphi(y),

    with ``w = softmax(logits)``, ``σ = exp(log_scales)`` and ``f = F'`` the
    mixture density. The inverse solves ``F(x) = Φ(y)`` by a batched, bracketed
    Newton root find; its gradients come from the implicit function theorem.

    ``event_ndims_in == event_ndims_out == 0``. Parameters have shape ``[..., K]``;
    the leading axes are parameter batch axes that broadcast against the input
    like ``distrax.RationalQuadraticSpline`` (``[D, K]`` parameters on ``[N, D]``
    inputs is a per-dimension marginal layer).

    Args:
      logits: Unnormalised log-weights ``[..., K]``; any real values.
      means: Component means ``[..., K]``.
      log_scales: Log standard deviations ``[..., K]``.
      root_finder: ``"hybrid"`` (safeguarded Newton, default), ``"newton"`` or
        ``"bisection"``.
      tol: Relative tolerance of the inverse (default: the dtype's epsilon).
      max_iter: Iteration cap of the inverse's batch loop.
      inverse_grad: How the inverse is differentiated: ``"implicit"`` (default,
        exact to any order), ``"one_step"`` or ``"unroll"`` (for comparison).

    Raises:
      TypeError: If a parameter is not a floating-point array.
      ValueError: If the parameters' shapes disagree or an option is invalid.
    """

    def __init__(
        self,
        logits: Any,
        means: Any,
        log_scales: Any,
        *,
        root_finder: str = "hybrid",
        tol: float | None = None,
        max_iter: int = 100,
        inverse_grad: str = "implicit",
    ):
        super().__init__(event_ndims_in=0, event_ndims_out=0)
        arrays = [
            _as_float_param(n, v)
            for n, v in zip(_PARAM_NAMES, (logits, means, log_scales))
        ]
        shapes = ", ".join(f"{n}{tuple(a.shape)}" for n, a in zip(_PARAM_NAMES, arrays))
        if len({a.shape[-1] for a in arrays}) != 1:
            raise ValueError(
                "`logits`, `means` and `log_scales` must have the same number of "
                f"components K on their last axis, got {shapes}."
            )
        if arrays[0].shape[-1] < 1:
            raise ValueError(f"The number of components K must be >= 1, got {shapes}.")
        try:
            jnp.broadcast_shapes(*(a.shape for a in arrays))
        except ValueError:
            raise ValueError(
                f"The parameter batch shapes do not broadcast together: {shapes}."
            ) from None
        dtype = jnp.result_type(*arrays)
        self._logits, self._means, self._log_scales = (a.astype(dtype) for a in arrays)
        self._options = _validated_options(root_finder, tol, max_iter, inverse_grad)

    # -- pytree: the three parameter arrays are the only leaves -----------------

    def tree_flatten(self):
        """Leaves are ``(logits, means, log_scales)``; the options are static."""
        return (self._logits, self._means, self._log_scales), self._options

    @classmethod
    def tree_unflatten(cls, aux_data, children):
        """Rebuilds without validation (JAX may pass placeholders as leaves)."""
        bijector = object.__new__(cls)
        distrax.Bijector.__init__(bijector, event_ndims_in=0, event_ndims_out=0)
        bijector._logits, bijector._means, bijector._log_scales = children
        bijector._options = aux_data
        return bijector

    # -- construction helpers ----------------------------------------------------

    @classmethod
    def from_params(cls, params: Any, **options) -> MixtureGaussianCDF:
        """Builds the bijector from one raw array ``[..., 3K]``.

        The last axis is laid out ``logits | means | log_scales``, so a coupling
        conditioner can emit all parameters at once (like the ``params`` of
        ``distrax.RationalQuadraticSpline``).

        Args:
          params: Floating array whose last axis has size ``3K``.
          **options: Solver options, as for the constructor.

        Returns:
          The bijector.

        Raises:
          ValueError: If the last axis is missing or not a positive multiple of 3.
        """
        params = _as_float_param("params", params)
        size = params.shape[-1]
        if size == 0 or size % 3:
            raise ValueError(
                "`params` must have a last axis of size 3K (logits | means | "
                f"log_scales) with K >= 1, got shape {params.shape}."
            )
        logits, means, log_scales = jnp.split(params, 3, axis=-1)
        return cls(logits, means, log_scales, **options)

    @classmethod
    @renamed_arguments(n_components="num_components")
    def from_data(
        cls,
        x: Any,
        num_components: int,
        method: str = "quantile",
        *,
        solver_options: dict[str, Any] | None = None,
        init_options: dict[str, Any] | None = None,
        **fit_options,
    ) -> MixtureGaussianCDF:
        """Initialises the mixture from data (a warm start for training).

        Args:
          x: Data ``[N]`` (parameters ``[K]``) or ``[N, D]`` (parameters ``[D, K]``).
          num_components: The number of components ``K`` (``n_components`` is
            its deprecated spelling).
          method: ``"quantile"``, ``"em"`` or ``"kde"``; see
            :func:`distrax_mixcdf.initial_params`.
          solver_options: Options of the bijector's inverse (``root_finder``,
            ``tol``, ``max_iter``, ``inverse_grad``), kept apart from the fit's
            own ``max_iter``/``tol``.
          init_options: Options of the fitting method (``max_iter``, ``tol``,
            ``bandwidth``, ``min_scale``), as for
            :func:`~distrax_mixcdf.gaussianization_flow`.
          **fit_options: Deprecated: the same options as loose keywords; pass
            ``init_options`` instead.

        Returns:
          The bijector with the fitted parameters.
        """
        if fit_options:
            warnings.warn(
                "MixtureGaussianCDF.from_data(): passing fit options as keywords "
                f"({', '.join(sorted(fit_options))}) is deprecated and will be "
                "removed in the next release; use `init_options=dict(...)` instead.",
                DeprecationWarning,
                stacklevel=3,
            )
        options = {**fit_options, **(init_options or {})}
        fitted = initial_params(x, num_components, method=method, **options)
        return cls(
            fitted.logits, fitted.means, fitted.log_scales, **(solver_options or {})
        )

    def to_tfp(self):
        """This bijector wrapped for TensorFlow Probability (``distrax.to_tfp``).

        TFP's ``TransformedDistribution``, ``tfb.Chain`` and ``tfb.Invert`` need
        TFP's bijector interface; a raw distrax bijector fails there with an
        ``AttributeError`` (e.g. ``forward_dtype``).

        Returns:
          A ``tfp.substrates.jax.bijectors.Bijector``.
        """
        return distrax.to_tfp(self)

    # -- the effective mixture -----------------------------------------------------

    @property
    def logits(self) -> jax.Array:
        """Unnormalised log-weights ``[..., K]`` (the stored parameter)."""
        return self._logits

    @property
    def log_scales(self) -> jax.Array:
        """Log standard deviations ``[..., K]`` (the stored parameter)."""
        return self._log_scales

    @property
    def weights(self) -> jax.Array:
        r"""Mixture weights ``w = softmax(logits)``, shape ``[..., K]``."""
        return jax.nn.softmax(self._logits, axis=-1)

    @property
    def means(self) -> jax.Array:
        r"""Component means ``μ``, shape ``[..., K]``."""
        return self._means

    @property
    def scales(self) -> jax.Array:
        r"""Component standard deviations ``σ = exp(log_scales)``, ``[..., K]``."""
        return jnp.exp(self._log_scales)

    @property
    def num_components(self) -> int:
        """The number of mixture components ``K``."""
        return int(self._logits.shape[-1])

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """The parameter batch shape (all axes but the last)."""
        return tuple(
            jnp.broadcast_shapes(
                self._logits.shape[:-1],
                self._means.shape[:-1],
                self._log_scales.shape[:-1],
            )
        )

    @property
    def solver_options(self) -> SolverOptions:
        """The inverse's static settings."""
        return self._options

    # -- the map ---------------------------------------------------------------------

    def _params_for(self, value: Any, argument: str):
        value = jnp.asarray(value)
        if jnp.issubdtype(value.dtype, jnp.complexfloating):
            # Casting would silently drop the imaginary part.
            raise TypeError(
                f"`{argument}` must be real (float, int or bool), got dtype "
                f"{value.dtype} with shape {value.shape}."
            )
        dtype = jnp.result_type(value.dtype, self._logits.dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            dtype = self._logits.dtype
        if jnp.finfo(dtype).bits < 32:
            # float16/bfloat16 cannot hold the tail numerics: compute in float32.
            dtype = jnp.float32
        try:
            jnp.broadcast_shapes(value.shape, self.batch_shape)
        except ValueError:
            raise ValueError(
                f"`{argument}` of shape {value.shape} does not broadcast against "
                f"the bijector's parameter batch shape {self.batch_shape} "
                f"(parameters are [..., K] with K = {self.num_components})."
            ) from None
        # Logits as they are: the numerics normalise them where it is cheapest
        # (per component in the forward's loops, per chunk in the solver).
        params = (
            self._logits.astype(dtype),
            self._means.astype(dtype),
            self._log_scales.astype(dtype),
        )
        return value.astype(dtype), params

    def forward_and_log_det(self, x: Any) -> tuple[jax.Array, jax.Array]:
        r"""Computes ``y = Φ⁻¹(F(x))`` and ``log|dy/dx|`` (closed form).

        Elementwise policy for unusual inputs: NaN gives NaN in that element
        only; ``±inf`` gives ``y = ±inf`` with ``log_det = -max_k log σ_k``
        (the limit of :math:`\log|dy/dx|`; the density there is 0); integers are
        promoted and float16/bfloat16 are computed and returned in float32.

        Args:
          x: Data, broadcastable against the parameter batch shape.

        Returns:
          ``(y, log_det)`` of the broadcast shape.
        """
        x, params = self._params_for(x, "x")
        return _forward_with_policy(x, params)

    def inverse_and_log_det(self, y: Any) -> tuple[jax.Array, jax.Array]:
        """Solves ``F(x) = Φ(y)`` for ``x`` and returns ``log|dx/dy|``.

        NaN gives NaN in that element only; ``±inf`` gives ``x = ±inf`` with
        ``log_det = max_k log σ_k``; dtypes as for the forward.

        Args:
          y: Latent values, broadcastable against the parameter batch shape.

        Returns:
          ``(x, log_det)`` of the broadcast shape, ``log_det = -log|dy/dx|(x)``.
        """
        y, params = self._params_for(y, "y")
        return _inverse_with_policy(y, params, self._options)

    def same_as(self, other: distrax.Bijector) -> bool:
        """True if ``other`` is a ``MixtureGaussianCDF`` with identical parameters."""
        if type(other) is not type(self) or other._options != self._options:
            return False
        pairs = zip(self.tree_flatten()[0], other.tree_flatten()[0])
        try:
            return all(
                a is b or (a.shape == b.shape and bool(np.array_equal(a, b)))
                for a, b in pairs
            )
        except (
            jax.errors.ConcretizationTypeError,
            jax.errors.TracerArrayConversionError,
        ):
            # Traced parameters cannot be compared by value.
            return all(
                a is b for a, b in zip(self.tree_flatten()[0], other.tree_flatten()[0])
            )

    def __repr__(self) -> str:
        options = self._options
        return (
            f"MixtureGaussianCDF(num_components={self.num_components}, "
            f"batch_shape={self.batch_shape}, dtype={self._logits.dtype}, "
            f"root_finder={options.root_finder!r}, "
            f"inverse_grad={options.inverse_grad!r}, "
            f"tol={options.tol}, max_iter={options.max_iter})"
        )


def _validated_options(root_finder, tol, max_iter, inverse_grad) -> SolverOptions:
    if root_finder not in ROOT_FINDERS:
        raise ValueError(
            f"`root_finder` must be one of {ROOT_FINDERS}, got {root_finder!r}."
        )
    if inverse_grad not in INVERSE_GRADIENTS:
        raise ValueError(
            f"`inverse_grad` must be one of {INVERSE_GRADIENTS}, got {inverse_grad!r}."
        )
    if (
        isinstance(max_iter, bool)
        or not isinstance(max_iter, (int, np.integer))
        or max_iter < 1
    ):
        raise ValueError(f"`max_iter` must be a positive integer, got {max_iter!r}.")
    if tol is not None and not (isinstance(tol, (float, int)) and 0 < tol < 1):
        raise ValueError(f"`tol` must be None or a float in (0, 1), got {tol!r}.")
    return SolverOptions(
        root_finder=root_finder,
        tol=None if tol is None else float(tol),
        max_iter=int(max_iter),
        inverse_grad=inverse_grad,
    )
