"""Tail functions against mpmath in float64 (twin of numerics/test_gaussian.py)."""

import helpers
import numpy as np

DTYPE = np.float64


def test_log_survival_and_log_mills_ratio_match_mpmath():
    helpers.check_log_survival_and_log_mills_ratio(DTYPE)


def test_ndtri_exp_matches_mpmath_to_the_far_tail():
    helpers.check_ndtri_exp(DTYPE)


def test_ndtri_exp_derivative_is_the_mills_ratio():
    helpers.check_ndtri_exp_derivative(DTYPE)


def test_tail_functions_propagate_nan_per_element():
    helpers.check_nan_propagation(DTYPE)


def test_mills_ratio_matches_mpmath():
    helpers.check_mills_ratio(DTYPE)


def test_survival_matches_mpmath():
    helpers.check_survival(DTYPE)


def test_survival_is_monotone_between_neighbouring_floats():
    helpers.check_survival_monotone_between_neighbouring_floats(DTYPE)


def test_ndtri_exp_is_monotone_between_neighbouring_floats():
    helpers.check_ndtri_exp_monotone_between_neighbouring_floats(DTYPE)


def test_log_survival_gradient_matches_mpmath():
    helpers.check_log_survival_gradient(DTYPE)
