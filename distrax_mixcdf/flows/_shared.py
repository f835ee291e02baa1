r"""Pieces the coupling and autoregressive flows share.

The conditioner MLP (plain ``(W, b)`` leaves, SiLU between layers, an optional
static mask per weight), the head that turns its output into bounded mixture
parameters with the fixed anchor component, the near-identity start of those
parameters, and the data-driven stem (a short greedy Gaussianization flow)
that both builders put in front of their layers.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import distrax
import jax
import jax.numpy as jnp
import numpy as np

from distrax_mixcdf._validation import check_data, check_int
from distrax_mixcdf.flows.gaussianization import (
    GaussianizationFlow,
    gaussianization_flow,
)
from distrax_mixcdf.mixture_cdf import MixtureGaussianCDF

#: What may precede the learned layers: a marginal layer, a stem, or nothing.
FirstStage = MixtureGaussianCDF | GaussianizationFlow | None

__all__ = [
    "ANCHOR_LOG_SCALE",
    "DEFAULT_ANCHOR_WEIGHT",
    "LOG_SCALE_BOUND",
    "FirstStage",
    "check_anchor_weight",
    "check_stage",
    "data_stem",
    "identity_mixture",
    "init_mlp",
    "mixture_params",
    "mlp",
    "stage_bijectors",
    "stage_forward",
    "stage_inverse",
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
        logits = jnp.concatenate(
            [
                np.log1p(-anchor) + jax.nn.log_softmax(logits, axis=-1),
                zero + np.log(anchor),
            ],
            axis=-1,
        )
        means = jnp.concatenate([means, zero], axis=-1)
        log_scales = jnp.concatenate([log_scales, zero + ANCHOR_LOG_SCALE], axis=-1)
    return jnp.concatenate([logits, means, log_scales], axis=-1)


def check_anchor_weight(anchor_weight: Any) -> float:
    """Returns ``anchor_weight`` as a float in ``[0, 1)`` or raises ``ValueError``."""
    if isinstance(anchor_weight, bool) or not (
        isinstance(anchor_weight, (int, float, np.integer, np.floating))
        and 0 <= anchor_weight < 1
    ):
        raise ValueError(
            f"`anchor_weight` must be a number in [0, 1), got {anchor_weight!r}."
        )
    return float(anchor_weight)


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


def stage_forward(marginal: FirstStage, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Applies the first stage to data: ``(values, log_det [...])``."""
    if isinstance(marginal, GaussianizationFlow):
        return marginal.forward_and_log_det(x)
    if marginal is None:
        return x, jnp.zeros(x.shape[:-1], x.dtype)
    y, log_det = marginal.forward_and_log_det(x)
    return y, log_det.sum(-1)


def stage_inverse(marginal: FirstStage, z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Inverts the first stage: ``(data, log|dx/dz| [...])``."""
    if isinstance(marginal, GaussianizationFlow):
        return marginal.inverse_and_log_det(z)
    if marginal is None:
        return z, jnp.zeros(z.shape[:-1], z.dtype)
    x, log_det = marginal.inverse_and_log_det(z)
    return x, log_det.sum(-1)
