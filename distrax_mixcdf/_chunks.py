"""Row chunks inside ``jit``: one function mapped over slices of the batch.

Every large computation in this library is elementwise over a batch whose
parameters broadcast against it. `map_row_chunks` runs such a function over
chunks of the batch's leading axis with ``lax.map``, so that its temporaries
are one chunk's size instead of the whole batch's.

Why this matters on XLA's CPU backend (measured, N = 1e6 float32, K = 8):

* XLA allocates all temporaries of one call as a single buffer. Above 32 MiB
  glibc's ``malloc`` serves it by a fresh ``mmap`` on every call, and every
  4 KiB page touched costs a page fault (~1 µs): the unchunked inverse's
  72 MiB buffer took ~17k faults, ~15 ms of a 35 ms call. Below that size
  glibc reuses freed heap memory and a warm call faults on nothing.
* One chunk's arrays stay in cache between the kernels of a loop body.
* Each chunk costs the loop body's kernel launches again, so chunks should not
  be small (the solver measured 30 ms at 2^14 elements per chunk, 22 ms at 2^18).

What you may change: the layout rule (`chunk_layout`). Callers choose the chunk
size and whether the body is rematerialised in reverse mode.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["chunk_layout", "has_rows", "map_row_chunks"]


def chunk_layout(rows: int, per_row: int, target_rows: int) -> tuple[int, int]:
    """``(chunks, chunk_rows)`` covering ``rows`` with ~``target_rows`` per chunk.

    Chunks hold a multiple of 16 elements: XLA's CPU kernels on odd lengths
    measured ~10x slower (unvectorised). An exact split is preferred, so that
    the inputs need no padding copy; otherwise the last chunk is padded.
    """
    align = 16 // math.gcd(16, per_row)
    fewest = math.ceil(rows / target_rows)
    for chunks in range(fewest, 2 * fewest + 1):
        if rows % chunks == 0 and (rows // chunks) % align == 0:
            return chunks, rows // chunks
    chunk_rows = math.ceil(math.ceil(rows / fewest) / align) * align
    return math.ceil(rows / chunk_rows), chunk_rows


def has_rows(leaf: jax.Array, batch_shape: Sequence[int]) -> bool:
    """Whether a parameter-like leaf ``[..., K]`` carries the batch's leading axis.

    Leaves are right-aligned against ``batch_shape`` plus one trailing axis (the
    components, or a table's knots); only a full-length leading axis is chunked.
    """
    rank = len(batch_shape)
    rows = batch_shape[0] if rank else 0
    return leaf.ndim - 1 == rank and leaf.shape[0] == rows and rows > 1


def map_row_chunks(
    body: Callable[..., Any],
    batched: Sequence[jax.Array],
    shared: Any,
    batch_shape: Sequence[int],
    chunk_elements: int,
    remat: bool = False,
) -> Any:
    """``body(*batched, shared)`` over chunks of the leading batch axis.

    Args:
      body: Function of the batched arrays (each of ``batch_shape``, sliced to
        one chunk's rows) and ``shared``. It returns a pytree whose leaves have
        the chunk's rows as leading axis, or are scalars (one per chunk).
      batched: Arrays of exactly ``batch_shape``.
      shared: Pytree of parameter-like arrays (see `has_rows`); leaves that
        carry the leading batch axis are chunked with it, others are passed
        whole to every chunk.
      batch_shape: The batch shape.
      chunk_elements: Target number of batch elements per chunk. Batches of
        fewer than two chunks run in one piece.
      remat: ``jax.checkpoint`` the body, so reverse mode saves only each
        chunk's inputs and recomputes the rest chunk by chunk.

    Returns:
      ``body``'s pytree with row leaves of ``batch_shape[0]`` rows, and scalar
      leaves stacked to ``[chunks]`` (left scalar when run in one piece).
    """
    run = jax.checkpoint(body) if remat else body
    rank = len(batch_shape)
    rows = batch_shape[0] if rank else 0
    per_row = math.prod(batch_shape[1:])
    target_rows = max(1, chunk_elements // max(per_row, 1))
    if rank == 0 or rows < 2 * target_rows:
        return run(*batched, shared)
    chunks, chunk_rows = chunk_layout(rows, per_row, target_rows)
    padded_rows = chunks * chunk_rows

    def split(array):
        if padded_rows > rows:
            padding = [(0, padded_rows - rows)] + [(0, 0)] * (array.ndim - 1)
            array = jnp.pad(array, padding, mode="edge")
        return array.reshape((chunks, chunk_rows, *array.shape[1:]))

    shared_leaves, shared_tree = jax.tree_util.tree_flatten(shared)
    leaf_has_rows = [has_rows(leaf, batch_shape) for leaf in shared_leaves]
    mapped = (
        tuple(split(a) for a in batched),
        [split(leaf) for leaf, r in zip(shared_leaves, leaf_has_rows) if r],
    )
    fixed = [leaf for leaf, r in zip(shared_leaves, leaf_has_rows) if not r]

    def chunk_body(chunk):
        chunk_batched, chunk_leaves = chunk
        chunk_leaves, fixed_leaves = iter(chunk_leaves), iter(fixed)
        leaves = [
            next(chunk_leaves) if r else next(fixed_leaves) for r in leaf_has_rows
        ]
        return run(*chunk_batched, jax.tree_util.tree_unflatten(shared_tree, leaves))

    outputs = lax.map(chunk_body, mapped)

    def merge(leaf):
        if leaf.ndim == 1:  # one scalar per chunk
            return leaf
        return leaf.reshape((padded_rows, *leaf.shape[2:]))[:rows]

    return jax.tree_util.tree_map(merge, outputs)
