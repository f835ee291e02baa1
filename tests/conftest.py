"""Shared pytest configuration: bounded hypothesis profiles, `helpers` import.

`ci` (default) keeps property tests to a handful of examples so the suite stays
well under five minutes on two cores; `thorough` (HYPOTHESIS_PROFILE=thorough)
is for runs by hand. Test modules in every folder below import the one shared
helper module, `tests/helpers.py`, as `helpers`.
"""

import os
import pathlib
import sys

from hypothesis import HealthCheck, settings

# `tests/` on the path, so that `import helpers` works from every folder and
# in the float64 child process.
_HERE = str(pathlib.Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

settings.register_profile(
    "ci",
    max_examples=8,
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


# The float64 suite needs JAX_ENABLE_X64=1 from process start; `test_float64.py`
# runs it in a child process. Collect it directly only in that child.
collect_ignore = [] if os.environ.get("JAX_ENABLE_X64") else ["float64"]
