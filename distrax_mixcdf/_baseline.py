"""The textbook mixture-CDF formula, kept as a baseline for benchmarks and tutorials."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtr, ndtri

__all__ = ["naive_forward_and_log_det"]


def naive_forward_and_log_det(
    x: jax.Array, params: tuple[jax.Array, jax.Array, jax.Array]
) -> tuple[jax.Array, jax.Array]:
    r"""The textbook formula ``ndtri(Σ w ndtr(z))`` and its log-det.

    .. math:: y = \Phi^{-1}\Big(\sum_k w_k \Phi(z_k)\Big),\qquad
        \log\frac{dy}{dx} = \log f(x) - \log\varphi(y)

    It saturates (``y = ±inf``) from ``|y| ≈ 5.4`` in float32 and ``≈ 8.3`` in
    float64, where every peer clips. Do not use it to model.
    """
    log_weights, means, log_scales = params
    z = (x[..., None] - means) * jnp.exp(-log_scales)
    cdf = jnp.sum(jnp.exp(log_weights) * ndtr(z), axis=-1)
    y = ndtri(cdf)
    log_density = jax.nn.logsumexp(
        log_weights - log_scales - 0.5 * jnp.square(z), axis=-1
    )
    return y, log_density + 0.5 * jnp.square(y)
