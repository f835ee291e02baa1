"""Fuzz suite, float32: random mixtures across the reliability envelope.

Scales 1e-6…1e6, means spread up to 1e6·σ_max, logits ±1e4, duplicated
components (`helpers.extreme_mixtures`), K = 4 so every example reuses one
compilation. The number of examples tried is printed at the end of the run.
The float64 twin is `tests/float64/test_fuzz_float64.py`. Profiles: `ci`
(default, bounded) and HYPOTHESIS_PROFILE=thorough (by hand).
"""

import helpers
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

DTYPE = np.float32
SEEDS = st.integers(0, 2**16)


@pytest.fixture(scope="module", autouse=True)
def _report_counts(request):
    yield
    helpers.report_fuzz_counts(request, DTYPE)


@given(helpers.extreme_mixtures(), SEEDS)
def test_fuzz_forward_finite_monotone_and_exact(params, seed):
    helpers.check_forward_finite_monotone(params, DTYPE, seed)


@given(helpers.extreme_mixtures(), SEEDS)
def test_fuzz_inverse_round_trip_and_log_det(params, seed):
    helpers.check_inverse_round_trip(params, DTYPE, seed)


@given(helpers.extreme_mixtures(), SEEDS)
def test_fuzz_non_finite_policy_elementwise(params, seed):
    helpers.check_non_finite_policy_and_gradients(params, DTYPE, seed)


# Includes points where the mixture density underflows between components
# (two unit components 54.6 apart, x = 20: y = 0, log_det = -200.7), where the
# forward's tangents once came out NaN.
@given(helpers.extreme_mixtures(), SEEDS)
def test_fuzz_masked_gradients_finite(params, seed):
    helpers.check_masked_gradients_finite(params, DTYPE, seed)
