"""MixtureGaussianCDF inside the JAX ecosystem: distrax, TFP, jit/vmap/grad, optax.

Every check is numeric: compositions are compared against autodiff of the scalar
maps or against scipy float64 formulas that share no code with the package.
Float32 throughout (x64 is never enabled here).
"""

from __future__ import annotations

import distrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.special as sps
import scipy.stats as st
import tensorflow_probability.substrates.jax as tfp

from distrax_mixcdf import MixtureGaussianCDF

tfd, tfb = tfp.distributions, tfp.bijectors

K = 3
D = 4


# -- independent float64 references (scipy) ---------------------------------------


def _mixture64(bij):
    logits, means, log_scales = (np.asarray(a, np.float64) for a in jax.tree.leaves(bij))
    return sps.log_softmax(logits, axis=-1), means, np.exp(log_scales)


def mixture_cdf(x, bij):
    log_w, mu, sigma = _mixture64(bij)
    z = (np.asarray(x, np.float64)[..., None] - mu) / sigma
    return np.sum(np.exp(log_w) * st.norm.cdf(z), axis=-1)


def mixture_logpdf(x, bij):
    log_w, mu, sigma = _mixture64(bij)
    z = (np.asarray(x, np.float64)[..., None] - mu) / sigma
    return sps.logsumexp(log_w + st.norm.logpdf(z) - np.log(sigma), axis=-1)


def reference_forward(x, bij):
    """``(y, log|dy/dx|)`` in float64, using the smaller tail for accuracy."""
    log_w, mu, sigma = _mixture64(bij)
    z = (np.asarray(x, np.float64)[..., None] - mu) / sigma
    lower = np.sum(np.exp(log_w) * st.norm.cdf(z), axis=-1)
    upper = np.sum(np.exp(log_w) * st.norm.sf(z), axis=-1)
    y = np.where(lower < upper, st.norm.ppf(lower), st.norm.isf(upper))
    return y, mixture_logpdf(x, bij) - st.norm.logpdf(y)


def close(actual, desired, rtol=1e-5, atol=1e-5):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(desired), rtol, atol)


# -- shared, jitted helpers (compiled once per shape) -----------------------------


@jax.jit
def fwd(bij, x):
    return bij.forward_and_log_det(x)


@jax.jit
def inv(bij, y):
    return bij.inverse_and_log_det(y)


def data_density(bij):
    return distrax.Transformed(distrax.Normal(0.0, 1.0), distrax.Inverse(bij))


def tfp_data_density(bij):
    return tfd.TransformedDistribution(tfd.Normal(0.0, 1.0), tfb.Invert(bij.to_tfp()))


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


def test_jitted_forward_matches_scipy_reference(bij, xs):
    y, log_det = fwd(bij, xs)
    y_ref, log_det_ref = reference_forward(xs, bij)
    close(y, y_ref, rtol=2e-5, atol=2e-5)
    close(log_det, log_det_ref, rtol=1e-4, atol=1e-4)


# -- distrax.Chain ----------------------------------------------------------------


def test_chain_round_trips_and_log_dets_match_autodiff(bij, bij2, xs):
    # Chain([a, b, c]).forward(x) == a(b(c(x))): data → bij → bij2 → affine → tanh.
    chain = distrax.Chain(
        [distrax.Tanh(), distrax.ScalarAffine(shift=0.2, scale=0.5), bij2, bij]
    )
    x = xs[4:-4]  # keep tanh away from saturation so float32 inverts cleanly
    y, fldj = jax.jit(chain.forward_and_log_det)(x)
    assert np.all(np.abs(np.asarray(y)) < 1.0)
    expected_y = np.tanh(0.2 + 0.5 * np.asarray(bij2.forward(bij.forward(x))))
    close(y, expected_y, rtol=1e-5, atol=1e-5)

    x_back, ildj = jax.jit(chain.inverse_and_log_det)(y)
    close(x_back, x, rtol=1e-4, atol=1e-4)
    close(ildj, -fldj, rtol=1e-4, atol=1e-4)

    dydx = jax.vmap(jax.grad(chain.forward))(x)
    close(fldj, np.log(np.abs(np.asarray(dydx))), rtol=1e-4, atol=1e-4)

    # Inverse direction: start in latent space (inside tanh's range).
    y0 = jnp.linspace(-0.8, 0.8, 17)
    x0, ildj0 = jax.jit(chain.inverse_and_log_det)(y0)
    close(jax.jit(chain.forward)(x0), y0, rtol=1e-5, atol=1e-5)
    dxdy = jax.vmap(jax.grad(chain.inverse))(y0)
    close(ildj0, np.log(np.abs(np.asarray(dxdy))), rtol=1e-4, atol=1e-4)


# -- distrax.Block ----------------------------------------------------------------


def test_block_log_det_is_sum_of_per_dimension_log_dets():
    rng = np.random.default_rng(0)
    params = jnp.asarray(rng.normal(size=(D, 3 * K)) * 0.7, jnp.float32)
    marginal = MixtureGaussianCDF.from_params(params)
    assert marginal.batch_shape == (D,)
    block = distrax.Block(marginal, 1)
    x = jnp.asarray(rng.normal(size=(16, D)) * 1.5, jnp.float32)

    y, log_det = jax.jit(block.forward_and_log_det)(x)
    assert y.shape == (16, D) and log_det.shape == (16,)
    per_dim = [MixtureGaussianCDF.from_params(params[d]) for d in range(D)]
    y_cols, ld_cols = zip(*(fwd(b, x[:, d]) for d, b in enumerate(per_dim)))
    close(y, np.stack(y_cols, axis=-1))
    close(log_det, np.sum(np.stack(ld_cols, axis=-1), axis=-1), rtol=1e-5, atol=1e-5)
    ref = [reference_forward(x[:, d], b) for d, b in enumerate(per_dim)]
    close(log_det, sum(r[1] for r in ref), rtol=1e-4, atol=2e-4)

    x_back, inv_log_det = jax.jit(block.inverse_and_log_det)(y)
    close(x_back, x, rtol=1e-4, atol=1e-4)
    close(inv_log_det, -log_det, rtol=1e-4, atol=1e-4)


# -- distrax.Inverse --------------------------------------------------------------


def test_inverse_wrapper_swaps_directions_and_negates_log_dets(bij, xs, ys):
    inverted = distrax.Inverse(bij)
    x, ld = inverted.forward_and_log_det(ys)
    x_direct, ld_direct = bij.inverse_and_log_det(ys)
    close(x, x_direct, rtol=0, atol=0)
    close(ld, ld_direct, rtol=0, atol=0)
    close(ld, -reference_forward(x, bij)[1], rtol=1e-4, atol=1e-4)
    close(inverted.forward_log_det_jacobian(ys), -bij.forward_log_det_jacobian(x))

    y, ld_inv = inverted.inverse_and_log_det(xs)
    close(y, bij.forward(xs), rtol=0, atol=0)
    close(ld_inv, -bij.forward_log_det_jacobian(xs), rtol=0, atol=0)


# -- distrax.Transformed: the data density ----------------------------------------


def test_transformed_log_prob_matches_scipy(bij, xs):
    dist = data_density(bij)
    lp = jax.jit(lambda b, x: data_density(b).log_prob(x))(bij, xs)
    y_ref, log_det_ref = reference_forward(xs, bij)
    close(lp, st.norm.logpdf(y_ref) + log_det_ref, rtol=1e-5, atol=2e-5)
    close(lp, mixture_logpdf(xs, bij), rtol=1e-5, atol=2e-5)
    close(dist.log_prob(xs), lp, rtol=1e-6, atol=1e-6)


def test_transformed_density_integrates_to_one(bij):
    _, mu, sigma = _mixture64(bij)
    grid = np.linspace(np.min(mu - 14 * sigma), np.max(mu + 14 * sigma), 40001)
    lp = jax.jit(lambda b, x: data_density(b).log_prob(x))(bij, jnp.asarray(grid))
    assert np.all(np.isfinite(np.asarray(lp)))
    density = np.exp(np.asarray(lp, np.float64))
    assert abs(np.trapezoid(density, grid) - 1.0) < 1e-4


@pytest.fixture(scope="module")
def draws(bij):
    dist = data_density(bij)
    key = jax.random.PRNGKey(0)
    samples = jax.jit(lambda k: dist.sample(seed=k, sample_shape=(5000,)))(key)
    pair = jax.jit(lambda k: dist.sample_and_log_prob(seed=k, sample_shape=(5000,)))
    return samples, *pair(key)


def test_sample_and_log_prob_are_consistent(bij, draws):
    samples, samples2, lp = draws
    assert samples.shape == (5000,) and lp.shape == (5000,)
    assert np.all(np.isfinite(np.asarray(samples)))
    close(samples2, samples, rtol=1e-6, atol=1e-6)  # same key, same base draw
    close(lp, data_density(bij).log_prob(samples2), rtol=1e-4, atol=1e-4)
    close(lp, mixture_logpdf(samples2, bij), rtol=1e-4, atol=1e-4)


def test_samples_follow_the_mixture_ks(bij, draws):
    samples = np.asarray(draws[0], np.float64)
    result = st.kstest(samples, lambda s: mixture_cdf(s, bij))
    assert result.pvalue > 0.01
    # ... and a clearly different mixture is rejected by the same test.
    shifted = st.kstest(samples + 0.3, lambda s: mixture_cdf(s, bij))
    assert shifted.pvalue < 1e-6


# -- couplings (Flow++-style mixture-CDF coupling) ---------------------------------


def _conditioner(n_in, n_out, seed):
    rng = np.random.default_rng(seed)
    weights = jnp.asarray(rng.normal(size=(n_in, n_out * 3 * K)) * 0.5, jnp.float32)
    base = jnp.tile(
        jnp.array([0.2, -0.1, 0.0, -1.5, 0.0, 1.5, -0.3, 0.0, 0.2]), (n_out, 1)
    )

    def conditioner(x):
        h = jnp.tanh(x @ weights).reshape((*x.shape[:-1], n_out, 3 * K))
        return base + 0.5 * h

    return conditioner


@pytest.fixture(scope="module")
def coupling_inputs():
    rng = np.random.default_rng(1)
    return jnp.asarray(rng.normal(size=(12, D)) * 1.5, jnp.float32)


def _check_coupling(coupling, x, fixed):
    y, log_det = jax.jit(coupling.forward_and_log_det)(x)
    assert y.shape == x.shape and log_det.shape == x.shape[:1]
    close(y[:, fixed], x[:, fixed], rtol=0, atol=0)
    changed = [d for d in range(D) if d not in fixed]
    assert np.all(np.abs(np.asarray(y[:, changed] - x[:, changed])) > 1e-4)

    jac = jax.vmap(jax.jacfwd(coupling.forward))(x)
    _, ref_log_det = np.linalg.slogdet(np.asarray(jac, np.float64))
    close(log_det, ref_log_det, rtol=1e-4, atol=1e-4)

    x_back, inv_log_det = jax.jit(coupling.inverse_and_log_det)(y)
    close(x_back, x, rtol=1e-4, atol=1e-4)
    close(inv_log_det, -log_det, rtol=1e-4, atol=1e-4)


def test_masked_coupling(coupling_inputs):
    mask = jnp.array([True, False, True, False])
    coupling = distrax.MaskedCoupling(
        mask=mask,
        conditioner=_conditioner(D, D, seed=2),
        bijector=MixtureGaussianCDF.from_params,
    )
    _check_coupling(coupling, coupling_inputs, fixed=[0, 2])


def test_split_coupling(coupling_inputs):
    coupling = distrax.SplitCoupling(
        split_index=2,
        event_ndims=1,
        conditioner=_conditioner(2, D - 2, seed=3),
        bijector=MixtureGaussianCDF.from_params,
    )
    _check_coupling(coupling, coupling_inputs, fixed=[0, 1])


# -- jit / vmap / grad over the bijector pytree ------------------------------------


def test_jit_with_bijector_argument_matches_eager(bij, bij2, xs, ys):
    assert len(jax.tree.leaves(bij)) == 3
    for b in (bij, MixtureGaussianCDF(*(leaf + 0.25 for leaf in jax.tree.leaves(bij)))):
        y_eager, ld_eager = b.forward_and_log_det(xs)
        y_jit, ld_jit = fwd(b, xs)
        close(y_jit, y_eager, rtol=1e-6, atol=1e-6)
        close(ld_jit, ld_eager, rtol=1e-6, atol=1e-6)
        close(y_jit, reference_forward(xs, b)[0], rtol=2e-5, atol=2e-5)
        x_eager, ild_eager = b.inverse_and_log_det(ys)
        x_jit, ild_jit = inv(b, ys)
        close(x_jit, x_eager, rtol=1e-6, atol=1e-6)
        close(ild_jit, ild_eager, rtol=1e-6, atol=1e-6)
    # A bijector with a different K retraces instead of reusing stale constants.
    close(fwd(bij2, xs)[0], reference_forward(xs, bij2)[0], rtol=2e-5, atol=2e-5)


@pytest.fixture(scope="module")
def stacked():
    rng = np.random.default_rng(4)
    params = jnp.asarray(rng.normal(size=(5, 3 * K)) * 0.6, jnp.float32)
    x = jnp.asarray(rng.normal(size=(5, 7)) * 2.0, jnp.float32)
    return params, x


def test_vmap_over_stacked_params(stacked):
    params, x = stacked

    @jax.vmap
    def apply(p, xi):
        b = MixtureGaussianCDF.from_params(p)
        y, ld = b.forward_and_log_det(xi)
        x_back, _ = b.inverse_and_log_det(y)
        return y, ld, x_back

    y, ld, x_back = jax.jit(apply)(params, x)
    for i in range(params.shape[0]):
        y_ref, ld_ref = reference_forward(x[i], MixtureGaussianCDF.from_params(params[i]))
        close(y[i], y_ref, rtol=2e-5, atol=2e-5)
        close(ld[i], ld_ref, rtol=1e-4, atol=1e-4)
    close(x_back, x, rtol=1e-4, atol=1e-4)


def test_vmap_over_bijector_pytree(stacked):
    params, x = stacked
    singles = [MixtureGaussianCDF.from_params(p) for p in params]
    batched = jax.tree.map(lambda *leaves: jnp.stack(leaves), *singles)
    assert isinstance(batched, MixtureGaussianCDF)
    assert all(leaf.shape == (5, K) for leaf in jax.tree.leaves(batched))

    y, ld = jax.vmap(fwd)(batched, x)
    x_back, ild = jax.vmap(inv)(batched, y)
    for i, b in enumerate(singles):
        y_ref, ld_ref = reference_forward(x[i], b)
        close(y[i], y_ref, rtol=2e-5, atol=2e-5)
        close(ld[i], ld_ref, rtol=1e-4, atol=1e-4)
    close(x_back, x, rtol=1e-4, atol=1e-4)
    close(ild, -ld, rtol=1e-4, atol=1e-4)


_WX = jnp.linspace(-1.0, 1.0, 9)
_XG = jnp.linspace(-3.0, 3.0, 9)
_YG = jnp.linspace(-2.0, 2.0, 9)


def _loss_forward(b):
    y, ld = b.forward_and_log_det(_XG)
    return jnp.sum(_WX * y + 0.5 * y**2 + ld)


def _loss_inverse(b):
    x, ld = b.inverse_and_log_det(_YG)
    return jnp.sum(_WX * x + 0.1 * x**2 + ld)


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
    for name, g, g_fd in zip(("logits", "means", "log_scales"), jax.tree.leaves(grads), fd):
        scale = np.max(np.abs(g_fd))
        assert scale > 1e-2, name  # the loss really depends on this parameter
        np.testing.assert_allclose(np.asarray(g), g_fd, rtol=2e-2, atol=2e-2 * scale)
    np.testing.assert_allclose(np.sum(np.asarray(grads.logits)), 0.0, atol=1e-3)


# -- TFP JAX substrate -------------------------------------------------------------


def test_tfp_transformed_distribution_matches_distrax(bij, xs):
    lp_tfp = jax.jit(lambda b, x: tfp_data_density(b).log_prob(x))(bij, xs)
    close(lp_tfp, data_density(bij).log_prob(xs), rtol=1e-5, atol=1e-5)
    close(lp_tfp, mixture_logpdf(xs, bij), rtol=1e-5, atol=2e-5)

    samples = tfp_data_density(bij).sample(64, seed=jax.random.PRNGKey(1))
    assert samples.shape == (64,) and np.all(np.isfinite(np.asarray(samples)))
    close(tfp_data_density(bij).log_prob(samples), mixture_logpdf(samples, bij), 1e-4, 1e-4)


def test_tfp_chain_matches_distrax_chain(bij, xs, ys):
    tfp_chain = tfb.Chain([bij.to_tfp(), tfb.Shift(1.0)])
    dx_chain = distrax.Chain([bij, distrax.ScalarAffine(shift=1.0)])
    close(tfp_chain.forward(xs), dx_chain.forward(xs), rtol=1e-6, atol=1e-6)
    close(tfp_chain.forward(xs), reference_forward(xs + 1.0, bij)[0], 2e-5, 2e-5)
    close(tfp_chain.inverse(ys), dx_chain.inverse(ys), rtol=1e-6, atol=1e-6)
    close(
        tfp_chain.forward_log_det_jacobian(xs, event_ndims=0),
        dx_chain.forward_log_det_jacobian(xs),
        rtol=1e-6,
        atol=1e-6,
    )
    close(
        tfp_chain.inverse_log_det_jacobian(ys, event_ndims=0),
        dx_chain.inverse_log_det_jacobian(ys),
        rtol=1e-6,
        atol=1e-6,
    )
    close(tfp_chain.inverse(tfp_chain.forward(xs)), xs, rtol=1e-4, atol=1e-4)


def test_tfp_log_prob_gradients_match_distrax(bij, xs):
    def nll_tfp(b, x):
        return -jnp.mean(tfp_data_density(b).log_prob(x))

    def nll_distrax(b, x):
        return -jnp.mean(data_density(b).log_prob(x))

    g_tfp = jax.jit(jax.grad(nll_tfp))(bij, xs)
    g_dx = jax.grad(nll_distrax)(bij, xs)
    assert isinstance(g_tfp, MixtureGaussianCDF)
    for a, b in zip(jax.tree.leaves(g_tfp), jax.tree.leaves(g_dx)):
        assert np.max(np.abs(np.asarray(b))) > 1e-3
        close(a, b, rtol=1e-4, atol=1e-5)


def test_raw_distrax_bijector_is_rejected_by_tfp(bij, xs):
    """TFP needs its own bijector interface; this is why ``to_tfp()`` exists."""
    with pytest.raises(AttributeError):
        tfd.TransformedDistribution(tfd.Normal(0.0, 1.0), bij).log_prob(xs)
    assert isinstance(bij.to_tfp(), tfb.Bijector)


# -- training ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def bimodal_data():
    rng = np.random.default_rng(13)
    x = np.concatenate([rng.normal(-2.0, 0.5, 256), rng.normal(1.5, 0.7, 256)])
    return jnp.asarray(x, jnp.float32)


def _init_bijector():
    return MixtureGaussianCDF(jnp.zeros(K), jnp.array([-0.5, 0.0, 0.5]), jnp.zeros(K))


def _nll(b, x):
    y, log_det = b.forward_and_log_det(x)
    return -jnp.mean(jax.scipy.stats.norm.logpdf(y) + log_det)


_OPT = optax.adam(1e-2)


def test_training_equinox_partition_loop(bimodal_data):
    bij = _init_bijector()
    params, static = eqx.partition(bij, eqx.is_inexact_array)

    def loss_fn(params, static, x):
        return _nll(eqx.combine(params, static), x)

    @eqx.filter_jit
    def step(params, static, opt_state, x):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(params, static, x)
        updates, opt_state = _OPT.update(grads, opt_state, params)
        return eqx.apply_updates(params, updates), opt_state, loss

    opt_state = _OPT.init(params)
    losses = []
    for _ in range(50):
        params, opt_state, loss = step(params, static, opt_state, bimodal_data)
        losses.append(float(loss))
    trained = eqx.combine(params, static)
    assert isinstance(trained, MixtureGaussianCDF)
    final = float(_nll(trained, bimodal_data))
    assert np.isfinite(losses).all()
    assert final < losses[0] - 0.1
    assert final <= min(losses) + 1e-3
    assert all(
        not np.allclose(a, b)
        for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(bij))
    )
    # The trained model's NLL is the scipy mixture NLL of its own parameters.
    close(final, -np.mean(mixture_logpdf(bimodal_data, trained)), rtol=1e-5, atol=1e-5)


def test_equinox_partition_of_distrax_chain_fails():
    """distrax #193: ``eqx.partition`` cannot rebuild a ``distrax.Chain``.

    ``Chain`` is a distrax ``Jittable`` whose flattening depends on which
    attributes are arrays, so replacing leaves with ``None`` changes its
    structure and ``eqx.partition`` raises. See
    ``test_chain_training_with_tree_util_flattening`` for the pattern that works.
    """
    chain = distrax.Chain([_init_bijector(), distrax.ScalarAffine(shift=0.0, scale=1.0)])
    with pytest.raises(ValueError, match="pytree structure"):
        eqx.partition(chain, eqx.is_inexact_array)


def test_chain_training_with_tree_util_flattening(bimodal_data):
    chain = distrax.Chain(
        [
            _init_bijector(),
            distrax.ScalarAffine(shift=jnp.asarray(0.0), scale=jnp.asarray(1.0)),
        ]
    )
    leaves, treedef = jax.tree.flatten(chain)
    trainable = [
        i
        for i, leaf in enumerate(leaves)
        if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jnp.floating)
    ]
    assert len(trainable) >= 4  # three mixture arrays plus the affine's parameters
    params = [leaves[i] for i in trainable]

    def rebuild(params):
        new = list(leaves)
        for i, p in zip(trainable, params):
            new[i] = p
        return treedef.unflatten(new)

    @jax.jit
    def step(params, opt_state, x):
        loss, grads = jax.value_and_grad(lambda p: _nll(rebuild(p), x))(params)
        updates, opt_state = _OPT.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state = _OPT.init(params)
    first = None
    for _ in range(30):
        params, opt_state, loss = step(params, opt_state, bimodal_data)
        first = float(loss) if first is None else first
    trained = rebuild(params)
    assert isinstance(trained, distrax.Chain)
    assert float(_nll(trained, bimodal_data)) < first - 0.05
    # The rebuilt chain is the composition of its rebuilt parts.
    mix = trained.bijectors[0]
    assert isinstance(mix, MixtureGaussianCDF)
    close(
        trained.forward(bimodal_data[:8]),
        mix.forward(trained.bijectors[1].forward(bimodal_data[:8])),
    )


def test_training_plain_value_and_grad_over_bijector(bimodal_data):
    bij = _init_bijector()

    def loss_fn(b, x):
        return -jnp.mean(data_density(b).log_prob(x))

    @jax.jit
    def step(b, opt_state, x):
        loss, grads = jax.value_and_grad(loss_fn)(b, x)
        updates, opt_state = _OPT.update(grads, opt_state, b)
        return optax.apply_updates(b, updates), opt_state, loss

    opt_state = _OPT.init(bij)
    trained, losses = bij, []
    for _ in range(50):
        trained, opt_state, loss = step(trained, opt_state, bimodal_data)
        losses.append(float(loss))
    assert isinstance(trained, MixtureGaussianCDF)
    assert losses[-1] < losses[0] - 0.1
    close(losses[0], -np.mean(mixture_logpdf(bimodal_data, bij)), rtol=1e-5, atol=1e-5)
    for before, after in zip(jax.tree.leaves(bij), jax.tree.leaves(trained)):
        assert np.max(np.abs(np.asarray(after - before))) > 0.05
