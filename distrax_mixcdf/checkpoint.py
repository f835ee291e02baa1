r"""Checkpoints: save and load trained models (and optimizer state) safely.

A checkpoint is one ``.npz`` file (a zip of ``.npy`` arrays) that NumPy reads
with ``allow_pickle=False``: loading never unpickles anything, so a checkpoint
from an untrusted source can at worst fail to load. Its members are

* ``__header__``: UTF-8 JSON (stored as a ``uint8`` array) with the format
  name, :data:`FORMAT_VERSION`, the library version, the ``step`` and
  ``metadata`` given to :func:`save_checkpoint`, a SHA-256 digest of every
  array, and for the model and the optimizer state: each leaf's tree path,
  shape and dtype, and (where every node is of a known type) a JSON *spec*
  from which the object is rebuilt without a template.
* ``model.leaf.<i>`` / ``opt_state.leaf.<i>``: the leaves of
  ``jax.tree_util.tree_flatten`` of the model / optimizer state, in that order,
  bit for bit (dtypes NumPy cannot store natively, such as ``bfloat16``, are
  stored as raw bytes and viewed back).
* ``model.extra.<i>``: arrays the spec needs that are not leaves (rare).

Two ways to load:

* **Without a template** for the types this module knows -- a
  :class:`~distrax_mixcdf.MixtureGaussianCDF`, ``distrax.Block``, ``Chain``,
  ``Inverse``, ``Transformed`` with a ``Normal``, ``MultivariateNormalDiag`` or
  ``Independent`` base (what :func:`~distrax_mixcdf.normalizing_flow` builds),
  and dicts/lists/tuples of arrays and of these -- and for types added with
  :func:`register_checkpoint_type`.
* **With a template**: any pytree of the same structure (e.g. a freshly
  initialised model, a flow's parameter pytree, or ``optimizer.init(params)``
  for the optax state). Leaf count, shapes and dtypes are checked against the
  template and the template's treedef rebuilds the object.

Writes are atomic: the file is written to a temporary file in the same
directory, flushed and ``fsync``-ed, then moved over the final name with
``os.replace`` (and the directory is ``fsync``-ed), so a crash mid-save leaves
either the old checkpoint or the new one, never a half-written file.
Truncated, corrupted or mismatched files raise :class:`CheckpointError` (a
``ValueError``) that says what is wrong.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import distrax
import jax
import jax.numpy as jnp
import numpy as np

from distrax_mixcdf.mixture_cdf import MixtureGaussianCDF

__all__ = [
    "FORMAT_VERSION",
    "Checkpoint",
    "CheckpointError",
    "load_checkpoint",
    "register_checkpoint_type",
    "save_checkpoint",
]

FORMAT_NAME = "distrax_mixcdf.checkpoint"
#: The format version this module writes; it reads every version up to this one.
FORMAT_VERSION = 1

_HEADER = "__header__"


class CheckpointError(ValueError):
    """A checkpoint file is unreadable, corrupted, or does not match the request."""


class Checkpoint(NamedTuple):
    """What :func:`load_checkpoint` returns.

    Attributes:
      model: The saved model (or parameter pytree).
      opt_state: The optimizer state, when saved and an ``opt_state_template``
        was given; otherwise ``None``.
      step: The ``step`` given to :func:`save_checkpoint` (or ``None``).
      metadata: The JSON ``metadata`` given to :func:`save_checkpoint` (``{}``).
      format_version: The file's format version.
    """

    model: Any
    opt_state: Any
    step: int | None
    metadata: dict[str, Any]
    format_version: int


# -- the type registry used by template-free loading ------------------------------


@dataclasses.dataclass(frozen=True)
class _Codec:
    name: str
    cls: type
    encode: Callable[[Any], tuple[dict[str, Any], dict[str, Any]]]
    decode: Callable[[dict[str, Any], dict[str, Any]], Any]


_CODECS_BY_TYPE: dict[type, _Codec] = {}
_CODECS_BY_NAME: dict[str, _Codec] = {}


def register_checkpoint_type(
    cls: type,
    encode: Callable[[Any], tuple[dict[str, Any], dict[str, Any]]],
    decode: Callable[[dict[str, Any], dict[str, Any]], Any],
    *,
    name: str | None = None,
) -> None:
    r"""Teaches template-free loading to rebuild objects of type ``cls``.

    ``encode(obj) -> (config, children)``: ``config`` is a JSON-serialisable
    dict of static settings, ``children`` a dict of the arrays and sub-objects
    (any supported node: arrays, dicts, lists, tuples, registered objects).
    ``decode(config, children) -> obj`` rebuilds it. The round trip must be
    exact: :math:`\mathrm{decode}(\mathrm{encode}(o)) = o` leaf for leaf.

    Args:
      cls: The exact type (subclasses are not matched).
      encode: Splits an object into ``(config, children)``.
      decode: Rebuilds an object from ``(config, children)``.
      name: The name stored in files (default ``module.QualifiedName``); keep it
        stable, files refer to it.

    Raises:
      ValueError: If ``name`` is already registered for another type.
    """
    name = name or f"{cls.__module__}.{cls.__qualname__}"
    existing = _CODECS_BY_NAME.get(name)
    if existing is not None and existing.cls is not cls:
        raise ValueError(
            f"checkpoint type name {name!r} is already registered for {existing.cls!r}."
        )
    codec = _Codec(name, cls, encode, decode)
    _CODECS_BY_TYPE[cls] = codec
    _CODECS_BY_NAME[name] = codec


def _register_builtin_types() -> None:
    def mixture_encode(b: MixtureGaussianCDF):
        options = b.solver_options._asdict()
        children = {"logits": b.logits, "means": b.means, "log_scales": b.log_scales}
        return options, children

    register_checkpoint_type(
        MixtureGaussianCDF,
        mixture_encode,
        lambda config, c: MixtureGaussianCDF(
            c["logits"], c["means"], c["log_scales"], **config
        ),
        name="MixtureGaussianCDF",
    )
    register_checkpoint_type(
        distrax.Block,
        lambda b: ({"ndims": int(b.ndims)}, {"bijector": b.bijector}),
        lambda config, c: distrax.Block(c["bijector"], config["ndims"]),
        name="distrax.Block",
    )
    register_checkpoint_type(
        distrax.Chain,
        lambda b: ({}, {"bijectors": list(b.bijectors)}),
        lambda config, c: distrax.Chain(c["bijectors"]),
        name="distrax.Chain",
    )
    register_checkpoint_type(
        distrax.Inverse,
        lambda b: ({}, {"bijector": b.bijector}),
        lambda config, c: distrax.Inverse(c["bijector"]),
        name="distrax.Inverse",
    )
    register_checkpoint_type(
        distrax.Transformed,
        lambda d: ({}, {"distribution": d.distribution, "bijector": d.bijector}),
        lambda config, c: distrax.Transformed(c["distribution"], c["bijector"]),
        name="distrax.Transformed",
    )
    register_checkpoint_type(
        distrax.Normal,
        lambda d: ({}, {"loc": d.loc, "scale": d.scale}),
        lambda config, c: distrax.Normal(c["loc"], c["scale"]),
        name="distrax.Normal",
    )
    register_checkpoint_type(
        distrax.MultivariateNormalDiag,
        lambda d: ({}, {"loc": d.loc, "scale_diag": d.scale_diag}),
        lambda config, c: distrax.MultivariateNormalDiag(c["loc"], c["scale_diag"]),
        name="distrax.MultivariateNormalDiag",
    )
    register_checkpoint_type(
        distrax.Independent,
        lambda d: (
            {"reinterpreted_batch_ndims": int(d.reinterpreted_batch_ndims)},
            {"distribution": d.distribution},
        ),
        lambda config, c: distrax.Independent(
            c["distribution"], config["reinterpreted_batch_ndims"]
        ),
        name="distrax.Independent",
    )


_register_builtin_types()


class _Unsupported(Exception):
    """A node the template-free spec cannot describe."""


def _is_array(value: Any) -> bool:
    return isinstance(value, (jax.Array, np.ndarray, np.generic))


class _Encoder:
    """Builds the JSON spec; arrays refer to leaves by identity where possible."""

    def __init__(self, leaves: list[Any]):
        self.leaf_index = {}
        for i, leaf in enumerate(leaves):
            self.leaf_index.setdefault(id(leaf), i)
        self.extras: list[np.ndarray] = []

    def __call__(self, node: Any) -> dict[str, Any]:
        if node is None:
            return {"type": "none"}
        if _is_array(node):
            # NumPy leaves come back as NumPy (exact even for float64 without
            # x64); JAX leaves as JAX arrays.
            kind = "jax" if isinstance(node, jax.Array) else "numpy"
            kind = "numpy_scalar" if isinstance(node, np.generic) else kind
            index = self.leaf_index.get(id(node))
            if index is not None:
                return {"type": "array", "leaf": index, "kind": kind}
            self.extras.append(_to_numpy(node))
            return {"type": "array", "extra": len(self.extras) - 1, "kind": kind}
        if isinstance(node, (bool, int, float, str)):
            return {"type": "scalar", "value": node}
        codec = _CODECS_BY_TYPE.get(type(node))
        if codec is not None:
            config, children = codec.encode(node)
            return {
                "type": codec.name,
                "config": config,
                "children": {k: self(v) for k, v in children.items()},
            }
        if type(node) is dict and all(isinstance(k, str) for k in node):
            return {"type": "dict", "items": {k: self(v) for k, v in node.items()}}
        if type(node) in (list, tuple):
            return {"type": type(node).__name__, "items": [self(v) for v in node]}
        raise _Unsupported(type(node).__name__)


def _decode(
    node: dict[str, Any], leaves: list[np.ndarray], extras: list[np.ndarray]
) -> Any:
    kind = node["type"]
    if kind == "none":
        return None
    if kind == "array":
        if "leaf" in node:
            array, where = leaves[node["leaf"]], f"leaf {node['leaf']}"
        else:
            array, where = extras[node["extra"]], f"extra array {node['extra']}"
        if node.get("kind") == "numpy":
            return array.copy()
        if node.get("kind") == "numpy_scalar":
            return array[()]
        return _as_jax(array, where)
    if kind == "scalar":
        return node["value"]
    if kind == "dict":
        return {k: _decode(v, leaves, extras) for k, v in node["items"].items()}
    if kind in ("list", "tuple"):
        items = [_decode(v, leaves, extras) for v in node["items"]]
        return items if kind == "list" else tuple(items)
    codec = _CODECS_BY_NAME.get(kind)
    if codec is None:
        raise CheckpointError(
            f"the checkpoint holds an object of type {kind!r}, which is not "
            "registered here: import the module that registers it, or pass a "
            "`template`."
        )
    children = {k: _decode(v, leaves, extras) for k, v in node["children"].items()}
    return codec.decode(node["config"], children)


# -- arrays <-> npz members -------------------------------------------------------


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        raise ValueError(
            "cannot save an array that is not fully addressable from this process "
            "(multi-host): gather it first, e.g. with "
            "`jax.experimental.multihost_utils.process_allgather`, and save from "
            "one process."
        )
    return np.asarray(jax.device_get(value))


def _storable(array: np.ndarray) -> np.ndarray:
    """The array as NumPy stores it without pickle (raw bytes for bfloat16 etc.)."""
    if array.dtype.kind in "biufc" and array.dtype.isbuiltin:
        return array
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def _restored(stored: np.ndarray, shape: list[int], dtype_name: str) -> np.ndarray:
    dtype = jnp.dtype(dtype_name)
    if stored.dtype == dtype:
        return stored.reshape(shape)
    return stored.view(dtype).reshape(shape)


def _digest(named_arrays: Mapping[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(named_arrays):
        array = np.ascontiguousarray(named_arrays[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _describe_tree(tree: Any, prefix: str, arrays: dict[str, np.ndarray]):
    """Stores the leaves of ``tree`` in ``arrays``; returns its header entry."""
    with_paths, _ = jax.tree_util.tree_flatten_with_path(tree)
    leaves = [leaf for _, leaf in with_paths]
    numpy_leaves = []
    for path, leaf in with_paths:
        if not (_is_array(leaf) or isinstance(leaf, (bool, int, float))):
            raise TypeError(
                f"cannot save leaf {jax.tree_util.keystr(path)} of type "
                f"{type(leaf).__name__}: checkpoints hold arrays and numbers only."
            )
        numpy_leaves.append(_to_numpy(leaf))
    for i, leaf in enumerate(numpy_leaves):
        arrays[f"{prefix}.leaf.{i}"] = _storable(leaf)
    encoder = _Encoder(leaves)
    try:
        spec = encoder(tree)
    except _Unsupported:
        spec, encoder.extras = None, []
    for i, extra in enumerate(encoder.extras):
        arrays[f"{prefix}.extra.{i}"] = _storable(extra)
    return {
        "type": type(tree).__name__,
        "paths": [jax.tree_util.keystr(path) for path, _ in with_paths],
        "shapes": [list(leaf.shape) for leaf in numpy_leaves],
        "dtypes": [leaf.dtype.name for leaf in numpy_leaves],
        "extra_shapes": [list(e.shape) for e in encoder.extras],
        "extra_dtypes": [e.dtype.name for e in encoder.extras],
        "spec": spec,
    }


# -- save ----------------------------------------------------------------------------


def _fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(
    path: str | os.PathLike[str],
    model: Any,
    *,
    opt_state: Any = None,
    step: int | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> pathlib.Path:
    """Saves ``model`` (and optionally the optax state) to ``path`` atomically.

    The file is written under a temporary name in the same directory, flushed
    and ``fsync``-ed, and only then renamed to ``path`` (``os.replace``), so an
    interrupted save never leaves a half-written file under ``path``: an older
    checkpoint there stays intact until the new one is complete.

    Args:
      model: A :class:`~distrax_mixcdf.MixtureGaussianCDF`, a distrax stack or
        flow of them, or any pytree of arrays (e.g. a flow's parameters).
      path: The file to write (conventionally ending in ``.npz``; the name is
        used as given).
      opt_state: Optional optimizer state (e.g. from ``optimizer.init``).
      step: Optional training step to store with it.
      metadata: Optional JSON-serialisable dict stored with it.

    Returns:
      The path written.

    Raises:
      TypeError: If a leaf is not an array or number, or ``metadata`` is not
        JSON-serialisable.
      ValueError: If an array is not addressable from this process.
    """
    path = pathlib.Path(path)
    arrays: dict[str, np.ndarray] = {}
    header: dict[str, Any] = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "library_version": _library_version(),
        "step": None if step is None else int(step),
        "metadata": dict(metadata or {}),
        "model": _describe_tree(model, "model", arrays),
        "opt_state": None
        if opt_state is None
        else _describe_tree(opt_state, "opt_state", arrays),
    }
    header["digest"] = _digest(arrays)
    try:
        encoded = json.dumps(header).encode()
    except TypeError as error:
        raise TypeError(f"`metadata` must be JSON-serialisable: {error}") from None
    arrays[_HEADER] = np.frombuffer(encoded, dtype=np.uint8)

    directory = str(path.resolve().parent)
    fd, temporary = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=".tmp", dir=directory
    )
    try:
        # mkstemp creates the file 0600; give it the permissions of a normal file.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        members: dict[str, Any] = arrays  # names never collide with savez's own
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **members)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    _fsync_directory(directory)
    return path


def _library_version() -> str:
    from distrax_mixcdf import __version__

    return __version__


# -- load ----------------------------------------------------------------------------


def _read_all(path: pathlib.Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            if _HEADER not in npz.files:
                raise CheckpointError(
                    f"{str(path)!r} is not a distrax_mixcdf checkpoint (no "
                    f"{_HEADER!r} entry; it has {sorted(npz.files)[:5]})."
                )
            arrays = {name: npz[name] for name in npz.files}
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as error:
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r} (truncated or corrupted?): "
            f"{type(error).__name__}: {error}"
        ) from None
    try:
        header = json.loads(arrays.pop(_HEADER).tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has a corrupted header: {error}"
        ) from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{str(path)!r} is not a distrax_mixcdf checkpoint.")
    version = header.get("version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"checkpoint {str(path)!r} has no valid version field.")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format version {version}, newer than "
            f"this library reads ({FORMAT_VERSION}); upgrade distrax-mixcdf."
        )
    if _digest(arrays) != header.get("digest"):
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupted: its arrays do not match the "
            "digest stored in its header."
        )
    return header, arrays


def _tree_leaves_from_file(
    entry: dict[str, Any], prefix: str, arrays: dict[str, np.ndarray]
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    leaves = [
        _restored(arrays[f"{prefix}.leaf.{i}"], shape, dtype)
        for i, (shape, dtype) in enumerate(
            zip(entry["shapes"], entry["dtypes"], strict=True)
        )
    ]
    extras = [
        _restored(arrays[f"{prefix}.extra.{i}"], shape, dtype)
        for i, (shape, dtype) in enumerate(
            zip(entry["extra_shapes"], entry["extra_dtypes"], strict=True)
        )
    ]
    return leaves, extras


def _as_jax(array: np.ndarray, where: str) -> jax.Array:
    value = jnp.asarray(array)
    if value.dtype != array.dtype:
        raise CheckpointError(
            f"{where} was saved as {array.dtype} but JAX would load it as "
            f"{value.dtype} (enable float64 with JAX_ENABLE_X64=1 to load it "
            "exactly)."
        )
    return value


def _with_template(
    entry: dict[str, Any],
    leaves: list[np.ndarray],
    template: Any,
    argument: str,
    path: pathlib.Path,
) -> Any:
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    if len(with_paths) != len(leaves):
        raise CheckpointError(
            f"`{argument}` has {len(with_paths)} leaves but checkpoint "
            f"{str(path)!r} holds {len(leaves)} (saved from a "
            f"{entry['type']} with leaf shapes {entry['shapes']})."
        )
    restored = []
    for (key_path, expected), stored, saved_path in zip(
        with_paths, leaves, entry["paths"], strict=True
    ):
        where = f"leaf {jax.tree_util.keystr(key_path)} (saved as {saved_path})"
        expected_shape = tuple(np.shape(expected))
        expected_dtype = np.asarray(expected).dtype if _is_array(expected) else None
        if tuple(stored.shape) != expected_shape or (
            expected_dtype is not None and expected_dtype != stored.dtype
        ):
            raise CheckpointError(
                f"{where} of `{argument}` has shape {expected_shape} and dtype "
                f"{expected_dtype}, but checkpoint {str(path)!r} holds shape "
                f"{tuple(stored.shape)} and dtype {stored.dtype}."
            )
        if isinstance(expected, np.ndarray | np.generic):
            restored.append(stored.copy())
        elif isinstance(expected, (bool, int, float)):
            restored.append(type(expected)(stored.item()))
        else:
            restored.append(_as_jax(stored, where))
    return jax.tree_util.tree_unflatten(treedef, restored)


def load_checkpoint(
    path: str | os.PathLike[str],
    template: Any = None,
    *,
    opt_state_template: Any = None,
) -> Checkpoint:
    """Loads a checkpoint written by :func:`save_checkpoint`.

    Never unpickles: the file is read with ``np.load(..., allow_pickle=False)``
    and its integrity is checked (zip CRCs and a SHA-256 digest of every array)
    before anything is rebuilt. Leaves come back bit for bit.

    Args:
      path: The checkpoint file.
      template: A pytree with the saved model's structure (leaf count, shapes
        and dtypes are checked), e.g. a freshly initialised model or parameter
        pytree; ``None`` rebuilds the model from the file's spec, which works
        for the types listed in the module docstring and registered ones.
      opt_state_template: The optimizer state's structure, e.g.
        ``optimizer.init(params)``; without it the saved state is not loaded.

    Returns:
      A :class:`Checkpoint`.

    Raises:
      FileNotFoundError: If ``path`` does not exist.
      CheckpointError: If the file is truncated, corrupted, not a checkpoint,
        from a newer format version, or does not match the templates.
    """
    path = pathlib.Path(path)
    header, arrays = _read_all(path)
    try:
        model_entry = header["model"]
        leaves, extras = _tree_leaves_from_file(model_entry, "model", arrays)
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is inconsistent: {type(error).__name__}: {error}"
        ) from None
    if template is not None:
        model = _with_template(model_entry, leaves, template, "template", path)
    elif model_entry["spec"] is None:
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds a {model_entry['type']} that cannot "
            "be rebuilt without a template: pass `template=` (a pytree of the "
            "same structure, e.g. a freshly initialised model)."
        )
    else:
        model = _decode(model_entry["spec"], leaves, extras)

    opt_state = None
    if opt_state_template is not None:
        entry = header.get("opt_state")
        if entry is None:
            raise CheckpointError(
                f"checkpoint {str(path)!r} holds no optimizer state, but "
                "`opt_state_template` was given."
            )
        opt_leaves, _ = _tree_leaves_from_file(entry, "opt_state", arrays)
        opt_state = _with_template(
            entry, opt_leaves, opt_state_template, "opt_state_template", path
        )
    return Checkpoint(
        model=model,
        opt_state=opt_state,
        step=header.get("step"),
        metadata=header.get("metadata") or {},
        format_version=header["version"],
    )
