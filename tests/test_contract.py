"""The transformation contract in float32 (`_contract.py`; float64 apart)."""

import _contract
import numpy as np
import pytest


@pytest.mark.parametrize(("name", "transform"), _contract.CELLS_FLOAT32)
def test_same_numbers_under_every_transformation(name, transform):
    _contract.check(name, transform, np.float32)
