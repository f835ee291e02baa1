"""The layer inside distrax: Chain, Block, Inverse, Transformed, couplings."""

from __future__ import annotations

import distrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats as st
from helpers import (
    close,
    data_density,
    jit_forward,
    mixture64,
    mixture_cdf,
    mixture_logpdf,
    scipy_forward,
    scipy_inverse,
)

from distrax_mixcdf import MixtureGaussianCDF

K = 3  # mixture components per layer
D = 4  # event size of the Block and coupling inputs


def test_standard_normal_layer_is_the_identity_in_both_far_tails():
    # K = 1 with μ = 0, σ = 1 is the identity map, including where float32
    # tail masses underflow (|x| ≳ 13): the density test below integrates there.
    identity = MixtureGaussianCDF(jnp.zeros(1), jnp.zeros(1), jnp.zeros(1))
    x = jnp.array([-30.0, -14.0, -13.0, -9.0, 9.0, 13.0, 14.0, 30.0])
    y, log_det = jit_forward(identity, x)
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

    expected = np.tanh(0.2 + 0.5 * scipy_forward(scipy_forward(x, bij)[0], bij2)[0])
    close(out["y"], expected, rtol=2e-5, atol=2e-5)
    close(out["x_back"], x, rtol=1e-4, atol=1e-4)
    close(out["ildj"], -out["fldj"], rtol=1e-4, atol=1e-4)
    close(out["fldj"], np.log(np.abs(np.asarray(out["dydx"]))), rtol=1e-4, atol=1e-4)

    close(out["y0_back"], y0, rtol=1e-5, atol=1e-5)
    close(out["ildj0"], np.log(np.abs(np.asarray(out["dxdy"]))), rtol=1e-4, atol=1e-4)
    x0_expected = scipy_inverse(
        scipy_inverse((np.arctanh(np.asarray(y0, np.float64)) - 0.2) / 0.5, bij2),
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
        scipy_forward(x[:, d], MixtureGaussianCDF.from_params(params[d]))
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
    close(x, scipy_inverse(ys, bij), rtol=1e-4, atol=1e-4)
    close(ld, -scipy_forward(scipy_inverse(ys, bij), bij)[1], 1e-4, 1e-4)

    y, ld_inv = out["inv_inv"]
    close(y, out["bij_fwd"][0], rtol=1e-6, atol=1e-6)
    # Inverse(bij).inverse is bij.forward: its log-det is bij's forward log-det,
    # the negation of Inverse(bij)'s forward log-det at the image point.
    close(ld_inv, out["bij_fwd"][1], rtol=1e-6, atol=1e-6)
    close(out["inv_ildj"], scipy_forward(xs, bij)[1], rtol=1e-4, atol=1e-4)


# -- distrax.Transformed: the data density ----------------------------------------


@jax.jit
def data_log_prob(bij, x):
    return data_density(bij).log_prob(x)


def test_transformed_log_prob_matches_scipy(bij, xs):
    lp = data_log_prob(bij, xs)
    y_ref, log_det_ref = scipy_forward(xs, bij)
    close(lp, st.norm.logpdf(y_ref) + log_det_ref, rtol=1e-5, atol=2e-5)
    close(lp, mixture_logpdf(xs, bij), rtol=1e-5, atol=2e-5)


def test_transformed_density_integrates_to_one(bij):
    _, mu, sigma = mixture64(bij)
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
