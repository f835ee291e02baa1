"""Shared pytest configuration: bounded hypothesis profiles.

`ci` (default) keeps property tests to a handful of examples so the suite stays
well under five minutes on two cores; `thorough` (HYPOTHESIS_PROFILE=thorough)
is for runs by hand.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
