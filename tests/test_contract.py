"""The transformation contract in float32 (`helpers`; float64 apart)."""

import helpers
import numpy as np
import pytest


@pytest.mark.parametrize(("name", "transform"), helpers.CONTRACT_CELLS_FLOAT32)
def test_same_numbers_under_every_transformation(name, transform):
    helpers.check_contract_cell(name, transform, np.float32)
