"""Deep flows: Gaussianization, coupling and autoregressive flows (unconditional).

Small on purpose (D = 3, K = 3, two or three layers, one jitted function per
check shared by both flow families): JIT compilation dominates these tests.
"""

import distrax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from distrax_mixcdf import (
    AutoregressiveFlow,
    CouplingFlow,
    FixedRotation,
    GaussianizationFlow,
    Householder,
    autoregressive_flow,
    coupling_flow,
    fit,
    gaussianization_flow,
)

D = 3


def skewed_data(n, seed):
    """Correlated, skewed, non-Gaussian 3-D data."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, D))
    x = np.stack([z[:, 0], 0.5 * z[:, 1] + z[:, 0] ** 2 - 1, np.exp(0.5 * z[:, 2])], 1)
    return ((x - x.mean(0)) / x.std(0)).astype(np.float32)


TRAIN, TEST = skewed_data(400, 0), skewed_data(400, 1)


FAMILIES = ["gaussianization", "coupling", "autoregressive"]


@pytest.fixture(scope="module")
def flows():
    gf = gaussianization_flow(TRAIN, num_layers=2, num_components=3)
    cf = coupling_flow(
        jax.random.PRNGKey(0),
        D,
        num_layers=2,
        num_components=3,
        hidden_sizes=(8,),
        data=TRAIN,
    )
    af = autoregressive_flow(
        jax.random.PRNGKey(0),
        D,
        num_layers=2,
        num_components=3,
        hidden_sizes=(8,),
        data=TRAIN,
    )
    return {"gaussianization": gf, "coupling": cf, "autoregressive": af}


@jax.jit
def _checks(flow, x, key):
    """Everything one flow is checked on, in one compiled function.

    The data and the samples go through one `log_prob` and one `forward` call
    (concatenated), so each map is traced and compiled once.
    """
    n = x.shape[0]
    samples, sample_log_prob = flow.sample_and_log_prob(seed=key, sample_shape=(16,))
    both = jnp.concatenate([x, samples])
    log_prob, z = flow.log_prob(both), flow.forward(both)
    # The whole stack's log-det against autodiff: log p(x) = log N(T(x)) + log|det J_T|.
    jac = jax.vmap(jax.jacfwd(flow.forward))(x[:4])
    autodiff_log_prob = (
        jax.scipy.stats.norm.logpdf(z[:4]).sum(-1) + jnp.linalg.slogdet(jac)[1]
    )
    grads = jax.grad(lambda f: -jnp.mean(f.log_prob(x)))(flow)
    return dict(
        log_prob=log_prob[:n],
        # The distrax.Transformed stack (unrolled; log_prob only, to bound compiles).
        distrax_log_prob=flow.to_distrax().log_prob(x[:4]),
        # Round trip latent -> data -> latent through the one inverse compiled here:
        # sample_and_log_prob maps z = jax.random.normal(key, (16, D)).
        latent=jax.random.normal(key, (16, D)),
        latent_back=z[n:],
        autodiff_log_prob=autodiff_log_prob,
        samples=samples,
        sample_log_prob=sample_log_prob,
        rescored=log_prob[n:],
        grads=grads,
    )


@pytest.fixture(scope="module")
def checked(flows):
    x = jnp.asarray(TEST[:32])
    return {name: _checks(f, x, jax.random.PRNGKey(1)) for name, f in flows.items()}


@pytest.mark.parametrize("name", FAMILIES)
def test_shapes_and_scan_matches_distrax_stack(checked, name):
    out = checked[name]
    assert out["log_prob"].shape == (32,)
    assert out["samples"].shape == (16, D)
    assert np.all(np.isfinite(out["log_prob"]))
    # The scanned log_prob is the distrax.Transformed stack's log_prob.
    np.testing.assert_allclose(out["log_prob"][:4], out["distrax_log_prob"], atol=2e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_whole_stack_log_det_matches_autodiff(checked, name):
    out = checked[name]
    np.testing.assert_allclose(
        out["autodiff_log_prob"], out["log_prob"][:4], rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("name", FAMILIES)
def test_invertible_and_samples_are_scored_consistently(checked, name):
    out = checked[name]
    np.testing.assert_allclose(out["latent_back"], out["latent"], atol=5e-4)
    np.testing.assert_allclose(out["rescored"], out["sample_log_prob"], atol=5e-3)


@pytest.mark.parametrize("name", FAMILIES)
def test_every_parameter_gets_a_nonzero_gradient(checked, flows, name):
    flow, grads = flows[name], checked[name]["grads"]
    leaves = jax.tree_util.tree_leaves(flow)
    grad_leaves = jax.tree_util.tree_leaves(grads)
    assert type(grads) is type(flow)
    assert len(grad_leaves) == len(leaves)
    for leaf, grad in zip(leaves, grad_leaves):
        assert grad.shape == leaf.shape
        assert np.all(np.isfinite(grad))
        assert np.max(np.abs(grad)) > 1e-6, f"a {leaf.shape} leaf gets no gradient"
    # Leaves are exactly the trainable arrays: nothing hidden in callables.
    if name == "gaussianization":
        assert len(leaves) == 2 * 3 + 1  # 2 marginals x 3 arrays, 1 rotation
        assert all(isinstance(r, Householder) for r in flow.rotations)
    elif name == "autoregressive":
        assert isinstance(flow, AutoregressiveFlow)
        assert isinstance(flow.marginal, GaussianizationFlow)
        stem = flow.marginal.num_layers
        assert len(leaves) == 3 * stem + (stem - 1) + 2 * 2 * 2
    else:
        assert isinstance(flow, CouplingFlow)
        # The greedy stem (a GaussianizationFlow) + 2 layers x 2 (W, b).
        assert isinstance(flow.marginal, GaussianizationFlow)
        stem = flow.marginal.num_layers
        assert len(leaves) == 3 * stem + (stem - 1) + 2 * 2 * 2


def test_greedy_init_beats_standard_normal_and_fine_tuning_beats_greedy(flows):
    gf = flows["gaussianization"]
    log_prob = jax.jit(lambda f, x: f.log_prob(x))
    normal_nll = -np.mean(jax.scipy.stats.norm.logpdf(TEST).sum(-1))
    greedy_nll = -np.mean(log_prob(gf, TEST))
    # The margin asserted is well inside what the greedy start gains here.
    print(f"N(0, I) {normal_nll:.3f}, greedy {greedy_nll:.3f}")
    assert greedy_nll < normal_nll - 0.3
    result = fit(gf, TRAIN, optax.adam(1e-2), steps=60, show_progress=False)
    tuned_nll = -np.mean(log_prob(result.model, TEST))
    # Fine-tuning must add a clear gain on top of the greedy start.
    print(f"tuned {tuned_nll:.3f}")
    assert tuned_nll < greedy_nll - 0.1
    assert result.skipped_steps == 0


def test_fixed_rotations_have_no_leaves_and_to_tfp_matches():
    flow = gaussianization_flow(TRAIN, num_layers=2, num_components=3, rotation="fixed")
    assert isinstance(flow.rotations[0], FixedRotation)
    assert len(jax.tree_util.tree_leaves(flow)) == 2 * 3
    assert isinstance(flow.to_distrax(), distrax.Transformed)
    both = jax.jit(lambda f, x: (f.to_tfp().log_prob(x), f.log_prob(x)))
    tfp_log_prob, log_prob = both(flow, TEST[:5])
    np.testing.assert_allclose(tfp_log_prob, log_prob, rtol=1e-5, atol=1e-5)


def test_deprecated_spellings_still_work_and_warn(flows):
    """`num_params()`, `.distribution` and `.bijector` warn and name the new API."""
    flow = flows["gaussianization"]
    count = sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(flow))
    assert flow.num_params == count
    assert f"{flow.num_params:,}" == f"{count:,}"
    with pytest.warns(DeprecationWarning, match=r"num_params \(a property\)"):
        assert flow.num_params() == count
    with pytest.warns(DeprecationWarning, match=r"to_distrax\(\)"):
        distribution = flow.distribution
    assert isinstance(distribution, distrax.Transformed)
    with pytest.warns(DeprecationWarning, match=r"chain\(\)"):
        bijector = flow.bijector
    x = TEST[:3]
    np.testing.assert_allclose(bijector.forward(x), flow.forward(x), atol=1e-5)
    np.testing.assert_allclose(flow.chain().forward(x), flow.forward(x), atol=1e-5)


def test_bad_input_raises(flows):
    with pytest.raises(ValueError, match=r"`data` must be \[N, D\]"):
        gaussianization_flow(np.ones(5, np.float32), 2)
    with pytest.raises(ValueError, match="rotation"):
        gaussianization_flow(TRAIN, 2, rotation="spin")
    with pytest.raises(ValueError, match="needs a PRNG `key`"):
        gaussianization_flow(TRAIN, 2, rotation_init="random")
    with pytest.raises(ValueError, match="validation_fraction"):
        gaussianization_flow(TRAIN, validation_fraction=1.0)
    with pytest.raises(ValueError, match="init_options"):
        gaussianization_flow(TRAIN, init_options={"spin": 1})
    with pytest.raises(ValueError, match="validation_data"):
        gaussianization_flow(TRAIN, validation_data=TRAIN[:, :2])
    coupling = flows["coupling"]
    with pytest.raises(ValueError, match="anchor_weight"):
        CouplingFlow(
            coupling.marginal,
            coupling.conditioners,
            coupling.masks,
            coupling.num_components,
            anchor_weight=1.0,
        )
    with pytest.raises(ValueError, match="dim"):
        coupling_flow(jax.random.PRNGKey(0), 1)
    with pytest.raises(ValueError, match="len\\(marginals\\) - 1"):
        GaussianizationFlow(flows["gaussianization"].marginals, [])
