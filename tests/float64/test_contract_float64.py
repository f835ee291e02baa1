"""The transformation contract in float64 (`helpers`; float32 is `test_contract.py`)."""

import helpers
import numpy as np
import pytest


@pytest.mark.parametrize(("name", "transform"), helpers.CONTRACT_CELLS_FLOAT64)
def test_same_numbers_under_every_transformation(name, transform):
    helpers.check_contract_cell(name, transform, np.float64)
