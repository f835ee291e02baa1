"""Standard-normal tail functions against mpmath (float32 here).

The checks live in `helpers` and take the dtype;
`float64/test_gaussian_float64.py` runs them in the x64 process.
"""

import helpers
import jax.numpy as jnp
import numpy as np

from distrax_mixcdf import log_mills_ratio, log_survival
from distrax_mixcdf._gaussian import survival


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


def test_log_survival_and_log_mills_ratio_match_mpmath():
    helpers.check_log_survival_and_log_mills_ratio(np.float32)


def test_ndtri_exp_matches_mpmath_to_the_far_tail():
    helpers.check_ndtri_exp(np.float32)


def test_ndtri_exp_derivative_is_the_mills_ratio():
    helpers.check_ndtri_exp_derivative(np.float32)


def test_tail_functions_propagate_nan_per_element():
    helpers.check_nan_propagation(np.float32)


def test_mills_ratio_matches_mpmath():
    helpers.check_mills_ratio(np.float32)


def test_ndtri_exp_is_monotone_between_neighbouring_floats():
    helpers.check_ndtri_exp_monotone_between_neighbouring_floats(np.float32)


def test_log_survival_gradient_matches_mpmath():
    helpers.check_log_survival_gradient(np.float32)


def test_survival_matches_mpmath():
    helpers.check_survival(np.float32)


def test_survival_is_monotone_between_neighbouring_floats():
    helpers.check_survival_monotone_between_neighbouring_floats(np.float32)
