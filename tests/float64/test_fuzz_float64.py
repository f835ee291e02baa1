"""Fuzz suite, float64 (run with JAX_ENABLE_X64=1 by `tests/test_float64.py`)."""

import _robust
import fuzz_suite
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

DTYPE = np.float64
SEEDS = st.integers(0, 2**16)


@pytest.fixture(scope="module", autouse=True)
def _report_counts(request):
    yield
    lines = [f"  {name}: {n}" for name, n in sorted(fuzz_suite.counts.items())]
    text = f"\nfuzz ({DTYPE.__name__}): examples tried\n" + "\n".join(lines)
    # Printed past pytest's output capture, so it shows without -s.
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(text)


@given(_robust.extreme_mixtures(), SEEDS)
def test_fuzz_forward_finite_monotone_and_exact_float64(params, seed):
    fuzz_suite.check_forward_finite_monotone(params, DTYPE, seed)


@given(_robust.extreme_mixtures(), SEEDS)
def test_fuzz_inverse_round_trip_and_log_det_float64(params, seed):
    fuzz_suite.check_inverse_round_trip(params, DTYPE, seed)


@given(_robust.extreme_mixtures(), SEEDS)
def test_fuzz_non_finite_policy_elementwise_float64(params, seed):
    fuzz_suite.check_non_finite_policy_and_gradients(params, DTYPE, seed)


# In float64 the forward's JVP NaN (see tests/test_fuzz.py) needs the density
# to underflow below e^-745 between components; with means within e^3 ≈ 20·σ_max
# of each other and weights ≥ e^-10/4 it cannot, so the check is asserted
# outright here.
@given(_robust.extreme_mixtures(max_log_gap=3.0, vanishing_weights=False), SEEDS)
def test_fuzz_masked_gradients_finite_float64(params, seed):
    fuzz_suite.check_masked_gradients_finite(params, DTYPE, seed)
