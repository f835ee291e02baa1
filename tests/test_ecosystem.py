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
from scipy.optimize import brentq

from distrax_mixcdf import MixtureGaussianCDF

tfd, tfb = tfp.distributions, tfp.bijectors

K = 3
D = 4


# -- independent float64 references (scipy) ---------------------------------------


def _mixture64(bij):
    logits, means, log_scales = (
        np.asarray(a, np.float64) for a in jax.tree.leaves(bij)
    )
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


def reference_inverse(y, bij):
    """``x`` with ``F(x) = Φ(y)`` by float64 bracketing (scipy ``brentq``)."""
    log_w, mu, sigma = _mixture64(bij)
    w = np.exp(log_w)
    lo, hi = np.min(mu - 40 * sigma), np.max(mu + 40 * sigma)

    def residual(x, target):
        z = (x - mu) / sigma
        lower, upper = np.sum(w * st.norm.cdf(z)), np.sum(w * st.norm.sf(z))
        value = st.norm.ppf(lower) if lower < upper else st.norm.isf(upper)
        return value - target

    flat = np.asarray(y, np.float64).ravel()
    roots = [brentq(residual, lo, hi, args=(t,), xtol=1e-14, rtol=1e-14) for t in flat]
    return np.reshape(roots, np.shape(y))


def close(actual, desired, rtol=1e-5, atol=1e-5, **kwargs):
    np.testing.assert_allclose(
        np.asarray(actual), np.asarray(desired), rtol, atol, **kwargs
    )


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


def test_standard_normal_layer_is_the_identity_in_both_far_tails():
    # K = 1 with μ = 0, σ = 1 is the identity map, including where float32
    # tail masses underflow (|x| ≳ 13): the density test below integrates there.
    identity = MixtureGaussianCDF(jnp.zeros(1), jnp.zeros(1), jnp.zeros(1))
    x = jnp.array([-30.0, -14.0, -13.0, -9.0, 9.0, 13.0, 14.0, 30.0])
    y, log_det = fwd(identity, x)
    close(y, x, rtol=1e-5, atol=0)
    close(log_det, np.zeros(8), rtol=0, atol=1e-4)


# -- distrax.Chain ----------------------------------------------------------------


@jax.jit
def _chain_checks(chain, x, y0):
    y, fldj = chain.forward_and_log_det(x)
    # One inverse pass for both round trips: data → latent → data and latent → data.
    x_all, ildj_all = chain.inverse_and_log_det(jnp.concatenate([y, y0]))
    x_back, x0 = x_all[: x.size], x_all[x.size :]
    return {
        "y": y,
        "fldj": fldj,
        "x_back": x_back,
        "ildj": ildj_all[: x.size],
        "dydx": jax.vmap(jax.grad(chain.forward))(x),
        "x0": x0,
        "ildj0": ildj_all[x.size :],
        "y0_back": chain.forward(x0),
        "dxdy": jax.vmap(jax.grad(chain.inverse))(y0),
    }


def test_chain_round_trips_and_log_dets_match_autodiff(bij, bij2, xs):
    # Chain([a, b, c]).forward(x) == a(b(c(x))): data → bij → bij2 → affine → tanh.
    chain = distrax.Chain(
        [distrax.Tanh(), distrax.ScalarAffine(shift=0.2, scale=0.5), bij2, bij]
    )
    x = xs[4:-4]  # keep tanh away from saturation so float32 inverts cleanly
    y0 = jnp.linspace(-0.8, 0.8, 17)  # the inverse direction starts in tanh's range
    out = _chain_checks(chain, x, y0)

    expected = np.tanh(
        0.2 + 0.5 * reference_forward(reference_forward(x, bij)[0], bij2)[0]
    )
    close(out["y"], expected, rtol=2e-5, atol=2e-5)
    close(out["x_back"], x, rtol=1e-4, atol=1e-4)
    close(out["ildj"], -out["fldj"], rtol=1e-4, atol=1e-4)
    close(out["fldj"], np.log(np.abs(np.asarray(out["dydx"]))), rtol=1e-4, atol=1e-4)

    close(out["y0_back"], y0, rtol=1e-5, atol=1e-5)
    close(out["ildj0"], np.log(np.abs(np.asarray(out["dxdy"]))), rtol=1e-4, atol=1e-4)
    x0_expected = reference_inverse(
        reference_inverse((np.arctanh(np.asarray(y0, np.float64)) - 0.2) / 0.5, bij2),
        bij,
    )
    close(out["x0"], x0_expected, rtol=1e-4, atol=1e-4)


# -- distrax.Block ----------------------------------------------------------------


@jax.jit
def _block_checks(marginal, x):
    block = distrax.Block(marginal, 1)
    y, log_det = block.forward_and_log_det(x)
    x_back, inv_log_det = block.inverse_and_log_det(y)
    _, elementwise_log_det = marginal.forward_and_log_det(x)
    return y, log_det, x_back, inv_log_det, elementwise_log_det


def test_block_log_det_is_sum_of_per_dimension_log_dets():
    rng = np.random.default_rng(0)
    params = jnp.asarray(rng.normal(size=(D, 3 * K)) * 0.7, jnp.float32)
    marginal = MixtureGaussianCDF.from_params(params)
    assert marginal.batch_shape == (D,)
    x = jnp.asarray(rng.normal(size=(16, D)) * 1.5, jnp.float32)

    y, log_det, x_back, inv_log_det, elementwise = _block_checks(marginal, x)
    assert y.shape == (16, D)
    assert log_det.shape == (16,)
    assert elementwise.shape == (16, D)
    close(log_det, np.sum(np.asarray(elementwise), axis=-1), rtol=1e-6, atol=1e-6)
    per_dim = [
        reference_forward(x[:, d], MixtureGaussianCDF.from_params(params[d]))
        for d in range(D)
    ]
    close(y, np.stack([r[0] for r in per_dim], axis=-1), rtol=2e-5, atol=2e-5)
    close(log_det, sum(r[1] for r in per_dim), rtol=1e-4, atol=2e-4)
    close(x_back, x, rtol=1e-4, atol=1e-4)
    close(inv_log_det, -log_det, rtol=1e-4, atol=1e-4)


# -- distrax.Inverse --------------------------------------------------------------


@jax.jit
def _inverse_wrapper_checks(bij, xs, ys):
    inverted = distrax.Inverse(bij)
    return {
        "inv_fwd": inverted.forward_and_log_det(ys),
        "bij_inv": bij.inverse_and_log_det(ys),
        "inv_inv": inverted.inverse_and_log_det(xs),
        "bij_fwd": bij.forward_and_log_det(xs),
        "inv_fldj": inverted.forward_log_det_jacobian(ys),
        "inv_ildj": inverted.inverse_log_det_jacobian(xs),
    }


def test_inverse_wrapper_swaps_directions_and_negates_log_dets(bij, xs, ys):
    out = _inverse_wrapper_checks(bij, xs, ys)
    x, ld = out["inv_fwd"]
    close(x, out["bij_inv"][0], rtol=1e-6, atol=1e-6)
    close(ld, out["bij_inv"][1], rtol=1e-6, atol=1e-6)
    close(out["inv_fldj"], ld, rtol=1e-6, atol=1e-6)
    close(x, reference_inverse(ys, bij), rtol=1e-4, atol=1e-4)
    close(ld, -reference_forward(reference_inverse(ys, bij), bij)[1], 1e-4, 1e-4)

    y, ld_inv = out["inv_inv"]
    close(y, out["bij_fwd"][0], rtol=1e-6, atol=1e-6)
    # Inverse(bij).inverse is bij.forward: its log-det is bij's forward log-det,
    # the negation of Inverse(bij)'s forward log-det at the image point.
    close(ld_inv, out["bij_fwd"][1], rtol=1e-6, atol=1e-6)
    close(out["inv_ildj"], reference_forward(xs, bij)[1], rtol=1e-4, atol=1e-4)


# -- distrax.Transformed: the data density ----------------------------------------


@jax.jit
def data_log_prob(bij, x):
    return data_density(bij).log_prob(x)


def test_transformed_log_prob_matches_scipy(bij, xs):
    lp = data_log_prob(bij, xs)
    y_ref, log_det_ref = reference_forward(xs, bij)
    close(lp, st.norm.logpdf(y_ref) + log_det_ref, rtol=1e-5, atol=2e-5)
    close(lp, mixture_logpdf(xs, bij), rtol=1e-5, atol=2e-5)


def test_transformed_density_integrates_to_one(bij):
    _, mu, sigma = _mixture64(bij)
    grid = np.linspace(np.min(mu - 14 * sigma), np.max(mu + 14 * sigma), 40001)
    lp = data_log_prob(bij, jnp.asarray(grid, jnp.float32))
    assert np.all(np.isfinite(np.asarray(lp)))
    density = np.exp(np.asarray(lp, np.float64))
    assert abs(np.trapezoid(density, grid) - 1.0) < 1e-4


@pytest.fixture(scope="module")
def draws(bij):
    @jax.jit
    def sample_both(b, key):
        dist = data_density(b)
        samples = dist.sample(seed=key, sample_shape=(5000,))
        return samples, *dist.sample_and_log_prob(seed=key, sample_shape=(5000,))

    return sample_both(bij, jax.random.PRNGKey(0))


def test_sample_and_log_prob_are_consistent(bij, draws):
    samples, samples2, lp = draws
    assert samples.shape == (5000,)
    assert lp.shape == (5000,)
    assert np.all(np.isfinite(np.asarray(samples)))
    close(samples2, samples, rtol=1e-6, atol=1e-6)  # same key, same base draw
    close(lp, data_log_prob(bij, samples2), rtol=1e-4, atol=1e-4)
    close(lp, mixture_logpdf(samples2, bij), rtol=1e-4, atol=1e-4)


def test_samples_follow_the_mixture_ks(bij, draws):
    samples = np.asarray(draws[0], np.float64)
    result = st.kstest(samples, lambda s: mixture_cdf(s, bij))
    assert result.pvalue > 0.01
    # ... and the same test rejects a slightly shifted sample.
    assert st.kstest(samples + 0.3, lambda s: mixture_cdf(s, bij)).pvalue < 1e-6


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
    @jax.jit
    def run(x):
        y, log_det = coupling.forward_and_log_det(x)
        x_back, inv_log_det = coupling.inverse_and_log_det(y)
        jac = jax.vmap(jax.jacfwd(coupling.forward))(x)
        return y, log_det, x_back, inv_log_det, jac

    y, log_det, x_back, inv_log_det, jac = run(x)
    assert y.shape == x.shape
    assert log_det.shape == x.shape[:1]
    close(y[:, fixed], x[:, fixed], rtol=0, atol=0)
    changed = [d for d in range(D) if d not in fixed]
    assert np.all(np.abs(np.asarray(y[:, changed] - x[:, changed])) > 1e-4)

    sign, ref_log_det = np.linalg.slogdet(np.asarray(jac, np.float64))
    assert np.all(sign > 0)  # increasing in every transformed coordinate
    close(log_det, ref_log_det, rtol=1e-4, atol=1e-4)
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
    y_eager, ld_eager = bij.forward_and_log_det(xs)
    x_eager, ild_eager = bij.inverse_and_log_det(ys)
    y_jit, ld_jit = fwd(bij, xs)
    x_jit, ild_jit = inv(bij, ys)
    close(y_jit, y_eager, rtol=1e-6, atol=1e-6)
    close(ld_jit, ld_eager, rtol=1e-6, atol=1e-6)
    close(x_jit, x_eager, rtol=1e-6, atol=1e-6)
    close(ild_jit, ild_eager, rtol=1e-6, atol=1e-6)
    # The parameters are arguments, not baked-in constants: new values (same
    # shapes, same compiled function) and a new K (a retrace) give new numbers.
    for other in (MixtureGaussianCDF(*(p + 0.25 for p in jax.tree.leaves(bij))), bij2):
        close(fwd(other, xs)[0], reference_forward(xs, other)[0], rtol=2e-5, atol=2e-5)
        close(inv(other, ys)[0], reference_inverse(ys, other), rtol=1e-4, atol=1e-4)


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
        y_ref, ld_ref = reference_forward(
            x[i], MixtureGaussianCDF.from_params(params[i])
        )
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
        y_ref, ld_ref = reference_forward(x[i], b)
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
    x_med = float(reference_inverse(np.zeros(1), bij)[0])
    log_w, mu, sigma = _mixture64(bij)
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


# -- TFP JAX substrate -------------------------------------------------------------


@jax.jit
def _tfp_vs_distrax_density(b, x, key):
    tfp_dist = tfp_data_density(b)
    samples = tfp_dist.sample(64, seed=key)
    return {
        "tfp": tfp_dist.log_prob(x),
        "distrax": data_density(b).log_prob(x),
        "samples": samples,
        "samples_lp": tfp_dist.log_prob(samples),
    }


def test_tfp_transformed_distribution_matches_distrax(bij, xs):
    out = _tfp_vs_distrax_density(bij, xs, jax.random.PRNGKey(1))
    close(out["tfp"], out["distrax"], rtol=1e-5, atol=1e-5)
    close(out["tfp"], mixture_logpdf(xs, bij), rtol=1e-5, atol=2e-5)
    samples = out["samples"]
    assert samples.shape == (64,)
    assert np.all(np.isfinite(np.asarray(samples)))
    assert np.std(np.asarray(samples)) > 0.5
    close(out["samples_lp"], mixture_logpdf(samples, bij), rtol=1e-4, atol=1e-4)


@jax.jit
def _tfp_chain_vs_distrax_chain(b, xs, ys):
    tfp_chain = tfb.Chain([b.to_tfp(), tfb.Shift(1.0)])
    dx_chain = distrax.Chain([b, distrax.ScalarAffine(shift=1.0)])
    pairs = {
        "forward": (tfp_chain.forward(xs), dx_chain.forward(xs)),
        "inverse": (tfp_chain.inverse(ys), dx_chain.inverse(ys)),
        "fldj": (
            tfp_chain.forward_log_det_jacobian(xs, event_ndims=0),
            dx_chain.forward_log_det_jacobian(xs),
        ),
        "ildj": (
            tfp_chain.inverse_log_det_jacobian(ys, event_ndims=0),
            dx_chain.inverse_log_det_jacobian(ys),
        ),
    }
    return pairs, tfp_chain.inverse(tfp_chain.forward(xs))


def test_tfp_chain_matches_distrax_chain(bij, xs, ys):
    pairs, round_trip = _tfp_chain_vs_distrax_chain(bij, xs, ys)
    for name, (tfp_value, distrax_value) in pairs.items():
        close(tfp_value, distrax_value, rtol=1e-6, atol=1e-6, err_msg=name)
    y_ref, log_det_ref = reference_forward(np.asarray(xs) + 1.0, bij)
    close(pairs["forward"][0], y_ref, rtol=2e-5, atol=2e-5)
    close(pairs["fldj"][0], log_det_ref, rtol=1e-4, atol=1e-4)
    close(pairs["inverse"][0], reference_inverse(ys, bij) - 1.0, rtol=1e-4, atol=1e-4)
    close(round_trip, xs, rtol=1e-4, atol=1e-4)


def test_tfp_log_prob_gradients_match_distrax(bij, xs):
    def nll_tfp(b, x):
        return -jnp.mean(tfp_data_density(b).log_prob(x))

    def nll_distrax(b, x):
        return -jnp.mean(data_density(b).log_prob(x))

    @jax.jit
    def both(b, x):
        return jax.grad(nll_tfp)(b, x), jax.grad(nll_distrax)(b, x)

    g_tfp, g_dx = both(bij, xs)
    assert isinstance(g_tfp, MixtureGaussianCDF)
    for a, b in zip(jax.tree.leaves(g_tfp), jax.tree.leaves(g_dx)):
        assert np.max(np.abs(np.asarray(b))) > 1e-3
        close(a, b, rtol=1e-5, atol=1e-6)
    # ... and both are the gradient of the scipy mixture NLL (central differences).
    leaves = [np.asarray(v, np.float64) for v in jax.tree.leaves(bij)]
    eps = 1e-5
    for i, g in enumerate(jax.tree.leaves(g_tfp)):
        for j in range(K):
            plus = [v.copy() for v in leaves]
            minus = [v.copy() for v in leaves]
            plus[i][j] += eps
            minus[i][j] -= eps
            fd = (_nll64(xs, plus) - _nll64(xs, minus)) / (2 * eps)
            assert abs(float(g[j]) - fd) < 1e-4 + 1e-3 * abs(fd), (i, j)


def _nll64(x, leaves):
    logits, means, log_scales = leaves
    z = (np.asarray(x, np.float64)[:, None] - means) / np.exp(log_scales)
    log_pdf = sps.logsumexp(
        sps.log_softmax(logits) + st.norm.logpdf(z) - log_scales, axis=-1
    )
    return -float(np.mean(log_pdf))


def test_raw_distrax_bijector_is_rejected_by_tfp(bij, xs):
    """TFP needs its own bijector interface; this is why ``to_tfp()`` exists."""
    with pytest.raises(AttributeError, match="forward_dtype"):
        tfd.TransformedDistribution(tfd.Normal(0.0, 1.0), bij).log_prob(xs)
    assert not hasattr(bij, "forward_dtype")
    wrapped = bij.to_tfp()
    assert hasattr(wrapped, "forward_dtype")  # the attribute TFP was missing
    assert wrapped.forward_min_event_ndims == 0
    assert wrapped.inverse_min_event_ndims == 0


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


_nll_jit = jax.jit(_nll)
_OPT = optax.adam(1e-2)


def test_training_equinox_partition_loop(bimodal_data):
    bij = _init_bijector()
    params, static = eqx.partition(bij, eqx.is_inexact_array)
    assert len(jax.tree.leaves(params)) == 3
    assert not jax.tree.leaves(static)

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
    assert trained.solver_options == bij.solver_options
    final = float(_nll_jit(trained, bimodal_data))
    assert np.all(np.isfinite(losses))
    close(losses[0], -np.mean(mixture_logpdf(bimodal_data, bij)), rtol=1e-5, atol=1e-5)
    assert final < losses[0] - 0.1
    assert np.all(np.diff(losses[5:]) < 1e-3)  # settles into a steady descent
    # The trained model's NLL is the scipy mixture NLL of its own parameters.
    close(final, -np.mean(mixture_logpdf(bimodal_data, trained)), rtol=1e-5, atol=1e-5)


def _chain(mixture):
    shift, scale = jnp.asarray(0.3), jnp.asarray(1.5)
    return distrax.Chain([mixture, distrax.ScalarAffine(shift=shift, scale=scale)])


def test_equinox_partition_of_distrax_chain_fails():
    """distrax #193 limitation: ``eqx.partition`` cannot split a ``distrax.Chain``.

    distrax's ``Jittable`` flattening decides per attribute, by its value, whether
    it is a leaf, so the ``None``-filled tree ``eqx.partition`` builds flattens to
    a different structure and raises. A lone ``MixtureGaussianCDF`` (fixed leaves)
    partitions fine; for a chain, ``jax.tree_util`` flattening works instead (see
    ``test_chain_training_with_tree_util_flattening``).
    """
    with pytest.raises(ValueError, match="pytree structure"):
        eqx.partition(_chain(_init_bijector()), eqx.is_inexact_array)


def test_chain_training_with_tree_util_flattening(bimodal_data):
    """Train a ``Chain`` through ``jax.tree_util`` flattening (floating leaves).

    Only the mixture's leaves are trained: ``ScalarAffine`` stores ``scale``,
    ``inv_scale`` and ``log_scale`` as separate leaves, which independent updates
    would desynchronise.
    """
    mixture = _init_bijector()
    leaves, treedef = jax.tree.flatten(_chain(mixture))
    assert all(jnp.issubdtype(leaf.dtype, jnp.floating) for leaf in leaves)
    trainable = [
        i
        for i, leaf in enumerate(leaves)
        if any(leaf is p for p in jax.tree.leaves(mixture))
    ]
    assert len(trainable) == 3
    assert len(leaves) > 3

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

    params = [leaves[i] for i in trainable]
    opt_state = _OPT.init(params)
    losses = []
    for _ in range(30):
        params, opt_state, loss = step(params, opt_state, bimodal_data)
        losses.append(float(loss))
    trained = rebuild(params)
    assert isinstance(trained, distrax.Chain)
    trained_mixture = trained.bijectors[0]
    assert isinstance(trained_mixture, MixtureGaussianCDF)

    # Chain([mixture, affine]) maps x to mixture(1.5 x + 0.3): scipy's NLL of it.
    def reference_nll(m):
        return -np.mean(mixture_logpdf(1.5 * bimodal_data + 0.3, m) + np.log(1.5))

    close(losses[0], reference_nll(mixture), rtol=1e-5, atol=1e-5)
    final = float(_nll_jit(trained, bimodal_data))
    close(final, reference_nll(trained_mixture), rtol=1e-5, atol=1e-5)
    assert final < losses[0] - 0.05


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
    close(losses[0], -np.mean(mixture_logpdf(bimodal_data, bij)), rtol=1e-5, atol=1e-5)
    assert losses[-1] < losses[0] - 0.1
    for before, after in zip(jax.tree.leaves(bij), jax.tree.leaves(trained)):
        assert np.max(np.abs(np.asarray(after - before))) > 0.05
