"""Householder and FixedRotation: orthogonality, factorisation, pytree rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distrax_mixcdf import FixedRotation, Householder


def haar(dim, seed):
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(dim, dim)))
    return q * np.sign(np.diag(r))


def reflections_reference(vectors, x):
    """float64 NumPy: explicit matrices H_l = I - 2 v vᵀ/vᵀv, applied v_0 first."""
    w = np.eye(vectors.shape[-1])
    for v in np.asarray(vectors, np.float64):
        w = (np.eye(len(v)) - 2 * np.outer(v, v) / (v @ v)) @ w
    return np.asarray(x, np.float64) @ w.T


@jax.jit
def forward_inverse(bijector, x):
    y, fwd_ld = bijector.forward_and_log_det(x)
    back, inv_ld = bijector.inverse_and_log_det(y)
    jac = jax.vmap(jax.jacfwd(bijector.forward))(x)
    return y, fwd_ld, back, inv_ld, jnp.linalg.slogdet(jac)[1]


def test_householder_matches_explicit_reflections_and_inverts():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(5, 4)).astype(np.float32)
    x = rng.normal(size=(7, 4)).astype(np.float32)
    y, fwd_ld, back, inv_ld, slogdet = forward_inverse(Householder(vectors), x)
    np.testing.assert_allclose(y, reflections_reference(vectors, x), atol=2e-6)
    np.testing.assert_allclose(back, x, atol=2e-6)
    np.testing.assert_array_equal(fwd_ld, np.zeros(7))
    np.testing.assert_array_equal(inv_ld, np.zeros(7))
    np.testing.assert_allclose(slogdet, np.zeros(7), atol=2e-6)  # autodiff agrees


def test_householder_batched_vectors_broadcast():
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(3, 2, 4)).astype(np.float32)
    x = rng.normal(size=(3, 4)).astype(np.float32)
    y = Householder(vectors).forward(x)
    for i in range(3):
        np.testing.assert_allclose(
            y[i], reflections_reference(vectors[i], x[i]), atol=2e-6
        )


@pytest.mark.parametrize("dim", [1, 2, 3, 5])
def test_from_matrix_is_exact(dim):
    for seed in range(3):
        w = haar(dim, seed)
        bijector = Householder.from_matrix(w)
        assert bijector.num_reflections <= 2 * dim - 1
        np.testing.assert_allclose(bijector.matrix(), w, atol=1e-5)
        x = np.random.default_rng(seed).normal(size=(4, dim))
        np.testing.assert_allclose(bijector.forward(x), x @ w.T, atol=1e-5)
    # Flipping the rows to R = I needs exactly D - 1 reflections.
    if dim > 1:
        signs = np.sign(np.diag(np.linalg.qr(haar(dim, 9).T)[1]))
        assert Householder.from_matrix(
            haar(dim, 9) * signs[:, None]
        ).num_reflections in (
            dim - 1,
            dim,
        )


def test_zero_vector_is_identity_with_finite_gradient():
    vectors = jnp.zeros((1, 3))
    x = jnp.arange(3.0)
    np.testing.assert_array_equal(Householder(vectors).forward(x), x)
    grad = jax.grad(lambda v: Householder(v).forward(x).sum())(vectors)
    assert np.all(np.isfinite(grad))


def test_pytree_leaves_and_gradients():
    vectors = jnp.asarray(np.random.default_rng(2).normal(size=(2, 3)), jnp.float32)
    householder = Householder(vectors)
    assert jax.tree_util.tree_leaves(householder) == [householder.vectors]
    x = jnp.array([[1.0, 2.0, 3.0]])
    # The map depends on the vectors: a non-trivial loss has a non-zero gradient.
    grad = jax.grad(lambda b: (b.forward(x)[0, 0] - 1.0) ** 2)(householder)
    assert isinstance(grad, Householder)
    assert np.linalg.norm(grad.vectors) > 1e-3
    fixed = FixedRotation(haar(3, 0))
    assert jax.tree_util.tree_leaves(fixed) == []  # nothing for optax to train
    jitted = jax.jit(lambda b, x: b.forward(x))
    np.testing.assert_allclose(jitted(fixed, x), x @ haar(3, 0).T, atol=1e-6)


def test_fixed_rotation_pca_decorrelates_in_decreasing_variance():
    rng = np.random.default_rng(3)
    mixing = rng.normal(size=(3, 3))
    data = rng.normal(size=(500, 3)) * np.array([3.0, 1.0, 0.3]) @ mixing
    rotation = FixedRotation.pca(data.astype(np.float32))
    z = np.asarray(rotation.forward(data.astype(np.float32)), np.float64)
    cov = np.cov(z.T)
    off_diagonal = cov - np.diag(np.diag(cov))
    assert np.max(np.abs(off_diagonal)) < 1e-3 * np.max(np.diag(cov))
    assert np.all(np.diff(np.diag(cov)) < 0)
    np.testing.assert_allclose(rotation.inverse(z.astype(np.float32)), data, atol=1e-4)
    w = np.asarray(FixedRotation.random(jax.random.PRNGKey(0), 4).matrix())
    np.testing.assert_allclose(w @ w.T, np.eye(4), atol=1e-6)


def test_to_tfp_matches():
    rotation = Householder(
        np.random.default_rng(4).normal(size=(2, 3)).astype(np.float32)
    )
    x = jnp.ones((2, 3))
    tfp_bijector = rotation.to_tfp()
    np.testing.assert_allclose(tfp_bijector.forward(x), rotation.forward(x), atol=1e-6)
    np.testing.assert_allclose(
        tfp_bijector.forward_log_det_jacobian(x, event_ndims=1), np.zeros(2)
    )


def test_bad_input_raises():
    with pytest.raises(ValueError, match="not orthogonal"):
        FixedRotation(np.array([[1.0, 1.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="square"):
        Householder.from_matrix(np.ones((2, 3)))
    with pytest.raises(TypeError, match="vectors"):
        Householder(np.ones((2, 3), np.int32))
    with pytest.raises(ValueError, match="event axis of size D = 3"):
        Householder(np.ones((2, 3), np.float32)).forward(jnp.ones((4, 2)))
    with pytest.raises(ValueError, match=r"N >= 2"):
        FixedRotation.pca(np.ones((1, 3)))
