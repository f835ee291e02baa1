"""The loop over mixture components, unrolled in blocks so compile time is flat in K.

Elementwise passes over the batch (the forward's bulk sums, the log-density,
the bracket) visit the components one at a time with a running result, so
that XLA fuses a block of them into one elementwise kernel instead of
reducing over a short minor axis. `fold` unrolls up to `BLOCK` components;
more components run as a ``lax.fori_loop`` over blocks of `BLOCK`, so the
compiled program has one block's code whatever ``K`` is.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["BLOCK", "fold"]

# Components per unrolled block: one block is one fused kernel per pass.
BLOCK = 8


def _padded_blocks(params: tuple[jax.Array, ...]) -> tuple[int, tuple]:
    """Per-component arrays padded to whole blocks, as ``[blocks, ..., BLOCK]``.

    Padding components repeat the last component (means, scales, ...) with
    weight zero (the first array, the log-weights, padded with ``-inf``): they
    add nothing to a sum and do not move a bracket.
    """
    size = params[0].shape[-1]
    blocks = math.ceil(size / BLOCK)
    pad = blocks * BLOCK - size

    def stack(p, mode, **fill):
        widths = [(0, 0)] * (p.ndim - 1) + [(0, pad)]
        p = jnp.pad(p, widths, mode=mode, **fill)
        return jnp.moveaxis(p.reshape(*p.shape[:-1], blocks, BLOCK), -2, 0)

    first, *rest = params
    return blocks, (
        stack(first, "constant", constant_values=-jnp.inf),
        *(stack(p, "edge") for p in rest),
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
      params: Per-component arrays ``[..., K]``, log-weights first (usually
        ``(log_weights, means, log_scales)``).
      shape: The batch shape of the carried arrays.

    Returns:
      The final carry. Padding components (log-weight ``-inf``, see above)
      must leave it unchanged, which holds for sums of ``w_k``-weighted terms
      and for extrema of ``μ_k + σ_k y`` or of log-weighted terms.
    """
    carry = jax.tree_util.tree_map(
        lambda leaf: jnp.broadcast_to(leaf, shape) if jnp.ndim(leaf) == 0 else leaf,
        carry,
    )
    size = params[0].shape[-1]
    if size <= BLOCK:
        for k in range(size):
            carry = body(carry, *(p[..., k] for p in params))
        return carry
    blocks, stacked = _padded_blocks(params)

    def run_block(index, carry):
        block = tuple(p[index] for p in stacked)
        for k in range(BLOCK):
            carry = body(carry, *(p[..., k] for p in block))
        return carry

    return lax.fori_loop(0, blocks, run_block, carry)
