"""Batch layout and chunking: the one place that decides how a batch is walked.

Every map in this library is elementwise over a batch whose parameters
``[..., K]`` broadcast against it. Before any numerics run, `canonical`
rearranges the batch into two axes ``[rows, lanes]``:

* rows are the parameter sets (``D`` for ``[D, K]`` parameters on ``[N, D]``
  inputs, 1 for a shared mixture), and parameters become ``[rows, 1, K]``;
* lanes are the elements that share a parameter set, so the minor axis is
  long and vectorises, whatever axis the caller's parameters vary along;
* with per-element parameters (``[N, K]`` on ``[N]``) there is one row and the
  parameters become ``[1, N, K]``.

`map_lane_chunks` then runs a function over chunks of the lanes with
``lax.map``, so that its temporaries are one chunk's size. Chunk sizes are per
backend (`chunk_elements`): on XLA's CPU backend, chunks keep each call's
temporaries in cache and below glibc's 32 MiB ``mmap`` threshold (above it,
every call page-faults on a fresh mapping); on GPU and TPU the whole batch
runs in one piece, where a sequential loop would only serialise parallel work.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "Layout",
    "canonical",
    "chunk_elements",
    "has_lanes",
    "lane_split",
    "map_lane_chunks",
    "vmap_as_batch",
]

Params = tuple[jax.Array, jax.Array, jax.Array]

# Target elements per chunk on the CPU backend, by what the chunk holds.
# "solve" and "policy" keep a handful of [chunk] arrays; "tangents" and
# "tail" hold [chunk, K] arrays, so their budget is per 8 components.
_CPU_CHUNK_ELEMENTS = {
    "solve": 1 << 17,
    "policy": 1 << 16,
    "tangents": 1 << 16,
    "tail": 1 << 14,
}
_COMPONENT_SCALED = ("tangents", "tail")
# Chunks hold a multiple of this many lanes: XLA's CPU kernels on odd lengths
# fall back to scalar code.
_LANE_ALIGN = 16


def chunk_elements(purpose: str, num_components: int = 8) -> int | None:
    """Target elements per chunk for ``purpose``, or ``None`` for one piece.

    Only XLA's CPU backend gets chunks; components scale the budget of the
    purposes that hold ``[chunk, K]`` arrays, so memory stays flat in ``K``.
    """
    if jax.default_backend() != "cpu":
        return None
    elements = _CPU_CHUNK_ELEMENTS[purpose]
    if purpose in _COMPONENT_SCALED:
        elements = max(1, elements * 8 // max(num_components, 8))
    return elements


class Layout(NamedTuple):
    """How `canonical` rearranged a batch (static: shapes and a permutation).

    Attributes:
      shape: The caller's broadcast batch shape.
      order: Permutation of its axes: parameter axes first, then lane axes.
      rows: Number of rows (parameter sets; 1 for shared or per-element).
      lanes: Number of lanes (elements per row).
      per_element: Whether every element has its own parameters.
      row_rank: How many leading axes of ``order`` make the rows.
    """

    shape: tuple[int, ...]
    order: tuple[int, ...]
    rows: int
    lanes: int
    per_element: bool
    row_rank: int

    def restore(self, array: jax.Array) -> jax.Array:
        """``[rows, lanes]`` back to the caller's broadcast batch shape."""
        permuted = tuple(self.shape[axis] for axis in self.order)
        inverse = tuple(self.order.index(axis) for axis in range(len(self.order)))
        return jnp.transpose(array.reshape(permuted), inverse)

    def arrange(self, array: jax.Array) -> jax.Array:
        """An array broadcastable to the batch shape, as ``[rows, lanes]``."""
        array = jnp.broadcast_to(array, self.shape)
        return jnp.transpose(array, self.order).reshape(self.rows, self.lanes)

    def arrange_params(self, param: jax.Array) -> jax.Array:
        """A parameter-like array ``[..., K]`` as ``[rows|1, lanes|1, K]``."""
        size = param.shape[-1]
        if self.per_element:
            param = jnp.broadcast_to(param, (*self.shape, size))
            return param.reshape(1, self.lanes, size)
        rank = len(self.shape)
        param = param.reshape((1,) * (rank + 1 - param.ndim) + param.shape)
        param = jnp.transpose(param, (*self.order, rank))
        row_shape = tuple(self.shape[axis] for axis in self.order[: self.row_rank])
        lane_ones = (1,) * (rank - self.row_rank)
        param = jnp.broadcast_to(param, (*row_shape, *lane_ones, size))
        return param.reshape(self.rows, 1, size)


def _layout(value_shape, param_shape) -> Layout:
    shape = tuple(jnp.broadcast_shapes(tuple(value_shape), tuple(param_shape)))
    aligned = (1,) * (len(shape) - len(param_shape)) + tuple(param_shape)
    varies = [size > 1 for size in aligned]
    per_element = (
        any(varies) and math.prod(s for s, v in zip(shape, varies) if not v) == 1
    )
    if per_element or not any(varies):
        # Lanes only: a shared mixture, or one mixture per element.
        return Layout(
            shape, tuple(range(len(shape))), 1, math.prod(shape), per_element, 0
        )
    param_axes = [axis for axis, v in enumerate(varies) if v]
    lane_axes = [axis for axis, v in enumerate(varies) if not v]
    rows = math.prod(shape[axis] for axis in param_axes)
    order = tuple(param_axes + lane_axes)
    return Layout(shape, order, rows, math.prod(shape) // rows, False, len(param_axes))


def canonical(value: jax.Array, params: Params) -> tuple[jax.Array, Params, Layout]:
    """``value`` as ``[rows, lanes]`` and the parameters as ``[rows|1, lanes|1, K]``.

    Args:
      value: Inputs broadcastable against the parameters' batch shape.
      params: ``(log_weights, means, log_scales)``, each ``[..., K]``.

    Returns:
      ``(value, params, layout)``; ``layout.restore`` maps outputs back.
    """
    param_shape = jnp.broadcast_shapes(*(p.shape[:-1] for p in params))
    layout = _layout(jnp.shape(value), param_shape)
    arranged = tuple(layout.arrange_params(p) for p in params)
    return layout.arrange(value), arranged, layout  # type: ignore[return-value]


def has_lanes(leaf: Any, lanes: int) -> bool:
    """Whether a parameter-like leaf ``[rows|1, lanes|1, ...]`` carries the lanes."""
    return hasattr(leaf, "ndim") and leaf.ndim >= 2 and leaf.shape[1] == lanes > 1


def lane_split(lanes: int, target: int) -> tuple[int, int]:
    """``(chunks, chunk_lanes)`` covering ``lanes`` with ~``target`` per chunk.

    An exact split is preferred, so that the inputs need no padding copy.
    """
    fewest = math.ceil(lanes / target)
    for chunks in range(fewest, 2 * fewest + 1):
        if lanes % chunks == 0 and (lanes // chunks) % _LANE_ALIGN == 0:
            return chunks, lanes // chunks
    chunk = math.ceil(math.ceil(lanes / fewest) / _LANE_ALIGN) * _LANE_ALIGN
    return math.ceil(lanes / chunk), chunk


def map_lane_chunks(
    body: Callable[..., Any],
    batched: Sequence[jax.Array],
    shared: Any,
    elements: int | None,
    remat: bool = False,
) -> Any:
    """``body(*batched, shared)`` over chunks of the lanes of ``[rows, lanes]``.

    Args:
      body: Function of the batched arrays (each ``[rows, chunk]``) and
        ``shared``; returns a pytree of ``[rows, chunk]`` leaves or scalars.
      batched: Arrays of shape ``[rows, lanes]``.
      shared: Pytree of parameter-like leaves ``[rows|1, lanes|1, ...]``;
        those that carry the lanes (`has_lanes`) are chunked with them.
      elements: Target elements per chunk (`chunk_elements`); ``None``, or a
        batch under two chunks, runs in one piece.
      remat: ``jax.checkpoint`` the body, so reverse mode saves only each
        chunk's inputs and recomputes the rest chunk by chunk.

    Returns:
      ``body``'s pytree with ``[rows, lanes]`` leaves, and scalar leaves stacked
      to ``[chunks]`` (left scalar when run in one piece).
    """
    run = jax.checkpoint(body) if remat else body
    rows, lanes = batched[0].shape
    target = None if elements is None else max(1, elements // max(rows, 1))
    if target is None or lanes < 2 * target:
        return run(*batched, shared)
    chunks, chunk = lane_split(lanes, target)
    padded = chunks * chunk

    def split(array):
        if padded > lanes:
            padding = [(0, 0), (0, padded - lanes)] + [(0, 0)] * (array.ndim - 2)
            array = jnp.pad(array, padding, mode="edge")
        array = array.reshape(array.shape[0], chunks, chunk, *array.shape[2:])
        return jnp.moveaxis(array, 1, 0)

    def split_leaf(leaf):
        # A leaf of one row (per-element parameters) is chunked without its
        # unit row axis: XLA's CPU backend would copy the whole array to move
        # a unit axis behind the chunk axis.
        if leaf.shape[0] == 1:
            return split(leaf)[:, 0]
        return split(leaf)

    leaves, tree = jax.tree_util.tree_flatten(shared)
    chunked = [has_lanes(leaf, lanes) for leaf in leaves]
    mapped = (
        tuple(split(a) for a in batched),
        [split_leaf(leaf) for leaf, c in zip(leaves, chunked) if c],
    )
    leaf_rows = [leaf.shape[0] for leaf, c in zip(leaves, chunked) if c]
    fixed = [leaf for leaf, c in zip(leaves, chunked) if not c]

    def chunk_body(chunk_arrays):
        chunk_batched, chunk_leaves = chunk_arrays
        chunk_leaves = [
            leaf[None] if rows == 1 else leaf
            for leaf, rows in zip(chunk_leaves, leaf_rows)
        ]
        chunk_iter, fixed_iter = iter(chunk_leaves), iter(fixed)
        merged = [next(chunk_iter) if c else next(fixed_iter) for c in chunked]
        return run(*chunk_batched, jax.tree_util.tree_unflatten(tree, merged))

    outputs = lax.map(chunk_body, mapped)

    def merge(leaf):
        if leaf.ndim == 1:  # one scalar per chunk
            return leaf
        leaf = jnp.moveaxis(leaf, 0, 1)
        return leaf.reshape(leaf.shape[0], padded, *leaf.shape[3:])[:, :lanes]

    return jax.tree_util.tree_map(merge, outputs)


def vmap_as_batch(fun: Callable[..., Any]) -> Callable[..., Any]:
    """``fun`` whose ``vmap`` is ``fun`` on the batch with the mapped axis in front.

    For a map that is elementwise over broadcast batch axes, ``vmap`` adds one
    more batch axis. Calling ``fun`` on the whole batch at once keeps its
    batch-level decisions (a ``lax.cond`` on "does any element need the tail
    pass", a ``while_loop`` until every element has converged) exact: under
    JAX's own batching rule both branches of such a ``cond`` run on every
    element. Only for primal computations: reverse mode does not go through
    ``custom_vmap``, so callers wrap this in a ``custom_jvp``.

    ``fun(value, params)`` takes an input broadcastable against the batch
    shape of ``params`` (``[..., K]`` leaves) and returns arrays of that
    broadcast shape, or scalars.
    """
    wrapped = jax.custom_batching.custom_vmap(fun)

    @wrapped.def_vmap
    def _rule(axis_size, in_batched, value, params):
        value_batched, params_batched = in_batched
        own = [jnp.ndim(value) - value_batched] + [
            p.ndim - 1 - b for p, b in zip(params, params_batched)
        ]
        rank = max(own)

        def align(leaf, batched, own_rank):
            if not batched:
                return leaf
            return leaf.reshape(
                leaf.shape[:1] + (1,) * (rank - own_rank) + leaf.shape[1:]
            )

        value = align(value, value_batched, own[0])
        params = tuple(
            align(p, b, r) for p, b, r in zip(params, params_batched, own[1:])
        )
        outputs = fun(value, params)
        outputs = jax.tree_util.tree_map(
            lambda out: jnp.broadcast_to(out, (axis_size,)) if out.ndim == 0 else out,
            outputs,
        )
        return outputs, jax.tree_util.tree_map(lambda _: True, outputs)

    return wrapped
