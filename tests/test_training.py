"""normalizing_flow and fit: densities, maximum likelihood, validation, skipping.

Every check is numeric against something computed independently: scipy float64
mixture densities, closed-form Gaussian MLEs, or a hand-written optax loop over
the minibatches `fit` actually drew (recorded with ``jax.debug.callback``).
The mixture bijector's gradient is slow to compile on CPU, so exactly one test
(`test_fit_bimodal_marginals_reach_true_nll`) trains it; the machinery tests use
cheap models. Float32 throughout (x64 is never enabled here).
"""

from __future__ import annotations

import distrax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.special as sps
import scipy.stats as st
import tensorflow_probability.substrates.jax as tfp

from distrax_mixcdf import (
    FitResult,
    MixtureGaussianCDF,
    fit,
    normalizing_flow,
    training,
)

tfd = tfp.distributions


# -- independent float64 references (scipy) ---------------------------------------


def mixture_log_pdf(x, logits, means, log_scales):
    """log Σ_k w_k N(x; μ_k, σ_k) for params [..., K] broadcast against x [...]."""
    logits, means, log_scales = (
        np.asarray(a, np.float64) for a in (logits, means, log_scales)
    )
    log_w = sps.log_softmax(logits, axis=-1)
    x = np.asarray(x, np.float64)[..., None]
    return sps.logsumexp(log_w + st.norm.logpdf(x, means, np.exp(log_scales)), axis=-1)


def bijector_log_pdf(bij, x):
    return mixture_log_pdf(x, bij.logits, bij.means, bij.log_scales)


# -- normalizing_flow ------------------------------------------------------------------


def test_normalizing_flow_log_prob_is_base_plus_forward_log_det():
    rng = np.random.default_rng(0)
    d, k = 3, 4
    bij = MixtureGaussianCDF(
        rng.normal(size=(d, k)).astype(np.float32),
        (2 * rng.normal(size=(d, k))).astype(np.float32),
        (0.5 * rng.normal(size=(d, k))).astype(np.float32),
    )
    bij_k = MixtureGaussianCDF(bij.logits[0], bij.means[0], bij.log_scales[0])
    x = (3 * rng.normal(size=(64, d))).astype(np.float32)

    @jax.jit  # one compilation for all cases (each forward call site costs ~2 s)
    def compute(bij, bij_k, x):
        y, log_det = bij.forward_and_log_det(x)
        y_k, log_det_k = bij_k.forward_and_log_det(x[:, 0])
        return (
            normalizing_flow(bij, (d,)).log_prob(x),
            normalizing_flow(bij_k).log_prob(x[:, 0]),
            y,
            log_det,
            y_k,
            log_det_k,
        )

    joint, scalar, y, log_det, y_k, log_det_k = map(np.asarray, compute(bij, bij_k, x))
    assert joint.shape == (64,)
    assert scalar.shape == (64,)
    # The change of variables, by hand: base log-density plus forward log-det.
    np.testing.assert_allclose(
        joint, (st.norm.logpdf(y) + log_det).sum(-1), rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        scalar, st.norm.logpdf(y_k) + log_det_k, rtol=1e-5, atol=1e-5
    )
    # ... and the flow's density is the mixture density itself (float64 scipy).
    reference = bijector_log_pdf(bij, x)
    np.testing.assert_allclose(joint, reference.sum(-1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        scalar, bijector_log_pdf(bij_k, x[:, 0]), rtol=1e-4, atol=1e-4
    )
    # [D, K] parameters with event_shape () are a batch of D scalar flows.
    batched = jax.eval_shape(normalizing_flow(bij).log_prob, x)
    assert batched.shape == (64, d)


def test_normalizing_flow_structure_base_and_dtype():
    bij = MixtureGaussianCDF(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros((2, 3)))
    flow = normalizing_flow(bij, (2,))
    # Sampling runs distrax's forward = Inverse(...).forward = our root find.
    assert isinstance(flow.bijector, distrax.Inverse)
    assert isinstance(flow.bijector.bijector, distrax.Block)
    assert flow.bijector.bijector.bijector is bij
    assert isinstance(flow.distribution, distrax.MultivariateNormalDiag)
    assert flow.event_shape == (2,)

    scalar = normalizing_flow(
        MixtureGaussianCDF(jnp.zeros(3), jnp.zeros(3), jnp.zeros(3))
    )
    assert isinstance(scalar.distribution, distrax.Normal)
    assert scalar.event_shape == ()

    half = jnp.zeros((2, 3), jnp.float16)
    flow16 = normalizing_flow(MixtureGaussianCDF(half, half, half), (2,))
    assert flow16.distribution.loc.dtype == jnp.float16

    images = normalizing_flow(bij, (4, 2))  # rank 2: Independent normal base
    assert isinstance(images.distribution, distrax.Independent)
    assert images.event_shape == (4, 2)


@pytest.mark.parametrize(
    ("event_shape", "match"),
    [
        ((3,), r"event_shape=\(3,\).*\(2,\)"),  # [2, K] params on 3-vectors
        ((1,), r"event_shape=\(1,\).*\(2,\)"),  # broadcasts, but to shape (2,)
        (3, "event_shape"),
        ((0,), "event_shape"),
        ((2.0,), "event_shape"),
    ],
)
def test_normalizing_flow_rejects_bad_event_shape(event_shape, match):
    bij = MixtureGaussianCDF(jnp.zeros((2, 3)), jnp.zeros((2, 3)), jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match=match):
        normalizing_flow(bij, event_shape)


def test_normalizing_flow_rejects_bad_bijector():
    with pytest.raises(TypeError, match="bijector"):
        normalizing_flow(distrax.Normal(0.0, 1.0))
    vector_bij = distrax.Block(distrax.ScalarAffine(shift=jnp.zeros(2)), 1)
    with pytest.raises(ValueError, match="event_ndims_in=1"):
        normalizing_flow(vector_bij, ())


# -- fit: the mixture bijector (the one expensive compilation) ---------------------


TRUE_MARGINALS = (  # (weights, means, scales) per dimension
    ((0.35, 0.65), (-2.0, 1.5), (0.5, 0.8)),
    ((0.5, 0.5), (-1.0, 3.0), (1.0, 0.4)),
)


def sample_marginals(rng, n):
    columns = []
    for weights, means, scales in TRUE_MARGINALS:
        component = rng.choice(2, size=n, p=weights)
        columns.append(
            np.asarray(means)[component]
            + np.asarray(scales)[component] * rng.normal(size=n)
        )
    return np.stack(columns, axis=1).astype(np.float32)


def true_nll(x):
    total = np.zeros(len(x))
    for j, (weights, means, scales) in enumerate(TRUE_MARGINALS):
        total += mixture_log_pdf(x[:, j], np.log(weights), means, np.log(scales))
    return -total.mean()


def test_fit_bimodal_marginals_reach_true_nll():
    rng = np.random.default_rng(1)
    train, val, test = (sample_marginals(rng, n) for n in (1000, 500, 4000))
    k = 2
    # A data-driven start, as a user would: components at the quartiles.
    quartiles = np.quantile(train, [0.25, 0.75], axis=0).T  # [D, K]
    log_scales = np.log(train.std(0) / 2)[:, None] * np.ones((1, k))
    start = MixtureGaussianCDF(
        jnp.zeros((2, k)), quartiles.astype(np.float32), log_scales.astype(np.float32)
    )
    result = fit(
        start, train, steps=300, validation_data=val, eval_every=25, show_progress=False
    )

    assert isinstance(result, FitResult)
    model = result.model
    assert isinstance(model, MixtureGaussianCDF)
    assert model.logits.shape == (2, k)
    assert result.losses.shape == (300,)
    assert result.skipped_steps == 0
    np.testing.assert_array_equal(result.val_steps, np.arange(0, 301, 25))

    def mean_nll(bij, x):  # [D, K] marginals: the joint is the sum over D
        return -bijector_log_pdf(bij, x).sum(-1).mean()

    before, after, oracle = (
        mean_nll(start, test),
        mean_nll(model, test),
        true_nll(test),
    )
    assert after < before - 0.3, (before, after)
    # 1000 training points, 10 parameters: the fitted mixture is within a few
    # hundredths of a nat of the data-generating one on 4000 held-out points.
    assert abs(after - oracle) < 0.03, (after, oracle)
    # The training loss is the mean NLL of the model before each step.
    np.testing.assert_allclose(result.losses[0], mean_nll(start, train), rtol=1e-5)
    # Restored parameters are those of the best validation evaluation.
    best = int(np.argmin(result.val_losses))
    assert result.best_step == result.val_steps[best]
    np.testing.assert_allclose(mean_nll(model, val), result.val_losses[best], rtol=1e-5)


# -- fit: machinery, on cheap models ---------------------------------------------


def test_fit_normal_distribution_reaches_closed_form_mle():
    rng = np.random.default_rng(2)
    x = (3.0 + 2.0 * rng.normal(size=(256, 2))).astype(np.float32)
    for model in (
        distrax.Normal(jnp.zeros(2), jnp.ones(2)),
        tfd.Normal(jnp.zeros(2), jnp.ones(2)),
    ):
        result = fit(model, x, optax.adam(0.1), steps=300, show_progress=False)
        assert type(result.model) is type(model)
        np.testing.assert_allclose(result.model.loc, x.mean(0), atol=2e-2)
        np.testing.assert_allclose(result.model.scale, x.std(0), atol=2e-2)
        # Mean NLL per example: the two dimensions' log-densities are summed.
        expected = -st.norm.logpdf(x, x.mean(0), x.std(0)).sum(-1).mean()
        assert result.losses[-1] == pytest.approx(expected, abs=1e-3)


def test_fit_early_stopping_restores_best_validation_params():
    # Train on N(2, 1) but validate on N(1, 1), starting at loc 0: the validation
    # loss falls until loc passes ~1, then rises, so training stops early.
    rng = np.random.default_rng(3)
    train = (2.0 + rng.normal(size=256)).astype(np.float32)
    val = (1.0 + rng.normal(size=256)).astype(np.float32)
    model = distrax.Normal(jnp.zeros(()), jnp.ones(()))
    patience, eval_every = 4, 5
    kwargs = dict(
        steps=2000,
        validation_data=val,
        patience=patience,
        eval_every=eval_every,
        show_progress=False,
    )
    result = fit(model, train, **kwargs)

    def val_nll(normal):
        return -st.norm.logpdf(val, float(normal.loc), float(normal.scale)).mean()

    best = int(np.argmin(result.val_losses))
    n_steps = len(result.losses)
    assert 0 < result.best_step < n_steps < 2000
    assert result.best_step == result.val_steps[best]
    # Stopped exactly `patience` evaluations after the best one.
    assert len(result.val_losses) == best + patience + 1
    assert result.val_steps[-1] == n_steps == result.best_step + patience * eval_every
    assert val_nll(result.model) == pytest.approx(result.val_losses[best], rel=1e-5)
    assert val_nll(result.model) == pytest.approx(result.val_losses.min(), rel=1e-5)
    # Between the validation mean (1) and the training mean (2).
    assert 1.0 < float(result.model.loc) < 2.0

    last = fit(model, train, restore_best=False, **kwargs)
    assert last.best_step == n_steps
    assert val_nll(last.model) == pytest.approx(last.val_losses[-1], rel=1e-5)
    assert val_nll(last.model) > result.val_losses.min() + 1e-4


def _recording_loss(record):
    def loss_fn(params, batch):
        jax.debug.callback(lambda b: record.append(np.asarray(b)), batch, ordered=True)
        return jnp.mean((batch - params["mu"]) ** 2)

    return loss_fn


def test_fit_skips_nonfinite_steps_without_touching_optimizer_state():
    rng = np.random.default_rng(4)
    data = rng.normal(size=64).astype(np.float32) + 1.0
    data[7] = np.nan  # every minibatch that draws row 7 has a NaN loss
    batches: list[np.ndarray] = []
    optimizer = optax.adam(0.05)
    result = fit(
        {"mu": jnp.zeros(())},
        data,
        optimizer,
        steps=80,
        batch_size=8,
        loss_fn=_recording_loss(batches),
        show_progress=False,
    )
    has_nan = np.array([np.isnan(b).any() for b in batches])
    assert len(batches) == 80
    assert 0 < result.skipped_steps < 80
    assert result.skipped_steps == has_nan.sum() == (~np.isfinite(result.losses)).sum()
    assert np.isfinite(result.model["mu"])

    # Reference: the same minibatches by hand, skipped ones leave params AND the
    # Adam state (its step count, moments) untouched.
    def loss(params, batch):
        return jnp.mean((batch - params["mu"]) ** 2)

    params = {"mu": jnp.zeros(())}
    state = optimizer.init(params)
    for batch, skip in zip(batches, has_nan, strict=True):
        if not skip:
            grads = jax.grad(loss)(params, batch)
            updates, state = optimizer.update(grads, state, params)
            params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(result.model["mu"], params["mu"], rtol=1e-5)


def test_fit_skips_infinite_gradient_with_finite_loss():
    # sqrt(|w|) is finite at w = 0 but its gradient is not: every step is skipped
    # and the parameters come back bit-for-bit.
    start = {"w": jnp.zeros(3), "b": jnp.ones(())}
    result = fit(
        start,
        np.ones((4, 1), np.float32),
        steps=5,
        loss_fn=lambda p, x: jnp.sum(jnp.sqrt(jnp.abs(p["w"]))) + p["b"] * jnp.mean(x),
        show_progress=False,
    )
    assert result.skipped_steps == 5
    np.testing.assert_array_equal(result.losses, np.ones(5))
    np.testing.assert_array_equal(result.model["w"], start["w"])
    np.testing.assert_array_equal(result.model["b"], start["b"])


def test_fit_minibatches_and_compiles_the_step_once():
    data = np.arange(64, dtype=np.float32)
    batches: list[np.ndarray] = []
    traces = []
    record = _recording_loss(batches)

    def loss_fn(params, batch):
        traces.append(batch.shape)  # runs once per trace, not per step
        return record(params, batch)

    optimizer = optax.sgd(0.0)  # frozen parameters: each loss is its batch's
    kwargs = dict(optimizer=optimizer, loss_fn=loss_fn, show_progress=False)
    result = fit({"mu": jnp.zeros(())}, data, steps=30, batch_size=8, **kwargs)
    assert traces == [(8,)]
    assert len(batches) == 30
    for batch, loss in zip(batches, result.losses, strict=True):
        assert batch.shape == (8,)
        assert np.isin(batch, data).all()
        assert loss == pytest.approx(np.mean(batch**2), rel=1e-6)
    assert len({b.tobytes() for b in batches}) > 25  # different draws each step

    # Same key: same batches; same model structure, loss and optimizer: the
    # compiled step is reused across calls.
    again = fit({"mu": jnp.zeros(())}, data, steps=30, batch_size=8, **kwargs)
    assert traces == [(8,)]
    np.testing.assert_array_equal(again.losses, result.losses)
    other = fit(
        {"mu": jnp.zeros(())},
        data,
        steps=5,
        batch_size=8,
        key=jax.random.PRNGKey(9),
        **kwargs,
    )
    assert not np.array_equal(other.losses, result.losses[:5])

    batches.clear()
    full = fit({"mu": jnp.zeros(())}, data, steps=2, **kwargs)  # batch_size=None
    assert traces[-1] == (64,)
    np.testing.assert_array_equal(batches[0], data)
    assert full.losses == pytest.approx([np.mean(data**2)] * 2)


def _affine_coupling_params(features):
    # shift and log-scale of x_b, linear in features (u, u²) of the kept x_a.
    return {"w": jnp.zeros((features, 2)), "b": jnp.zeros(2)}


def test_fit_params_pytree_with_masked_coupling_stack_reaches_true_nll():
    # x1 ~ N(0, 1), x2 | x1 ~ N(x1²/2, 0.3²): an affine coupling with features
    # (x1, x1²) represents it exactly, so the fit approaches the true NLL.
    rng = np.random.default_rng(5)

    def sample(n):
        x1 = rng.normal(size=n)
        return np.stack([x1, 0.5 * x1**2 + 0.3 * rng.normal(size=n)], 1).astype(
            np.float32
        )

    train, test = sample(1000), sample(4000)
    masks = (np.array([True, False]), np.array([False, True]))

    def flow(params):
        layers = []
        for mask, p in zip(masks, params, strict=True):

            def conditioner(masked_x, p=p):
                u = jnp.sum(masked_x, axis=-1, keepdims=True)  # the kept coordinate
                features = jnp.concatenate([u, u**2], axis=-1)
                out = features @ p["w"] + p["b"]  # [..., 2]: shift, log-scale
                return jnp.broadcast_to(out[..., None, :], (*masked_x.shape, 2))

            def bijector(out):
                return distrax.ScalarAffine(shift=out[..., 0], log_scale=out[..., 1])

            layers.append(distrax.MaskedCoupling(mask, conditioner, bijector))
        return normalizing_flow(layers, (2,))

    def loss_fn(params, batch):
        return -jnp.mean(flow(params).log_prob(batch))

    start = [_affine_coupling_params(2), _affine_coupling_params(2)]
    result = fit(
        start, train, optax.adam(0.05), steps=400, loss_fn=loss_fn, show_progress=False
    )
    assert isinstance(result.model, list)
    assert result.skipped_steps == 0

    x1, x2 = test[:, 0].astype(np.float64), test[:, 1].astype(np.float64)
    oracle = -(st.norm.logpdf(x1) + st.norm.logpdf(x2, 0.5 * x1**2, 0.3)).mean()
    before = float(loss_fn(start, test))
    after = float(loss_fn(result.model, test))
    assert before == pytest.approx(-st.norm.logpdf(test).sum(-1).mean(), rel=1e-5)
    assert after < before - 1.0
    assert abs(after - oracle) < 0.05, (after, oracle)


def test_fit_distrax_chain_with_bool_mask_keeps_mask_and_trains():
    # The equinox.partition trap (distrax #193): a Chain holding a boolean mask
    # leaf. Only the Block's shift is trainable; its MLE is minus the mean of the
    # coupled data, y = (x1, x2 - x1) + shift.
    rng = np.random.default_rng(6)
    x1 = 2.0 + rng.normal(size=512)
    x = np.stack([x1, x1 - 1.0 + rng.normal(size=512)], 1).astype(np.float32)
    mask = jnp.array([True, False])

    def conditioner(masked_x):
        return -jnp.sum(masked_x, axis=-1, keepdims=True) * jnp.ones_like(masked_x)

    coupling = distrax.MaskedCoupling(
        mask, conditioner, lambda shift: distrax.ScalarAffine(shift=shift)
    )
    model = distrax.Chain(
        [distrax.Block(distrax.ScalarAffine(shift=jnp.zeros(2)), 1), coupling]
    )
    result = fit(model, x, optax.adam(0.1), steps=200, show_progress=False)

    trained = result.model
    assert isinstance(trained, distrax.Chain)
    kept = trained.bijectors[1]
    assert isinstance(kept, distrax.MaskedCoupling)
    assert kept.mask.dtype == jnp.bool_
    np.testing.assert_array_equal(kept.mask, mask)
    assert kept.conditioner is conditioner
    coupled = np.stack([x[:, 0], x[:, 1] - x[:, 0]], 1)
    np.testing.assert_allclose(
        trained.bijectors[0].bijector.shift, -coupled.mean(0), atol=2e-2
    )
    assert result.losses[-1] < result.losses[0] - 1.0


def test_fit_show_progress(capsys):
    model = distrax.Normal(jnp.zeros(()), jnp.ones(()))
    x = np.linspace(-1, 1, 16, dtype=np.float32)
    fit(model, x, steps=3, show_progress=False)  # compile before capturing
    capsys.readouterr()
    fit(model, x, steps=3, show_progress=False, validation_data=x)
    assert capsys.readouterr() == ("", "")
    fit(model, x, steps=3, show_progress=True, validation_data=x)
    err = capsys.readouterr().err
    assert "loss=" in err
    assert "val=" in err
    assert "best=" in err  # the best validation loss and its step
    assert "3/3" in err


def test_fit_returns_the_initial_model_when_no_step_beats_it():
    # Start at the validation data's MLE: every step towards the training data
    # raises the validation loss, so the model passed in (step 0) is returned.
    rng = np.random.default_rng(5)
    train = (3.0 + rng.normal(size=128)).astype(np.float32)
    val = rng.normal(size=64).astype(np.float32)
    start = distrax.Normal(jnp.asarray(val.mean()), jnp.asarray(val.std()))
    result = fit(
        start, train, steps=40, validation_data=val, eval_every=10, show_progress=False
    )
    assert result.best_step == 0
    assert float(result.model.loc) == float(start.loc)
    assert float(result.model.scale) == float(start.scale)
    assert result.best_val_loss == result.val_losses[0] < result.val_losses[1:].min()
    np.testing.assert_array_equal(result.val_steps, [0, 10, 20, 30, 40])


# -- fit: restore-best's margin over the initial model ---------------------------------


def _paired_t(start_rows, rows):
    """The paired t statistic of the per-row gains, by hand (float64, ddof=1)."""
    gains = np.asarray(start_rows, np.float64) - np.asarray(rows, np.float64)
    return gains.mean() / (gains.std(ddof=1) / np.sqrt(len(gains)))


def test_fit_margin_is_the_paired_t_statistic_of_the_validation_rows():
    # A poor start, a real gain: the margin lets the trained parameters through
    # up to exactly the paired t statistic of the per-row validation NLLs
    # (scipy, float64), and keeps the start just above it.
    rng = np.random.default_rng(8)
    loc, scale = np.array([0.6, -0.4]), np.array([1.8, 0.7])
    train = (loc + scale * rng.normal(size=(200, 2))).astype(np.float32)
    val = (loc + scale * rng.normal(size=(40, 2))).astype(np.float32)
    start = distrax.Normal(jnp.zeros(2), jnp.ones(2))  # [D] parameters, [N, D] data
    kwargs = dict(steps=40, validation_data=val, eval_every=10, show_progress=False)
    free = fit(start, train, improvement_z=0, **kwargs)  # the plain restore-best
    assert free.best_step == free.val_steps[np.argmin(free.val_losses)] == 40

    def rows(normal):  # a row's NLL is the joint of its D coordinates
        mean, std = (np.asarray(a, np.float64) for a in (normal.loc, normal.scale))
        return -st.norm.logpdf(val.astype(np.float64), mean, std).sum(-1)

    t = _paired_t(rows(start), rows(free.model))
    assert 3.0 < t < 4.5, t
    # What the margin must not be: the unpaired statistic, or ddof=0 (1.3% off).
    start_rows, rows_40 = rows(start), rows(free.model)
    unpaired = (start_rows.mean() - rows_40.mean()) / np.sqrt(
        (start_rows.var(ddof=1) + rows_40.var(ddof=1)) / len(val)
    )
    assert unpaired < 0.5 * t
    assert abs(t * np.sqrt(39 / 40) - t) > 0.01 * t

    for z, returned in ((0.998 * t, 40), (1.002 * t, 0), (2.0, 40)):
        result = fit(start, train, improvement_z=z, **kwargs)
        np.testing.assert_array_equal(result.val_losses, free.val_losses)
        assert result.best_step == returned, (z, t)
        expected = free.model if returned else start
        np.testing.assert_array_equal(result.model.loc, expected.loc)
        np.testing.assert_array_equal(result.model.scale, expected.scale)
        assert result.best_val_loss == result.val_losses[returned // 10]
    default = fit(start, train, **kwargs)  # t is above the default z = 3
    assert default.best_step == 40

    # The decision rule's edge cases, on per-row losses given directly.
    clearly_better = training._clearly_better
    assert clearly_better([np.inf, 1.0], [5.0, 1.0], 2.0)  # an infinite start loses
    assert clearly_better([np.nan, 1.0], [5.0, 1.0], 2.0)
    assert not clearly_better([2.0], [1.0], 2.0)  # one row: no standard error
    assert clearly_better([2.0, 3.0], [1.0, 2.0], 1e6)  # no spread: any gain is clear
    assert not clearly_better([2.0, 3.0], [2.0, 3.0], 0.5)  # no gain


@jax.tree_util.register_pytree_node_class
class _GaussianMixture:
    """A 1-D Gaussian mixture with only raw parameters as leaves (cheap to fit)."""

    def __init__(self, logits, means, log_scales):
        self.logits, self.means, self.log_scales = logits, means, log_scales

    def tree_flatten(self):
        return (self.logits, self.means, self.log_scales), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        del aux
        return cls(*children)

    def log_prob(self, x):
        z = (x[..., None] - self.means) * jnp.exp(-self.log_scales)
        log_components = -0.5 * z**2 - self.log_scales - 0.5 * np.log(2 * np.pi)
        log_weights = jax.nn.log_softmax(self.logits)
        return jax.nn.logsumexp(log_weights + log_components, axis=-1)


_TRUE_MIXTURE = (np.array([0.5, 0.3, 0.2]), np.array([-2.0, 0.5, 2.5]), [0.6, 1.0, 0.4])


def _sample_true_mixture(rng, n):
    weights, means, scales = _TRUE_MIXTURE
    k = rng.choice(3, size=n, p=weights)
    return (means[k] + np.asarray(scales)[k] * rng.normal(size=n)).astype(np.float32)


def _mixture_nll(model, x):  # scipy float64, per row
    return -mixture_log_pdf(x, model.logits, model.means, model.log_scales)


def test_fit_margin_keeps_a_start_that_fine_tuning_overfits():
    # The start is the data-generating mixture itself, the best a greedy fit
    # could hope for: on new rows, no fine-tuning on 120 rows can beat it. Many
    # steps at a high learning rate chase the 120 training rows; plain
    # restore-best on 40 validation rows takes a validation gain that is noise
    # and returns a model worse on 4000 test rows. The margin keeps the start.
    rng = np.random.default_rng(0)
    train, val, test = (_sample_true_mixture(rng, n) for n in (120, 40, 4000))
    weights, means, scales = _TRUE_MIXTURE
    start = _GaussianMixture(
        jnp.asarray(np.log(weights), jnp.float32),
        jnp.asarray(means, jnp.float32),
        jnp.asarray(np.log(scales), jnp.float32),
    )
    optimizer = optax.adam(0.05)
    kwargs = dict(steps=200, validation_data=val, eval_every=10, show_progress=False)
    free = fit(start, train, optimizer, improvement_z=0, **kwargs)
    tuned = fit(start, train, optimizer, **kwargs)

    def test_nll(model):
        return _mixture_nll(model, test).mean()

    # Without the margin: a lower validation loss, a higher test NLL.
    assert free.best_step > 0
    assert free.best_val_loss < free.val_losses[0] - 0.03
    assert test_nll(free.model) > test_nll(start) + 0.01
    t = _paired_t(_mixture_nll(start, val), _mixture_nll(free.model, val))
    assert 0 < t < 1.5, t  # the validation gain is within noise
    # With it: the start, so neither validation nor test loss is worse.
    assert tuned.best_step == 0
    assert tuned.best_val_loss == tuned.val_losses[0]
    np.testing.assert_allclose(
        tuned.val_losses[0], _mixture_nll(start, val).mean(), rtol=1e-5
    )
    for got, want in zip(
        jax.tree_util.tree_leaves(tuned.model),
        jax.tree_util.tree_leaves(start),
        strict=True,
    ):
        np.testing.assert_array_equal(got, want)
    assert test_nll(tuned.model) == test_nll(start)

    # A poor start (one wide blob) with 400 validation rows: the gain is clear
    # and the trained parameters come back, much better on the test rows.
    blob = _GaussianMixture(
        jnp.zeros(3), jnp.asarray([-0.1, 0.0, 0.1]), jnp.full(3, np.log(3.0))
    )
    val_400 = _sample_true_mixture(rng, 400)
    kwargs["validation_data"] = val_400
    helped = fit(blob, train, optimizer, **kwargs)
    assert helped.best_step == helped.val_steps[np.argmin(helped.val_losses)] > 0
    assert (
        _paired_t(_mixture_nll(blob, val_400), _mixture_nll(helped.model, val_400)) > 5
    )
    assert test_nll(helped.model) < test_nll(blob) - 0.2


def test_fit_margin_does_not_apply_to_a_custom_loss():
    # A custom loss need not be a mean over rows, so fit does not split it: the
    # lowest validation loss wins whatever improvement_z is. One validation row
    # with the default loss: no standard error, so the start is kept.
    rng = np.random.default_rng(9)
    train = (1.0 + rng.normal(size=64)).astype(np.float32)
    val = (1.0 + rng.normal(size=8)).astype(np.float32)

    def loss_fn(params, x):
        return -jnp.mean(distrax.Normal(params["loc"], 1.0).log_prob(x))

    kwargs = dict(steps=20, eval_every=10, show_progress=False)
    custom = fit(
        {"loc": jnp.zeros(())},
        train,
        loss_fn=loss_fn,
        validation_data=val,
        improvement_z=1e6,
        **kwargs,
    )
    assert custom.best_step == 20
    start = distrax.Normal(jnp.zeros(()), jnp.ones(()))
    one_row = fit(start, train, validation_data=val[:1], **kwargs)
    assert one_row.val_losses[-1] < one_row.val_losses[0]
    assert one_row.best_step == 0
    assert (
        fit(start, train, validation_data=val[:1], improvement_z=0, **kwargs).best_step
        == 20
    )


def test_fit_result_curves_and_plot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.linspace(-1, 1, 32, dtype=np.float32)
    model = distrax.Normal(jnp.zeros(()), jnp.ones(()))
    result = fit(
        model, x, steps=30, validation_data=x, eval_every=10, show_progress=False
    )
    np.testing.assert_array_equal(result.train_steps, np.arange(30))
    assert result.best_val_loss == result.val_losses.min()
    fig, ax = plt.subplots()
    assert result.plot(ax) is ax
    labels = [line.get_label() for line in ax.get_lines()]
    assert {"training", "validation", "best (returned)"} <= set(labels)
    plt.close(fig)
    # Without validation data: only the training curve, and no best loss.
    plain = fit(model, x, steps=5, show_progress=False)
    assert np.isnan(plain.best_val_loss)
    fig, ax = plt.subplots()
    plain.plot(ax)
    assert [line.get_label() for line in ax.get_lines()] == ["training"]
    plt.close(fig)


def test_fit_rejects_bad_arguments():
    x = np.zeros((8, 2), np.float32)
    normal = distrax.Normal(jnp.zeros(2), jnp.ones(2))
    quiet = dict(show_progress=False, steps=1)
    with pytest.raises(ValueError, match="patience"):
        fit(normal, x, patience=3, **quiet)
    with pytest.raises(ValueError, match="batch_size"):
        fit(normal, x, batch_size=9, **quiet)
    with pytest.raises(ValueError, match="validation_data"):
        fit(normal, x, validation_data=np.zeros((4, 3), np.float32), **quiet)
    with pytest.raises(TypeError, match="loss_fn"):
        fit({"w": jnp.zeros(2)}, x, **quiet)
    with pytest.raises(ValueError, match="floating-point"):
        fit({"n": jnp.arange(3)}, x, loss_fn=lambda p, b: jnp.sum(b), **quiet)
    with pytest.raises(ValueError, match="scalar"):
        fit({"w": jnp.zeros(2)}, x, loss_fn=lambda p, b: p["w"] * b.sum(), **quiet)
    with pytest.raises(ValueError, match="steps"):
        fit(normal, x, steps=-1, show_progress=False)
    for bad in (-1.0, float("nan"), float("inf"), True, "2"):
        with pytest.raises(ValueError, match="improvement_z"):
            fit(normal, x, validation_data=x, improvement_z=bad, **quiet)
    shift = distrax.ScalarAffine(shift=jnp.zeros(2))
    with pytest.raises(ValueError, match=r"event_shape=\(3,\)"):
        fit(shift, x, event_shape=(3,), **quiet)
    with pytest.raises(ValueError, match="loss_fn"):
        fit(shift, {"x": x}, **quiet)
