"""jit, vmap and grad over the layer's pytree, against scipy and differences."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats as st
from helpers import (
    close,
    jit_forward,
    jit_inverse,
    mixture64,
    scipy_forward,
    scipy_inverse,
)

from distrax_mixcdf import MixtureGaussianCDF

K = 3  # mixture components per layer


def test_jitted_forward_matches_scipy_reference(bij, xs):
    y, log_det = jit_forward(bij, xs)
    y_ref, log_det_ref = scipy_forward(xs, bij)
    close(y, y_ref, rtol=2e-5, atol=2e-5)
    close(log_det, log_det_ref, rtol=1e-4, atol=1e-4)


def test_jit_with_bijector_argument_matches_eager(bij, bij2, xs, ys):
    assert len(jax.tree.leaves(bij)) == 3
    y_eager, ld_eager = bij.forward_and_log_det(xs)
    x_eager, ild_eager = bij.inverse_and_log_det(ys)
    y_jit, ld_jit = jit_forward(bij, xs)
    x_jit, ild_jit = jit_inverse(bij, ys)
    close(y_jit, y_eager, rtol=1e-6, atol=1e-6)
    close(ld_jit, ld_eager, rtol=1e-6, atol=1e-6)
    close(x_jit, x_eager, rtol=1e-6, atol=1e-6)
    close(ild_jit, ild_eager, rtol=1e-6, atol=1e-6)
    # The parameters are arguments, not baked-in constants: new values (same
    # shapes, same compiled function) and a new K (a retrace) give new numbers.
    for other in (MixtureGaussianCDF(*(p + 0.25 for p in jax.tree.leaves(bij))), bij2):
        close(
            jit_forward(other, xs)[0], scipy_forward(xs, other)[0], rtol=2e-5, atol=2e-5
        )
        close(jit_inverse(other, ys)[0], scipy_inverse(ys, other), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def stacked():
    rng = np.random.default_rng(4)
    params = jnp.asarray(rng.normal(size=(5, 3 * K)) * 0.6, jnp.float32)
    x = jnp.asarray(rng.normal(size=(5, 7)) * 2.0, jnp.float32)
    return params, x


def test_vmap_over_stacked_params(stacked):
    params, x = stacked

    @jax.jit
    @jax.vmap
    def apply(p, xi):
        b = MixtureGaussianCDF.from_params(p)
        y, ld = b.forward_and_log_det(xi)
        return y, ld, b.inverse(y)

    y, ld, x_back = apply(params, x)
    for i in range(params.shape[0]):
        y_ref, ld_ref = scipy_forward(x[i], MixtureGaussianCDF.from_params(params[i]))
        close(y[i], y_ref, rtol=2e-5, atol=2e-5)
        close(ld[i], ld_ref, rtol=1e-4, atol=1e-4)
    close(x_back, x, rtol=1e-4, atol=1e-4)


def test_vmap_over_bijector_pytree(stacked):
    params, x = stacked
    singles = [MixtureGaussianCDF.from_params(p) for p in params]
    batched = jax.tree.map(lambda *leaves: jnp.stack(leaves), *singles)
    assert isinstance(batched, MixtureGaussianCDF)
    assert all(leaf.shape == (5, K) for leaf in jax.tree.leaves(batched))

    @jax.jit
    @jax.vmap
    def apply(b, xi):
        y, ld = b.forward_and_log_det(xi)
        return y, ld, *b.inverse_and_log_det(y)

    y, ld, x_back, ild = apply(batched, x)
    for i, b in enumerate(singles):
        y_ref, ld_ref = scipy_forward(x[i], b)
        close(y[i], y_ref, rtol=2e-5, atol=2e-5)
        close(ld[i], ld_ref, rtol=1e-4, atol=1e-4)
    close(x_back, x, rtol=1e-4, atol=1e-4)
    close(ild, -ld, rtol=1e-4, atol=1e-4)


_WEIGHTS = jnp.linspace(-1.0, 1.0, 9)
_X_POINTS = jnp.linspace(-3.0, 3.0, 9)
# Includes y = 0 (F(x) = 1/2): an earlier version's forward had a zero parameter
# gradient exactly there, which made the inverse's implicit gradient wrong.
_Y_POINTS = jnp.linspace(-2.0, 2.0, 9)


def _loss_forward(b):
    y, ld = b.forward_and_log_det(_X_POINTS)
    return jnp.sum(_WEIGHTS * y + 0.5 * y**2 + ld)


def _loss_inverse(b):
    x, ld = b.inverse_and_log_det(_Y_POINTS)
    return jnp.sum(_WEIGHTS * x + 0.1 * x**2 + ld)


def _central_differences(loss, b, eps=1e-2):
    loss = jax.jit(loss)
    leaves, treedef = jax.tree.flatten(b)
    out = []
    for i, leaf in enumerate(leaves):
        g = np.zeros(leaf.shape)
        for j in range(leaf.size):
            step = np.zeros(leaf.size, np.float32)
            step[j] = eps
            step = step.reshape(leaf.shape)
            plus = [v + step if n == i else v for n, v in enumerate(leaves)]
            minus = [v - step if n == i else v for n, v in enumerate(leaves)]
            diff = float(loss(treedef.unflatten(plus))) - float(
                loss(treedef.unflatten(minus))
            )
            g.flat[j] = diff / (2 * eps)
        out.append(g)
    return out


@pytest.mark.parametrize("loss", [_loss_forward, _loss_inverse], ids=["fwd", "inv"])
def test_grad_wrt_bijector_matches_finite_differences(bij, loss):
    grads = jax.jit(jax.grad(loss))(bij)
    assert isinstance(grads, MixtureGaussianCDF)
    fd = _central_differences(loss, bij)
    names = ("logits", "means", "log_scales")
    for name, g, g_fd in zip(names, jax.tree.leaves(grads), fd):
        scale = np.max(np.abs(g_fd))
        assert scale > 1e-2, name  # the loss really depends on this parameter
        np.testing.assert_allclose(
            np.asarray(g), g_fd, rtol=2e-2, atol=2e-2 * scale, err_msg=name
        )
    np.testing.assert_allclose(np.sum(np.asarray(grads.logits)), 0.0, atol=1e-3)


def test_parameter_gradients_at_the_median(bij):
    """At F(x) = 1/2 (y = 0) the gradients are the analytic ones, not zero."""
    x_med = float(scipy_inverse(np.zeros(1), bij)[0])
    log_w, mu, sigma = mixture64(bij)
    z = (x_med - mu) / sigma
    component_density = np.exp(log_w) * st.norm.pdf(z) / sigma
    # dy/dμ_k = -w_k φ(z_k)/σ_k / φ(0); dx/dμ_k at y = 0 = w_k φ(z_k)/σ_k / f(x).
    dy_dmeans = -component_density / st.norm.pdf(0.0)
    dx_dmeans = component_density / np.sum(component_density)

    @jax.jit
    def grads(b):
        forward = jax.grad(lambda b: b.forward(jnp.float32(x_med)))(b)
        inverse = jax.grad(lambda b: b.inverse(jnp.float32(0.0)))(b)
        return forward.means, inverse.means

    g_forward, g_inverse = grads(bij)
    close(g_forward, dy_dmeans, rtol=1e-3, atol=1e-5)
    close(g_inverse, dx_dmeans, rtol=1e-3, atol=1e-5)
