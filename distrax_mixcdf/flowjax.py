r"""The mixture-CDF layer as a flowjax bijection (needs the ``flowjax`` extra).

:class:`MixtureGaussianCDF` here is a scalar flowjax ``AbstractBijection`` that
can be used on its own or, above all, as the *transformer* of flowjax's
``coupling_flow`` and ``masked_autoregressive_flow`` (in place of their affine
default or a ``RationalQuadraticSpline``). Import it with
``from distrax_mixcdf.flowjax import MixtureGaussianCDF``.

The numerics are those of the library's distrax bijector
:class:`distrax_mixcdf.MixtureGaussianCDF`, rebuilt from this module's three
array leaves inside each method.

Direction. The layer's closed-form map is data → latent,

.. math::
    z = \Phi^{-1}\big(F(x)\big),\qquad
    F(x) = \sum_{k=1}^{K} w_k\,\Phi\Big(\frac{x-\mu_k}{\sigma_k}\Big),

and its inverse is a root find. flowjax's convention is that a bijection's
``transform`` is its fast side and that flows which need a fast ``log_prob``
wrap their layers in ``Invert``: ``coupling_flow`` and
``masked_autoregressive_flow`` do so by default (``invert=True``), so their
``log_prob`` (and hence maximum-likelihood training with ``fit_to_data``) calls
each transformer's ``transform``. Hence

* ``transform`` = the closed form :math:`x \mapsto z` (the distrax
  bijector's ``forward``);
* ``inverse`` = the root find :math:`z \mapsto x` (the distrax bijector's
  ``inverse``, with implicit gradients).

In ``coupling_flow``/``masked_autoregressive_flow`` with the default
``invert=True`` this makes ``log_prob`` and training closed form and sampling
the root find. Pass ``invert=False`` to make sampling closed form instead (then
``log_prob`` and training differentiate through the root find). Used directly
as the bijection of a one-dimensional ``Transformed`` distribution (which scores
with ``inverse``), flip it with
``flowjax.bijections.Invert(MixtureGaussianCDF(8))`` so that ``log_prob`` is the
closed form.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from flowjax.bijections import AbstractBijection
from jaxtyping import Array, ArrayLike

import distrax_mixcdf

__all__ = ["MixtureGaussianCDF", "default_init"]


def default_init(
    num_components: int, scale: float = 0.8, dtype: Any = jnp.float32
) -> tuple[Array, Array, Array]:
    r"""Near-identity parameters: a K-component mixture close to :math:`N(0, 1)`.

    Equal weights (``logits = 0``), a common scale :math:`s` and means at the
    standard-normal quantiles, rescaled so that the mixture has mean 0 and
    variance exactly 1:

    .. math::
        \mu_k = \sqrt{1 - s^2}\;\frac{q_k}{\sqrt{\tfrac1K\sum_j q_j^2}},\qquad
        q_k = \Phi^{-1}\Big(\frac{k - 1/2}{K}\Big),\qquad \sigma_k = s.

    With the default :math:`s = 0.8` and :math:`K = 8` the means span
    :math:`\pm 1`, :math:`|z - x| < 0.1` on :math:`[-3, 3]` and
    :math:`|z - x| < 1` on :math:`[-8, 8]`; :math:`K = 1` gives
    :math:`\mu = 0, \sigma = 1`, the identity exactly.

    Args:
      num_components: The number of components :math:`K \ge 1`.
      scale: The common component scale :math:`s \in (0, 1]`. Smaller values
        spread the means wider (more room for the conditioner to bend the map
        at first) at the cost of a less identity-like start.
      dtype: Floating dtype of the arrays.

    Returns:
      ``(logits, means, log_scales)``, each of shape ``[num_components]``.

    Raises:
      TypeError: If ``num_components`` is not an integer.
      ValueError: If ``num_components < 1`` or ``scale`` is not in ``(0, 1]``.
    """
    if isinstance(num_components, bool) or not isinstance(
        num_components, int | np.integer
    ):
        raise TypeError(f"`num_components` must be an int, got {num_components!r}.")
    if num_components < 1:
        raise ValueError(f"`num_components` must be >= 1, got {num_components}.")
    if not 0.0 < scale <= 1.0:
        raise ValueError(f"`scale` must be in (0, 1], got {scale!r}.")
    from statistics import NormalDist

    if num_components == 1:
        means = np.zeros(1)
        scale = 1.0
    else:
        probs = (np.arange(num_components) + 0.5) / num_components
        q = np.array([NormalDist().inv_cdf(float(p)) for p in probs])
        means = np.sqrt(1.0 - scale**2) * q / np.sqrt(np.mean(q**2))
    return (
        jnp.zeros(num_components, dtype),
        jnp.asarray(means, dtype),
        jnp.full(num_components, np.log(scale), dtype),
    )


# -- the fused batching rule -------------------------------------------------------
#
# flowjax calls a transformer on scalars and vmaps it (over dimensions, over the
# batch, per layer). Vmapped one scalar at a time, the bijector's input policy
# turns its batch-level branches into per-element selects that run every
# branch. The custom batching rule below hands each vmap level's batch to one
# call of the library's bijector instead. ``custom_vmap`` has no reverse mode,
# so a ``custom_jvp`` outside gives the tangents as linear maps of the
# per-element partial derivatives (the map is elementwise), which JAX transposes.


def _library_map(direction: str, options: tuple, x, logits, means, log_scales):
    root_finder, tol, max_iter, inverse_grad = options
    bijector = distrax_mixcdf.MixtureGaussianCDF(
        logits,
        means,
        log_scales,
        root_finder=root_finder,
        tol=tol,
        max_iter=max_iter,
        inverse_grad=inverse_grad,
    )
    if direction == "forward":
        return bijector.forward_and_log_det(x)
    return bijector.inverse_and_log_det(x)


def _broadcast_all(x, logits, means, log_scales):
    shape = jnp.broadcast_shapes(
        x.shape, logits.shape[:-1], means.shape[:-1], log_scales.shape[:-1]
    )
    k = logits.shape[-1]
    params = (jnp.broadcast_to(p, (*shape, k)) for p in (logits, means, log_scales))
    return (jnp.broadcast_to(x, shape), *params)


def _batch_rule(function):
    """A ``custom_vmap`` rule that calls ``function`` on the whole batch."""

    def rule(axis_size, in_batched, *args):
        args = [
            a if batched else jnp.broadcast_to(a, (axis_size, *a.shape))
            for a, batched in zip(args, in_batched)
        ]
        out = function(*args)
        return out, jax.tree_util.tree_map(lambda _: True, out)

    return rule


@functools.cache
def _fused_map(direction: str, options: tuple):
    """``(x, logits, means, log_scales) -> (out, log_det)``, batched as one call."""
    library_map = functools.partial(_library_map, direction, options)

    @jax.custom_batching.custom_vmap
    def value(x, logits, means, log_scales):
        return library_map(x, logits, means, log_scales)

    value.def_vmap(_batch_rule(value))

    def plain_value_and_partials(x, logits, means, log_scales):
        args = _broadcast_all(x, logits, means, log_scales)
        out, pullback = jax.vjp(library_map, *args)
        one, zero = jnp.ones_like(out[0]), jnp.zeros_like(out[1])
        return out, pullback((one, zero)), pullback((zero, one))

    fused_value_and_partials = jax.custom_batching.custom_vmap(plain_value_and_partials)
    fused_value_and_partials.def_vmap(_batch_rule(fused_value_and_partials))

    # Derivatives of the partials (second and higher order) take the plain,
    # per-element path: slower under vmap, but exact to any order.
    @jax.custom_jvp
    def value_and_partials(x, logits, means, log_scales):
        return fused_value_and_partials(x, logits, means, log_scales)

    @value_and_partials.defjvp
    def _(primals, tangents):
        return jax.jvp(plain_value_and_partials, primals, tangents)

    @jax.custom_jvp
    def fused(x, logits, means, log_scales):
        return value(x, logits, means, log_scales)

    @fused.defjvp
    def _(primals, tangents):
        out, d_out, d_log_det = value_and_partials(*primals)
        t_x, *t_params = tangents

        def linear(partials):
            d_x, *d_params = partials
            return d_x * t_x + sum(
                jnp.sum(d * t, axis=-1) for d, t in zip(d_params, t_params)
            )

        return out, (linear(d_out), linear(d_log_det))

    return fused


class MixtureGaussianCDF(AbstractBijection):
    r"""Scalar mixture-of-Gaussians CDF bijection for flowjax.

    ``transform`` (fast, closed form) maps data to a standard-normal latent,

    .. math::
        z = \Phi^{-1}\big(F(x)\big),\quad
        F(x) = \sum_{k=1}^{K} w_k\,\Phi\Big(\frac{x-\mu_k}{\sigma_k}\Big),\quad
        \log\Big|\frac{dz}{dx}\Big| = \log f(x) - \log\varphi(z),

    with :math:`w = \operatorname{softmax}(\text{logits})`,
    :math:`\sigma = \exp(\text{log\_scales})` and :math:`f = F'`; ``inverse``
    solves :math:`F(x) = \Phi(z)` by a bracketed Newton root find whose
    gradients come from the implicit function theorem. ``transform_and_log_det``
    returns :math:`\log|dz/dx|` and ``inverse_and_log_det`` returns
    :math:`\log|dx/dz| = -\log|dz/dx|`, both scalars (flowjax's conventions).

    See the module docstring for why ``transform`` is the closed-form side: in
    ``coupling_flow`` and ``masked_autoregressive_flow`` (``invert=True`` by
    default) it makes ``log_prob`` and training closed form. For a fast
    ``transform`` in the other direction use
    ``flowjax.bijections.Invert(MixtureGaussianCDF(8))``.

    ``shape == ()`` and ``cond_shape is None``: a *transformer* for flowjax's
    coupling and masked autoregressive layers, which vmap it over dimensions
    and flatten its three array leaves into the conditioner's output. The
    leaves are unconstrained real arrays, so any conditioner output is a valid
    mixture; the initial leaves are the offset that the conditioner's output is
    added to. Conditioning enters through the conditioner (``cond_dim=`` of the
    flow), not through this bijection.

    Args:
      num_components: The number of mixture components :math:`K`.
      logits: Initial unnormalised log-weights ``[K]``; default zeros (equal
        weights).
      means: Initial component means ``[K]``; default from
        :func:`default_init`.
      log_scales: Initial log standard deviations ``[K]``; default from
        :func:`default_init` (:math:`\log 0.8`, or 0 for :math:`K = 1`).
      init_scale: The common scale :math:`s` of :func:`default_init`, used for
        the defaults of ``means`` and ``log_scales``.
      root_finder: Root finder of ``inverse``, as for
        :class:`distrax_mixcdf.MixtureGaussianCDF`.
      tol: Relative tolerance of ``inverse`` (default: the dtype's epsilon).
      max_iter: Iteration cap of ``inverse``.
      inverse_grad: How ``inverse`` is differentiated (``"implicit"`` default).
      fuse_vmap: If True (default), ``jax.vmap`` over the methods (which
        flowjax applies over dimensions and batch) is fused into one batched
        call of the library's bijector by a custom batching rule: several times
        faster, with exact first derivatives in forward and reverse mode (the
        tangents are linear maps of the per-element partial derivatives).
        Second and higher derivatives stay exact but take the per-scalar
        path. False evaluates per scalar under ``vmap`` throughout.

    Raises:
      ValueError: If a given array does not have shape ``[num_components]`` or
        a solver option is invalid.
      TypeError: If a given array is not floating point.
    """

    shape: ClassVar[tuple[int, ...]] = ()
    cond_shape: ClassVar[None] = None
    logits: Array
    means: Array
    log_scales: Array
    root_finder: str = eqx.field(static=True)
    tol: float | None = eqx.field(static=True)
    max_iter: int = eqx.field(static=True)
    inverse_grad: str = eqx.field(static=True)
    fuse_vmap: bool = eqx.field(static=True)

    def __init__(
        self,
        num_components: int,
        *,
        logits: ArrayLike | None = None,
        means: ArrayLike | None = None,
        log_scales: ArrayLike | None = None,
        init_scale: float = 0.8,
        root_finder: str = "hybrid",
        tol: float | None = None,
        max_iter: int = 100,
        inverse_grad: str = "implicit",
        fuse_vmap: bool = True,
    ):
        defaults = default_init(num_components, init_scale)
        given = (logits, means, log_scales)
        names = ("logits", "means", "log_scales")
        arrays = []
        for name, value, default in zip(names, given, defaults):
            if value is None:
                arrays.append(default)
                continue
            array = jnp.asarray(value)
            if not jnp.issubdtype(array.dtype, jnp.floating):
                raise TypeError(
                    f"`{name}` must be a floating-point array, got dtype {array.dtype}."
                )
            if array.shape != (num_components,):
                raise ValueError(
                    f"`{name}` must have shape ({num_components},), got {array.shape}."
                )
            arrays.append(array)
        self.logits, self.means, self.log_scales = arrays
        # Validates the options (and the leaves) once, at construction.
        distrax_mixcdf.MixtureGaussianCDF(
            *arrays,
            root_finder=root_finder,
            tol=tol,
            max_iter=max_iter,
            inverse_grad=inverse_grad,
        )
        self.root_finder = root_finder
        self.tol = tol
        self.max_iter = max_iter
        self.inverse_grad = inverse_grad
        self.fuse_vmap = bool(fuse_vmap)

    @property
    def num_components(self) -> int:
        """The number of mixture components :math:`K`."""
        return int(self.logits.shape[-1])

    def to_distrax(self) -> distrax_mixcdf.MixtureGaussianCDF:
        """The same map as the library's distrax bijector (data → latent forward).

        Returns:
          A :class:`distrax_mixcdf.MixtureGaussianCDF` with these parameters
          and solver options.
        """
        return distrax_mixcdf.MixtureGaussianCDF(
            self.logits,
            self.means,
            self.log_scales,
            root_finder=self.root_finder,
            tol=self.tol,
            max_iter=self.max_iter,
            inverse_grad=self.inverse_grad,
        )

    def _map(self, direction: str, value: ArrayLike) -> tuple[Array, Array]:
        value = jnp.asarray(value)
        if not jnp.issubdtype(value.dtype, jnp.floating):
            value = value.astype(self.logits.dtype)
        if not self.fuse_vmap:
            bijector = self.to_distrax()
            if direction == "forward":
                return bijector.forward_and_log_det(value)
            return bijector.inverse_and_log_det(value)
        options = (self.root_finder, self.tol, self.max_iter, self.inverse_grad)
        return _fused_map(direction, options)(
            value, self.logits, self.means, self.log_scales
        )

    def transform_and_log_det(
        self, x: ArrayLike, condition: ArrayLike | None = None
    ) -> tuple[Array, Array]:
        r"""Maps data to latent in closed form: :math:`z = \Phi^{-1}(F(x))`.

        Args:
          x: A scalar data value.
          condition: Ignored (the bijection is unconditional).

        Returns:
          ``(z, log_det)`` with :math:`\text{log\_det} = \log|dz/dx|`, both
          scalars.
        """
        del condition
        return self._map("forward", x)

    def inverse_and_log_det(
        self, y: ArrayLike, condition: ArrayLike | None = None
    ) -> tuple[Array, Array]:
        r"""Maps latent to data by the root find :math:`F(x) = \Phi(z)`.

        Args:
          y: A scalar latent value :math:`z`.
          condition: Ignored (the bijection is unconditional).

        Returns:
          ``(x, log_det)`` with :math:`\text{log\_det} = \log|dx/dz|
          = -\log|dz/dx|(x)`, both scalars.
        """
        del condition
        return self._map("inverse", y)
