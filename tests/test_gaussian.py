"""Standard-normal tail functions against mpmath (float32 here).

The `check_*` functions take the dtype; `float64/test_gaussian_float64.py`
runs them in the x64 process.
"""

import jax
import jax.numpy as jnp
import mpmath as mp
import numpy as np

from distrax_mixcdf import log_mills_ratio, log_survival, ndtri_exp
from distrax_mixcdf._gaussian import survival

mp.mp.dps = 40


def _log_q(u):
    return float(mp.log(mp.ncdf(-mp.mpf(float(u)))))


def _log_mills(u):
    u = mp.mpf(float(u))
    return float(mp.log(mp.ncdf(-u)) - mp.log(mp.npdf(u)))


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


def check_survival(dtype):
    """Linear-space Q(u) (a Chebyshev erfc in float32) against mpmath.

    Down to Q ≈ 1e-30 (float32) / 1e-290 (float64): the relative error grows
    like eps·u²/2 from rounding u² (4e-6 at u = 11 in float32), as for any
    erfc evaluated in the working precision.
    """
    top = 11.0 if dtype is np.float32 else 36.0
    u = np.linspace(-12.0, top, 941).astype(dtype)
    want = np.array([float(mp.ncdf(-mp.mpf(float(v)))) for v in u])
    got = np.asarray(survival(jnp.asarray(u)), np.float64)
    eps = float(np.finfo(dtype).eps)
    bound = 4 * eps * np.maximum(1.0, np.square(u.astype(np.float64)))
    assert np.all(np.abs(got - want) <= bound * want), np.max(np.abs(got / want - 1))
    assert np.isnan(np.asarray(survival(jnp.asarray([np.nan], dtype)))[0])


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


def check_nan_propagation(dtype):
    u = jnp.asarray(np.array([1.0, np.nan, 40.0]), dtype)
    for fn in (log_survival, log_mills_ratio):
        out = np.asarray(fn(u))
        assert np.isnan(out[1])
        assert np.all(np.isfinite(out[[0, 2]]))
    out = np.asarray(ndtri_exp(jnp.asarray(np.array([-3.0, np.nan]), dtype)))
    assert np.isfinite(out[0])
    assert np.isnan(out[1])


def test_log_survival_and_log_mills_ratio_match_mpmath():
    check_log_survival_and_log_mills_ratio(np.float32)


def test_ndtri_exp_matches_mpmath_to_the_far_tail():
    check_ndtri_exp(np.float32)


def test_ndtri_exp_derivative_is_the_mills_ratio():
    check_ndtri_exp_derivative(np.float32)


def test_tail_functions_propagate_nan_per_element():
    check_nan_propagation(np.float32)


def test_survival_matches_mpmath():
    check_survival(np.float32)
