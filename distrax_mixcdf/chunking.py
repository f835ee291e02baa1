r"""Chunked evaluation: apply a batched function to inputs larger than memory.

:func:`map_in_chunks` streams an input ``[N, ...]`` (a NumPy array, an
``np.memmap`` of a file on disk, or a JAX array) through a function in chunks of
``chunk_size`` rows, with one compiled function for every chunk (the last one is
padded), and writes the results into host arrays (or caller-provided ones, e.g.
``np.memmap`` outputs). Peak device memory is that of one chunk, whatever ``N``.

Every map in this library is elementwise or per-example along the leading axis
(``forward``, ``inverse``, ``log_prob``), so chunking changes no formula: results
agree with one big call to rounding (XLA vectorises the transcendental
functions differently for different batch sizes; measured up to 6e-7
relative, the tests allow 1e-6).

For gradients over a dataset larger than memory, train on minibatches
(:func:`~distrax_mixcdf.fit` with ``batch_size``), or sum ``jax.grad`` over
chunks yourself; inside ``jit``, ``jax.lax.map(f, xs, batch_size=...)`` gives
the same memory bound on device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["map_in_chunks"]


def map_in_chunks(
    fn: Callable[[jax.Array], Any],
    x: Any,
    chunk_size: int = 1 << 20,
    *,
    out: Any = None,
) -> Any:
    r"""Computes ``fn(x)`` chunk by chunk along the leading axis, on the host.

    For ``x`` of shape ``[N, ...]`` and ``fn`` mapping ``[B, ...]`` to a pytree of
    arrays ``[B, ...]`` row by row, returns the same pytree with leading axis
    ``N``, computed ``chunk_size`` rows at a time:

    .. math:: \mathrm{out}[i \cdot c : (i+1) c] = f\big(x[i \cdot c : (i+1) c]\big),
              \qquad c = \text{chunk\_size}.

    The last chunk is padded (by repeating its last row) to ``chunk_size``, so
    ``fn`` is compiled once; the padding is discarded. The next chunk is
    dispatched before the previous result is copied out, so device work and
    the host copy overlap.

    Example::

        layer = dm.MixtureGaussianCDF(logits, means, log_scales)
        big = np.memmap("x.f32", np.float32, mode="r", shape=(10**9, 2))
        y, log_det = dm.map_in_chunks(layer.forward_and_log_det, big, 1 << 22)

    Args:
      fn: The function, e.g. ``layer.forward_and_log_det`` or
        ``flow.log_prob``; it is wrapped in ``jax.jit``.
      x: Input ``[N, ...]``: NumPy array, ``np.memmap`` or JAX array.
      chunk_size: Rows per call (bounds device memory).
      out: Optional pytree of preallocated host arrays (e.g. ``np.memmap``)
        matching ``fn``'s output structure with leading axis ``N``; default
        new NumPy arrays.

    Returns:
      The pytree of outputs (``out`` itself when given).

    Raises:
      ValueError: If ``x`` has no leading axis, ``chunk_size`` is not a
        positive integer, ``fn``'s outputs do not keep the leading axis, or
        ``out`` does not match them.
    """
    if (
        isinstance(chunk_size, bool)
        or not isinstance(chunk_size, (int, np.integer))
        or chunk_size < 1
    ):
        raise ValueError(
            f"`chunk_size` must be a positive integer, got {chunk_size!r}."
        )
    shape = tuple(np.shape(x))
    if len(shape) == 0:
        raise ValueError(f"`x` must have a leading axis [N, ...], got shape {shape}.")
    n = shape[0]
    chunk_size = int(min(chunk_size, max(n, 1)))
    jitted = jax.jit(fn)

    def chunk(start: int) -> Any:
        piece = np.asarray(x[start : start + chunk_size])
        if piece.shape[0] < chunk_size:
            pad = np.repeat(piece[-1:], chunk_size - piece.shape[0], axis=0)
            piece = np.concatenate([piece, pad], axis=0)
        return jitted(jnp.asarray(piece))

    out_struct = jax.eval_shape(
        jitted, jax.ShapeDtypeStruct((chunk_size, *shape[1:]), jnp.asarray(x[:0]).dtype)
    )
    leaves, treedef = jax.tree_util.tree_flatten(out_struct)
    for leaf in leaves:
        if leaf.ndim == 0 or leaf.shape[0] != chunk_size:
            raise ValueError(
                "`fn` must map a chunk [B, ...] to outputs with the same leading "
                f"axis B = {chunk_size}, got output shapes "
                f"{[tuple(s.shape) for s in leaves]}."
            )
    if out is None:
        out = jax.tree_util.tree_unflatten(
            treedef, [np.empty((n, *s.shape[1:]), s.dtype) for s in leaves]
        )
    out_leaves = treedef.flatten_up_to(out)
    for given, expected in zip(out_leaves, leaves, strict=True):
        if tuple(np.shape(given)) != (n, *expected.shape[1:]):
            raise ValueError(
                f"`out` leaf of shape {tuple(np.shape(given))} does not match the "
                f"output shape {(n, *expected.shape[1:])}."
            )

    starts = list(range(0, n, chunk_size))
    pending = chunk(starts[0]) if starts else None
    for i, start in enumerate(starts):
        current = pending
        # Dispatch the next chunk before copying this one out (JAX is async).
        pending = chunk(starts[i + 1]) if i + 1 < len(starts) else None
        stop = min(start + chunk_size, n)
        for target, value in zip(
            out_leaves, jax.tree_util.tree_leaves(current), strict=True
        ):
            target[start:stop] = np.asarray(value)[: stop - start]
    return out
