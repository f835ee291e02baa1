"""Fixtures shared by the ecosystem tests: two layers and input grids.

Every check in this folder is numeric: compositions are compared against
autodiff of the scalar maps or against the scipy float64 formulas in
`helpers`, which share no code with the package. Float32 throughout (x64 is
never enabled here).
"""

import jax.numpy as jnp
import pytest

from distrax_mixcdf import MixtureGaussianCDF


@pytest.fixture(scope="module")
def bij():
    return MixtureGaussianCDF(
        jnp.array([0.3, -0.2, 0.5]),
        jnp.array([-2.0, 0.3, 1.8]),
        jnp.array([-0.4, 0.1, -0.9]),
    )


@pytest.fixture(scope="module")
def bij2():
    return MixtureGaussianCDF(
        jnp.array([0.0, 1.0]), jnp.array([-0.5, 1.0]), jnp.array([0.2, -0.3])
    )


@pytest.fixture(scope="module")
def xs():
    return jnp.linspace(-4.0, 4.0, 33)


@pytest.fixture(scope="module")
def ys():
    return jnp.linspace(-2.5, 2.5, 21)
