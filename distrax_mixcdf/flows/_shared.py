r"""Pieces the coupling and autoregressive flows share.

:class:`MLPFlow`, their base class (a first stage, then one conditioner MLP
per layer: validation, pytree, settings, the scan over the layers); the MLP
(plain ``(W, b)`` leaves, SiLU between layers, an optional static mask per
weight), its shape check and near-identity start; the head that turns its
output into bounded mixture parameters with the fixed anchor component; and
the data-driven stem (a short greedy Gaussianization flow) that both builders
put in front of their layers.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import distrax
import jax
import jax.numpy as jnp
import numpy as np

from distrax_mixcdf._components import logsumexp_components
from distrax_mixcdf._validation import check_data, check_fraction, check_int
from distrax_mixcdf.flows.base import Flow, unrolled
from distrax_mixcdf.flows.gaussianization import (
    GaussianizationFlow,
    gaussianization_flow,
)
from distrax_mixcdf.mixture_cdf import MixtureGaussianCDF

#: What may precede the learned layers: a marginal layer, a stem, or nothing.
FirstStage = MixtureGaussianCDF | GaussianizationFlow | None
#: One MLP: its ``(W, b)`` pairs, input layer first.
MLP = tuple[tuple[jax.Array, jax.Array], ...]

__all__ = [
    "ANCHOR_LOG_SCALE",
    "DEFAULT_ANCHOR_WEIGHT",
    "LOG_SCALE_BOUND",
    "MLP",
    "FirstStage",
    "MLPFlow",
    "broadcast_context",
    "check_stage",
    "conditioner_input",
    "data_stem",
    "identity_mixture",
    "init_mlp",
    "init_mlps",
    "mixture_params",
    "mlp",
    "mlp_shapes",
    "mlp_sizes",
    "stage_bijectors",
    "stage_map",
]

# Bound on the conditioner's log-scales, |log σ| < 5 (σ in [0.0067, 148]) on
# standardised latents: keeps a layer's Jacobian and its root-find inverse well
# conditioned however large the MLP output grows during training.
LOG_SCALE_BOUND = 5.0
# Default anchor weight: caps what one layer can cost a held-out point near
# log(200) nats per coordinate, for at most 0.01 nats where the mixture fits.
DEFAULT_ANCHOR_WEIGHT = 0.01
# The anchor is N(0, 2²): wider than the standard-normal latent, so its floor
# costs a far-out point nothing and the anchor alone maps outliers inwards.
ANCHOR_LOG_SCALE = float(np.log(2.0))
# Variance of the initial means of the near-identity mixture.
_IDENTITY_SPREAD = 0.1
# Deepest data-driven stem: enough for the Gaussian-copula start; the learned
# layers model the rest.
_STEM_MAX_LAYERS = 4


def identity_mixture(num_components: int) -> np.ndarray:
    r"""Raw ``[3K]`` params of an equal-weight mixture close to :math:`\Phi`.

    Every :math:`\sigma = 1`, means on a symmetric grid with variance
    :math:`v = 0.1`, so :math:`f = \varphi * \text{grid}` and, by Jensen,
    :math:`\log f(z) - \log\varphi(z) = \log\overline{e^{z\mu - \mu^2/2}}
    \ge -v/2` everywhere: a layer starts within 0.05 nats of the identity
    even at far-out points (narrower components would have lighter tails than
    :math:`\Phi` and cost held-out outliers many nats). The components still
    differ: identical ones would receive identical gradients forever.
    """
    grid = np.linspace(-1.0, 1.0, num_components)
    spread = np.var(grid)
    means = grid * np.sqrt(_IDENTITY_SPREAD / spread) if spread > 0 else grid
    return np.concatenate([np.zeros(num_components), means, np.zeros(num_components)])


def init_mlp(
    key: jax.Array, sizes: Sequence[int], head_bias: np.ndarray, dtype: Any
) -> list[tuple[jax.Array, jax.Array]]:
    """LeCun-normal ``(W, b)`` pairs; the head 100x smaller with bias ``head_bias``.

    The small head makes the emitted parameters start at ``head_bias`` for any
    input, i.e. every layer starts near the map ``head_bias`` describes.
    """
    keys = jax.random.split(key, len(sizes) - 1)
    layers = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        w = jax.random.normal(keys[i], (n_in, n_out), dtype) / np.sqrt(n_in)
        if i == len(sizes) - 2:
            w, b = w * 0.01, jnp.asarray(head_bias, dtype)
        else:
            b = jnp.zeros(n_out, dtype)
        layers.append((w, b))
    return layers


def init_mlps(
    key: jax.Array,
    num_layers: int,
    dim: int,
    context_dim: int | None,
    hidden: Sequence[int],
    num_components: int,
    dtype: Any,
) -> list[list[tuple[jax.Array, jax.Array]]]:
    """One :func:`init_mlp` per layer, ``D + C`` inputs to ``D · 3K`` outputs.

    Layer ``l`` draws from ``fold_in(key, l)``; every head starts at
    :func:`identity_mixture` for every coordinate.
    """
    sizes = [dim + (context_dim or 0), *hidden, dim * 3 * num_components]
    head = np.tile(identity_mixture(num_components), dim)
    return [
        init_mlp(jax.random.fold_in(key, layer), sizes, head, dtype)
        for layer in range(num_layers)
    ]


def mlp_shapes(
    layers: Sequence[tuple[Any, Any]],
) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """``[(W.shape, b.shape), …]`` of one MLP, for its checks and messages."""
    return [(tuple(w.shape), tuple(b.shape)) for w, b in layers]


def mlp_sizes(
    shapes: Sequence[tuple[tuple[int, ...], tuple[int, ...]]],
) -> tuple[int, ...] | None:
    """``(n_in, hidden…, n_out)`` of an MLP's :func:`mlp_shapes`, or ``None``.

    ``None`` unless there is at least one pair, every weight is
    ``[n_in, n_out]`` with a bias ``[n_out]``, and each ``n_out`` is the next
    weight's ``n_in``.
    """
    if not shapes or any(len(w) != 2 or b != w[1:] for w, b in shapes):
        return None
    weights = [w for w, _ in shapes]
    if any(a[1] != b[0] for a, b in itertools.pairwise(weights)):
        return None
    return (weights[0][0], *(w[1] for w in weights))


def mlp(
    layers: Sequence[tuple[jax.Array, jax.Array]],
    x: jax.Array,
    masks: Sequence[np.ndarray] | None = None,
) -> jax.Array:
    """``x @ W + b`` per layer with SiLU between; ``masks`` zero weights (MADE)."""
    for i, (w, b) in enumerate(layers):
        if masks is not None:
            w = w * jnp.asarray(masks[i], w.dtype)
        x = x @ w + b
        if i < len(layers) - 1:
            x = jax.nn.silu(x)
    return x


def conditioner_input(values: jax.Array, context: jax.Array | None) -> jax.Array:
    """The MLP's input: ``values``, then the context (in their dtype), if any."""
    if context is None:
        return values
    return jnp.concatenate([values, context.astype(values.dtype)], axis=-1)


def broadcast_context(context: jax.Array | None, values: jax.Array) -> jax.Array | None:
    """One fixed context ``[C]`` broadcast to the batch axes of ``values``."""
    if context is None:
        return None
    return jnp.broadcast_to(context, (*values.shape[:-1], context.shape[-1]))


def mixture_params(raw: jax.Array, anchor: float) -> jax.Array:
    r"""Conditioner output ``[..., 3K]`` -> bounded mixture parameters.

    Log-scales are bounded smoothly, :math:`\log\sigma = 5\tanh(s/5)`. With
    ``anchor > 0`` the ``K`` learned components share weight ``1 - anchor`` and
    a fixed ``N(0, 2²)`` component gets ``anchor``: ``[..., 3(K + 1)]``.
    """
    logits, means, log_scales = jnp.split(raw, 3, axis=-1)
    log_scales = LOG_SCALE_BOUND * jnp.tanh(log_scales / LOG_SCALE_BOUND)
    if anchor > 0:
        zero = jnp.zeros_like(logits[..., :1])
        # Unnormalised logits: the anchor's is log(anchor / (1 - anchor)) above
        # the others' logsumexp, which gives it weight `anchor` after softmax.
        anchor_logit = np.log(anchor) - np.log1p(-anchor) + logsumexp_components(logits)
        logits = jnp.concatenate([logits, anchor_logit[..., None]], axis=-1)
        means = jnp.concatenate([means, zero], axis=-1)
        log_scales = jnp.concatenate([log_scales, zero + ANCHOR_LOG_SCALE], axis=-1)
    return jnp.concatenate([logits, means, log_scales], axis=-1)


def data_stem(
    data: Any,
    dim: int,
    *,
    num_components: int,
    marginal_components: int | None,
    method: str,
    solver_options: dict[str, Any] | None,
    stem_layers: int | None,
    dtype: Any,
) -> tuple[GaussianizationFlow | None, Any]:
    """The greedy Gaussianization stem of ``data`` (``None`` without data).

    Returns ``(stem, dtype)``: the dtype defaults to the data's.
    """
    if data is None:
        return None, jnp.result_type(float) if dtype is None else dtype
    x = check_data(data)
    if x.shape[1] != dim:
        raise ValueError(f"`data` of shape {x.shape} does not have D = {dim}.")
    if dtype is None:
        dtype = jax.dtypes.canonicalize_dtype(x.dtype)
    k = num_components if marginal_components is None else marginal_components
    stem = gaussianization_flow(
        np.asarray(x, dtype),
        stem_layers,
        check_int(k, "marginal_components", 1),
        method=method,
        solver_options=solver_options,
        max_layers=_STEM_MAX_LAYERS,
    )
    return stem, dtype


def check_stage(marginal: Any, dim: int) -> None:
    """Raises ``ValueError`` unless ``marginal`` is a valid first stage on ``D``."""
    if marginal is not None and not (
        (isinstance(marginal, MixtureGaussianCDF) and marginal.batch_shape == (dim,))
        or (isinstance(marginal, GaussianizationFlow) and marginal.dim == dim)
    ):
        raise ValueError(
            f"`marginal` must be None, a MixtureGaussianCDF with parameters "
            f"[D={dim}, K] or a GaussianizationFlow on D={dim}, got {marginal!r}."
        )


def stage_bijectors(marginal: FirstStage) -> list[distrax.Bijector]:
    """The first stage's data → latent bijectors (none for ``None``)."""
    if marginal is None:
        return []
    if isinstance(marginal, GaussianizationFlow):
        return marginal.bijectors()
    return [marginal]


def stage_map(
    marginal: FirstStage, values: jax.Array, inverse: bool
) -> tuple[jax.Array, jax.Array]:
    r"""Applies the first stage to data, or inverts it: ``(values, log_det [...])``.

    ``log_det`` is :math:`\log|\det J|` of the map applied (data → latent, or
    latent → data with ``inverse``), summed over the event axis; zero without
    a first stage.
    """
    if marginal is None:
        return values, jnp.zeros(values.shape[:-1], values.dtype)
    mapped = marginal.inverse_and_log_det if inverse else marginal.forward_and_log_det
    out, log_det = mapped(values)
    if isinstance(marginal, GaussianizationFlow):
        return out, log_det
    return out, log_det.sum(-1)


class MLPFlow(Flow):
    r"""A first stage, then layers whose mixture parameters MLPs compute.

    The base of :class:`~distrax_mixcdf.CouplingFlow` and
    :class:`~distrax_mixcdf.AutoregressiveFlow`: an optional first stage
    (:data:`FirstStage`, never given the context), then one MLP per layer
    that emits the layer's :math:`K`-component mixture parameters. The pytree
    children are ``(marginal, mlps)``, so the leaves are exactly their arrays
    in that order; the settings are static aux data, a ``_settings_type``
    of (layout, ``K``, sorted solver options, :math:`\alpha`, ``C``).

    A subclass sets ``_settings_type`` and provides ``dim``, ``bijectors``,
    ``_check_layout`` (its own checks; returns ``D`` and the layout) and
    ``_step`` (one layer, either direction); it extends ``_stacked`` when its
    layers need more than their weights.

    Args:
      marginal: The first stage, or ``None``.
      mlps: One MLP per layer: ``(W, b)`` pairs with ``W [n_in, n_out]`` and
        ``b [n_out]``.
      num_components: ``K`` of the mixtures.
      solver_options: Options of the mixtures' inverse.
      anchor_weight: :math:`\alpha \in [0, 1)`; 0 for no anchor.
      context_dim: The context size ``C``, or ``None``.
      layout: What the subclass's ``_check_layout`` checks besides the MLPs.

    Raises:
      ValueError: If the shapes or counts disagree.
    """

    _settings_type: Any

    def __init__(
        self,
        marginal: FirstStage,
        mlps: Sequence[Sequence[tuple[Any, Any]]],
        num_components: int,
        *,
        solver_options: dict[str, Any] | None,
        anchor_weight: float,
        context_dim: int | None,
        layout: Any = None,
    ):
        mlps = tuple(
            tuple((jnp.asarray(w), jnp.asarray(b)) for w, b in layers)
            for layers in mlps
        )
        num_components = check_int(num_components, "num_components", 1)
        anchor_weight = check_fraction(anchor_weight, "anchor_weight")
        if context_dim is not None:
            context_dim = check_int(context_dim, "context_dim", 1)
        dim, layout = self._check_layout(mlps, layout, num_components, context_dim)
        check_stage(marginal, dim)
        self.marginal = marginal
        self._mlps: tuple[MLP, ...] = mlps
        self._settings = self._settings_type(
            layout,
            num_components,
            tuple(sorted((solver_options or {}).items())),
            anchor_weight,
            context_dim,
        )

    def _check_layout(
        self,
        mlps: tuple[MLP, ...],
        layout: Any,
        num_components: int,
        context_dim: int | None,
    ) -> tuple[int, Any]:
        """Checks the MLPs and ``layout``: ``(D, the settings' first field)``."""
        raise NotImplementedError  # pragma: no cover - abstract

    def tree_flatten(self):
        """Children: the first stage and the MLP weights; the settings are static."""
        return (self.marginal, self._mlps), self._settings

    @classmethod
    def tree_unflatten(cls, aux_data, children):
        """Rebuilds without validation (JAX may pass placeholders as leaves)."""
        flow = object.__new__(cls)
        flow.marginal, flow._mlps = children
        flow._settings = aux_data
        return flow

    @property
    def num_components(self) -> int:
        """``K`` of the mixtures (learned components; the anchor is one more)."""
        return self._settings.num_components

    @property
    def num_layers(self) -> int:
        """The number of layers (one MLP each) after the first stage."""
        return len(self._mlps)

    @property
    def anchor_weight(self) -> float:
        r""":math:`\alpha`, the fixed weight of each mixture's anchor component."""
        return self._settings.anchor_weight

    @property
    def context_dim(self) -> int | None:
        """The context size ``C``, or ``None`` for an unconditional flow."""
        return self._settings.context_dim

    def _solver_options(self) -> dict[str, Any]:
        return dict(self._settings.solver_options)

    # -- both directions: one lax.scan over the layers ---------------------------

    def _step(
        self, layer: Any, values: jax.Array, context: jax.Array | None, inverse: bool
    ) -> tuple[jax.Array, jax.Array]:
        """One layer of :meth:`_stacked`, either direction: ``(values, log_det)``."""
        raise NotImplementedError  # pragma: no cover - abstract

    def _stacked(self) -> Any:
        """The MLPs stacked on a leading layer axis for ``lax.scan``.

        ``None`` if their shapes differ (the layers are then applied one by
        one).
        """
        if len({tuple(mlp_shapes(layers)) for layers in self._mlps}) != 1:
            return None
        return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *self._mlps)

    def _forward(
        self, x: jax.Array, context: jax.Array | None
    ) -> tuple[jax.Array, jax.Array]:
        return self._scan(x, context, inverse=False)

    def _inverse(
        self, z: jax.Array, context: jax.Array | None
    ) -> tuple[jax.Array, jax.Array]:
        return self._scan(z, context, inverse=True)

    def _scan(
        self, values: jax.Array, context: jax.Array | None, inverse: bool
    ) -> tuple[jax.Array, jax.Array]:
        """First stage then layers (data → latent), or back: ``(values, log_det)``."""
        values = values.astype(jnp.result_type(values.dtype, self._dtype()))
        stacked = self._stacked()
        if stacked is None:  # MLPs of different shapes: the unrolled stack
            return self._unrolled(values, context, inverse)
        if inverse:
            log_det = jnp.zeros(values.shape[:-1], values.dtype)
        else:
            values, log_det = stage_map(self.marginal, values, inverse=False)

        def body(carry, layer):
            values, log_det = carry
            values, layer_log_det = self._step(layer, values, context, inverse)
            return (values, log_det + layer_log_det), None

        (values, log_det), _ = jax.lax.scan(
            body, (values, log_det), stacked, reverse=inverse
        )
        if inverse:
            values, stage_log_det = stage_map(self.marginal, values, inverse=True)
            log_det = log_det + stage_log_det
        return values, log_det

    def _unrolled(self, values, context, inverse):
        """The :meth:`bijectors` one by one (vmapped over per-row contexts)."""
        if context is None:
            return unrolled(self.bijectors(), values, inverse)
        batch = values.shape[:-1]
        flat_v = values.reshape(-1, self.dim)
        flat_c = context.reshape(-1, context.shape[-1])
        out, log_det = jax.vmap(lambda v, c: unrolled(self.bijectors(c), v, inverse))(
            flat_v, flat_c
        )
        return out.reshape(values.shape), log_det.reshape(batch)

    def __repr__(self) -> str:
        hidden = [int(w.shape[1]) for w, _ in self._mlps[0][:-1]]
        return (
            f"{type(self).__name__}(dim={self.dim}, num_layers={self.num_layers}, "
            f"num_components={self.num_components}, hidden={hidden}, "
            f"context_dim={self.context_dim}, "
            f"marginal={type(self.marginal).__name__ if self.marginal else None}, "
            f"num_params={self.num_params})"
        )
