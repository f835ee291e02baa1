"""Checkpoints: exact round trips, atomic writes, and clear errors for bad files."""

import json
import os
import pathlib
import pickle
import signal
import subprocess
import sys
import time
import zipfile
from typing import NamedTuple

import distrax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import distrax_mixcdf as dm
from distrax_mixcdf import checkpoint

HERE = pathlib.Path(__file__).resolve().parent


def _layer(seed, shape=(2, 3), **options):
    rng = np.random.default_rng(seed)
    return dm.MixtureGaussianCDF(
        *(jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(3)),
        **options,
    )


def _assert_same_leaves(a, b):
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b, strict=True):
        assert type(x) is type(y) or (
            isinstance(x, jax.Array) and isinstance(y, jax.Array)
        )
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype
        assert x.shape == y.shape
        # Bit for bit (NaN-safe, -0.0 distinguished).
        assert x.tobytes() == y.tobytes()


def _header(path):
    with np.load(path, allow_pickle=False) as npz:
        return json.loads(npz["__header__"].tobytes().decode())


def test_single_layer_round_trips_exactly_with_options_and_version(tmp_path):
    layer = _layer(0, root_finder="newton", tol=1e-5, max_iter=37)
    path = dm.save_checkpoint(tmp_path / "layer.npz", layer, step=12, metadata={"a": 1})
    loaded = dm.load_checkpoint(path)
    assert isinstance(loaded.model, dm.MixtureGaussianCDF)
    _assert_same_leaves(layer, loaded.model)
    assert loaded.model.solver_options == layer.solver_options
    assert (loaded.step, loaded.metadata, loaded.format_version) == (12, {"a": 1}, 1)
    header = _header(path)
    assert header["format"] == "distrax_mixcdf.checkpoint"
    assert header["version"] == checkpoint.FORMAT_VERSION == 1
    # The file is a plain npz that NumPy reads without pickle.
    with zipfile.ZipFile(path) as archive:
        assert all(name.endswith(".npy") for name in archive.namelist())


def test_flow_stack_and_optimizer_state_round_trip_and_resume(tmp_path):
    layers = [_layer(1), _layer(2, inverse_grad="one_step")]
    optimizer = optax.adam(1e-2)

    # A cheap stand-in loss: what matters here is the optimizer state's content
    # (count, moments), not the flow's likelihood (its compile time is not).
    def loss(params):
        return sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree_util.tree_leaves(params))

    @jax.jit
    def step(params, state):
        updates, state = optimizer.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    params, state = step(layers, optimizer.init(layers))
    path = dm.save_checkpoint(tmp_path / "flow.npz", params, opt_state=state, step=1)
    flow = dm.normalizing_flow(params, (2,))
    dm.save_checkpoint(tmp_path / "model.npz", flow)

    # The stack and the Transformed flow rebuild without a template.
    restored = dm.load_checkpoint(path, opt_state_template=optimizer.init(layers))
    assert isinstance(restored.model, list)
    assert len(restored.model) == 2
    _assert_same_leaves(params, restored.model)
    _assert_same_leaves(state, restored.opt_state)
    assert int(restored.opt_state[0].count) == 1
    assert restored.model[1].solver_options.inverse_grad == "one_step"
    loaded_flow = dm.load_checkpoint(tmp_path / "model.npz").model
    _assert_same_leaves(flow, loaded_flow)
    assert jax.tree_util.tree_structure(
        flow.bijector.bijector.bijectors[0]
    ) == jax.tree_util.tree_structure(loaded_flow.bijector.bijector.bijectors[0])
    inner = loaded_flow.bijector.bijector.bijectors[1]
    assert isinstance(inner, distrax.Block)
    assert inner.ndims == 1
    assert isinstance(loaded_flow.distribution, distrax.MultivariateNormalDiag)
    # The same flow also loads into a template.
    _assert_same_leaves(flow, dm.load_checkpoint(tmp_path / "model.npz", flow).model)
    # Without an opt_state_template the state is not loaded.
    assert dm.load_checkpoint(path).opt_state is None

    # Resuming from the checkpoint is the same as never having stopped.
    _assert_same_leaves(step(params, state), step(restored.model, restored.opt_state))


class _FlowParams(NamedTuple):
    """A NamedTuple pytree: a type the template-free spec does not know."""

    weights: list
    permutation: np.ndarray


def test_params_pytree_with_template_and_mismatch_errors(tmp_path):
    rng = np.random.default_rng(4)
    params = _FlowParams(
        weights=[
            {"w": jnp.asarray(rng.normal(size=(2, 4)), jnp.float32)},
            {"w": jnp.asarray(rng.normal(size=(4, 6)), jnp.bfloat16)},
        ],
        permutation=np.array([1, 0], np.int64),
    )
    path = dm.save_checkpoint(tmp_path / "p.npz", params)
    with pytest.raises(dm.CheckpointError, match="template"):
        dm.load_checkpoint(path)
    template = jax.tree_util.tree_map(jnp.zeros_like, params)
    template = template._replace(permutation=np.zeros(2, np.int64))
    loaded = dm.load_checkpoint(path, template).model
    assert isinstance(loaded, _FlowParams)
    _assert_same_leaves(params, loaded)
    assert loaded.weights[1]["w"].dtype == jnp.bfloat16

    wrong_shape = template._replace(
        weights=[template.weights[0], {"w": jnp.zeros((4, 5), jnp.bfloat16)}]
    )
    with pytest.raises(dm.CheckpointError, match=r"\(4, 5\).*\(4, 6\)"):
        dm.load_checkpoint(path, wrong_shape)
    wrong_dtype = template._replace(
        weights=[template.weights[0], {"w": jnp.zeros((4, 6), jnp.float32)}]
    )
    with pytest.raises(dm.CheckpointError, match="bfloat16"):
        dm.load_checkpoint(path, wrong_dtype)
    with pytest.raises(dm.CheckpointError, match=r"2 leaves but .* holds 3"):
        dm.load_checkpoint(path, template._replace(weights=template.weights[:1]))
    # A layer saved with K = 3 does not load into a K = 4 template.
    dm.save_checkpoint(tmp_path / "k3.npz", _layer(5))
    with pytest.raises(dm.CheckpointError, match=r"\(2, 4\).*\(2, 3\)"):
        dm.load_checkpoint(tmp_path / "k3.npz", _layer(5, shape=(2, 4)))
    with pytest.raises(dm.CheckpointError, match="no optimizer state"):
        dm.load_checkpoint(tmp_path / "k3.npz", opt_state_template={"m": jnp.zeros(2)})


def test_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.npz"
    old = _layer(6)
    dm.save_checkpoint(path, old)
    before = path.read_bytes()

    def crash_mid_write(handle, **arrays):
        handle.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(checkpoint.np, "savez", crash_mid_write)
    with pytest.raises(KeyboardInterrupt):
        dm.save_checkpoint(path, _layer(7))
    monkeypatch.undo()

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        dm.save_checkpoint(path, _layer(7))
    monkeypatch.undo()

    assert path.read_bytes() == before
    _assert_same_leaves(old, dm.load_checkpoint(path).model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.npz"]


_KILL_SCRIPT = """
import sys, numpy as np, jax.numpy as jnp
import distrax_mixcdf as dm
path = sys.argv[1]
rng = np.random.default_rng(0)
for i in range(10**6):
    value = float(i % 2)
    dm.save_checkpoint(path, {"w": jnp.full((1 << 20,), value), "i": jnp.asarray(i)})
    if i == 0:
        print("ready", flush=True)
"""


def test_killed_writer_never_leaves_a_partial_file(tmp_path):
    """SIGKILL a process that keeps rewriting a 4 MB checkpoint, then load it."""
    path = tmp_path / "live.npz"
    child = subprocess.Popen(
        [sys.executable, "-c", _KILL_SCRIPT, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=HERE.parent,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        time.sleep(0.3)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    loaded = dm.load_checkpoint(path).model
    i = int(loaded["i"])
    assert i >= 0
    np.testing.assert_array_equal(loaded["w"], np.full(1 << 20, float(i % 2)))


def _corrupt(path, offset_fraction, new=None):
    data = bytearray(path.read_bytes())
    position = int(len(data) * offset_fraction)
    data[position] = (data[position] + 1) % 256 if new is None else new
    path.write_bytes(bytes(data))


def test_truncated_corrupted_and_foreign_files_raise_clear_errors(tmp_path):
    good = tmp_path / "good.npz"
    big = {"w": jnp.arange(4096, dtype=jnp.float32)}
    dm.save_checkpoint(good, big)
    data = good.read_bytes()

    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(dm.CheckpointError, match="truncated or corrupted"):
        dm.load_checkpoint(truncated)

    # One flipped byte inside the array data: the zip CRC catches it.
    flipped = tmp_path / "flipped.npz"
    flipped.write_bytes(data)
    _corrupt(flipped, 0.5)
    with pytest.raises(dm.CheckpointError, match="corrupted"):
        dm.load_checkpoint(flipped)

    # A rewritten member with a valid CRC: the header's digest catches it.
    tampered = tmp_path / "tampered.npz"
    with np.load(good, allow_pickle=False) as npz:
        members = {name: npz[name] for name in npz.files}
    members["model.leaf.0"] = members["model.leaf.0"] + 1
    with open(tampered, "wb") as handle:
        np.savez(handle, **members)
    with pytest.raises(dm.CheckpointError, match="digest"):
        dm.load_checkpoint(tampered)

    # Newer format versions are refused, not misread.
    header = json.loads(members["__header__"].tobytes().decode())
    header["version"] = checkpoint.FORMAT_VERSION + 1
    members["model.leaf.0"] = members["model.leaf.0"] - 1
    members["__header__"] = np.frombuffer(json.dumps(header).encode(), np.uint8)
    newer = tmp_path / "newer.npz"
    with open(newer, "wb") as handle:
        np.savez(handle, **members)
    with pytest.raises(dm.CheckpointError, match="newer"):
        dm.load_checkpoint(newer)

    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, w=np.zeros(3))
    with pytest.raises(dm.CheckpointError, match="not a distrax_mixcdf checkpoint"):
        dm.load_checkpoint(foreign)

    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(np.random.default_rng(0).bytes(1000))
    with pytest.raises(dm.CheckpointError):
        dm.load_checkpoint(garbage)

    with pytest.raises(FileNotFoundError):
        dm.load_checkpoint(tmp_path / "missing.npz")


class _Marker:
    """Unpickling this writes a marker file: proof that something was unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def test_pickles_are_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"
    evil = tmp_path / "evil.npz"
    evil.write_bytes(pickle.dumps(_Marker(str(marker))))
    with pytest.raises(dm.CheckpointError):
        dm.load_checkpoint(evil)
    # An npz whose header member is an object array (pickled inside the .npy).
    evil_npz = tmp_path / "evil2.npz"
    with open(evil_npz, "wb") as handle:
        np.savez(
            handle,
            __header__=np.array([_Marker(str(marker))], dtype=object),
        )
    with pytest.raises(dm.CheckpointError):
        dm.load_checkpoint(evil_npz)
    assert not marker.exists()
