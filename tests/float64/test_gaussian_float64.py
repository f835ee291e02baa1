"""Standard-normal tail functions against mpmath in float64 (see test_gaussian)."""

import numpy as np
import test_gaussian as shared

DTYPE = np.float64


def test_log_survival_and_log_mills_ratio_match_mpmath():
    shared.check_log_survival_and_log_mills_ratio(DTYPE)


def test_ndtri_exp_matches_mpmath_to_the_far_tail():
    shared.check_ndtri_exp(DTYPE)


def test_ndtri_exp_derivative_is_the_mills_ratio():
    shared.check_ndtri_exp_derivative(DTYPE)


def test_tail_functions_propagate_nan_per_element():
    shared.check_nan_propagation(DTYPE)


def test_mills_ratio_matches_mpmath():
    shared.check_mills_ratio(DTYPE)


def test_survival_matches_mpmath():
    shared.check_survival(DTYPE)


def test_survival_is_monotone_between_neighbouring_floats():
    shared.check_survival_monotone_between_neighbouring_floats(DTYPE)


def test_ndtri_exp_is_monotone_between_neighbouring_floats():
    shared.check_ndtri_exp_monotone_between_neighbouring_floats(DTYPE)


def test_log_survival_gradient_matches_mpmath():
    shared.check_log_survival_gradient(DTYPE)
