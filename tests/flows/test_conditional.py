"""Conditional flows: coupling and autoregressive flows with a context.

Small on purpose (D <= 3, C = 2, K = 3, two layers, one hidden layer of 8):
JIT compilation dominates, so each flow is checked by one compiled function,
and the per-row loops reuse one compiled single-row function.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats as st

import distrax_mixcdf as dm

C = 2


def _perturbed(flow, key, scale=0.3):
    """The flow with every leaf moved off its near-identity start."""
    leaves, treedef = jax.tree_util.tree_flatten(flow)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef,
        [
            leaf + scale * jax.random.normal(k, leaf.shape)
            for leaf, k in zip(leaves, keys)
        ],
    )


def _build(name, dim):
    builder = {"coupling": dm.coupling_flow, "autoregressive": dm.autoregressive_flow}
    return builder[name](
        jax.random.PRNGKey(0),
        dim,
        context_dim=C,
        num_layers=2,
        num_components=3,
        hidden_sizes=(8,),
    )


DIMS = {"coupling": 2, "autoregressive": 3}


@pytest.fixture(scope="module")
def flows():
    return {
        name: _perturbed(_build(name, dim), jax.random.PRNGKey(1))
        for name, dim in DIMS.items()
    }


def _rows(dim, n, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    c = rng.normal(size=(n, C)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(c)


@jax.jit
def _checks(flow, x, context, key):
    """Everything one flow is checked on, in one compiled function.

    Three traces of the flow: the forward with its gradient (on the rows under
    their own contexts and under the first row's), the inverse (of those
    latents and of fresh draws), and the forward-mode Jacobian row by row
    (of the data and of the samples).
    """
    n, dim = x.shape
    one = jnp.broadcast_to(context[0], context.shape)
    both = jnp.concatenate([context, one])

    def loss(f):
        z, log_det = f.forward_and_log_det(jnp.concatenate([x, x]), both)
        log_prob = jax.scipy.stats.norm.logpdf(z).sum(-1) + log_det
        return -jnp.mean(log_prob[:n]), (z, log_det, log_prob)

    (_, (z, log_det, log_prob)), grads = jax.value_and_grad(loss, has_aux=True)(flow)
    latent = jax.random.normal(key, (n, dim))
    back, inverse_log_det = flow.inverse_and_log_det(
        jnp.concatenate([z[:n], latent]), jnp.concatenate([context, one])
    )
    samples = back[n:]

    def forward_and_jacobian(xi, ci):
        return jax.jacfwd(lambda v: (flow.forward(v, ci),) * 2, has_aux=True)(xi)

    jac, z_rows = jax.vmap(forward_and_jacobian)(
        jnp.concatenate([x, samples]), jnp.concatenate([context, one])
    )
    row_log_prob = (
        jax.scipy.stats.norm.logpdf(z_rows).sum(-1) + jnp.linalg.slogdet(jac)[1]
    )
    return dict(
        log_prob=log_prob[:n],
        log_det=log_det[:n],
        broadcast=log_prob[n:],
        autodiff=row_log_prob[:n],
        back=back[:n],
        inverse_log_det=inverse_log_det[:n],
        latent=latent,
        latent_back=z_rows[n:],
        sample_log_prob=jax.scipy.stats.norm.logpdf(latent).sum(-1)
        - inverse_log_det[n:],
        rescored=row_log_prob[n:],
        grads=grads,
    )


_single_row = jax.jit(lambda flow, x, c: flow.log_prob(x, c))


@pytest.fixture(scope="module")
def checked(flows):
    out = {}
    for name, flow in flows.items():
        x, c = _rows(flow.dim, 8, seed=2)
        out[name] = (x, c, _checks(flow, x, c, jax.random.PRNGKey(3)))
    return out


NAMES = sorted(DIMS)


@pytest.mark.parametrize("name", NAMES)
def test_log_prob_is_change_of_variables_with_autodiff_jacobian(checked, name):
    _, _, out = checked[name]
    assert out["log_prob"].shape == (8,)
    assert np.all(np.isfinite(out["log_prob"]))
    # The flows are perturbed off the identity: the log-det is not ~0.
    assert np.std(out["log_det"]) > 0.05
    np.testing.assert_allclose(out["autodiff"], out["log_prob"], rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize("name", NAMES)
def test_round_trips(checked, name):
    x, _, out = checked[name]
    np.testing.assert_allclose(out["back"], x, atol=2e-4)
    np.testing.assert_allclose(out["inverse_log_det"], -out["log_det"], atol=2e-4)
    # Sampling inverts the forward: T_c(sample) is the drawn latent (T_c is
    # evaluated row by row under vmap here, batched above: jit + vmap agree).
    np.testing.assert_allclose(out["latent_back"], out["latent"], atol=5e-4)
    np.testing.assert_allclose(out["rescored"], out["sample_log_prob"], atol=2e-3)


@pytest.mark.parametrize("name", NAMES)
def test_per_row_and_broadcast_contexts_match_a_loop_over_rows(flows, checked, name):
    flow = flows[name]
    x, c, out = checked[name]
    loop = np.array([_single_row(flow, x[i], c[i]) for i in range(len(x))])
    loop_one = np.array([_single_row(flow, x[i], c[0]) for i in range(len(x))])
    np.testing.assert_allclose(out["log_prob"], loop, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["broadcast"], loop_one, rtol=1e-5, atol=1e-5)
    # The context matters: the same rows under another context score otherwise.
    assert np.max(np.abs(loop - loop_one)) > 1e-2
    # Shapes: sample_shape + context batch + (D,), traced without compiling.
    key = jax.random.PRNGKey(0)
    for sample_shape, context, want in [
        ((16,), c[0], (16, flow.dim)),
        ((), c, (8, flow.dim)),
        ((2,), c, (2, 8, flow.dim)),
        (3, c[:1], (3, 1, flow.dim)),
    ]:
        shapes = jax.eval_shape(
            lambda f, ctx, s=sample_shape: f.sample_and_log_prob(
                seed=key, sample_shape=s, context=ctx
            ),
            flow,
            context,
        )
        assert shapes[0].shape == want
        assert shapes[1].shape == want[:-1]
    # One context for rows of a higher-rank batch.
    assert jax.eval_shape(flow.log_prob, jnp.zeros((4, 8, flow.dim)), c).shape == (4, 8)


@pytest.mark.parametrize("name", NAMES)
def test_every_leaf_gets_a_gradient(flows, checked, name):
    flow, grads = flows[name], checked[name][2]["grads"]
    assert type(grads) is type(flow)
    for leaf, grad in zip(
        jax.tree_util.tree_leaves(flow), jax.tree_util.tree_leaves(grads), strict=True
    ):
        assert grad.shape == leaf.shape
        assert np.all(np.isfinite(grad))
        assert np.max(np.abs(grad)) > 1e-6


def test_made_masks_connect_coordinate_d_to_earlier_ones_and_the_context():
    """A path from input i to output u exists iff i < d(u) or i is context.

    (That the flows' log-det, a sum over the diagonal, matches the autodiff
    determinant above checks the same property through the trained maps.)
    """
    dim, k3 = 3, 9
    for hidden in ([8], [8, 8], []):
        masks = dm.flows.autoregressive.made_masks(dim, C, hidden, k3)
        paths = masks[0].astype(int)
        for m in masks[1:]:
            paths = paths @ m.astype(int)
        out_dim = np.repeat(np.arange(dim), k3)
        for i in range(dim + C):
            reach = paths[i] > 0
            if i < dim:
                np.testing.assert_array_equal(reach, out_dim > i)
            else:  # a context input reaches every output
                assert reach.all()
    # Without a context the first coordinate's outputs see nothing but biases.
    masks = dm.flows.autoregressive.made_masks(dim, None, [8], k3)
    assert not (masks[0].astype(int) @ masks[1].astype(int))[:, :k3].any()


def test_shape_errors_name_the_shapes(flows):
    flow = flows["coupling"]
    x, c = _rows(2, 5, seed=5)
    with pytest.raises(ValueError, match=r"conditional \(context_dim = 2\).*\(5, 2\)"):
        flow.log_prob(x)
    with pytest.raises(ValueError, match=r"`context` of shape \(5, 3\).*C = 2"):
        flow.log_prob(x, jnp.ones((5, 3)))
    with pytest.raises(ValueError, match=r"\(4, 2\).*\(5, 2\).*do not broadcast"):
        flow.log_prob(x, jnp.ones((4, 2)))
    with pytest.raises(ValueError, match="conditional"):
        flow.sample(seed=jax.random.PRNGKey(0), sample_shape=(3,))
    with (
        pytest.warns(DeprecationWarning, match="to_distrax"),
        pytest.raises(ValueError, match="no single distrax distribution"),
    ):
        _ = flow.distribution
    for method in (flow.to_tfp, flow.to_distrax, flow.chain):
        with pytest.raises(ValueError, match=r"one `context` of shape \[C\]"):
            method(c)
    unconditional = dm.coupling_flow(jax.random.PRNGKey(0), 2, num_layers=1)
    with pytest.raises(ValueError, match=r"unconditional.*\(5, 2\).*`x` of shape"):
        unconditional.log_prob(x, c)
    with pytest.raises(ValueError, match="context_dim"):
        dm.autoregressive_flow(jax.random.PRNGKey(0), 2, context_dim=0)
    with pytest.raises(ValueError, match="hidden_sizes"):
        dm.autoregressive_flow(jax.random.PRNGKey(0), 4, hidden_sizes=(2,))
    with pytest.raises(ValueError, match="dim"):
        dm.coupling_flow(jax.random.PRNGKey(0), 1)
    # fit: contexts row by row, and only for conditional models.
    with pytest.raises(ValueError, match=r"`context` of shape \(4, 2\).*\(5, 2\)"):
        dm.fit(flow, x, context=c[:4], steps=1, show_progress=False)
    with pytest.raises(ValueError, match="pass `context` of shape"):
        dm.fit(flow, x, steps=1, show_progress=False)
    with pytest.raises(ValueError, match="unconditional flow"):
        dm.fit(unconditional, x, context=c, steps=1, show_progress=False)
    with pytest.raises(ValueError, match="together"):
        dm.fit(flow, x, context=c, validation_data=x, steps=1, show_progress=False)
    with pytest.raises(ValueError, match=r"`validation_context` of shape \(3, 2\)"):
        dm.fit(
            flow,
            x,
            context=c,
            validation_data=x,
            validation_context=c[:3],
            steps=1,
            show_progress=False,
        )


def test_to_tfp_at_one_context_and_checkpoint_round_trip(flows, tmp_path):
    flow = flows["autoregressive"]
    x, c = _rows(flow.dim, 4, seed=6)
    tfp_log_prob = jax.jit(lambda f, v, ci: f.to_tfp(ci).log_prob(v))(flow, x, c[0])
    np.testing.assert_allclose(
        tfp_log_prob, _single_row(flow, x, c[0]), rtol=1e-5, atol=1e-5
    )
    path = dm.save_checkpoint(tmp_path / "conditional.npz", flow, step=7)
    template = _build("autoregressive", flow.dim)
    loaded = dm.load_checkpoint(path, template).model
    assert type(loaded) is type(flow)
    assert loaded.context_dim == C
    for a, b in zip(
        jax.tree_util.tree_leaves(flow), jax.tree_util.tree_leaves(loaded), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(
        _single_row(loaded, x, c[0]), _single_row(flow, x, c[0])
    )


def _toy(n, seed):
    """c ~ U(-1, 1), x | c ~ N(sin 3c, σ(c)²) with σ(c) = 0.1 + 0.5 c²."""
    rng = np.random.default_rng(seed)
    c = rng.uniform(-1, 1, size=(n, 1))
    sigma = 0.1 + 0.5 * c**2
    x = np.sin(3 * c) + sigma * rng.normal(size=(n, 1))
    true_nll = -np.mean(st.norm.logpdf(x, np.sin(3 * c), sigma))
    return x.astype(np.float32), c.astype(np.float32), float(true_nll)


@pytest.mark.parametrize("name", NAMES)
def test_fit_with_context_approaches_the_true_conditional_nll(name):
    x, c, _ = _toy(2000, seed=0)
    x_val, c_val, true_nll = _toy(2000, seed=1)
    builder = {"coupling": dm.coupling_flow, "autoregressive": dm.autoregressive_flow}
    flow = builder[name](
        jax.random.PRNGKey(0),
        1,
        context_dim=1,
        num_layers=2,
        num_components=4,
        hidden_sizes=(16, 16),
    )
    result = dm.fit(
        flow,
        x,
        optax.adam(3e-2),
        context=c,
        validation_data=x_val,
        validation_context=c_val,
        steps=150,
        batch_size=512,
        eval_every=25,
        show_progress=False,
    )
    start, tuned = result.val_losses[0], result.best_val_loss
    print(f"{name}: true {true_nll:.3f}, start {start:.3f}, tuned {tuned:.3f}")
    # The near-identity start cannot know sin(3c); the fitted conditional
    # must, to within 0.1 nats of the truth (it gets within about 0.03).
    assert start > true_nll + 1.0
    assert tuned < true_nll + 0.1
    assert result.best_step > 0
    assert result.skipped_steps == 0
