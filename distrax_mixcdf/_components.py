"""The loop over mixture components, unrolled in blocks so compile time is flat in K.

Elementwise passes over the batch (the forward's bulk sums, the log-density,
the bracket) visit the components one at a time with a running result, so
that XLA fuses a block of them into one elementwise kernel instead of
reducing over a short minor axis. `fold` unrolls up to ``2 * BLOCK - 1``
components; from ``2 * BLOCK`` on, whole blocks of `BLOCK` run as a
``lax.fori_loop`` and the remainder (under `BLOCK`) is unrolled after it, so
the compiled program has at most two blocks' code whatever ``K`` is.
`reduce_components` is the same loop for a maximum, minimum or sum over the
components of one array, and `logsumexp_components` for a logsumexp;
`log_normalise` is ``log_softmax`` over the components.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "BLOCK",
    "fold",
    "log_normalise",
    "logsumexp_components",
    "reduce_components",
]

# Components per unrolled block: one block is one fused kernel per pass.
BLOCK = 8


def _blocks(params: tuple[jax.Array, ...], blocks: int) -> tuple[jax.Array, ...]:
    """The first ``blocks * BLOCK`` components as ``[blocks, ..., BLOCK]`` arrays."""
    return tuple(
        jnp.moveaxis(
            p[..., : blocks * BLOCK].reshape(*p.shape[:-1], blocks, BLOCK), -2, 0
        )
        for p in params
    )


def fold(
    body: Callable[..., Any],
    carry: Any,
    params: tuple[jax.Array, ...],
    shape: tuple[int, ...],
) -> Any:
    """``carry = body(carry, log_weight_k, mean_k, log_scale_k, ...)`` for each ``k``.

    Args:
      body: One component's update; its slices have the parameters' batch
        shape and broadcast against the batch.
      carry: Initial pytree; scalar leaves are broadcast to ``shape``, others
        must already have their final shape.
      params: Per-component arrays ``[..., K]`` (usually
        ``(log_weights, means, log_scales)``).
      shape: The batch shape of the carried arrays.

    Returns:
      The final carry, after the components in order ``0 … K-1``.
    """
    carry = jax.tree_util.tree_map(
        lambda leaf: jnp.broadcast_to(leaf, shape) if jnp.ndim(leaf) == 0 else leaf,
        carry,
    )
    size = params[0].shape[-1]

    def run(carry, components, start, stop):
        for k in range(start, stop):
            carry = body(carry, *(p[..., k] for p in components))
        return carry

    blocks = size // BLOCK
    if blocks > 1:
        stacked = _blocks(params, blocks)
        carry = lax.fori_loop(
            0,
            blocks,
            lambda i, c: run(c, tuple(p[i] for p in stacked), 0, BLOCK),
            carry,
        )
    # The remainder (all of K when a loop is not worth it) unrolled: no
    # padding components, so K = 9 costs nine components, not sixteen.
    start = BLOCK * blocks if blocks > 1 else 0
    return run(carry, params, start, size)


def reduce_components(
    combine: Callable[[jax.Array, jax.Array], jax.Array], values: jax.Array
) -> jax.Array:
    """``combine`` folded over the component axis of ``values [..., K]``.

    An elementwise fold rather than a reduction over the minor axis: XLA's
    CPU backend hands such reductions to a library kernel several times
    slower than one fused elementwise loop.
    """
    first = values[..., 0]
    if values.shape[-1] == 1:
        return first
    return fold(combine, first, (values[..., 1:],), first.shape)


def _finite_max(values: jax.Array) -> jax.Array:
    """The largest component of ``values [..., K]``; 0 where it is not finite."""
    largest = reduce_components(jnp.maximum, values)
    return jnp.where(jnp.isfinite(largest), largest, 0.0)


def logsumexp_components(values: jax.Array) -> jax.Array:
    r"""``log Σ_k exp(values_k)`` over the component axis of ``values [..., K]``.

    Shifted by the largest entry (0 where it is not finite); an elementwise
    fold, like `reduce_components`.
    """
    shift = _finite_max(values)
    total = fold(
        lambda s, value: s + jnp.exp(value - shift),
        jnp.zeros((), values.dtype),
        (values,),
        shift.shape,
    )
    return shift + jnp.log(total)


def log_normalise(values: jax.Array) -> jax.Array:
    r"""``values - logsumexp(values)`` over the component axis: ``log_softmax``.

    The sum is a product with ones, whose result XLA keeps in memory: an
    elementwise normaliser would be fused into, and recomputed by, every
    consumer of every component.
    """
    shift = _finite_max(values)[..., None]
    total = jnp.exp(values - shift) @ jnp.ones(values.shape[-1], values.dtype)
    return values - (shift + jnp.log(total)[..., None])
