"""Data-parallel training over 4 (virtual CPU) devices matches one device.

A bijector, a distribution and a conditional flow (its context sharded with
the data) each follow the single-device trajectory.

`XLA_FLAGS=--xla_force_host_platform_device_count=4` must be set before JAX
starts, so the comparison runs in a child process and reports JSON.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]

_CHILD = r"""
import json
import distrax, jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import distrax_mixcdf as dm

assert jax.device_count() == 4, jax.devices()
rng = np.random.default_rng(0)
data = np.concatenate([rng.normal(-2, 0.5, 512), rng.normal(1, 1.0, 512)])
data = jnp.asarray(data[rng.permutation(1024)][:, None], jnp.float32)
layer = dm.MixtureGaussianCDF(jnp.zeros(2), jnp.array([-1.0, 1.0]), jnp.zeros(2))
normal = distrax.Normal(jnp.zeros(1), jnp.ones(1))
optimizer = optax.adam(3e-2)
mesh = Mesh(np.array(jax.devices()), ("data",))


def put(rows):
    # Rows split over the 4 devices (None stays None: no context).
    if rows is None:
        return None
    return jax.device_put(rows, NamedSharding(mesh, P("data")))


sharded = put(data)
out = {"shards": [str(s.device) for s in sharded.addressable_shards]}
# A conditional flow: its context rows are sharded like the data rows.
context = rng.uniform(-1.0, 1.0, (512, 1)).astype(np.float32)
noise = rng.normal(size=(512, 1)).astype(np.float32)
pairs = jnp.asarray(2.0 * context + noise * (0.3 + 0.5 * np.abs(context)))
context = jnp.asarray(context)
conditional = dm.coupling_flow(jax.random.PRNGKey(0), 1, context_dim=1, num_layers=1,
                               num_components=2, hidden_sizes=(8,))
# The mixture flow on minibatches; a Normal (cheap to compile) on the full batch.
cases = (
    ("flow", layer, data, None, 256),
    ("normal", normal, data, None, None),
    ("conditional", conditional, pairs, context, 128),
)
for name, model, rows, rows_context, batch_size in cases:
    single = dm.fit(model, rows, optimizer, context=rows_context, steps=20,
                    batch_size=batch_size, show_progress=False)
    multi = dm.fit(model, put(rows), optimizer, context=put(rows_context), steps=20,
                   batch_size=batch_size, show_progress=False)
    params = jax.tree_util.tree_leaves(multi.model)
    out[name] = {
        "single_losses": single.losses.tolist(),
        "multi_losses": multi.losses.tolist(),
        "single_params": [np.asarray(p).tolist() for p in
                          jax.tree_util.tree_leaves(single.model)],
        "multi_params": [np.asarray(p).tolist() for p in params],
        "multi_param_devices": [len(p.sharding.device_set) for p in params],
        "replicated": [p.sharding.is_fully_replicated for p in params],
    }
try:
    dm.fit(layer, sharded, optimizer, steps=1, batch_size=6, show_progress=False)
    out["bad_batch_error"] = None
except ValueError as error:
    out["bad_batch_error"] = str(error)
print("RESULT" + json.dumps(out))
"""


def test_data_parallel_fit_matches_single_device():
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_PLATFORMS="cpu",
    )
    run = subprocess.run(
        [sys.executable, "-c", _CHILD],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    line = next(x for x in run.stdout.splitlines() if x.startswith("RESULT"))
    out = json.loads(line[len("RESULT") :])
    assert len(set(out["shards"])) == 4
    for name, n_params in (("flow", 3), ("normal", 2), ("conditional", 4)):
        result = out[name]
        # Parameters replicated on all four devices.
        assert result["multi_param_devices"] == [4] * n_params
        assert all(result["replicated"])
        single, multi = (
            np.array(result["single_losses"]),
            np.array(result["multi_losses"]),
        )
        assert single.shape == multi.shape == (20,)
        # Training moved (the comparison is not trivially between constants)...
        assert single[-1] < single[0] - 0.05
        # ...and the sharded run follows the same trajectory to float rounding
        # (only the order of the gradient reduction differs).
        np.testing.assert_allclose(multi, single, rtol=1e-4, atol=1e-5)
        for a, b in zip(result["multi_params"], result["single_params"], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert "divisible by the number of data shards (4)" in out["bad_batch_error"]
