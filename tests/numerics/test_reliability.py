"""Reliability: bad input, non-finite values, extreme parameters, robust training.

Every check here reuses a handful of jitted functions on fixed shapes (K = 4,
512 inputs), so the whole module compiles each map once.
"""

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

import distrax_mixcdf as dm

DTYPE = np.float32
N = 512
K = 4


# -- bad arguments -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (
            lambda: dm.MixtureGaussianCDF(jnp.zeros(3), jnp.zeros(4), jnp.zeros(3)),
            ValueError,
            r"same number of components.*logits\(3,\), means\(4,\), log_scales\(3,\)",
        ),
        (
            lambda: dm.MixtureGaussianCDF(
                jnp.zeros((2, 3)), jnp.zeros((4, 3)), 0 * 1.0
            ),
            ValueError,
            r"`log_scales`.*scalar \(shape \(\)\)",
        ),
        (
            lambda: dm.MixtureGaussianCDF(
                jnp.zeros((2, 3)), jnp.zeros((4, 3)), jnp.zeros(3)
            ),
            ValueError,
            r"do not broadcast.*logits\(2, 3\), means\(4, 3\)",
        ),
        (
            lambda: dm.MixtureGaussianCDF(jnp.zeros(0), jnp.zeros(0), jnp.zeros(0)),
            ValueError,
            r"K must be >= 1.*logits\(0,\)",
        ),
        (
            lambda: dm.MixtureGaussianCDF(
                jnp.zeros(3), jnp.zeros(3, jnp.int32), jnp.zeros(3)
            ),
            TypeError,
            r"`means` must be a floating-point array.*int32.*\(3,\)",
        ),
        (
            lambda: dm.MixtureGaussianCDF(
                jnp.zeros(3), jnp.zeros(3), np.zeros(3, np.complex64)
            ),
            TypeError,
            r"`log_scales`.*complex64",
        ),
        (
            lambda: dm.MixtureGaussianCDF.from_params(jnp.zeros((2, 7))),
            ValueError,
            r"size 3K.*\(2, 7\)",
        ),
        (
            lambda: dm.MixtureGaussianCDF.from_params(jnp.zeros((5, 6), jnp.int32)),
            TypeError,
            r"`params`.*int32.*\(5, 6\)",
        ),
        (
            lambda: dm.MixtureGaussianCDF.from_data(np.zeros((5, 2, 2)), 2),
            ValueError,
            r"`x`.*\(5, 2, 2\)",
        ),
        (
            lambda: dm.MixtureGaussianCDF.from_data(np.arange(10.0), 0),
            ValueError,
            "num_components",
        ),
        (
            lambda: dm.MixtureGaussianCDF(
                jnp.zeros(2), jnp.zeros(2), jnp.zeros(2)
            ).forward(jnp.ones(3, jnp.complex64)),
            TypeError,
            r"`x` must be real.*complex64.*\(3,\)",
        ),
    ],
)
def test_bad_arguments_name_the_argument_and_shapes(build, error, match):
    with pytest.raises(error, match=match):
        build()


# -- non-finite inputs, half precision, integers --------------------------------------


def _policy_layer():
    return helpers.make_bijector(
        [0.3, -1.0, 0.5, 0.0], [-2.0, 0.0, 5.0, 1.0], [-1.0, 0.5, 0.0, 0.2], DTYPE
    )


def test_nan_and_inf_policy_elementwise_with_finite_masked_gradients():
    layer = _policy_layer()
    clean = np.linspace(-8.0, 8.0, N).astype(DTYPE)
    dirty = clean.copy()
    nan_at, pinf_at, ninf_at = [3, 200, 511], [17, 300], [0, 18]
    dirty[nan_at], dirty[pinf_at], dirty[ninf_at] = np.nan, np.inf, -np.inf
    finite = np.isfinite(dirty)
    widest = float(np.max(np.asarray(layer.log_scales)))
    for fn, sign in ((helpers.forward, -1.0), (helpers.inverse, 1.0)):
        out, log_det = (np.asarray(v) for v in fn(layer, jnp.asarray(dirty)))
        out_clean, log_det_clean = (
            np.asarray(v) for v in fn(layer, jnp.asarray(clean))
        )
        # The rest of the batch is bit-for-bit what it is without the bad values.
        np.testing.assert_array_equal(out[finite], out_clean[finite])
        np.testing.assert_array_equal(log_det[finite], log_det_clean[finite])
        assert np.isnan(out[nan_at]).all()
        assert np.isnan(log_det[nan_at]).all()
        assert (out[pinf_at] == np.inf).all()
        assert (out[ninf_at] == -np.inf).all()
        # ±inf: the log-det's limit, ∓ max log σ (the widest component's slope).
        np.testing.assert_array_equal(log_det[pinf_at + ninf_at], sign * widest)
    # ...and that limit is where the finite log-det is heading far out.
    far = jnp.asarray([-1e30, -1e6, 1e6, 1e30], DTYPE)
    np.testing.assert_allclose(helpers.forward(layer, far)[1], -widest, atol=1e-5)

    # A loss that masks the bad elements has finite gradients everywhere, equal
    # to the gradients on the clean batch restricted to the same elements.
    grads, x_grad = helpers.masked_loss_grads(layer, jnp.asarray(dirty))
    ref_grads, ref_x_grad = helpers.masked_loss_grads(
        layer, jnp.asarray(np.where(finite, dirty, 0.5))
    )
    for g in jax.tree_util.tree_leaves(grads):
        assert np.all(np.isfinite(np.asarray(g)))
    x_grad = np.asarray(x_grad)
    assert np.all(x_grad[~finite] == 0.0)
    np.testing.assert_array_equal(x_grad[finite], np.asarray(ref_x_grad)[finite])
    # Parameter gradients: the masked slots contribute nothing either way.
    mask_only = jnp.asarray(np.where(finite, dirty, np.nan))
    again, _ = helpers.masked_loss_grads(layer, mask_only)
    for a, b in zip(
        jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(again), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    del ref_grads


@pytest.mark.parametrize(
    ("tied", "per_element"), [(False, False), (True, False), (True, True)]
)
def test_inverse_tangents_at_irregular_inputs_are_the_far_maps(tied, per_element):
    """The implicit inverse handles NaN, ±inf and saturated y inside its rule.

    Its tangents there (`_tangents._inverse_far_tangents`, written by hand so
    that clean batches pay nothing for them) must equal JAX's derivatives of
    the closed forms in `_irregular.inverse_far`, for y and every parameter,
    in both outputs. "tied": two components share the widest scale, so the
    tie-breaks (the bracket end for saturated y, JAX's even split of the max
    for ±inf) are exercised. "per_element": one parameter set per input, where
    the rule forms the far tangents only for chunks with an irregular input.
    """
    from distrax_mixcdf import _irregular

    y = jnp.asarray([3e30, -3e30, 2e19, -5e18, np.inf, -np.inf, np.nan], DTYPE)
    log_scales = [-1.0, 0.5, 0.0, 0.5 if tied else 0.2]
    params = ([0.3, -1.0, 0.5, 0.0], [-2.0, 0.0, 5.0, 1.0], log_scales)
    if per_element:
        # Each element's mixture shifted differently, so a mix-up shows.
        shift = np.linspace(-0.5, 0.5, y.size)[:, None]
        params = tuple(np.asarray(p) + shift for p in params)
    layer = helpers.make_bijector(*params, DTYPE)
    cotangents = jnp.asarray([1.0, -0.5, 2.0, 0.25, 0.0, 0.0, 0.0], DTYPE)

    def weighted(pair):
        out, log_det = pair
        return jnp.sum(jnp.where(jnp.isfinite(out), cotangents * out, 0.0)) + jnp.sum(
            jnp.where(jnp.isfinite(log_det), (1.0 + cotangents) * log_det, 0.0)
        )

    def ours(params, y):
        b = dm.MixtureGaussianCDF(*params)
        return weighted(b.inverse_and_log_det(y))

    def reference(params, y):
        log_weights = jax.nn.log_softmax(params[0])
        _, x, log_det = _irregular.inverse_far(y, (log_weights, *params[1:]))
        return weighted((x, log_det))

    params = (layer.logits, layer.means, layer.log_scales)
    ours_value, (ours_params, ours_y) = jax.value_and_grad(ours, (0, 1))(params, y)
    want_value, (want_params, want_y) = jax.value_and_grad(reference, (0, 1))(params, y)
    np.testing.assert_allclose(ours_value, want_value, rtol=1e-6)
    for got, want in zip(ours_params, want_params, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # The loss masks the non-finite outputs: zero, not NaN, gradients there.
    np.testing.assert_allclose(ours_y, want_y, rtol=1e-6)
    assert np.all(np.asarray(ours_y[4:]) == 0.0)
    # Forward mode agrees with reverse mode (the rule is one custom_jvp).
    tangent = tuple(jnp.ones_like(p) for p in params)
    _, forward_dot = jax.jvp(lambda p: ours(p, y), (params,), (tangent,))
    np.testing.assert_allclose(
        forward_dot, sum(jnp.sum(g) for g in ours_params), rtol=1e-5
    )


def test_per_example_gradients_of_per_element_layers_with_irregular_inputs():
    """``vmap(grad)`` over per-element layers equals the loop, finite throughout.

    Each example has its own ``[M, K]`` parameters on ``[M]`` inputs, some of
    them NaN, ±inf or saturated. Unbatched, the tangent rule forms the far
    tangents only for chunks holding an irregular input (a ``lax.cond``);
    under ``vmap`` both branches run, and the gradients must not differ.
    """
    rng = np.random.default_rng(5)
    batch, m = 3, 8
    params = tuple(
        jnp.asarray(rng.normal(size=(batch, m, K)) * s + c, DTYPE)
        for s, c in ((1.0, 0.0), (2.0, 0.0), (0.3, -0.3))
    )
    y = rng.normal(size=(batch, m))
    y[0, [1, 4]] = [np.nan, 3e30]  # irregular entries in two examples only
    y[2, [0, 7]] = [-np.inf, -5e18]
    y = jnp.asarray(y, DTYPE)

    def loss(params, y):
        x, log_det = dm.MixtureGaussianCDF(*params).inverse_and_log_det(y)
        keep = jnp.isfinite(x) & jnp.isfinite(log_det)
        return jnp.sum(jnp.where(keep, x + 0.5 * log_det, 0.0))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    batched = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1))))(params, y)
    for b in range(batch):
        one = grad(tuple(p[b] for p in params), y[b])
        for got, want in zip(
            jax.tree_util.tree_leaves(batched), jax.tree_util.tree_leaves(one)
        ):
            got, want = np.asarray(got[b]), np.asarray(want)
            assert np.all(np.isfinite(got))
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("per_element", [False, True], ids=["shared", "per_element"])
def test_unnormalised_logits_give_the_values_and_gradients_of_their_softmax(
    per_element,
):
    """Logits shifted by ±50 give the map and gradients of ``log_softmax(logits)``.

    The numerics normalise logits inside their loops (forward), per chunk
    (solver) and in the tangent rule, which must project logit tangents as
    ``log_softmax``'s JVP does; the reference path gets normalised
    log-weights and autodiff's ``log_softmax``. Inputs reach both tails'
    log-space pass and ``|y| = 12``.
    """
    rng = np.random.default_rng(11)
    batch = (N,) if per_element else ()
    logits, means, log_scales = (
        jnp.asarray(rng.normal(size=(*batch, K)) * s + c, DTYPE)
        for s, c in ((1.0, 0.0), (2.0, 0.0), (0.3, -0.3))
    )
    shift = jnp.asarray(rng.choice([-50.0, 50.0], size=(*batch, 1)), DTYPE)
    x = jnp.asarray(rng.normal(size=N) * 3.0, DTYPE).at[:4].set([-60, -25, 25, 60])
    y = jnp.asarray(rng.normal(size=N) * 3.0, DTYPE).at[:2].set([-12, 12])

    def loss(logits, normalise):
        if normalise:
            logits = jax.nn.log_softmax(logits, axis=-1)
        bijector = dm.MixtureGaussianCDF(logits, means, log_scales)
        z, ld_fwd = bijector.forward_and_log_det(x)
        x_hat, ld_inv = bijector.inverse_and_log_det(y)
        outputs = (z, ld_fwd, x_hat, ld_inv)
        return jnp.sum(z + 0.5 * ld_fwd) + jnp.sum(x_hat * 0.3 + ld_inv), outputs

    run = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (_, got), got_grad = run(logits + shift, False)
    (_, want), want_grad = run(logits, True)
    for g, w in zip(got, want):
        assert np.all(np.isfinite(np.asarray(g)))
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5)
    assert np.all(np.isfinite(np.asarray(got_grad)))
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-4, atol=1e-4)


def test_half_precision_is_computed_in_float32_and_integers_are_promoted():
    layer = _policy_layer()
    x = np.linspace(-8.0, 8.0, N).astype(DTYPE)
    # float16 forward, bfloat16 and int32 inverse (int32 forward is in
    # test_mixture_cdf.py): each is one more compile of the same float32 map.
    cases = [
        (helpers.forward, jnp.float16, x),
        (helpers.inverse, jnp.bfloat16, x),
        (helpers.inverse, jnp.int32, np.round(x)),
    ]
    for fn, dtype, values in cases:
        low = jnp.asarray(values, dtype)
        out, log_det = fn(layer, low)
        ref_out, ref_log_det = fn(layer, low.astype(jnp.float32))
        # float32 out: no rounding back to 8 or 11 bits of mantissa, and the
        # same numbers as for the exactly upcast input.
        assert out.dtype == log_det.dtype == jnp.float32, dtype
        np.testing.assert_array_equal(out, ref_out)
        np.testing.assert_array_equal(log_det, ref_log_det)
    # Far in the tail: float16 could not hold these log-dets' inputs' images.
    far = jnp.asarray(np.full(N, 6e4), jnp.float16)
    assert np.all(np.isfinite(np.asarray(helpers.forward(layer, far)[0])))


# -- extreme but valid parameters ----------------------------------------------------

EXTREME = {
    "scales 1e-6 to 1e6": (
        [0.0] * 4,
        [0.0, 1.0, 2.0, 3.0],
        np.log([1e-6, 1e-2, 1e2, 1e6]),
    ),
    "means spread over 1e6": ([0.0] * 4, [-5e5, 0.0, 1.0, 5e5], [0.0] * 4),
    "logits -1e4 to 1e4": ([-1e4, 0.0, 1e4, 5.0], [-3.0, 0.0, 1.0, 3.0], [0.0] * 4),
    "duplicated components": ([0.0] * 4, [1.0] * 4, [0.0] * 4),
    "all at once": (
        [-1e4, 1e4, 0.0, 3.0],
        [-5e5, 0.0, 1.0, 5e5],
        np.log([1e-6, 1e6, 1.0, 1e-3]),
    ),
    "vanishing weights far out": (
        [0.0, -1e4, -1e4, -50.0],
        [0.0, 1e6, -1e6, 30.0],
        [0.0, -13.8, 13.8, 2.0],
    ),
}


@pytest.mark.parametrize("case", sorted(EXTREME))
def test_extreme_parameters_forward_monotone_and_inverse_converges(case):
    params = tuple(np.asarray(p, np.float64) for p in EXTREME[case])
    layer = helpers.make_bijector(*params, DTYPE)
    _, means, log_scales = params
    spread = float(np.exp(log_scales.max()))
    x = np.sort(
        np.concatenate(
            [
                np.linspace(
                    means.min() - 20 * spread, means.max() + 20 * spread, N // 2
                ),
                # Around every component, at its own scale.
                (
                    means[:, None]
                    + np.exp(log_scales)[:, None] * np.linspace(-6, 6, N // 8)
                )
                .ravel()
                .astype(np.float64),
            ]
        )
    ).astype(DTYPE)
    y, log_det = (
        np.asarray(v, np.float64) for v in helpers.forward(layer, jnp.asarray(x))
    )
    assert np.all(np.isfinite(y)), case
    assert np.all(np.isfinite(log_det)), case
    assert np.all(np.diff(y) >= 0), (case, x[np.argmin(np.diff(y))])
    # The inverse meets the foundation issue's residual bound on latent draws
    # and on the far latent tails.
    latent = np.concatenate(
        [
            np.random.default_rng(0).normal(size=N - 8) * 2,
            [-30, -9, -5, 0, 1e-3, 5, 9, 30],
        ]
    ).astype(DTYPE)
    helpers.check_round_trip_from_y(params, DTYPE, latent)


def test_inverse_converges_next_to_a_component_a_few_ulps_wide():
    # Found by the thorough fuzz: half the mass in a component 4.7 ulps of x
    # wide (σ = e^-13.69 at μ = 3.49), the other half (σ = 1) 6.98 below it.
    # At y = 1e-3 the root lies 15 ulps below μ, in that component's tail,
    # where T' grows e-fold every 1.5 ulps; the stopping rule linearised T
    # across one x-resolution step there and returned x 4.5 ulps from the root.
    m = 3.490342957461841
    params = ([-1e4, -1e4, 0.0, 0.0], [0.0, 0.0, -m, m], [1.0, 1.0, 0.0, -13.6875])
    layer = helpers.make_bijector(*params, DTYPE)
    # Latents from one side of the narrow component to the other.
    y = np.concatenate([[1e-3], np.linspace(-0.6, 0.6, N - 1)]).astype(DTYPE)
    helpers.check_converged_within_four_ulps(layer, y, DTYPE)


def test_inverse_residual_at_y_zero_where_the_bulk_switches_sides():
    # Found by the thorough fuzz: 97.5% of the mass in N(0, 1), the rest in
    # three unit components at 0, 1 and 0.6875. The bulk took the smaller of
    # its two rounded tail sums, whose total missed 1 by a few ulps of 1/2, so
    # y jumped from -3.0e-7 to +2.2e-7 where the side switches (y = 0), and
    # the last Newton step, from a residual that noisy, landed at T = 5.2e-7,
    # over the residual bound 4.8e-7. Near the switch the tail now comes from
    # the difference of the sums, the same on both sides.
    params = ([0.0, 4.75, 0.0, 0.0], [0.0, 0.0, 1.0, 0.6875], [0.0, 0.0, 0.0, 0.0])
    latent = np.concatenate([[0.0, 1e-3, -1e-3], np.linspace(-1.2, 1.2, N - 3)]).astype(
        DTYPE
    )
    helpers.check_round_trip_from_y(params, DTYPE, latent)


# "means spread over 1e6" puts points between two components 1e6 apart
# (x ≈ -4.96e5, y ≈ -0.67 on the plateau F = 1/4, log f ≈ -7.6e6), where the
# forward's log-weight tangent once came out NaN.
@pytest.mark.parametrize("case", sorted(EXTREME))
def test_extreme_parameters_gradients_are_finite(case):
    params = tuple(np.asarray(p, np.float64) for p in EXTREME[case])
    layer = helpers.make_bijector(*params, DTYPE)
    _, means, log_scales = params
    spread = float(np.exp(log_scales.max()))
    # Data-range and latent-range points, through forward and inverse both (the
    # masked-loss gradient function, so nothing new is compiled).
    values = np.concatenate(
        [
            np.linspace(means.min() - 20 * spread, means.max() + 20 * spread, N // 2),
            np.linspace(-30.0, 30.0, N // 2),
        ]
    )
    grads = helpers.masked_loss_grads(layer, jnp.asarray(values, DTYPE))
    for leaf in jax.tree_util.tree_leaves(grads):
        assert np.all(np.isfinite(np.asarray(leaf))), case


# -- training that does not fall over ------------------------------------------------

_OPTIMIZER = optax.adam(1e-2)


def _masked_nll(layer, batch):
    # NaN rows are masked out of the loss: with the NaN policy their gradients
    # are exactly zero, so they cost the step nothing.
    keep = jnp.isfinite(batch[:, 0])
    log_prob = dm.normalizing_flow(layer, (1,)).log_prob(batch)
    return -jnp.sum(jnp.where(keep, log_prob, 0.0)) / jnp.maximum(jnp.sum(keep), 1)


_full_nll = jax.jit(lambda layer, data: _masked_nll(layer, data))


@pytest.mark.parametrize("dataset", ["outliers_and_nans", "student_t_1.5"])
def test_training_on_outliers_and_heavy_tails_never_takes_a_bad_step(dataset):
    rng = np.random.default_rng(7)
    if dataset == "outliers_and_nans":
        data = rng.normal(size=2048)
        outliers = rng.choice(2048, size=21, replace=False)
        data[outliers] = 1e4 * np.sign(rng.normal(size=21))  # 1% at 1e4 σ
        data[rng.choice(2048, size=5, replace=False)] = np.nan
    else:
        data = scipy.stats.t(df=1.5).rvs(size=2048, random_state=rng)
    data = data.astype(DTYPE)[:, None]
    finite = np.isfinite(data[:, 0])
    layer = dm.MixtureGaussianCDF.from_data(data[finite], num_components=K)
    result = dm.fit(
        layer,
        data,
        _OPTIMIZER,
        steps=20,
        batch_size=256,
        loss_fn=_masked_nll,
        show_progress=False,
    )
    # Finite loss at every step, and no step skipped: the gradients and the
    # updated parameters were finite at every step too (fit counts otherwise).
    assert result.losses.shape == (20,)
    assert np.all(np.isfinite(result.losses)), result.losses
    assert result.skipped_steps == 0
    # It learns: the full-data loss falls.
    before = float(_full_nll(layer, jnp.asarray(data)))
    after = float(_full_nll(result.model, jnp.asarray(data)))
    assert np.isfinite(after)
    assert after < before, (before, after)


# -- chunked evaluation ----------------------------------------------------------------


def test_map_in_chunks_matches_one_call_and_writes_to_memmaps(tmp_path):
    layer = _policy_layer()
    x = np.random.default_rng(8).normal(size=N).astype(DTYPE) * 4
    # The same function as map_in_chunks compiles (parameters as constants):
    # with traced parameters XLA rounds exp(log σ) differently, by an ulp of log f.
    one_call = jax.jit(layer.forward_and_log_det)
    y, log_det = (np.asarray(v) for v in one_call(jnp.asarray(x)))
    # 512 rows in chunks of 200: two full chunks and a padded one.
    disk_x = np.memmap(tmp_path / "x.f32", DTYPE, mode="w+", shape=(N,))
    disk_x[:] = x
    out = (
        np.memmap(tmp_path / "y.f32", DTYPE, mode="w+", shape=(N,)),
        np.memmap(tmp_path / "ld.f32", DTYPE, mode="w+", shape=(N,)),
    )
    returned = dm.map_in_chunks(layer.forward_and_log_det, disk_x, 200, out=out)
    assert returned is out
    # Equal up to XLA's batch-size-dependent vectorisation (measured 6e-7).
    np.testing.assert_allclose(out[0], y, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out[1], log_det, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="chunk_size"):
        dm.map_in_chunks(layer.forward, x, 0)
    with pytest.raises(ValueError, match=r"`out` leaf of shape \(3,\)"):
        dm.map_in_chunks(layer.forward, x, 200, out=np.zeros(3, DTYPE))
