"""float64 tests: collected only in a process started with JAX_ENABLE_X64=1."""

import jax

assert jax.config.jax_enable_x64, "run the float64 tests with JAX_ENABLE_X64=1"
