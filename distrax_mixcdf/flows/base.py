r"""What every flow shares: the :class:`Flow` API and :func:`normalizing_flow`.

* :func:`normalizing_flow` turns any Gaussianizing bijector (data → latent,
  like :class:`~distrax_mixcdf.MixtureGaussianCDF`) into the density model
  ``distrax.Transformed(N(0, I), distrax.Inverse(bijector))``.
* :class:`Flow` is the base class of the deep flows: ``log_prob``, ``sample``,
  ``sample_and_log_prob``, ``forward``/``inverse`` with an optional ``context``
  that batches against the data, and the conversions to distrax and TFP. A
  subclass supplies only its two scanned maps and its list of bijectors.

Properties hold cheap static metadata (``dim``, ``num_layers``,
``num_params``); methods compute arrays or build objects (``bijectors()``,
``chain()``, ``to_distrax()``, ``to_tfp()``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import distrax
import jax
import jax.numpy as jnp
import numpy as np

from distrax_mixcdf._validation import (
    check_event_shape,
    is_bijector,
    is_bijector_stack,
)

__all__ = ["Flow", "normalizing_flow"]


# -- normalizing_flow ----------------------------------------------------------------


def floating_dtype(tree: Any) -> Any:
    """The promoted dtype of the floating array leaves (the default float if none)."""
    dtypes = [
        leaf.dtype
        for leaf in jax.tree_util.tree_leaves(tree)
        if isinstance(leaf, (jax.Array, np.ndarray))
        and jnp.issubdtype(leaf.dtype, jnp.floating)
    ]
    return jnp.result_type(*dtypes) if dtypes else jnp.result_type(float)


def _lifted(bijector: distrax.Bijector, rank: int, index: str) -> distrax.Bijector:
    """Lifts an elementwise bijector to ``rank`` event axes; checks the others."""
    n_in, n_out = bijector.event_ndims_in, bijector.event_ndims_out
    if n_in == n_out == 0 and rank > 0:
        return distrax.Block(bijector, rank)
    if n_in != rank or n_out != rank:
        raise ValueError(
            f"`bijector`{index} acts on events of rank event_ndims_in={n_in}, "
            f"event_ndims_out={n_out}, which does not fit event_shape of rank "
            f"{rank}; only elementwise (rank-0) bijectors are lifted with "
            "`distrax.Block`."
        )
    return bijector


def _batch_shape_note(bijector: Any) -> str:
    batch_shape = getattr(bijector, "batch_shape", None)
    if isinstance(batch_shape, tuple):
        return f" (the bijector's parameter batch shape is {batch_shape})"
    return ""


def normalizing_flow(
    bijector: Any, event_shape: Sequence[int] = ()
) -> distrax.Transformed:
    r"""The density model whose Gaussianizing map (data → latent) is ``bijector``.

    With ``T`` the bijector's forward (``y = T(x)``, data to latent) and a
    standard-normal base of shape ``event_shape``,

    .. math::
        \log p(x) = \log \mathcal{N}\big(T(x); 0, I\big)
            + \log\Big|\det \frac{\partial T}{\partial x}\Big|,
        \qquad x = T^{-1}(z),\ z \sim \mathcal{N}(0, I).

    This is ``distrax.Transformed(base, distrax.Inverse(bijector))``: distrax
    samples through the bijector's forward and scores through its inverse, and
    ``Inverse`` swaps the two, so ``log_prob`` uses the closed-form ``T`` and
    ``sample`` the root find ``T⁻¹``.

    The base is ``distrax.Normal(0, 1)`` for ``event_shape == ()``,
    ``distrax.MultivariateNormalDiag`` for ``(D,)`` and an ``Independent``
    normal for higher ranks, in the bijector's floating dtype. An elementwise
    bijector (``event_ndims_in == event_ndims_out == 0``) is lifted to the event
    rank with ``distrax.Block``, so ``[D, K]`` mixture parameters on ``(D,)``
    events give a joint density with ``log_prob`` of shape ``[N]`` on ``[N, D]``.
    With ``event_shape == ()`` such parameters are instead a *batch* of ``D``
    scalar flows (``log_prob`` of shape ``[N, D]``).

    Args:
      bijector: A distrax or TFP bijector, or a non-empty list/tuple of them,
        composed as ``distrax.Chain`` (the last element is applied first to
        data); elementwise members are lifted one by one.
      event_shape: Shape of one data point, ``()`` or ``(D,)`` (higher ranks
        work the same way).

    Returns:
      The ``distrax.Transformed`` distribution.

    Raises:
      TypeError: If ``bijector`` is not a bijector or a sequence of them.
      ValueError: If ``event_shape`` is malformed or does not fit the bijector's
        event rank or parameter shapes.
    """
    shape = check_event_shape(event_shape, "event_shape")
    rank = len(shape)
    if is_bijector(bijector):
        flow_bijector = _lifted(distrax.as_bijector(bijector), rank, "")
    elif is_bijector_stack(bijector):
        flow_bijector = distrax.Chain(
            [
                _lifted(distrax.as_bijector(b), rank, f"[{i}]")
                for i, b in enumerate(bijector)
            ]
        )
    else:
        raise TypeError(
            "`bijector` must be a distrax or TFP bijector or a non-empty list/tuple "
            f"of them, got {type(bijector).__name__}."
        )

    dtype = floating_dtype(bijector)
    # Trace the forward once on a placeholder: shape errors surface here with the
    # arguments' names instead of deep inside log_prob. Tracing is free at run time.
    try:
        out = jax.eval_shape(flow_bijector.forward, jax.ShapeDtypeStruct(shape, dtype))
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"`bijector` cannot be applied to events of shape event_shape={shape}"
            f"{_batch_shape_note(bijector)}: {error}"
        ) from None
    if tuple(out.shape[len(out.shape) - rank :]) != shape:
        raise ValueError(
            f"`bijector` maps events of shape event_shape={shape} to shape "
            f"{tuple(out.shape)}, whose trailing axes are not {shape}"
            f"{_batch_shape_note(bijector)}."
        )

    zeros, ones = jnp.zeros(shape, dtype), jnp.ones(shape, dtype)
    if rank == 0:
        base = distrax.Normal(zeros, ones)
    elif rank == 1:
        base = distrax.MultivariateNormalDiag(zeros, ones)
    else:
        base = distrax.Independent(distrax.Normal(zeros, ones), rank)
    return distrax.Transformed(base, distrax.Inverse(flow_bijector))


# -- the Flow base class -------------------------------------------------------------


def std_normal_log_prob(z: jax.Array) -> jax.Array:
    r""":math:`\log\mathcal N(z; 0, I)` summed over the last axis."""
    return -0.5 * jnp.sum(z * z, axis=-1) - 0.5 * z.shape[-1] * np.log(2 * np.pi)


def unrolled(
    bijectors: Sequence[distrax.Bijector], x: jax.Array, inverse: bool
) -> tuple[jax.Array, jax.Array]:
    """Applies data → latent layers (or their inverses) one by one, summing log-dets."""
    log_det = jnp.zeros(x.shape[:-1], x.dtype)
    values: Any = x
    for b in reversed(bijectors) if inverse else bijectors:
        if b.event_ndims_in == 0:
            b = distrax.Block(b, 1)
        step = b.inverse_and_log_det if inverse else b.forward_and_log_det
        values, ld = step(values)
        log_det = log_det + ld
    return values, log_det


class Flow:
    r"""Base class of the deep flows: one API, with or without a context.

    A flow is a bijection :math:`T_c` from data to a standard-normal latent,
    optionally indexed by a *context* :math:`c` (a conditional flow), with

    .. math::
        \log p(x \mid c) = \log\mathcal N\big(T_c(x); 0, I\big)
            + \log\Big|\det\frac{\partial T_c(x)}{\partial x}\Big|,
        \qquad x = T_c^{-1}(z),\ z \sim \mathcal N(0, I).

    ``context`` batches against the data the way flowjax's ``condition`` does:
    ``x [..., D]`` and ``context [..., C]`` broadcast over their leading
    (batch) axes, so one context ``[C]`` serves many rows and a ``[N, C]``
    context gives each of ``N`` rows its own. A conditional flow
    (``context_dim`` set) must get a context, an unconditional one must not:
    either mistake raises a ``ValueError`` that names the shapes.

    Subclasses are pytrees whose leaves are exactly their trainable arrays,
    so ``jax.jit``, ``jax.vmap``, ``jax.grad``, optax and
    :func:`~distrax_mixcdf.fit` take a flow as an argument.
    """

    # -- what a subclass provides ----------------------------------------------------

    @property
    def dim(self) -> int:  # pragma: no cover - abstract
        """The event size ``D``."""
        raise NotImplementedError

    @property
    def context_dim(self) -> int | None:
        """The context size ``C``, or ``None`` for an unconditional flow."""
        return None

    def bijectors(self, context: Any = None) -> list[distrax.Bijector]:
        """The data → latent bijectors, in the order they act on data.

        Args:
          context: For a conditional flow, one context ``[C]`` the bijectors
            are fixed to; ``None`` otherwise.

        Returns:
          A list of distrax bijectors with ``event_ndims == 1`` (or elementwise).
        """
        raise NotImplementedError  # pragma: no cover - abstract

    def _forward(self, x: jax.Array, context: jax.Array | None):
        """Data → latent on checked, broadcast inputs: ``(z, log_det)``."""
        raise NotImplementedError  # pragma: no cover - abstract

    def _inverse(self, z: jax.Array, context: jax.Array | None):
        """Latent → data on checked, broadcast inputs: ``(x, log|dx/dz|)``."""
        raise NotImplementedError  # pragma: no cover - abstract

    # -- the public API --------------------------------------------------------------

    def log_prob(self, x: Any, context: Any = None) -> jax.Array:
        r"""Log-density :math:`\log p(x \mid c)`, ``[..., D] -> [...]`` (closed form).

        Computed by one ``lax.scan`` over the layers, so ``jax.jit`` compiles
        one layer instead of ``L``.

        Args:
          x: Data ``[..., D]``.
          context: ``[..., C]`` for a conditional flow (batch axes broadcast
            against ``x``'s), ``None`` otherwise.

        Returns:
          The log-densities, of the broadcast batch shape.
        """
        x, context = self._checked(x, "x", context)
        z, log_det = self._forward(x, context)
        return std_normal_log_prob(z) + log_det

    def sample(
        self, *, seed: Any, sample_shape: Any = (), context: Any = None
    ) -> jax.Array:
        """Samples ``sample_shape + context_batch + (D,)`` through the root finds.

        Args:
          seed: PRNG key.
          sample_shape: Leading shape of the samples (an int or a tuple).
          context: ``[..., C]`` for a conditional flow: ``sample_shape``
            samples are drawn for every context row.

        Returns:
          The samples.
        """
        return self.sample_and_log_prob(
            seed=seed, sample_shape=sample_shape, context=context
        )[0]

    def sample_and_log_prob(
        self, *, seed: Any, sample_shape: Any = (), context: Any = None
    ) -> tuple[jax.Array, jax.Array]:
        r"""Samples and their log-densities in one pass (one inverse per layer).

        With ``z = jax.random.normal(seed, shape + (D,))`` and
        :math:`x = T_c^{-1}(z)`,
        :math:`\log p(x \mid c) = \log\mathcal{N}(z)
        - \log|\det\partial x/\partial z|`.

        Args:
          seed: PRNG key.
          sample_shape: Leading shape of the samples (an int or a tuple).
          context: ``[..., C]`` for a conditional flow, ``None`` otherwise.

        Returns:
          ``(samples [*sample_shape, *context_batch, D], log_prob [...])``.
        """
        shape = (sample_shape,) if isinstance(sample_shape, int) else sample_shape
        shape = tuple(shape)
        context = self._checked_context(context, None)
        if context is not None:
            shape = shape + context.shape[:-1]
            context = jnp.broadcast_to(context, (*shape, context.shape[-1]))
        z = jax.random.normal(seed, (*shape, self.dim), self._dtype())
        x, log_det = self._inverse(z, context)
        return x, std_normal_log_prob(z) - log_det

    def forward_and_log_det(
        self, x: Any, context: Any = None
    ) -> tuple[jax.Array, jax.Array]:
        r"""Data → latent and :math:`\log|\det\partial T_c(x)/\partial x|`.

        Args:
          x: Data ``[..., D]``.
          context: ``[..., C]`` for a conditional flow, ``None`` otherwise.

        Returns:
          ``(z [..., D], log_det [...])`` of the broadcast batch shape.
        """
        return self._forward(*self._checked(x, "x", context))

    def inverse_and_log_det(
        self, z: Any, context: Any = None
    ) -> tuple[jax.Array, jax.Array]:
        r"""Latent → data by root finds, and :math:`\log|\det\partial x/\partial z|`.

        Args:
          z: Latent values ``[..., D]``.
          context: ``[..., C]`` for a conditional flow, ``None`` otherwise.

        Returns:
          ``(x [..., D], log_det [...])`` of the broadcast batch shape.
        """
        return self._inverse(*self._checked(z, "z", context))

    def forward(self, x: Any, context: Any = None) -> jax.Array:
        """Data → latent, ``[..., D] -> [..., D]`` (see :meth:`forward_and_log_det`)."""
        return self.forward_and_log_det(x, context)[0]

    def inverse(self, z: Any, context: Any = None) -> jax.Array:
        """Latent → data (see :meth:`inverse_and_log_det`)."""
        return self.inverse_and_log_det(z, context)[0]

    def to_distrax(self, context: Any = None) -> distrax.Transformed:
        r"""The density model as a ``distrax.Transformed``.

        Built from the current leaves on every call. distrax distributions take
        no context, so for a conditional flow this is the density
        :math:`p(x \mid c)` at *one* context ``c`` (shape ``[C]``), fixed when
        the distribution is built.

        Args:
          context: ``None`` for an unconditional flow; one context ``[C]`` for
            a conditional one.

        Returns:
          :func:`normalizing_flow` of the data → latent stack, with event shape
          ``(D,)``.

        Raises:
          ValueError: If ``context`` is missing, unexpected, or not ``[C]``.
        """
        context = self._one_context(context, "to_distrax")
        return normalizing_flow(list(reversed(self.bijectors(context))), (self.dim,))

    def chain(self, context: Any = None) -> distrax.Chain:
        """The data → latent map as one ``distrax.Chain`` with ``event_ndims == 1``.

        Elementwise layers are lifted with ``distrax.Block``; the chain's
        ``forward`` is :meth:`forward` and its ``inverse`` is :meth:`inverse`
        (at the given context, for a conditional flow).

        Args:
          context: ``None`` for an unconditional flow; one context ``[C]`` for
            a conditional one.

        Returns:
          The ``distrax.Chain``, built from the current leaves on every call.

        Raises:
          ValueError: If ``context`` is missing, unexpected, or not ``[C]``.
        """
        context = self._one_context(context, "chain")
        layers = reversed(self.bijectors(context))
        return distrax.Chain([_lifted(b, 1, "") for b in layers])

    @property
    def distribution(self) -> distrax.Transformed:
        """Deprecated: use :meth:`to_distrax`.

        Raises:
          ValueError: For a conditional flow.
        """
        _warn_renamed("Flow.distribution", "Flow.to_distrax()")
        if self.context_dim is not None:
            raise ValueError(
                f"A conditional flow (context_dim = {self.context_dim}) has no "
                "single distrax distribution; use `log_prob(x, context)`, or "
                "`to_distrax(context=c)` for the density at one context."
            )
        return self.to_distrax()

    @property
    def bijector(self) -> distrax.Bijector:
        """Deprecated: use :meth:`chain` (the same data → latent map)."""
        _warn_renamed("Flow.bijector", "Flow.chain()")
        return distrax.Inverse(self.to_distrax().bijector)

    def to_tfp(self, context: Any = None):
        r"""The density model as a TFP ``TransformedDistribution``.

        TFP distributions take no context, so for a conditional flow this is
        the density :math:`p(x \mid c)` at *one* context ``c`` (shape ``[C]``),
        fixed when the distribution is built.

        Args:
          context: ``None`` for an unconditional flow; one context ``[C]`` for
            a conditional one.

        Returns:
          ``tfd.TransformedDistribution(tfd.MultivariateNormalDiag(0, 1),
          tfb.Invert(chain))`` where ``chain`` is ``distrax.to_tfp`` of
          :meth:`chain`.

        Raises:
          ValueError: If ``context`` is missing, unexpected, or not ``[C]``.
        """
        from tensorflow_probability.substrates import jax as tfp

        chain = self.chain(self._one_context(context, "to_tfp"))
        tfd, tfb = tfp.distributions, tfp.bijectors
        return tfd.TransformedDistribution(
            tfd.MultivariateNormalDiag(jnp.zeros(self.dim, self._dtype())),
            tfb.Invert(distrax.to_tfp(chain)),
        )

    @property
    def num_params(self) -> int:
        """The number of trainable scalars (the sizes of all leaves).

        Calling it, ``flow.num_params()``, still works for one release, with a
        ``DeprecationWarning``.
        """
        leaves = jax.tree_util.tree_leaves(self)
        return _CallableInt(sum(np.size(leaf) for leaf in leaves))

    # -- input checks ----------------------------------------------------------------

    def _dtype(self) -> Any:
        return floating_dtype(self)

    def _one_context(self, context: Any, method: str) -> jax.Array | None:
        """Checks the single context ``[C]`` that ``method`` fixes, if any."""
        if self.context_dim is None:
            return self._checked_context(context, None)  # raises if one is given
        context = self._checked_context(context, None)
        if context is None or context.ndim != 1:
            raise ValueError(
                f"`{method}` of a conditional flow needs one `context` of shape "
                f"[C] = [{self.context_dim}] (distrax and TFP distributions take "
                f"no context argument), got shape "
                f"{None if context is None else context.shape}."
            )
        return context

    def _checked_context(self, context: Any, x_shape: tuple[int, ...] | None):
        """Checks ``context`` against ``context_dim``; returns it as an array."""
        on = "" if x_shape is None else f" for `x` of shape {x_shape}"
        if self.context_dim is None:
            if context is not None:
                raise ValueError(
                    f"This flow is unconditional (context_dim = None), but a "
                    f"`context` of shape {jnp.shape(context)} was given{on}."
                )
            return None
        if context is None:
            raise ValueError(
                f"This flow is conditional (context_dim = {self.context_dim}): "
                f"pass `context` of shape [..., {self.context_dim}]{on}."
            )
        context = jnp.asarray(context)
        if context.ndim < 1 or context.shape[-1] != self.context_dim:
            raise ValueError(
                f"`context` of shape {context.shape} must end in the context axis "
                f"of size C = {self.context_dim}{on}."
            )
        if not jnp.issubdtype(context.dtype, jnp.floating):
            context = context.astype(self._dtype())
        return context

    def _checked(
        self, x: Any, argument: str, context: Any
    ) -> tuple[jax.Array, jax.Array | None]:
        """Checks ``x`` and ``context``; broadcasts their batch axes together."""
        x = jnp.asarray(x)
        if x.ndim < 1 or x.shape[-1] != self.dim:
            raise ValueError(
                f"`{argument}` of shape {x.shape} must end in the event axis of "
                f"size D = {self.dim}."
            )
        context = self._checked_context(context, x.shape)
        if context is None:
            return x, None
        try:
            batch = jnp.broadcast_shapes(x.shape[:-1], context.shape[:-1])
        except ValueError:
            raise ValueError(
                f"`context` of shape {context.shape} does not batch against "
                f"`{argument}` of shape {x.shape}: the batch shapes "
                f"{context.shape[:-1]} and {x.shape[:-1]} do not broadcast."
            ) from None
        return (
            jnp.broadcast_to(x, (*batch, self.dim)),
            jnp.broadcast_to(context, (*batch, context.shape[-1])),
        )


def _warn_renamed(old: str, new: str) -> None:
    warnings.warn(
        f"`{old}` is deprecated and will be removed in the next release; use "
        f"`{new}` instead.",
        DeprecationWarning,
        stacklevel=3,
    )


class _CallableInt(int):
    """An ``int`` that can still be called: ``num_params`` was a method."""

    def __call__(self) -> int:
        _warn_renamed("Flow.num_params()", "Flow.num_params (a property)")
        return int(self)
