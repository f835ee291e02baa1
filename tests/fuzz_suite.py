"""The fuzz suite's checks, shared by float32 (`test_fuzz.py`) and float64.

Each check takes the dtype; `count` records how many examples were tried, and
the test modules print the totals at the end of the session.
"""

import collections

import _checks
import _robust
import jax
import jax.numpy as jnp
import numpy as np
import reference

N = 512
counts: collections.Counter = collections.Counter()


def report_counts(request, dtype):
    """Prints the examples tried per check, past pytest's output capture."""
    lines = [f"  {name}: {n}" for name, n in sorted(counts.items())]
    text = f"\nfuzz ({np.dtype(dtype).name}): examples tried\n" + "\n".join(lines)
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(text)


def check_forward_finite_monotone(params, dtype, seed):
    counts["forward finite, monotone, exact"] += 1
    layer = _checks.make_bijector(*params, dtype)
    x = _robust.sorted_grid(params, N, dtype, seed)
    y, log_det = (
        np.asarray(v, np.float64) for v in _checks.forward(layer, jnp.asarray(x))
    )
    assert np.all(np.isfinite(y)), x[~np.isfinite(y)][:5]
    assert np.all(np.isfinite(log_det) | (log_det == -np.inf))
    # Non-decreasing everywhere, beyond the foundation's envelope too (scale
    # ratios up to 1e12, weights down to e^-2e4): every rounded operation of
    # the bulk is monotone in x. (With jax's `erfc` summed there, y stepped
    # back by up to 3 ulps on such mixtures.)
    assert np.all(np.diff(y) >= 0), x[np.argmin(np.diff(y))]
    if not _robust.in_foundation_envelope(params, dtype):
        return
    # Against the mpmath reference at a few points (it is slow).
    pick = np.linspace(0, N - 1, 6).astype(int)
    y_ref, _ = reference.forward(
        x[pick].astype(np.float64), _checks.as_used(params, dtype)
    )
    error = np.abs(y[pick] - y_ref) / np.maximum(1.0, np.abs(y_ref))
    # float32 x itself is only known to ulp(x): allow what that moves y by.
    slack = np.exp(log_det[pick]) * _checks.ulp(x[pick], dtype)
    assert np.all(error <= _checks.TOL[dtype]["y"] + slack), (error, x[pick])


def check_inverse_round_trip(params, dtype, seed):
    counts["inverse residual and log-det"] += 1
    rng = np.random.default_rng(seed)
    y = np.concatenate(
        [rng.normal(size=N - 6) * 3, [-35.0, -9.0, 0.0, 1e-3, 9.0, 35.0]]
    )
    y = y.astype(dtype)
    layer = _checks.make_bijector(*params, dtype)
    if _robust.in_foundation_envelope(params, dtype):
        _checks.check_round_trip_from_y(params, dtype, y)
    else:
        _checks.check_converged_within_four_ulps(layer, y, dtype)
    # The inverse's log-det is minus the forward's at the root.
    x_hat, inverse_log_det = _checks.inverse(layer, jnp.asarray(y, dtype))
    _, forward_log_det = _checks.forward(layer, x_hat)
    eps = float(np.finfo(dtype).eps)
    forward_log_det = np.asarray(forward_log_det, np.float64)
    tol = _checks.TOL[dtype]["log_det"] * np.maximum(1.0, np.abs(forward_log_det))
    tol = tol + 8 * eps * y.astype(np.float64) ** 2
    mismatch = np.abs(np.asarray(inverse_log_det, np.float64) + forward_log_det)
    finite = np.isfinite(forward_log_det)
    assert np.all(mismatch[finite] <= tol[finite]), mismatch.max()


def check_non_finite_policy_and_gradients(params, dtype, seed):
    counts["NaN/inf elementwise"] += 1
    rng = np.random.default_rng(seed)
    layer = _checks.make_bijector(*params, dtype)
    values = np.concatenate(
        [rng.normal(size=N // 2) * 3, _robust.sorted_grid(params, N // 2, dtype, seed)]
    ).astype(dtype)
    dirty = values.copy()
    bad = rng.choice(N, size=6, replace=False)
    dirty[bad] = [np.nan, np.inf, -np.inf, np.nan, np.inf, -np.inf]
    keep = np.isfinite(dirty)
    for fn in (_checks.forward, _checks.inverse):
        out, log_det = (np.asarray(v) for v in fn(layer, jnp.asarray(dirty)))
        clean_out, clean_log_det = (
            np.asarray(v) for v in fn(layer, jnp.asarray(values))
        )
        np.testing.assert_array_equal(out[keep], clean_out[keep])
        np.testing.assert_array_equal(log_det[keep], clean_log_det[keep])
        np.testing.assert_array_equal(out[~keep], dirty[~keep])


def check_masked_gradients_finite(params, dtype, seed):
    counts["masked-loss gradients finite"] += 1
    rng = np.random.default_rng(seed)
    layer = _checks.make_bijector(*params, dtype)
    dirty = np.concatenate(
        [rng.normal(size=N // 2) * 3, _robust.sorted_grid(params, N // 2, dtype, seed)]
    ).astype(dtype)
    bad = rng.choice(N, size=6, replace=False)
    dirty[bad] = [np.nan, np.inf, -np.inf, np.nan, np.inf, -np.inf]
    keep = np.isfinite(dirty)
    grads, value_grads = _robust.masked_loss_grads(layer, jnp.asarray(dirty))
    for leaf in jax.tree_util.tree_leaves(grads):
        assert np.all(np.isfinite(np.asarray(leaf)))
    value_grads = np.asarray(value_grads)
    assert np.all(value_grads[~keep] == 0)
    assert np.all(np.isfinite(value_grads))
