"""The transformation contract in float64 (`tests/_contract.py`)."""

import _contract
import numpy as np
import pytest


@pytest.mark.parametrize(("name", "transform"), _contract.CELLS_FLOAT64)
def test_same_numbers_under_every_transformation(name, transform):
    _contract.check(name, transform, np.float64)
