"""float64 tests: collected only in a process started with JAX_ENABLE_X64=1."""

import pathlib
import sys

import jax

# Shared helpers (`_checks`, `reference`) live one directory up.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

assert jax.config.jax_enable_x64, "run the float64 tests with JAX_ENABLE_X64=1"
