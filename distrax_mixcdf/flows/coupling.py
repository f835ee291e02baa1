r"""Coupling flows: masked couplings with mixture-CDF transformers (Flow++-style).

:class:`CouplingFlow` is an optional first stage (a marginal mixture-CDF layer
or the short greedy Gaussianization flow :func:`coupling_flow` builds from
data) followed by ``distrax.MaskedCoupling`` layers whose inner bijector is
:meth:`MixtureGaussianCDF.from_params` and whose conditioner is a small
pure-JAX MLP of the kept coordinates and, for a conditional flow, the context.
Both directions are one ``lax.scan`` over the layers; the data → latent one is
closed form.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import distrax
import jax
import jax.numpy as jnp
import numpy as np

from distrax_mixcdf._validation import check_int
from distrax_mixcdf.flows._shared import (
    DEFAULT_ANCHOR_WEIGHT,
    MLP,
    FirstStage,
    MLPFlow,
    broadcast_context,
    conditioner_input,
    data_stem,
    init_mlps,
    mixture_params,
    mlp,
    mlp_shapes,
    mlp_sizes,
    stage_bijectors,
)
from distrax_mixcdf.mixture_cdf import MixtureGaussianCDF

__all__ = ["CouplingFlow", "coupling_flow"]


class _Settings(NamedTuple):
    """The static (non-leaf) part of a :class:`CouplingFlow`."""

    masks: tuple[tuple[bool, ...], ...]
    num_components: int
    solver_options: tuple[tuple[str, Any], ...]
    anchor_weight: float
    context_dim: int | None


def _conditioner_input(
    values: jax.Array, mask: Any, context: jax.Array | None
) -> jax.Array:
    """The MLP's input: the kept coordinates (others zeroed), then the context."""
    return conditioner_input(jnp.where(mask, values, 0), context)


def _coupling_params(
    weights: Sequence[tuple[jax.Array, jax.Array]],
    inputs: jax.Array,
    dim: int,
    num_components: int,
    anchor: float,
) -> jax.Array:
    """Mixture parameters ``[..., D, 3K']`` of every coordinate from the MLP."""
    out = mlp(weights, inputs)
    out = out.reshape((*out.shape[:-1], dim, 3 * num_components))
    return mixture_params(out, anchor)


@jax.tree_util.register_pytree_node_class
class CouplingFlow(MLPFlow):
    r"""Coupling flow with mixture-CDF inner bijectors (Flow++-style).

    Each coupling layer :math:`l` keeps the coordinates :math:`x_m` where
    ``masks[l]`` is true and Gaussianizes the others, each with its own
    ``K``-component mixture whose parameters an MLP computes from the kept
    coordinates and, for a conditional flow, the context :math:`c`:

    .. math::
        y_{\bar m} = \Phi^{-1}\Big((1 - \alpha)\sum_k w_k(x_m, c)\,
            \Phi\Big(\frac{x_{\bar m} - \mu_k(x_m, c)}{\sigma_k(x_m, c)}\Big)
            + \alpha\,\Phi(x_{\bar m} / 2)\Big),
        \qquad y_m = x_m,

    with a fixed *anchor* weight :math:`\alpha` (``anchor_weight``, default
    0) on a fixed :math:`\mathcal N(0, 2^2)` component. The anchor puts a
    floor under every conditional density, :math:`f(u \mid x_m) \ge
    \alpha\,\varphi(u/2)/2`, so however the MLP extrapolates at a point unlike
    the training data, a coupling costs that point at most
    :math:`\log(2/\alpha) - 3u^2/8` nats per coordinate more than the identity
    would (nothing beyond :math:`|u| \approx 3.8` for :math:`\alpha = 0.01`),
    while a well-fitting coupling loses at most :math:`-\log(1 - \alpha)`.

    This is ``distrax.MaskedCoupling`` with
    :meth:`MixtureGaussianCDF.from_params` (see :meth:`bijectors`),
    optionally preceded by a first stage: a per-dimension marginal mixture-CDF
    layer or a whole :class:`GaussianizationFlow` (what :func:`coupling_flow`
    builds from data). The first stage never sees the context.
    The MLP sees ``x`` with the transformed coordinates zeroed (``D`` inputs),
    then the context (``C`` more), and emits ``D · 3K`` values (the kept
    coordinates' share is unused), so every layer has the same shapes and
    :meth:`log_prob` scans over them. The log-scales are bounded smoothly,
    :math:`\log\sigma = 5\tanh(s/5)`.

    The pytree leaves are the optional first stage's arrays and the MLP
    weights and biases (``conditioners[l]`` is a tuple of ``(W, b)`` pairs);
    the masks, ``K``, the anchor weight, the context size and the solver
    options are static. Build one with :func:`coupling_flow`.

    Args:
      marginal: The first stage, applied to data before the couplings: a
        ``MixtureGaussianCDF`` with parameters ``[D, K']``, a
        ``GaussianizationFlow`` on ``D`` dimensions, or ``None``.
      conditioners: One MLP per coupling layer: a sequence of ``(W, b)`` with
        ``W [n_in, n_out]`` and ``b [n_out]``, from ``D + C`` inputs to
        ``D · 3K`` outputs; SiLU between layers.
      masks: One boolean ``[D]`` mask per layer (true = kept), each with at
        least one false entry, and at least one true entry unless the flow is
        conditional (a layer may then depend on the context alone).
      num_components: ``K`` of the coupling mixtures (learned components; the
        anchor, if any, is one more).
      solver_options: Options of the inner bijectors' inverse.
      anchor_weight: :math:`\alpha \in [0, 1)`, the fixed weight of the
        ``N(0, 2²)`` anchor component of every coupling mixture; 0 for none.
      context_dim: The context size ``C``, or ``None`` for an unconditional
        flow.

    Raises:
      ValueError: If the shapes or counts disagree.
    """

    _settings_type = _Settings

    def __init__(
        self,
        marginal: FirstStage,
        conditioners: Sequence[Sequence[tuple[Any, Any]]],
        masks: Sequence[Any],
        num_components: int,
        *,
        solver_options: dict[str, Any] | None = None,
        anchor_weight: float = 0.0,
        context_dim: int | None = None,
    ):
        masks = tuple(tuple(bool(v) for v in np.asarray(m).reshape(-1)) for m in masks)
        super().__init__(
            marginal,
            conditioners,
            num_components,
            solver_options=solver_options,
            anchor_weight=anchor_weight,
            context_dim=context_dim,
            layout=masks,
        )

    def _check_layout(
        self,
        mlps: tuple[MLP, ...],
        layout: tuple[tuple[bool, ...], ...],
        num_components: int,
        context_dim: int | None,
    ) -> tuple[int, tuple[tuple[bool, ...], ...]]:
        """Checks the masks and the conditioners' shapes: ``(D, masks)``."""
        masks = layout
        if len(masks) != len(mlps) or not masks:
            raise ValueError(
                f"`masks` ({len(masks)}) and `conditioners` ({len(mlps)}) "
                "must have the same, non-zero length."
            )
        dim, n_context = len(masks[0]), context_dim or 0
        fewest_kept = 0 if context_dim else 1
        want_in, want_out = dim + n_context, dim * 3 * num_components
        for i, (mask, layers) in enumerate(zip(masks, mlps, strict=True)):
            if len(mask) != dim or not fewest_kept <= sum(mask) < dim:
                raise ValueError(
                    f"`masks[{i}]` must have D = {dim} entries with at least "
                    f"{fewest_kept} kept and one transformed, got {mask}."
                )
            shapes = mlp_shapes(layers)
            sizes = mlp_sizes(shapes)
            if sizes is None or sizes[0] != want_in or sizes[-1] != want_out:
                raise ValueError(
                    f"`conditioners[{i}]` must map D + C = {want_in} inputs to "
                    f"D * 3K = {want_out} outputs through [n_in, n_out] weights "
                    f"and [n_out] biases, got shapes {shapes}."
                )
        return dim, masks

    @property
    def conditioners(self) -> tuple[MLP, ...]:
        """One MLP per coupling layer: a tuple of ``(W, b)`` pairs."""
        return self._mlps

    @property
    def masks(self) -> tuple[tuple[bool, ...], ...]:
        """One boolean mask per coupling layer (true = kept unchanged)."""
        return self._settings.masks

    @property
    def dim(self) -> int:
        """The event size ``D``."""
        return len(self.masks[0])

    def _params(self, weights, values, mask, context) -> jax.Array:
        inputs = _conditioner_input(values, mask, context)
        return _coupling_params(
            weights, inputs, self.dim, self.num_components, self.anchor_weight
        )

    def bijectors(self, context: Any = None) -> list[distrax.Bijector]:
        """``[first stage…, coupling_1, …]``: the data → latent layers in order.

        Args:
          context: For a conditional flow, one context ``[C]`` every
            conditioner sees; ``None`` for an unconditional flow.

        Returns:
          The list of distrax bijectors.
        """
        context = self._checked_context(context, None)
        options = self._solver_options()

        def coupling(layer: int) -> distrax.MaskedCoupling:
            weights, mask = self.conditioners[layer], jnp.asarray(self.masks[layer])

            def conditioner(masked_x):
                c = broadcast_context(context, masked_x)
                return self._params(weights, masked_x, mask, c)

            return distrax.MaskedCoupling(
                mask=mask,
                conditioner=conditioner,
                bijector=lambda p: MixtureGaussianCDF.from_params(p, **options),
            )

        layers = stage_bijectors(self.marginal)
        return layers + [coupling(i) for i in range(self.num_layers)]

    def _stacked(self):
        """``(weights [L, ...], masks [L, D], transformed [L, M])`` for ``lax.scan``.

        ``transformed[l]`` lists layer ``l``'s transformed coordinates, padded
        to the most any layer has by repeating its first one. None if the
        conditioners differ in shape.
        """
        weights = super()._stacked()
        if weights is None:
            return None
        indices = [[d for d, kept in enumerate(m) if not kept] for m in self.masks]
        width = max(len(i) for i in indices)
        transformed = np.array([i + i[:1] * (width - len(i)) for i in indices])
        return weights, jnp.asarray(self.masks), jnp.asarray(transformed, jnp.int32)

    def _step(self, layer, values, context, inverse):
        """One coupling layer, either direction: ``(values, log_det [...])``.

        Only the transformed coordinates are computed: the MLP's last layer
        keeps just their columns, and the mixture runs on just them.
        """
        weights, mask, transformed = layer
        inputs = _conditioner_input(values, mask, context)
        *hidden, (w, b) = weights
        features = jax.nn.silu(mlp(hidden, inputs)) if hidden else inputs
        k3 = 3 * self.num_components
        w = w.reshape(w.shape[0], self.dim, k3)[:, transformed].reshape(w.shape[0], -1)
        b = b.reshape(self.dim, k3)[transformed].reshape(-1)
        raw = features @ w + b
        raw = raw.reshape((*raw.shape[:-1], transformed.shape[0], k3))
        params = mixture_params(raw, self.anchor_weight)
        bijector = MixtureGaussianCDF.from_params(params, **self._solver_options())
        mapped = (
            bijector.inverse_and_log_det if inverse else bijector.forward_and_log_det
        )
        out, log_det = mapped(values[..., transformed])
        # Padding repeats a transformed coordinate: it writes the same value
        # twice and its log-det is counted once.
        first = jnp.concatenate([jnp.ones(1, bool), transformed[1:] != transformed[0]])
        return (
            values.at[..., transformed].set(out),
            jnp.where(first, log_det, 0).sum(-1),
        )


def coupling_flow(
    key: jax.Array,
    dim: int,
    *,
    context_dim: int | None = None,
    num_layers: int = 4,
    num_components: int = 8,
    hidden_sizes: Sequence[int] = (32, 32),
    data: Any = None,
    marginal_components: int | None = None,
    method: str = "em",
    solver_options: dict[str, Any] | None = None,
    dtype: Any = None,
    stem_layers: int | None = None,
    anchor_weight: float = DEFAULT_ANCHOR_WEIGHT,
) -> CouplingFlow:
    r"""A coupling flow with mixture-CDF couplings and MLP conditioners.

    Each layer keeps the masked coordinates :math:`x_m` and maps the others by
    a mixture CDF whose parameters an MLP computes from them (and from the
    context :math:`c` of a conditional flow),
    :math:`y_{\bar m} = \Phi^{-1}\big(\sum_k w_k(x_m, c)\,
    \Phi((x_{\bar m} - \mu_k(x_m, c))/\sigma_k(x_m, c))\big)`,
    :math:`y_m = x_m` (see :class:`CouplingFlow`).

    Masks alternate: for ``D = 2`` between ``[True, False]`` and ``[False,
    True]``; for ``D >= 3`` each pair of layers keeps a random half of the
    coordinates (from ``key``) and then its complement, so every coordinate is
    transformed once per pair. A conditional flow on ``D = 1`` transforms its
    one coordinate in every layer, from the context alone. Hidden layers use
    SiLU; weights start LeCun-normal, the output layer 100x smaller with a bias
    that makes every coupling start near the identity.

    With ``data``, a greedy :func:`gaussianization_flow` of the data comes
    first (the *stem*; its depth is data-driven, at most 4 layers, unless
    ``stem_layers`` fixes it). Its first two layers are per-dimension
    marginals with a PCA rotation between them, so before any training the
    flow is already a Gaussian copula of the data (of the marginal
    :math:`p(x)` for a conditional flow; the stem ignores the context); the
    couplings, which start near the identity, then only have to model what is
    left. On a few hundred rows, where the couplings' MLPs overfit within a
    few steps, this start is what :func:`~distrax_mixcdf.fit` with
    ``validation_data`` falls back to.

    The context enters every conditioner as given: standardise it (zero mean,
    unit variance per column) for the default initial scales to fit.

    Example:
      >>> import jax
      >>> from distrax_mixcdf import coupling_flow, fit
      >>> x = jax.random.normal(jax.random.PRNGKey(0), (512, 2)) ** 3
      >>> flow = coupling_flow(jax.random.PRNGKey(1), 2, num_layers=4, data=x)
      >>> flow = fit(flow, x, steps=50, show_progress=False).model
      >>> flow.log_prob(x[:3]).shape
      (3,)

    Args:
      key: PRNG key for the weights and the masks.
      dim: The event size ``D`` (``>= 2``, or ``>= 1`` with a context).
      context_dim: The context size ``C`` of a conditional flow, or ``None``.
      num_layers: The number of coupling layers.
      num_components: ``K`` of each coupling mixture.
      hidden_sizes: Hidden widths of each conditioner MLP.
      data: Optional training data ``[N, D]`` for the stem.
      marginal_components: ``K`` of the stem's marginals (default
        ``num_components``).
      method: The stem marginals' initialisation method (see
        :func:`gaussianization_flow`).
      solver_options: Options of every mixture's inverse.
      dtype: Floating dtype of the weights (default: the data's, or JAX's
        default float).
      stem_layers: The stem's number of marginal layers, or ``None`` for the
        data-driven depth.
      anchor_weight: The fixed weight :math:`\alpha` of each coupling
        mixture's ``N(0, 2²)`` anchor component (see :class:`CouplingFlow`);
        0 turns it off.

    Returns:
      The :class:`CouplingFlow`.

    Raises:
      ValueError: If an argument is malformed.
    """
    if context_dim is not None:
        context_dim = check_int(context_dim, "context_dim", 1)
    dim = check_int(dim, "dim", 1 if context_dim else 2)
    num_layers = check_int(num_layers, "num_layers", 1)
    num_components = check_int(num_components, "num_components", 1)
    hidden = [check_int(h, "hidden_sizes", 1) for h in hidden_sizes]
    marginal, dtype = data_stem(
        data,
        dim,
        num_components=num_components,
        marginal_components=marginal_components,
        method=method,
        solver_options=solver_options,
        stem_layers=stem_layers,
        dtype=dtype,
    )
    mask_key, weight_key = jax.random.split(key)
    masks = []
    for layer in range(num_layers):
        if dim == 1:
            mask = np.zeros(1, bool)
        elif dim == 2:
            mask = np.array([layer % 2 == 0, layer % 2 == 1])
        elif layer % 2 == 0:
            perm = np.asarray(
                jax.random.permutation(jax.random.fold_in(mask_key, layer), dim)
            )
            mask = np.zeros(dim, bool)
            mask[perm[: dim // 2]] = True
        else:
            mask = ~masks[-1]
        masks.append(mask)
    conditioners = init_mlps(
        weight_key, num_layers, dim, context_dim, hidden, num_components, dtype
    )
    return CouplingFlow(
        marginal,
        conditioners,
        masks,
        num_components,
        solver_options=solver_options,
        anchor_weight=anchor_weight,
        context_dim=context_dim,
    )
