"""MixtureGaussianCDF in float64: reference accuracy and exact gradients.

Runs in its own process with JAX_ENABLE_X64=1 (see `tests/test_float64.py`):
toggling x64 inside one process leaks into other tests and, measured here,
aborted XLA compiles.
"""

import functools

import helpers
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given

from distrax_mixcdf import MixtureGaussianCDF

DTYPE = np.float64


@given(helpers.mixtures())
def test_forward_matches_mpmath_reference(params):
    helpers.check_forward_against_reference(params, DTYPE)


def test_tail_pass_in_small_chunks_matches_the_reference(monkeypatch):
    helpers.check_tail_pass_in_small_chunks(monkeypatch, DTYPE)


def test_forward_is_monotone_on_a_plateau():
    helpers.check_monotone_on_plateau(DTYPE)


def test_forward_is_monotone_between_neighbouring_floats():
    helpers.check_monotone_between_neighbouring_floats(DTYPE)


@given(helpers.mixtures())
def test_forward_is_monotone_and_finite_out_to_1e4_sigma(params):
    helpers.check_monotone(params, DTYPE)


@given(helpers.mixtures())
def test_round_trip_from_data(params):
    helpers.check_round_trip_from_x(params, DTYPE)


@given(helpers.mixtures())
def test_round_trip_from_latent(params):
    y = np.concatenate([np.linspace(-8, 8, 97), [-300.0, -40.0, 35.0, 500.0]])
    helpers.check_round_trip_from_y(params, DTYPE, y)


def test_large_batch_round_trip_uses_table():
    rng = np.random.default_rng(11)
    params = (
        rng.normal(size=8),
        rng.normal(size=8) * 2,
        rng.normal(size=8) * 0.3 - 0.5,
    )
    y = np.concatenate([rng.normal(size=20_000), np.linspace(-40, 40, 161)])
    helpers.check_round_trip_from_y(params, DTYPE, y)


PARAMS = (
    np.array([0.2, -0.4, 0.9]),
    np.array([-1.5, 0.3, 2.2]),
    np.array([-0.3, 0.4, -0.8]),
)
POINTS = np.array([-7.0, -1.3, 0.0, 0.4, 2.5, 9.0])


@functools.partial(jax.jit, static_argnames="inverse_grad")
def _inverse_loss(params, y, inverse_grad="implicit"):
    bijector = MixtureGaussianCDF(*params, inverse_grad=inverse_grad)
    x, log_det = bijector.inverse_and_log_det(y)
    return jnp.sum(jnp.sin(x) + 0.3 * x**2) + 0.5 * jnp.sum(log_det)


def _central_difference(fn, value, step=1e-6):
    value = np.asarray(value, np.float64)
    grad = np.zeros_like(value)
    for index in np.ndindex(*value.shape):
        bump = np.zeros_like(value)
        bump[index] = step * max(1.0, abs(value[index]))
        grad[index] = (fn(value + bump) - fn(value - bump)) / (2 * bump[index])
    return grad


def test_inverse_gradients_match_central_differences_to_1e6():
    params = tuple(jnp.asarray(p) for p in PARAMS)
    y = jnp.asarray(POINTS)
    grads = jax.grad(_inverse_loss, argnums=(0, 1))(params, y)
    for i in range(3):

        def loss_of(value, i=i):
            changed = list(params)
            changed[i] = jnp.asarray(value)
            return float(_inverse_loss(tuple(changed), y))

        fd = _central_difference(loss_of, params[i])
        np.testing.assert_allclose(np.asarray(grads[0][i]), fd, rtol=1e-6, atol=1e-9)
    fd_y = _central_difference(
        lambda v: float(_inverse_loss(params, jnp.asarray(v))), y
    )
    np.testing.assert_allclose(np.asarray(grads[1]), fd_y, rtol=1e-6, atol=1e-9)


def test_inverse_hessian_matches_differences_of_the_gradient():
    params = tuple(jnp.asarray(p) for p in PARAMS)
    y = jnp.asarray(POINTS[1:4])

    def loss_of_means(means):
        return _inverse_loss((params[0], means, params[2]), y)

    hessian = np.asarray(jax.hessian(loss_of_means)(params[1]))
    gradient = jax.jit(jax.grad(loss_of_means))
    fd = np.stack(
        [
            (
                np.asarray(gradient(params[1] + e * 1e-5))
                - np.asarray(gradient(params[1] - e * 1e-5))
            )
            / 2e-5
            for e in np.eye(3)
        ],
        axis=1,
    )
    np.testing.assert_allclose(hessian, fd, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(hessian, hessian.T, rtol=1e-10, atol=1e-12)


def test_forward_and_reverse_mode_agree_through_the_inverse():
    bijector = MixtureGaussianCDF(*(jnp.asarray(p) for p in PARAMS))
    y = jnp.asarray(POINTS)
    forward_mode = jax.jacfwd(bijector.inverse)(y)
    reverse_mode = jax.jacrev(bijector.inverse)(y)
    np.testing.assert_allclose(forward_mode, reverse_mode, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(
        np.diag(forward_mode), np.exp(bijector.inverse_and_log_det(y)[1]), rtol=1e-12
    )


def test_one_step_and_unrolled_newton_match_implicit_gradients():
    params = tuple(jnp.asarray(p) for p in PARAMS)
    y = jnp.asarray(POINTS)
    implicit = jax.grad(_inverse_loss)(params, y)
    one_step = jax.grad(lambda p: _inverse_loss(p, y, "one_step"))(params)
    for a, b in zip(implicit, one_step):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_unrolled_bisection_gradient_is_wrong():
    """The failure the implicit rule avoids: bisection iterates carry no θ-gradient."""

    def loss(means, inverse_grad):
        bijector = MixtureGaussianCDF(
            jnp.asarray(PARAMS[0]),
            means,
            jnp.asarray(PARAMS[2]),
            root_finder="bisection",
            max_iter=60,
            inverse_grad=inverse_grad,
        )
        return jnp.sum(bijector.inverse(jnp.asarray(POINTS)))

    means = jnp.asarray(PARAMS[1])
    implicit = np.asarray(jax.grad(loss)(means, "implicit"))
    unrolled = np.asarray(jax.grad(loss)(means, "unroll"))
    # Shifting every mean by δ shifts every root by δ: the gradient sums to N.
    np.testing.assert_allclose(implicit.sum(), len(POINTS), rtol=1e-10)
    assert np.max(np.abs(unrolled - implicit)) > 1e-3


def test_log_det_of_inverse_tail_is_finite_and_consistent():
    bijector = MixtureGaussianCDF(*(jnp.asarray(p) for p in PARAMS))
    y = jnp.array([-38.0, -20.0, 20.0, 38.0, 1e3])
    x, log_det = bijector.inverse_and_log_det(y)
    _, forward_log_det = bijector.forward_and_log_det(x)
    assert np.all(np.isfinite(np.asarray(x)))
    assert np.all(np.isfinite(np.asarray(log_det)))
    np.testing.assert_allclose(log_det, -forward_log_det, rtol=1e-10, atol=1e-10)
