"""Fuzz suite, float64 (run with JAX_ENABLE_X64=1 by `tests/test_float64.py`)."""

import helpers
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

DTYPE = np.float64
SEEDS = st.integers(0, 2**16)


@pytest.fixture(scope="module", autouse=True)
def _report_counts(request):
    yield
    helpers.report_fuzz_counts(request, DTYPE)


@given(helpers.extreme_mixtures(), SEEDS)
def test_fuzz_forward_finite_monotone_and_exact_float64(params, seed):
    helpers.check_forward_finite_monotone(params, DTYPE, seed)


@given(helpers.extreme_mixtures(), SEEDS)
def test_fuzz_inverse_round_trip_and_log_det_float64(params, seed):
    helpers.check_inverse_round_trip(params, DTYPE, seed)


@given(helpers.extreme_mixtures(), SEEDS)
def test_fuzz_non_finite_policy_elementwise_float64(params, seed):
    helpers.check_non_finite_policy_and_gradients(params, DTYPE, seed)


# Includes points where the mixture density underflows between components
# (as in tests/numerics/test_fuzz.py), over the same envelope as float32.
@given(helpers.extreme_mixtures(), SEEDS)
def test_fuzz_masked_gradients_finite_float64(params, seed):
    helpers.check_masked_gradients_finite(params, DTYPE, seed)
