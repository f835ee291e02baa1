"""The layer in TFP's JAX substrate (`to_tfp()`), against distrax and scipy."""

from __future__ import annotations

import distrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special as sps
import scipy.stats as st
import tensorflow_probability.substrates.jax as tfp
from helpers import close, data_density, mixture_logpdf, scipy_forward, scipy_inverse

from distrax_mixcdf import MixtureGaussianCDF

tfd, tfb = tfp.distributions, tfp.bijectors

K = 3  # mixture components of the `bij` fixture


def tfp_data_density(bij):
    return tfd.TransformedDistribution(tfd.Normal(0.0, 1.0), tfb.Invert(bij.to_tfp()))


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
    y_ref, log_det_ref = scipy_forward(np.asarray(xs) + 1.0, bij)
    close(pairs["forward"][0], y_ref, rtol=2e-5, atol=2e-5)
    close(pairs["fldj"][0], log_det_ref, rtol=1e-4, atol=1e-4)
    close(pairs["inverse"][0], scipy_inverse(ys, bij) - 1.0, rtol=1e-4, atol=1e-4)
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
