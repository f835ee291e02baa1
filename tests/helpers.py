"""Shared test helpers: references, compiled maps, strategies and checks.

The one helper module of the suite (`tests/conftest.py` puts `tests/` on
``sys.path``); the float32 modules and their float64 twins under
`tests/float64/` call the same checks with the dtype they run in. Sections:

* mpmath references: the mixture map and the standard-normal tail functions
  to 40 digits, sharing no code with the package;
* scipy float64 references: the mixture's CDF, density, map and inverse for
  the ecosystem tests (`tests/integration/`);
* compiled maps: bucketed forward/inverse, autodiff slope, masked-loss
  gradients and the jitted maps of the ecosystem tests, defined once here so
  that every module reuses their compilations;
* hypothesis strategies and evaluation grids, with the resolution of y;
* accuracy, monotonicity and round-trip checks of the layer, with the
  foundation issue's tolerances (`TOL`);
* checks of the standard-normal tail functions against mpmath;
* fuzz checks over extreme mixtures, with the count of examples tried;
* the transformation contract: every map under every JAX transformation.
"""

from __future__ import annotations

import collections
import functools

import distrax
import jax
import jax.numpy as jnp
import mpmath as mp
import numpy as np
import scipy.special as sps
import scipy.stats as st
from hypothesis import strategies as hst
from scipy.optimize import brentq

from distrax_mixcdf import (
    MixtureGaussianCDF,
    _chunks,
    _forward,
    log_mills_ratio,
    log_survival,
    ndtri_exp,
)
from distrax_mixcdf._gaussian import mills_ratio, survival

# -- mpmath references (40 digits; they share no code with the package) ---------

# 40 digits: the quantile's Newton iteration stops at 1e-30 relative.
mp.mp.dps = 40


def _mp_mixture(params):
    logits, means, log_scales = (np.asarray(p, dtype=np.float64) for p in params)
    log_norm = mp.log(mp.fsum(mp.exp(mp.mpf(v)) for v in logits))
    weights = [mp.exp(mp.mpf(v) - log_norm) for v in logits]
    return weights, [mp.mpf(v) for v in means], [mp.exp(mp.mpf(v)) for v in log_scales]


def mpmath_forward(x, params):
    """Returns float64 arrays ``(y, log_det)`` for 1-D params ``[K]`` and 1-D ``x``."""
    weights, means, scales = _mp_mixture(params)
    ys, log_dets = [], []
    for value in np.asarray(x, dtype=np.float64).ravel():
        xv = mp.mpf(float(value))
        lower = mp.fsum(
            w * mp.ncdf((xv - m) / s) for w, m, s in zip(weights, means, scales)
        )
        upper = mp.fsum(
            w * mp.ncdf((m - xv) / s) for w, m, s in zip(weights, means, scales)
        )
        density = mp.fsum(
            w * mp.npdf((xv - m) / s) / s for w, m, s in zip(weights, means, scales)
        )
        tail = min(lower, upper)
        y = _mp_quantile_of_log(mp.log(tail))
        if upper < lower:
            y = -y
        ys.append(float(y))
        log_dets.append(float(mp.log(density) - mp.log(mp.npdf(y))))
    return np.array(ys), np.array(log_dets)


def _mp_quantile_of_log(log_p):
    """Φ⁻¹(exp(log_p)) to full working precision (Newton on log Φ)."""
    log_p = mp.mpf(log_p)
    y = -mp.sqrt(-2 * log_p) if log_p < -1 else mp.mpf(0)
    for _ in range(200):
        step = (mp.log(mp.ncdf(y)) - log_p) * mp.ncdf(y) / mp.npdf(y)
        y -= step
        if abs(step) < mp.mpf(10) ** -30 * max(1, abs(y)):
            break
    return y


def _quantile_of_log(log_p):
    return float(_mp_quantile_of_log(float(log_p)))


def _log_q(u):
    return float(mp.log(mp.ncdf(-mp.mpf(float(u)))))


def _log_mills(u):
    u = mp.mpf(float(u))
    return float(mp.log(mp.ncdf(-u)) - mp.log(mp.npdf(u)))


def _mills(u):
    """R(u) = sqrt(pi/2) erfcx(u/sqrt 2); its asymptotic series far out."""
    u = mp.mpf(float(u))
    if u > 1e6:  # series truncation below 15/u^6 = 1.5e-35
        return float((1 - 1 / u**2 + 3 / u**4) / u)
    x = u / mp.sqrt(2)
    return float(mp.sqrt(mp.pi / 2) * mp.erfc(x) * mp.exp(x * x))


# -- scipy float64 references for the ecosystem tests (no package code)


def mixture64(bij):
    """A scalar-parameter layer's ``(log weights, means, scales)`` in float64."""
    logits, means, log_scales = (
        np.asarray(a, np.float64) for a in jax.tree.leaves(bij)
    )
    return sps.log_softmax(logits, axis=-1), means, np.exp(log_scales)


def mixture_cdf(x, bij):
    log_w, mu, sigma = mixture64(bij)
    z = (np.asarray(x, np.float64)[..., None] - mu) / sigma
    return np.sum(np.exp(log_w) * st.norm.cdf(z), axis=-1)


def mixture_logpdf(x, bij):
    log_w, mu, sigma = mixture64(bij)
    z = (np.asarray(x, np.float64)[..., None] - mu) / sigma
    return sps.logsumexp(log_w + st.norm.logpdf(z) - np.log(sigma), axis=-1)


def scipy_forward(x, bij):
    """``(y, log|dy/dx|)`` in float64, using the smaller tail for accuracy."""
    log_w, mu, sigma = mixture64(bij)
    z = (np.asarray(x, np.float64)[..., None] - mu) / sigma
    lower = np.sum(np.exp(log_w) * st.norm.cdf(z), axis=-1)
    upper = np.sum(np.exp(log_w) * st.norm.sf(z), axis=-1)
    y = np.where(lower < upper, st.norm.ppf(lower), st.norm.isf(upper))
    return y, mixture_logpdf(x, bij) - st.norm.logpdf(y)


def scipy_inverse(y, bij):
    """``x`` with ``F(x) = Φ(y)`` by float64 bracketing (scipy ``brentq``)."""
    log_w, mu, sigma = mixture64(bij)
    w = np.exp(log_w)
    lo, hi = np.min(mu - 40 * sigma), np.max(mu + 40 * sigma)

    def residual(x, target):
        z = (x - mu) / sigma
        lower, upper = np.sum(w * st.norm.cdf(z)), np.sum(w * st.norm.sf(z))
        value = st.norm.ppf(lower) if lower < upper else st.norm.isf(upper)
        return value - target

    flat = np.asarray(y, np.float64).ravel()
    roots = [brentq(residual, lo, hi, args=(t,), xtol=1e-14, rtol=1e-14) for t in flat]
    return np.reshape(roots, np.shape(y))


def close(actual, desired, rtol=1e-5, atol=1e-5, **kwargs):
    np.testing.assert_allclose(
        np.asarray(actual), np.asarray(desired), rtol, atol, **kwargs
    )


# -- bijectors and compiled maps shared across modules (one compile per shape)

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


@jax.jit
def autodiff_slope(bijector, x):
    """``dy/dx`` elementwise by ``grad`` (compiled once per K and dtype)."""
    return jax.vmap(jax.grad(lambda v: bijector.forward(v)))(x)


@jax.jit
def masked_loss_grads(bijector, values):
    """Gradients of a loss over forward and inverse that masks non-finite inputs."""

    def loss(b, v):
        keep = jnp.isfinite(v)
        total = 0.0
        for fn in (b.forward_and_log_det, b.inverse_and_log_det):
            out, log_det = fn(v)
            total = total + jnp.sum(jnp.where(keep, out + log_det, 0.0))
        return total

    return jax.grad(loss, argnums=(0, 1))(bijector, values)


# Plain jitted maps for the ecosystem tests (unpadded, returning JAX arrays).
@jax.jit
def jit_forward(bij, x):
    return bij.forward_and_log_det(x)


@jax.jit
def jit_inverse(bij, y):
    return bij.inverse_and_log_det(y)


def data_density(bij):
    """The data density: a standard normal pushed through the layer's inverse."""
    return distrax.Transformed(distrax.Normal(0.0, 1.0), distrax.Inverse(bij))


# -- hypothesis strategies, evaluation grids and float resolution


@hst.composite
def mixtures(draw, max_components=8):
    """Mixtures inside the issue's envelope: weights ≥ 1e-6, scale ratio ≤ 1e4."""
    k = draw(hst.sampled_from([c for c in (1, 2, 5, 8) if c <= max_components]))
    floats = lambda lo, hi: hst.floats(lo, hi, allow_nan=False, allow_infinity=False)  # noqa: E731
    logits = draw(hst.lists(floats(-3.0, 3.0), min_size=k, max_size=k))
    log_spread = draw(floats(-2.0, 2.0))
    log_scales = draw(
        hst.lists(floats(log_spread - 4.6, log_spread + 4.6), min_size=k, max_size=k)
    )
    center = draw(floats(-10.0, 10.0))
    means = draw(hst.lists(floats(-5.0, 5.0), min_size=k, max_size=k))
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


def resolution_of_y(y, dtype):
    """r(y) = max(ulp(y), eps·min(Φ(y), 1-Φ(y))/φ(y)), the resolution of y."""
    eps = float(np.finfo(dtype).eps)
    mills = np.exp(sps.log_ndtr(-np.abs(y)) - (-0.5 * y**2 - 0.5 * np.log(2 * np.pi)))
    return np.maximum(ulp(y, dtype), eps * mills)


def neighbouring_floats(centres, count, dtype):
    """``count`` consecutive floats of ``dtype`` around each centre, ``[n, count]``."""
    lowest = np.asarray(centres, dtype)
    for _ in range(count // 2):
        lowest = np.nextafter(lowest, dtype(-np.inf))
    rows = [lowest]
    for _ in range(count - 1):
        rows.append(np.nextafter(rows[-1], dtype(np.inf)))
    return np.stack(rows, axis=1)


@hst.composite
def extreme_mixtures(draw, k=4):
    """K = 4 mixtures across the reliability envelope.

    Scales from 1e-6 to 1e6, means spread up to e^13.8 ≈ 1e6 times the widest
    scale, logits from -1e4 to 1e4 (vanishing weights), and duplicated
    components.
    """
    max_log_gap = 13.8
    finite = lambda lo, hi: hst.floats(lo, hi, allow_nan=False, allow_infinity=False)  # noqa: E731
    extreme = hst.sampled_from([-1e4, -50.0, 50.0, 1e4])
    logit = hst.one_of(finite(-5.0, 5.0), extreme)
    logits = draw(hst.lists(logit, min_size=k, max_size=k))
    log_scales = draw(
        hst.lists(finite(np.log(1e-6), np.log(1e6)), min_size=k, max_size=k)
    )
    duplicate = draw(hst.booleans())
    if duplicate:  # component 1 is a copy of component 0
        logits[1], log_scales[1] = logits[0], log_scales[0]
    # The spread is relative to the final widest scale.
    spread = float(np.exp(draw(finite(-3.0, max_log_gap)))) * float(
        np.exp(max(log_scales))
    )
    means = [draw(finite(-1.0, 1.0)) * spread for _ in range(k)]
    if duplicate:
        means[1] = means[0]
    return np.array(logits), np.array(means), np.array(log_scales)


def in_foundation_envelope(params, dtype) -> bool:
    """The foundation's envelope: scales within 1e4, weights ≥ 1e-6, and every
    component wider than 1e3 ulps of the means (else x cannot resolve it)."""
    logits, means, log_scales = params
    log_weights = logits - np.logaddexp.reduce(logits)
    resolution = 1e3 * float(np.finfo(dtype).eps) * max(1.0, float(np.abs(means).max()))
    return bool(
        np.ptp(log_scales) <= np.log(1e4)
        and log_weights.min() >= np.log(1e-6)
        and np.exp(log_scales.min()) >= resolution
    )


def sorted_grid(params, size, dtype, seed):
    """Points around every component at its own scale, and far out to 1e4·σ_max."""
    _, means, log_scales = params
    rng = np.random.default_rng(seed)
    scales = np.exp(log_scales)
    local = means[rng.integers(len(means), size=size // 2)] + scales[
        rng.integers(len(means), size=size // 2)
    ] * rng.uniform(-8, 8, size // 2)
    far = means.mean() + np.exp(log_scales.max()) * np.sign(
        rng.normal(size=size - size // 2)
    ) * np.logspace(-1, 4, size - size // 2)
    return np.sort(np.concatenate([local, far]).astype(dtype))


# -- accuracy, monotonicity and round-trip checks of the layer (either dtype)

TOL = {
    # (y relative/absolute, log_det relative, round-trip x relative)
    np.float32: dict(y=2e-5, log_det=1e-4, round_trip=1e-5),
    np.float64: dict(y=1e-12, log_det=1e-10, round_trip=1e-12),
}


def check_forward_against_reference(params, dtype):
    x = evaluation_grid(params, dtype)
    bijector = make_bijector(*params, dtype)
    assert_forward_matches_reference(
        x, *forward(bijector, jnp.asarray(x)), params, dtype
    )


def assert_forward_matches_reference(x, y, log_det, params, dtype):
    """``(y, log_det)`` at ``x`` within the issue's tolerances of mpmath's."""
    y, log_det = (np.asarray(v, np.float64) for v in (y, log_det))
    y_ref, log_det_ref = mpmath_forward(x, as_used(params, dtype))
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
    """The tail pass gathers its blocks in chunks and writes over the bulk's.

    With blocks patched down to 7 elements and chunks to 2 blocks, 101 tail
    elements (|y| beyond the bulk pass's reach: |x - μ| of 60 to 1e3 σ) on
    every other row of a batch of 240 (34 blocks and a padded 35th) lie in
    29 blocks, which run in 15 chunks, the last one clamped into range. The
    bulk elements between them, which run through the tail pass with their
    block, keep the bulk pass's values; so does element 0, where the padding's
    out-of-range index must write nothing. All must match the mpmath
    reference.
    """
    monkeypatch.setitem(_chunks._CPU_CHUNK_ELEMENTS, "tail", 14)
    monkeypatch.setattr(_forward, "_TAIL_BLOCK", 7)
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
    y_ref = mpmath_forward(pairs, as_used(params, dtype))[0].reshape(-1, 2)
    # "More than 4 ulps" in units of what y can resolve: r(y) (see
    # resolution_of_y), which is ulp(y) in the tails but eps·Φ/φ ≈ 1.5e-7
    # (float32) near y = 0, where y comes from F ≈ 1/2 (found by the thorough
    # profile: the reference moves 3.5e-9 → 3.8e-9 on a plateau where F
    # changes by far less than ulp(1/2); ulp(y) there is 1e-15).
    moves = np.abs(y_ref[:, 1] - y_ref[:, 0]) > 4 * resolution_of_y(y_ref[:, 0], dtype)
    assert np.all(y[idx + 1][moves] > y[idx][moves])


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


# -- standard-normal tail functions against mpmath (either dtype)

_TAIL_U = np.concatenate([np.linspace(-30, 30, 241), np.logspace(1, 6, 41)])
_TAIL_LOG_P = -np.concatenate([np.logspace(-6, 8, 120), np.log([2.0, 4.0, 1.0001])])


TAIL_TOL = {np.float32: 2e-6, np.float64: 5e-14}


def _relative_error(got, want):
    return np.max(
        np.abs(np.asarray(got, np.float64) - want) / np.maximum(1.0, np.abs(want))
    )


def check_log_survival_and_log_mills_ratio(dtype):
    u = _TAIL_U.astype(dtype)
    want_q = np.array([_log_q(v) for v in u])
    want_r = np.array([_log_mills(v) for v in u])
    assert _relative_error(log_survival(jnp.asarray(u)), want_q) <= TAIL_TOL[dtype]
    # R(u) from erfc below the series start loses up to eps·u²/2 (6e-6 in
    # float32 at u = 10), documented in `_gaussian.py`.
    mills_tolerance = 1e-5 if dtype is np.float32 else TAIL_TOL[dtype]
    assert _relative_error(log_mills_ratio(jnp.asarray(u)), want_r) <= mills_tolerance


def check_mills_ratio(dtype):
    """R(u) = Q(u)/φ(u) for u ≥ 0 (a rational form in float32) against mpmath.

    float32: within 4 eps everywhere (the polynomial fit is good to 1.6e-7);
    float64: exp(log R), within 4 eps·u² below the asymptotic series (rounding
    u²/2, see `check_log_survival_and_log_mills_ratio`).
    """
    u = np.concatenate([np.linspace(0.0, 40.0, 801), np.logspace(1.7, 30, 60)])
    u = u.astype(dtype)
    want = np.array([_mills(v) for v in u])
    got = np.asarray(mills_ratio(jnp.asarray(u)), np.float64)
    eps = float(np.finfo(dtype).eps)
    if dtype is np.float32:
        bound = np.full_like(want, 4 * eps)
    else:
        bound = 4 * eps * np.maximum(1.0, np.square(u.astype(np.float64)))
    assert np.all(np.abs(got / want - 1) <= bound), np.max(np.abs(got / want - 1))
    edge = np.asarray(mills_ratio(jnp.asarray([np.inf, np.nan], dtype)))
    assert edge[0] == 0.0
    assert np.isnan(edge[1])


def check_ndtri_exp(dtype):
    log_p = _TAIL_LOG_P.astype(dtype)
    want = np.array([_quantile_of_log(v) for v in log_p])
    got = ndtri_exp(jnp.asarray(log_p))
    assert np.all(np.isfinite(np.asarray(got)))
    assert _relative_error(got, want) <= TAIL_TOL[dtype]


def check_ndtri_exp_derivative(dtype):
    log_p = jnp.asarray(np.array([-1e6, -300.0, -20.0, -2.0, -0.01]), dtype)
    grads = jax.vmap(jax.grad(ndtri_exp))(log_p)
    y = np.array([_quantile_of_log(v) for v in np.asarray(log_p)])
    want = np.array([float(mp.ncdf(v) / mp.npdf(v)) for v in y])
    np.testing.assert_allclose(
        np.asarray(grads, np.float64), want, rtol=1e3 * np.finfo(dtype).eps
    )


def check_log_survival_gradient(dtype):
    """d log Q/du = -φ/Q by autodiff, including the floats just before the
    `survival` table's edges, where its clip is active (the clip once made
    the gradient 0 there: 3 of these points in float32, 5 in float64).
    """
    edges = (np.arange(1, 9 * 128) / 128).astype(dtype)
    just_below = np.nextafter(edges, dtype(0))
    random = np.random.default_rng(5).uniform(-5.0, 9.5, 200).astype(dtype)
    u = np.concatenate([just_below, np.nextafter(just_below, dtype(0)), random])
    got = np.asarray(jax.jit(jax.vmap(jax.grad(log_survival)))(jnp.asarray(u)))
    want = np.array(
        [float(-mp.npdf(mp.mpf(float(v))) / mp.ncdf(-mp.mpf(float(v)))) for v in u]
    )
    relative = np.abs(got.astype(np.float64) - want) / np.abs(want)
    assert np.max(relative) <= TAIL_TOL[dtype], u[np.argmax(relative)]


def check_ndtri_exp_monotone_between_neighbouring_floats(dtype):
    """``ndtri_exp`` never steps back between neighbouring ``log_p``.

    Windows of 2000 consecutive floats at six levels from log(0.5) to -1e4.
    With three plain Newton steps (before its last step was made monotone,
    see `_gaussian._polish_in_cells`) the mixture's float32 tail pass stepped
    back 12 times in 40000 neighbouring pairs at y = 11.5 (log_p ≈ -69.5);
    compiled on its own, as here, that version happened not to.
    """
    levels = np.array([-0.7, -2.0, -20.0, -68.0, -300.0, -1e4], dtype)
    log_p = neighbouring_floats(levels, 2000, dtype)
    y = np.asarray(jax.jit(ndtri_exp)(jnp.asarray(log_p)))
    steps_back = np.diff(y, axis=1) < 0
    assert not steps_back.any(), log_p[:, 1:][steps_back][:5]


def check_nan_propagation(dtype):
    u = jnp.asarray(np.array([1.0, np.nan, 40.0]), dtype)
    for fn in (log_survival, log_mills_ratio):
        out = np.asarray(fn(u))
        assert np.isnan(out[1])
        assert np.all(np.isfinite(out[[0, 2]]))
    out = np.asarray(ndtri_exp(jnp.asarray(np.array([-3.0, np.nan]), dtype)))
    assert np.isfinite(out[0])
    assert np.isnan(out[1])


def check_survival(dtype):
    """Q(u) for u ≥ 0 against mpmath, within 4 eps, and its edge values.

    Measured: 0.93 eps (float32) and 2 eps (float64) at worst; jax's `erfc`
    is 100 eps / 1068 eps off on the same grid. float32 beyond u = 12
    (Q < 1.8e-33): products below the smallest normal number flush to zero on
    XLA's CPU backend, so there the error is bounded in absolute terms only.
    """
    end = 12.75 if dtype is np.float32 else 36.0
    relative_end = 12.0 if dtype is np.float32 else end
    rng = np.random.default_rng(3)
    u = np.concatenate([rng.uniform(0.0, end, 1500), np.arange(0.0, end, 1 / 16)])
    u = u.astype(dtype)
    want = np.array([float(mp.ncdf(-mp.mpf(float(v)))) for v in u])
    got = np.asarray(survival(jnp.asarray(u)), np.float64)
    near = u < relative_end
    relative = np.abs(got - want)[near] / want[near]
    assert np.max(relative) <= 4 * np.finfo(dtype).eps, u[near][np.argmax(relative)]
    assert np.all(np.abs(got - want)[~near] <= 2 * np.finfo(dtype).tiny)
    edge = np.asarray(survival(jnp.asarray([0.0, end, np.inf, np.nan], dtype)))
    assert edge[0] == 0.5
    assert edge[1] == 0.0
    assert edge[2] == 0.0
    assert np.isnan(edge[3])


def check_survival_monotone_between_neighbouring_floats(dtype):
    """Q never steps up between neighbouring floats, around every table edge.

    Windows of 64 consecutive floats around every 1/128 (the float32 table's
    edges, every fourth float64 edge) and 400 random points. jax's `erfc`
    steps up for 2–18% of neighbouring arguments below 1 (measured), which
    this check catches within its first window there.
    """
    end = 12.75 if dtype is np.float32 else 36.0
    centres = np.concatenate(
        [
            np.arange(1, int(end * 128)) / 128,
            np.random.default_rng(4).uniform(0, end, 400),
        ]
    )
    u = neighbouring_floats(centres.astype(dtype), 64, dtype)
    q = np.asarray(jax.jit(survival)(jnp.asarray(u)))
    steps_up = np.diff(q, axis=1) > 0
    assert not steps_up.any(), u[:, 1:][steps_up][:5]


# -- fuzz checks on extreme mixtures (either dtype), counting the examples tried

# The test modules print `fuzz_counts` at the end of their run.
FUZZ_N = 512
fuzz_counts: collections.Counter = collections.Counter()


def report_fuzz_counts(request, dtype):
    """Prints the examples tried per check, past pytest's output capture."""
    lines = [f"  {name}: {n}" for name, n in sorted(fuzz_counts.items())]
    text = f"\nfuzz ({np.dtype(dtype).name}): examples tried\n" + "\n".join(lines)
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(text)


def check_forward_finite_monotone(params, dtype, seed):
    fuzz_counts["forward finite, monotone, exact"] += 1
    layer = make_bijector(*params, dtype)
    x = sorted_grid(params, FUZZ_N, dtype, seed)
    y, log_det = (np.asarray(v, np.float64) for v in forward(layer, jnp.asarray(x)))
    assert np.all(np.isfinite(y)), x[~np.isfinite(y)][:5]
    assert np.all(np.isfinite(log_det) | (log_det == -np.inf))
    # Non-decreasing everywhere, beyond the foundation's envelope too (scale
    # ratios up to 1e12, weights down to e^-2e4): every rounded operation of
    # the bulk is monotone in x. (With jax's `erfc` summed there, y stepped
    # back by up to 3 ulps on such mixtures.)
    assert np.all(np.diff(y) >= 0), x[np.argmin(np.diff(y))]
    if not in_foundation_envelope(params, dtype):
        return
    # Against the mpmath reference at a few points (it is slow).
    pick = np.linspace(0, FUZZ_N - 1, 6).astype(int)
    y_ref, _ = mpmath_forward(x[pick].astype(np.float64), as_used(params, dtype))
    error = np.abs(y[pick] - y_ref) / np.maximum(1.0, np.abs(y_ref))
    # float32 x itself is only known to ulp(x): allow what that moves y by.
    slack = np.exp(log_det[pick]) * ulp(x[pick], dtype)
    assert np.all(error <= TOL[dtype]["y"] + slack), (error, x[pick])


def check_inverse_round_trip(params, dtype, seed):
    fuzz_counts["inverse residual and log-det"] += 1
    rng = np.random.default_rng(seed)
    y = np.concatenate(
        [rng.normal(size=FUZZ_N - 6) * 3, [-35.0, -9.0, 0.0, 1e-3, 9.0, 35.0]]
    )
    y = y.astype(dtype)
    layer = make_bijector(*params, dtype)
    if in_foundation_envelope(params, dtype):
        check_round_trip_from_y(params, dtype, y)
    else:
        check_converged_within_four_ulps(layer, y, dtype)
    # The inverse's log-det is minus the forward's at the root.
    x_hat, inverse_log_det = inverse(layer, jnp.asarray(y, dtype))
    _, forward_log_det = forward(layer, x_hat)
    eps = float(np.finfo(dtype).eps)
    forward_log_det = np.asarray(forward_log_det, np.float64)
    tol = TOL[dtype]["log_det"] * np.maximum(1.0, np.abs(forward_log_det))
    tol = tol + 8 * eps * y.astype(np.float64) ** 2
    mismatch = np.abs(np.asarray(inverse_log_det, np.float64) + forward_log_det)
    finite = np.isfinite(forward_log_det)
    assert np.all(mismatch[finite] <= tol[finite]), mismatch.max()


def _fuzz_batch(params, dtype, seed):
    """``(layer, values, dirty, keep)``: a fuzz batch, then six of it NaN/±inf."""
    rng = np.random.default_rng(seed)
    layer = make_bijector(*params, dtype)
    values = np.concatenate(
        [
            rng.normal(size=FUZZ_N // 2) * 3,
            sorted_grid(params, FUZZ_N // 2, dtype, seed),
        ]
    ).astype(dtype)
    dirty = values.copy()
    bad = rng.choice(FUZZ_N, size=6, replace=False)
    dirty[bad] = [np.nan, np.inf, -np.inf, np.nan, np.inf, -np.inf]
    return layer, values, dirty, np.isfinite(dirty)


def check_non_finite_policy_and_gradients(params, dtype, seed):
    fuzz_counts["NaN/inf elementwise"] += 1
    layer, values, dirty, keep = _fuzz_batch(params, dtype, seed)
    for fn in (forward, inverse):
        out, log_det = (np.asarray(v) for v in fn(layer, jnp.asarray(dirty)))
        clean_out, clean_log_det = (
            np.asarray(v) for v in fn(layer, jnp.asarray(values))
        )
        np.testing.assert_array_equal(out[keep], clean_out[keep])
        np.testing.assert_array_equal(log_det[keep], clean_log_det[keep])
        np.testing.assert_array_equal(out[~keep], dirty[~keep])


def check_masked_gradients_finite(params, dtype, seed):
    fuzz_counts["masked-loss gradients finite"] += 1
    layer, _, dirty, keep = _fuzz_batch(params, dtype, seed)
    grads, value_grads = masked_loss_grads(layer, jnp.asarray(dirty))
    for leaf in jax.tree_util.tree_leaves(grads):
        assert np.all(np.isfinite(np.asarray(leaf)))
    value_grads = np.asarray(value_grads)
    assert np.all(value_grads[~keep] == 0)
    assert np.all(np.isfinite(value_grads))


# -- the transformation contract: every map under every JAX transformation

# A drop-in JAX layer gives the same numbers however it is called. For each map
# (forward, forward log-det, inverse, inverse log-det) and each composition of
# JAX transformations below, the result per element must match the unbatched
# call at that element, to float rounding, and be finite wherever the
# unbatched call is finite, with NaN and ±inf elements in the same batch.
# Inputs run from the bulk to |x − μ| = 1e4·σ (forward) and to |y| = 30
# (float32) / 37 (float64) (inverse). ``chain`` is the log-det of a distrax
# ``Chain`` of the layer, an affine map and another layer inverted.

CONTRACT_MAPS = ("forward", "forward_log_det", "inverse", "inverse_log_det", "chain")

CONTRACT_TRANSFORMS = (
    "batched_call",
    "vmap",
    "vmap_grad",
    "vmap_jacfwd",
    "vmap_jacrev",
    "vmap_hessian",
    "per_example_param_grad",
    "grad_of_vmapped_loss",
    "param_grad_of_vmapped_loss",
    "vmap_over_bijectors",
    "jit_inside_vmap",
)

# Every map under every transformation in float32. The chain of three layers
# and float64 (whose batching is the same program in another dtype) take the
# transformations that exercise distinct code: both derivative modes, second
# order, parameter gradients, and batched parameters.
_CONTRACT_DISTINCT = (
    "vmap_grad",
    "vmap_jacfwd",
    "vmap_hessian",
    "per_example_param_grad",
    "param_grad_of_vmapped_loss",
    "vmap_over_bijectors",
)
CONTRACT_CELLS_FLOAT32 = [
    (name, transform)
    for name in CONTRACT_MAPS
    for transform in (_CONTRACT_DISTINCT if name == "chain" else CONTRACT_TRANSFORMS)
]
CONTRACT_CELLS_FLOAT64 = [
    (name, transform)
    for name in CONTRACT_MAPS
    if name != "chain"
    for transform in _CONTRACT_DISTINCT
]

# The mixture: three components of different widths.
CONTRACT_PARAMS = ([0.0, 0.0, 0.0], [-1.0, 0.0, 2.0], [0.0, -0.5, 0.3])


def contract_inputs(name: str, dtype) -> np.ndarray:
    """Bulk to far-tail inputs, NaN and ±inf, for the map ``name``."""
    if name.startswith("forward") or name == "chain":
        widest = np.exp(0.3)
        values = [-3.0, -0.7, 0.0, 1.3, 5.1, 18.0, -20.0, 150.0, -1e3, 1e4 * widest]
        values += [-1e4 * widest]
    else:
        far = 30.0 if dtype == np.float32 else 37.0
        values = [-far, -12.0, -5.0, -0.3, 0.0, 0.8, 3.0, 8.0, 12.0, far]
    return np.asarray([*values, np.nan, np.inf, -np.inf], dtype)


def _contract_map(name: str):
    def f(x, params):
        bijector = MixtureGaussianCDF(*params)
        if name == "chain":
            # A distrax stack: layer, affine, then another layer inverted.
            other = MixtureGaussianCDF(params[0], 0.5 * params[1], params[2] - 0.2)
            chain = distrax.Chain(
                [bijector, distrax.ScalarAffine(0.3, 1.2), distrax.Inverse(other)]
            )
            return chain.forward_and_log_det(x)[1]
        if name == "forward":
            return bijector.forward(x)
        if name == "forward_log_det":
            return bijector.forward_log_det_jacobian(x)
        if name == "inverse":
            return bijector.inverse(x)
        return bijector.inverse_log_det_jacobian(x)

    return f


def _contract_params(dtype, shift=0.0):
    return tuple(jnp.asarray(np.asarray(p) + shift, dtype) for p in CONTRACT_PARAMS)


@functools.cache
def _contract_unbatched(name: str):
    """One compiled scalar-input function returning every derivative program.

    Each batched derivative is compared with the same derivative program
    called on one element: reverse and forward mode round differently, and
    the contract is about batching, not about the mode. One program serves
    them all, so each worker compiles it once per map.
    """
    f = _contract_map(name)

    def every(x, params):
        return {
            "value": f(x, params),
            "grad": jax.grad(f)(x, params),
            "jacfwd": jax.jacfwd(f)(x, params),
            "hessian": jax.hessian(f)(x, params),
            "param_grad": jax.grad(f, argnums=1)(x, params),
        }

    return jax.jit(every)


def _per_element(key, xs, params_per_element, name):
    fn = _contract_unbatched(name)
    out = [fn(x, p)[key] for x, p in zip(xs, params_per_element)]
    return jax.tree_util.tree_map(lambda *leaves: np.stack(leaves), *out)


def _contract_batched_params(dtype, size):
    """A different mixture per element, for vmap over a batch of bijectors."""
    shifts = np.linspace(-0.2, 0.2, size)
    return tuple(
        jnp.asarray(np.asarray(p)[None, :] + shifts[:, None] * (i + 1), dtype)
        for i, p in enumerate(CONTRACT_PARAMS)
    )


def _batched_programs(f):
    """Every batched transformation of ``f``, each a function of four arguments.

    The arguments are ``(xs, params, batch, regular)``: ``batch`` holds one
    mixture per element (``vmap_over_bijectors``), and ``regular`` masks the
    irregular inputs out of the parameter-gradient loss, as a user's would.
    """

    def each(g):
        return lambda xs, params, batch, regular: jax.vmap(g, (0, None))(xs, params)

    def summed(xs, params):
        return jnp.sum(jax.vmap(f, (0, None))(xs, params))

    def masked_sum(params, xs, regular):
        return jnp.sum(jnp.where(regular, jax.vmap(f, (0, None))(xs, params), 0.0))

    return {
        "batched_call": lambda xs, params, batch, regular: f(xs, params),
        "vmap": each(f),
        "vmap_grad": each(jax.grad(f)),
        "vmap_jacfwd": each(jax.jacfwd(f)),
        "vmap_jacrev": each(jax.jacrev(f)),
        "vmap_hessian": each(jax.hessian(f)),
        "per_example_param_grad": each(jax.grad(f, argnums=1)),
        "grad_of_vmapped_loss": lambda xs, params, batch, regular: jax.grad(summed)(
            xs, params
        ),
        "param_grad_of_vmapped_loss": lambda xs, params, batch, regular: jax.grad(
            masked_sum
        )(params, xs, regular),
        "vmap_over_bijectors": lambda xs, params, batch, regular: jax.vmap(
            jax.value_and_grad(f)
        )(xs, batch),
        "jit_inside_vmap": each(jax.jit(jax.grad(f))),
    }


@functools.cache
def _contract_batched(name: str, transforms: tuple[str, ...]):
    """One jitted program computing ``transforms`` of the map ``name``.

    Separate programs per transformation compile in about twice the time;
    inside the one ``jit`` each output is still its own transformation (and
    ``jit_inside_vmap`` keeps its inner ``jit``).
    """
    programs = _batched_programs(_contract_map(name))
    return jax.jit(lambda *args: {t: programs[t](*args) for t in transforms})


def _transforms_of(name: str, dtype) -> tuple[str, ...]:
    cells = CONTRACT_CELLS_FLOAT32 if dtype == np.float32 else CONTRACT_CELLS_FLOAT64
    return tuple(t for n, t in cells if n == name)


# The unbatched program each batched transformation is compared with.
_REFERENCE_PROGRAM = {
    "batched_call": "value",
    "vmap": "value",
    "vmap_grad": "grad",
    "vmap_jacrev": "grad",
    "grad_of_vmapped_loss": "grad",
    "jit_inside_vmap": "grad",
    "vmap_jacfwd": "jacfwd",
    "vmap_hessian": "hessian",
    "per_example_param_grad": "param_grad",
}


def contract_computed_and_expected(name: str, transform: str, dtype):
    """``(got, want)`` pytrees for one cell of the contract matrix."""
    xs = jnp.asarray(contract_inputs(name, dtype))
    params = _contract_params(dtype)
    same = [params] * xs.shape[0]
    regular = np.isfinite(np.asarray(xs))
    batch = _contract_batched_params(dtype, xs.shape[0])
    got = _contract_batched(name, _transforms_of(name, dtype))(
        xs, params, batch, jnp.asarray(regular)
    )[transform]
    if transform in _REFERENCE_PROGRAM:
        return got, _per_element(_REFERENCE_PROGRAM[transform], xs, same, name)
    if transform == "param_grad_of_vmapped_loss":
        per = _per_element("param_grad", xs[regular], same, name)
        return got, jax.tree_util.tree_map(lambda g: g.sum(axis=0), per)
    if transform == "vmap_over_bijectors":
        per_params = [tuple(p[i] for p in batch) for i in range(xs.shape[0])]
        return got, (
            _per_element("value", xs, per_params, name),
            _per_element("grad", xs, per_params, name),
        )
    raise ValueError(transform)


def _log_det_conditioning(name: str, dtype) -> np.ndarray:
    """Per element, the rounding a log-det derivative inherits from its terms.

    The tangent of ``log f(x) - log φ(y)`` sums terms of size ``y²`` (``y ẏ``
    and ``Σ ρ z²``) that cancel to O(1) in the tails, so any two float
    programs agree there only to ``eps·y²``, whichever is batched.
    """
    if not name.endswith("log_det") and name != "chain":
        return np.zeros(contract_inputs(name, dtype).shape)
    xs = contract_inputs(name, dtype)
    y = (
        xs
        if name.startswith("inverse")
        else np.asarray(
            _per_element(
                "value", jnp.asarray(xs), [_contract_params(dtype)] * len(xs), "forward"
            )
        )
    )
    y = np.where(np.isfinite(y), y, 0.0).astype(np.float64)
    return 32 * np.finfo(dtype).eps * (1.0 + 2.0 * np.square(y))


def check_contract_cell(name: str, transform: str, dtype) -> None:
    """Asserts one cell: same numbers, and finite where the reference is."""
    got, want = contract_computed_and_expected(name, transform, dtype)
    # Batched and unbatched programs may round differently (XLA vectorises
    # by batch size), so the floor is relative to the largest entry, plus the
    # log-dets' conditioning in the tails.
    rtol, floor = (1e-4, 1e-5) if dtype == np.float32 else (1e-9, 1e-11)
    conditioning = _log_det_conditioning(name, dtype)
    if transform == "param_grad_of_vmapped_loss":
        conditioning = conditioning[np.isfinite(contract_inputs(name, dtype))].sum()
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        assert g.shape == w.shape, (g.shape, w.shape)
        finite = np.isfinite(w)
        assert finite.sum() >= finite.size // 2, w  # the check is not vacuous
        np.testing.assert_array_equal(np.isfinite(g), finite, err_msg=str((g, w)))
        np.testing.assert_array_equal(g[~finite], w[~finite])
        extra = np.reshape(conditioning, np.shape(conditioning) + (1,) * (w.ndim - 1))
        extra = np.broadcast_to(extra, w.shape)[finite] if w.ndim else extra
        tolerance = rtol * np.abs(w[finite]) + floor * np.max(np.abs(w[finite])) + extra
        np.testing.assert_array_less(
            np.abs(g[finite] - w[finite]), tolerance + 1e-30, err_msg=str((g, w))
        )
