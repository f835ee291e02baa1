"""Numerical checks shared by the float32 and float64 test modules.

Each check takes the dtype it runs in, so `test_mixture_cdf.py` (float32) and
`test_mixture_cdf_float64.py` (x64 enabled in that module only) assert the same
properties with the tolerances of the foundation issue.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import reference
import scipy.special as sps
from hypothesis import strategies as st

from distrax_mixcdf import MixtureGaussianCDF, _chunks

TOL = {
    # (y relative/absolute, log_det relative, round-trip x relative)
    np.float32: dict(y=2e-5, log_det=1e-4, round_trip=1e-5),
    np.float64: dict(y=1e-12, log_det=1e-10, round_trip=1e-12),
}


# Inputs of up to this many elements are padded to the next bucket, so one
# compiled forward / inverse per (K, dtype) serves every grid the checks use
# (compilation dominates this suite). Below 8192 elements per parameter set, so
# the inverse's knot-table start (used from 8192 shared inputs) is never
# switched on by the padding.
_BUCKETS = (512, 2048, 8000)


def _bucketed(method):
    compiled = jax.jit(lambda bijector, values: getattr(bijector, method)(values))

    def call(bijector, values):
        """``bijector.<method>(values)`` as NumPy arrays, compiled per bucket."""
        values = np.asarray(values)
        size = values.size
        scalar_params = bijector.batch_shape == ()
        if not scalar_params or values.ndim != 1 or not 0 < size <= _BUCKETS[-1]:
            return tuple(np.asarray(v) for v in compiled(bijector, values))
        bucket = next(b for b in _BUCKETS if b >= size)
        padded = np.pad(values, (0, bucket - size), mode="edge")
        return tuple(np.asarray(v)[:size] for v in compiled(bijector, padded))

    return call


forward = _bucketed("forward_and_log_det")
inverse = _bucketed("inverse_and_log_det")


def make_bijector(logits, means, log_scales, dtype, **options):
    cast = lambda a: jnp.asarray(np.asarray(a, dtype=np.float64), dtype=dtype)  # noqa: E731
    return MixtureGaussianCDF(cast(logits), cast(means), cast(log_scales), **options)


@st.composite
def mixtures(draw, max_components=8):
    """Mixtures inside the issue's envelope: weights ≥ 1e-6, scale ratio ≤ 1e4."""
    k = draw(st.sampled_from([c for c in (1, 2, 5, 8) if c <= max_components]))
    floats = lambda lo, hi: st.floats(lo, hi, allow_nan=False, allow_infinity=False)  # noqa: E731
    logits = draw(st.lists(floats(-3.0, 3.0), min_size=k, max_size=k))
    log_spread = draw(floats(-2.0, 2.0))
    log_scales = draw(
        st.lists(floats(log_spread - 4.6, log_spread + 4.6), min_size=k, max_size=k)
    )
    center = draw(floats(-10.0, 10.0))
    means = draw(st.lists(floats(-5.0, 5.0), min_size=k, max_size=k))
    means = [center + m * float(np.exp(log_spread)) for m in means]
    return np.array(logits), np.array(means), np.array(log_scales)


def evaluation_grid(params, dtype, size=64, seed=0):
    """Bulk points, moderate tails and far tails out to |x - μ| = 1e4·σ_max."""
    _, means, log_scales = params
    rng = np.random.default_rng(seed)
    sigma_max = float(np.exp(np.max(log_scales)))
    center = float(np.mean(means))
    bulk = center + sigma_max * rng.uniform(-6, 6, size // 2)
    far = np.sign(rng.normal(size=size - size // 2)) * np.logspace(
        0.5, 4, size - size // 2
    )
    tails = means[rng.integers(len(means), size=far.size)] + far * sigma_max
    return np.concatenate([bulk, tails]).astype(dtype)


def as_used(params, dtype):
    """The parameters exactly as the bijector holds them, rounded to ``dtype``.

    The reference maps ``x`` with these: in float32 rounding ``μ`` alone moves
    ``y`` by up to ``ulp(μ)/σ`` (3e-5 for μ = 4.26, σ = e^-5), which is the
    input's rounding, not the map's error.
    """
    return tuple(
        np.asarray(p, np.float64).astype(dtype).astype(np.float64) for p in params
    )


def ulp(values, dtype):
    values = np.abs(np.asarray(values, dtype=dtype))
    return np.spacing(values).astype(np.float64)


def check_forward_against_reference(params, dtype):
    x = evaluation_grid(params, dtype)
    bijector = make_bijector(*params, dtype)
    assert_forward_matches_reference(
        x, *forward(bijector, jnp.asarray(x)), params, dtype
    )


def assert_forward_matches_reference(x, y, log_det, params, dtype):
    """``(y, log_det)`` at ``x`` within the issue's tolerances of mpmath's."""
    y, log_det = (np.asarray(v, np.float64) for v in (y, log_det))
    y_ref, log_det_ref = reference.forward(x, as_used(params, dtype))
    assert np.all(np.isfinite(y)), "non-finite y"
    assert np.all(np.isfinite(log_det)), "non-finite log_det"
    tol = TOL[dtype]
    y_error = np.abs(y - y_ref) / np.maximum(1.0, np.abs(y_ref))
    assert y_error.max() <= tol["y"], (y_error.max(), x[y_error.argmax()])
    eps = float(np.finfo(dtype).eps)
    allowed = tol["log_det"] * np.maximum(1.0, np.abs(log_det_ref)) + 8 * eps * y_ref**2
    assert np.all(np.abs(log_det - log_det_ref) <= allowed), (
        np.max(np.abs(log_det - log_det_ref) - allowed),
        x[np.argmax(np.abs(log_det - log_det_ref) - allowed)],
    )


def check_converged_within_four_ulps(layer, y, dtype):
    """The inverse's root is within four ulps of x of the exact one.

    That is: ``y`` lies between ``T`` four ulps either side of the returned
    root, up to four ulps of ``y``. Outside the foundation's envelope its
    residual bound does not apply: the bound's ``2·f'·ulp(x)`` takes ``T'`` at
    the root, and next to a component only a few ulps wide ``T'`` changes by
    orders of magnitude within an ulp (a component narrower than an ulp makes
    ``T`` jump).
    """
    x_hat = np.asarray(inverse(layer, jnp.asarray(y))[0])
    assert np.all(np.isfinite(x_hat))
    below, above = x_hat, x_hat
    for _ in range(4):
        below = np.nextafter(below, -np.inf, dtype=dtype)
        above = np.nextafter(above, np.inf, dtype=dtype)
    y_below = np.asarray(forward(layer, jnp.asarray(below))[0], np.float64)
    y_above = np.asarray(forward(layer, jnp.asarray(above))[0], np.float64)
    # 4 ulps of y, plus 4 more in float64 for jax's erfc (see check_round_trip_from_y).
    ulps = 4 if dtype == np.float32 else 8
    tol = ulps * ulp(np.maximum(1.0, np.abs(y)), dtype)
    inside = (y_below - tol <= y) & (y <= y_above + tol)
    assert np.all(inside), (y[~inside][:5], x_hat[~inside][:5])


def check_tail_pass_in_small_chunks(monkeypatch, dtype):
    """The tail pass gathers its elements in chunks and writes over the bulk's.

    With its chunk size patched down to 8 elements, 101 tail elements (|y|
    beyond the bulk pass's reach: |x - μ| of 60 to 1e3 σ) spread over a batch
    of 240 run in 13 chunks, the last one clamped into range; the bulk
    elements between them, element 0 among them (where the padding's
    out-of-range index must write nothing), keep the bulk pass's values. All
    must match the mpmath reference.
    """
    monkeypatch.setitem(_chunks._CPU_CHUNK_ELEMENTS, "tail", 8)
    params = (
        np.array([0.2, -0.4, 0.1]),
        np.array([-1.0, 0.5, 2.0]),
        np.array([-0.3, 0.2, -0.8]),
    )
    rng = np.random.default_rng(3)
    x = rng.normal(size=240) * 2
    tail_rows = np.arange(1, 240, 2)[:101]
    x[tail_rows] = rng.choice([-1.0, 1.0], 101) * rng.uniform(60.0, 1e3, 101)
    x = x.astype(dtype)
    bijector = make_bijector(*params, dtype)
    # A new function, so that it is traced with the patched chunk size.
    forward_fn = jax.jit(lambda b, v: b.forward_and_log_det(v))
    y, log_det = forward_fn(bijector, x)
    # Beyond the bulk pass's smallest tail mass (1e-28 / 1e-250).
    bulk_limit = 11.05 if dtype == np.float32 else 33.8
    assert np.all(np.abs(np.asarray(y)[tail_rows]) > bulk_limit)
    assert_forward_matches_reference(x, y, log_det, params, dtype)
    # The bulk elements are untouched: exactly what a batch without tail
    # elements (which skips the tail pass) gives them.
    is_tail = np.isin(np.arange(x.size), tail_rows)
    bulk_only = forward_fn(bijector, np.where(is_tail, np.asarray(0.5, dtype), x))
    for got, want in zip((y, log_det), bulk_only):
        np.testing.assert_array_equal(
            np.asarray(got)[~is_tail], np.asarray(want)[~is_tail]
        )


# Mixtures whose map has a plateau in the bulk: one component's CDF
# saturated, the others' tail mass tiny, so the tail mass changes by a few
# ulps over a wide range of x. Found by the thorough fuzz profile; before the
# bulk's refinement started from a fixed grid point, y stepped back by one ulp
# 27 (float32) and 10 (float64) times on these grids.
_PLATEAUS = {
    np.float32: (
        (np.array([0.0, 1.0, 2.0, 1.0]), np.array([0.0, 0.0, 0.0, 20.085536923187668])),
        (3.0, 9.0),
    ),
    np.float64: (
        (
            np.array([2.763478226691647, 2.763478226691647, 2.21514536963109, 0.5]),
            np.array([20.085536923187668, 20.085536923187668, 0.0, 0.0]),
        ),
        (5.0, 15.0),
    ),
}


def check_monotone_on_plateau(dtype):
    """y is non-decreasing on a dense grid over a plateau of the map."""
    (logits, means), (lo, hi) = _PLATEAUS[dtype]
    layer = make_bijector(logits, means, np.zeros(4), dtype)
    x = np.linspace(lo, hi, 8000).astype(dtype)
    y = np.asarray(forward(layer, jnp.asarray(x))[0], np.float64)
    steps_back = np.flatnonzero(np.diff(y) < 0)
    assert steps_back.size == 0, x[steps_back[:5]]


def check_monotone(params, dtype):
    _, means, log_scales = params
    sigma_max = float(np.exp(np.max(log_scales)))
    span = 1e4 * sigma_max
    x = np.sort(
        np.concatenate(
            [
                np.linspace(means.min() - span, means.max() + span, 2001),
                np.linspace(
                    means.min() - 10 * sigma_max, means.max() + 10 * sigma_max, 4001
                ),
            ]
        )
    ).astype(dtype)
    x = np.unique(x)
    bijector = make_bijector(*params, dtype)
    y = np.asarray(forward(bijector, jnp.asarray(x))[0], np.float64)
    assert np.all(np.isfinite(y))
    assert np.all(np.diff(y) >= 0), x[np.argmin(np.diff(y))]
    # Strictly increasing wherever the exact map moves by more than 4 ulps: a
    # subset, against the float64 mpmath reference (it is slow).
    idx = np.linspace(0, x.size - 2, 60).astype(int)
    pairs = np.stack([x[idx], x[idx + 1]], axis=1).ravel()
    y_ref = reference.forward(pairs, as_used(params, dtype))[0].reshape(-1, 2)
    # "More than 4 ulps" in units of what y can resolve: r(y) (see
    # resolution_of_y), which is ulp(y) in the tails but eps·Φ/φ ≈ 1.5e-7
    # (float32) near y = 0, where y comes from F ≈ 1/2 (found by the thorough
    # profile: the reference moves 3.5e-9 → 3.8e-9 on a plateau where F
    # changes by far less than ulp(1/2); ulp(y) there is 1e-15).
    moves = np.abs(y_ref[:, 1] - y_ref[:, 0]) > 4 * resolution_of_y(y_ref[:, 0], dtype)
    assert np.all(y[idx + 1][moves] > y[idx][moves])


@jax.jit
def autodiff_slope(bijector, x):
    """``dy/dx`` elementwise by ``grad`` (compiled once per K and dtype)."""
    return jax.vmap(jax.grad(lambda v: bijector.forward(v)))(x)


def check_log_det_matches_autodiff(params, dtype):
    x = evaluation_grid(params, dtype, size=48, seed=1)
    bijector = make_bijector(*params, dtype)
    y, log_det = forward(bijector, jnp.asarray(x))
    slope = autodiff_slope(bijector, jnp.asarray(x))
    slope, log_det = np.asarray(slope, np.float64), np.asarray(log_det, np.float64)
    finite = np.isfinite(np.log(slope)) & (slope > 0)
    assert finite.mean() > 0.5
    eps = float(np.finfo(dtype).eps)
    y = np.asarray(y, np.float64)
    allowed = 1e3 * eps * np.maximum(1.0, np.abs(log_det)) + 8 * eps * y**2
    assert np.all(np.abs(np.log(slope[finite]) - log_det[finite]) <= allowed[finite])


def resolution_of_y(y, dtype):
    """r(y) = max(ulp(y), eps·min(Φ(y), 1-Φ(y))/φ(y)), the resolution of y."""
    eps = float(np.finfo(dtype).eps)
    mills = np.exp(sps.log_ndtr(-np.abs(y)) - (-0.5 * y**2 - 0.5 * np.log(2 * np.pi)))
    return np.maximum(ulp(y, dtype), eps * mills)


def check_round_trip_from_x(params, dtype):
    x = evaluation_grid(params, dtype, size=64, seed=2)
    x = np.concatenate([x, np.linspace(-10, 10, 64).astype(dtype)])
    bijector = make_bijector(*params, dtype)
    y, log_det = forward(bijector, jnp.asarray(x))
    x_back, inverse_log_det = inverse(bijector, y)
    x_back = np.asarray(x_back, np.float64)
    y64, log_det64 = np.asarray(y, np.float64), np.asarray(log_det, np.float64)
    assert np.all(np.isfinite(x_back))
    # The bound's conditioning term 4·r(y)/T' linearises T. Between
    # far-apart components T' changes by orders of magnitude across the
    # interval of x that one y resolves, so take T' at its smallest of x, x̂
    # and their midpoint (mean value theorem: Δx = Δy / T'(ξ) for some ξ).
    midpoint = jnp.asarray(0.5 * (x + x_back), dtype)
    log_slopes = [
        log_det64,
        np.asarray(forward(bijector, jnp.asarray(x_back, dtype))[1], np.float64),
        np.asarray(forward(bijector, midpoint)[1], np.float64),
    ]
    # Where T' underflows even in float64 (between components far apart on
    # their own scale, log T' < -745) every x of the gap has the same y: the
    # conditioning term is infinite there, and so is the allowed error.
    with np.errstate(over="ignore"):
        inverse_slopes = np.exp(-np.minimum.reduce(log_slopes))
    conditioning = 4 * resolution_of_y(y64, dtype) * inverse_slopes
    allowed = TOL[dtype]["round_trip"] * np.maximum(1.0, np.abs(x)) + conditioning
    assert np.all(np.abs(x_back - x) <= allowed), np.max(np.abs(x_back - x) / allowed)
    # The inverse's log-det is minus the forward's at the same point.
    _, log_det_at_root = forward(bijector, jnp.asarray(x_back, dtype))
    eps = float(np.finfo(dtype).eps)
    tol = TOL[dtype]["log_det"] * np.maximum(1.0, np.abs(log_det64)) + 8 * eps * y64**2
    mismatch = np.abs(np.asarray(inverse_log_det) + np.asarray(log_det_at_root))
    assert np.all(mismatch <= tol), mismatch.max()


def check_round_trip_from_y(params, dtype, y):
    bijector = make_bijector(*params, dtype)
    x_hat, _ = inverse(bijector, jnp.asarray(y, dtype))
    y_back, log_det = forward(bijector, x_hat)
    x_hat = np.asarray(x_hat, np.float64)
    assert np.all(np.isfinite(x_hat)), "NaN/inf from a finite input"
    residual = np.abs(np.asarray(y_back, np.float64) - y)
    allowed = 4 * ulp(np.maximum(1.0, np.abs(y)), dtype) + 2 * np.exp(
        np.asarray(log_det, np.float64)
    ) * ulp(x_hat, dtype)
    if dtype == np.float64:
        # The residual is measured with our own forward, whose float64 `y`
        # carries jax's float64 `erfc` error (up to 7 ulps relative, measured):
        # up to ~4 more ulps of y that no root can remove.
        allowed = allowed + 4 * ulp(np.maximum(1.0, np.abs(y)), dtype)
    assert np.all(residual <= allowed), (
        residual.max(),
        y[np.argmax(residual - allowed)],
    )
    return residual


def neighbouring_floats(centres, count, dtype):
    """``count`` consecutive floats of ``dtype`` around each centre, ``[n, count]``."""
    lowest = np.asarray(centres, dtype)
    for _ in range(count // 2):
        lowest = np.nextafter(lowest, dtype(-np.inf))
    rows = [lowest]
    for _ in range(count - 1):
        rows.append(np.nextafter(rows[-1], dtype(np.inf)))
    return np.stack(rows, axis=1)


def check_monotone_between_neighbouring_floats(dtype):
    """y never steps back between neighbouring floats, at ten latent levels.

    Sorted grids of a few thousand points do not resolve single ulps; here
    every float in a window of 800 around each level is evaluated, including
    the log-space tail pass (|y| = 11.5 in float32, 34.5 in float64). Before
    the monotone `survival` the float32 forward stepped back for ~1 in 1300
    such pairs in the bulk (jax's `erfc` is not monotone below 1), the float64
    one for ~1 in 200, so six K = 8 mixtures would show dozens of step-backs.
    """
    rng = np.random.default_rng(7)
    far = 11.5 if dtype == np.float32 else 34.5
    levels = np.array([-far, -5, -1.1, -0.3, -0.01, 0, 0.3, 1.1, 5, far], dtype)
    for _ in range(6):
        params = (
            rng.normal(size=8) * 2,
            rng.normal(size=8) * 2,
            rng.normal(size=8) * 0.7,
        )
        layer = make_bijector(*params, dtype)
        centres = inverse(layer, levels)[0]
        x = neighbouring_floats(centres, 800, dtype)
        y = forward(layer, x.ravel())[0].reshape(x.shape)
        steps_back = np.diff(y, axis=1) < 0
        assert not steps_back.any(), (params, x[:, 1:][steps_back][:5])
