"""Standard-normal tail functions against mpmath (float32 here).

The `check_*` functions take the dtype; `float64/test_gaussian_float64.py`
runs them in the x64 process.
"""

import _checks
import jax
import jax.numpy as jnp
import mpmath as mp
import numpy as np

from distrax_mixcdf import log_mills_ratio, log_survival, ndtri_exp
from distrax_mixcdf._gaussian import mills_ratio, survival

mp.mp.dps = 40


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


def _quantile_of_log(log_p):
    """Φ⁻¹(exp(log_p)) by Newton on log Φ at 40 digits."""
    log_p = mp.mpf(float(log_p))
    y = -mp.sqrt(-2 * log_p) if log_p < -1 else mp.mpf(0)
    for _ in range(100):
        step = (mp.log(mp.ncdf(y)) - log_p) * mp.ncdf(y) / mp.npdf(y)
        y -= step
        if abs(step) < mp.mpf(10) ** -30 * max(1, abs(y)):
            break
    return float(y)


U = np.concatenate([np.linspace(-30, 30, 241), np.logspace(1, 6, 41)])
LOG_P = -np.concatenate([np.logspace(-6, 8, 120), np.log([2.0, 4.0, 1.0001])])


TOLERANCE = {np.float32: 2e-6, np.float64: 5e-14}


def _relative_error(got, want):
    return np.max(
        np.abs(np.asarray(got, np.float64) - want) / np.maximum(1.0, np.abs(want))
    )


def check_log_survival_and_log_mills_ratio(dtype):
    u = U.astype(dtype)
    want_q = np.array([_log_q(v) for v in u])
    want_r = np.array([_log_mills(v) for v in u])
    assert _relative_error(log_survival(jnp.asarray(u)), want_q) <= TOLERANCE[dtype]
    # R(u) from erfc below the series start loses up to eps·u²/2 (6e-6 in
    # float32 at u = 10), documented in `_gaussian.py`.
    mills_tolerance = 1e-5 if dtype is np.float32 else TOLERANCE[dtype]
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
    log_p = LOG_P.astype(dtype)
    want = np.array([_quantile_of_log(v) for v in log_p])
    got = ndtri_exp(jnp.asarray(log_p))
    assert np.all(np.isfinite(np.asarray(got)))
    assert _relative_error(got, want) <= TOLERANCE[dtype]


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
    assert np.max(relative) <= TOLERANCE[dtype], u[np.argmax(relative)]


def check_ndtri_exp_monotone_between_neighbouring_floats(dtype):
    """``ndtri_exp`` never steps back between neighbouring ``log_p``.

    Windows of 2000 consecutive floats at six levels from log(0.5) to -1e4.
    With three plain Newton steps (before its last step was made monotone,
    see `_gaussian._polish_in_cells`) the mixture's float32 tail pass stepped
    back 12 times in 40000 neighbouring pairs at y = 11.5 (log_p ≈ -69.5);
    compiled on its own, as here, that version happened not to.
    """
    levels = np.array([-0.7, -2.0, -20.0, -68.0, -300.0, -1e4], dtype)
    log_p = _checks.neighbouring_floats(levels, 2000, dtype)
    y = np.asarray(jax.jit(ndtri_exp)(jnp.asarray(log_p)))
    steps_back = np.diff(y, axis=1) < 0
    assert not steps_back.any(), log_p[:, 1:][steps_back][:5]


def test_half_precision_tail_functions():
    """float16 / bfloat16 inputs work: `survival` is float32's result rounded.

    The log functions then run in the half precision itself (as they did on
    `erfc`), so they are compared with float32 to the half precision's eps.
    """
    u = np.array([-2.0, 0.0, 0.5, 3.0], np.float32)
    for dtype in (jnp.float16, jnp.bfloat16):
        half = jnp.asarray(np.abs(u), dtype)
        got = survival(half)
        assert got.dtype == dtype
        want = survival(half.astype(jnp.float32)).astype(dtype)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        for fn in (log_survival, log_mills_ratio):
            half = jnp.asarray(u, dtype)
            got = np.asarray(fn(half).astype(jnp.float32))
            want = np.asarray(fn(half.astype(jnp.float32)))
            eps = float(jnp.finfo(dtype).eps)
            np.testing.assert_allclose(got, want, rtol=4 * eps, atol=4 * eps)


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
    u = _checks.neighbouring_floats(centres.astype(dtype), 64, dtype)
    q = np.asarray(jax.jit(survival)(jnp.asarray(u)))
    steps_up = np.diff(q, axis=1) > 0
    assert not steps_up.any(), u[:, 1:][steps_up][:5]


def test_log_survival_and_log_mills_ratio_match_mpmath():
    check_log_survival_and_log_mills_ratio(np.float32)


def test_ndtri_exp_matches_mpmath_to_the_far_tail():
    check_ndtri_exp(np.float32)


def test_ndtri_exp_derivative_is_the_mills_ratio():
    check_ndtri_exp_derivative(np.float32)


def test_tail_functions_propagate_nan_per_element():
    check_nan_propagation(np.float32)


def test_mills_ratio_matches_mpmath():
    check_mills_ratio(np.float32)


def test_ndtri_exp_is_monotone_between_neighbouring_floats():
    check_ndtri_exp_monotone_between_neighbouring_floats(np.float32)


def test_log_survival_gradient_matches_mpmath():
    check_log_survival_gradient(np.float32)


def test_survival_matches_mpmath():
    check_survival(np.float32)


def test_survival_is_monotone_between_neighbouring_floats():
    check_survival_monotone_between_neighbouring_floats(np.float32)
