"""MixtureGaussianCDF in float32: accuracy, tails, inverse, gradients, shapes.

The float64 counterparts live in `test_mixture_cdf_float64.py` (x64 is enabled
there only, so it cannot leak into these tests).
"""

import functools
import itertools

import distrax
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from distrax_mixcdf import MixtureGaussianCDF, _chunks, _root_finding, _tangents

DTYPE = np.float32


@given(helpers.mixtures())
def test_forward_matches_mpmath_reference(params):
    helpers.check_forward_against_reference(params, DTYPE)


@given(helpers.mixtures())
def test_forward_is_monotone_and_finite_out_to_1e4_sigma(params):
    helpers.check_monotone(params, DTYPE)


@settings(max_examples=6)
@given(helpers.mixtures())
def test_log_det_matches_autodiff(params):
    helpers.check_log_det_matches_autodiff(params, DTYPE)


@given(helpers.mixtures())
def test_round_trip_from_data(params):
    helpers.check_round_trip_from_x(params, DTYPE)


@given(helpers.mixtures(), st.integers(0, 2**16))
def test_round_trip_from_latent(params, seed):
    y = np.random.default_rng(seed).normal(size=256) * 3
    y = np.concatenate([y, [-40.0, -12.0, 9.5, 25.0, 0.0]]).astype(DTYPE)
    helpers.check_round_trip_from_y(params, DTYPE, y)


def test_naive_formula_saturates_where_ours_does_not():
    bijector = MixtureGaussianCDF(jnp.zeros(1), jnp.zeros(1), jnp.zeros(1))
    x = jnp.array([4.4, 5.4, 9.0, 40.0])
    y = bijector.forward(x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=2e-6)
    naive = jax.scipy.special.ndtri(jax.scipy.special.ndtr(x))
    assert abs(float(naive[0]) - 4.4) > 1e-4
    assert not np.isfinite(float(naive[2]))


def test_tail_pass_in_small_chunks_matches_the_reference(monkeypatch):
    helpers.check_tail_pass_in_small_chunks(monkeypatch, DTYPE)


def test_forward_is_monotone_on_a_plateau():
    helpers.check_monotone_on_plateau(DTYPE)


def test_forward_is_monotone_between_neighbouring_floats():
    helpers.check_monotone_between_neighbouring_floats(DTYPE)


def test_k64_mixture_forward_and_round_trip():
    rng = np.random.default_rng(64)
    params = (rng.normal(size=64), rng.normal(size=64) * 4, rng.uniform(-2, 2, 64))
    helpers.check_forward_against_reference(params, DTYPE)


def test_sampling_direction_one_million_draws():
    """y ~ N(0, 1): |f(f⁻¹(y)) - y| ≤ 1e-5 and no NaN (the table-started path)."""
    rng = np.random.default_rng(0)
    params = (
        rng.normal(size=8),
        rng.normal(size=8) * 2,
        rng.normal(size=8) * 0.3 - 0.5,
    )
    y = rng.normal(size=1_000_000).astype(DTYPE)
    residual = helpers.check_round_trip_from_y(params, DTYPE, y)
    assert residual.max() <= 1e-5


def test_large_batch_with_far_tails_uses_table_and_stays_exact():
    rng = np.random.default_rng(1)
    params = (rng.normal(size=5), rng.normal(size=5), rng.normal(size=5) * 0.5)
    y = np.concatenate([rng.normal(size=20_000) * 4, np.linspace(-60, 60, 241)])
    helpers.check_round_trip_from_y(params, DTYPE, y.astype(DTYPE))


def test_nan_in_nan_out_per_element():
    bijector = MixtureGaussianCDF(
        jnp.zeros(3), jnp.array([-1.0, 0.0, 3.0]), jnp.zeros(3)
    )
    values = jnp.array([0.5, jnp.nan, -2.0, 1e4])
    for fn in (bijector.forward_and_log_det, bijector.inverse_and_log_det):
        out, log_det = fn(values)
        assert np.isnan(out[1])
        assert np.isnan(log_det[1])
        assert np.all(np.isfinite(np.delete(np.asarray(out), 1)))
        assert np.all(np.isfinite(np.delete(np.asarray(log_det), 1)))


def test_no_nan_gradients_anywhere_including_far_tails():
    bijector = MixtureGaussianCDF(
        jnp.array([0.3, -1.0, 0.5]),
        jnp.array([-2.0, 0.0, 5.0]),
        jnp.array([-1.0, 0.5, 0.0]),
    )
    x = jnp.concatenate([jnp.linspace(-3e4, 3e4, 41), jnp.linspace(-30.0, 30.0, 61)])

    def loss(b, values, direction):
        out, log_det = getattr(b, f"{direction}_and_log_det")(values)
        return jnp.sum(out) + jnp.sum(log_det)

    # Compiled (eager op-by-op dispatch of these gradients took ~20 s). Each
    # output depends on its own input only, so the input gradient of the sum
    # is every element's own derivative: one backward pass gives both.
    grads = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    for direction in ("forward", "inverse"):
        param_grads, x_grad = grads(bijector, x, direction)
        for leaf in jax.tree_util.tree_leaves(param_grads):
            assert np.all(np.isfinite(np.asarray(leaf))), direction
        assert np.all(np.isfinite(np.asarray(x_grad))), direction


@pytest.mark.parametrize("root_finder", ["hybrid", "newton", "bisection"])
def test_every_root_finder_converges(root_finder):
    params = (np.array([0.0, 0.5]), np.array([-1.5, 2.0]), np.array([-0.5, 0.2]))
    y = np.linspace(-6, 6, 101).astype(DTYPE)
    bijector = helpers.make_bijector(*params, DTYPE, root_finder=root_finder)
    x_hat, _ = bijector.inverse_and_log_det(jnp.asarray(y))
    y_back = np.asarray(bijector.forward(x_hat), np.float64)
    assert np.max(np.abs(y_back - y)) <= 4e-6


def test_jit_vmap_grad_agree_with_eager():
    bijector = helpers.make_bijector(
        np.array([0.0, 1.0, -0.5]),
        np.array([-1.0, 0.5, 2.0]),
        np.array([0.0, -0.5, 0.3]),
        DTYPE,
    )
    y = jnp.linspace(-3, 3, 7)
    eager = bijector.inverse(y)
    np.testing.assert_allclose(
        jax.jit(lambda b, v: b.inverse(v))(bijector, y), eager, rtol=1e-6
    )
    np.testing.assert_allclose(
        jax.vmap(bijector.inverse)(y), eager, rtol=1e-6, atol=1e-6
    )
    grad_batched = jax.grad(lambda v: jnp.sum(bijector.inverse(v)))(y)
    grad_single = jax.vmap(jax.grad(bijector.inverse))(y)
    np.testing.assert_allclose(grad_batched, grad_single, rtol=1e-5)
    # dx/dy = 1 / T'(x)
    _, log_det = bijector.inverse_and_log_det(y)
    np.testing.assert_allclose(grad_batched, np.exp(log_det), rtol=1e-5)


# The shape combinations of distrax's own RationalQuadraticSpline tests.
SHAPES = [
    ((), ()),
    ((), (5,)),
    ((5,), ()),
    ((5,), (5,)),
    ((3, 5), (5,)),
    ((5,), (3, 5)),
    ((1, 5), (3, 5)),
    ((3, 5), (1, 5)),
    ((3, 5), (3, 5)),
]


@pytest.mark.parametrize(("param_batch", "input_shape"), SHAPES)
def test_parameter_and_input_batches_broadcast(param_batch, input_shape):
    rng = np.random.default_rng(7)
    k = 4
    logits, means, log_scales = (rng.normal(size=(*param_batch, k)) for _ in range(3))
    bijector = helpers.make_bijector(logits, means, log_scales, DTYPE)
    x = rng.normal(size=input_shape).astype(DTYPE)
    y, log_det = helpers.forward(bijector, jnp.asarray(x))
    x_back, inverse_log_det = helpers.inverse(bijector, y)
    batch = np.broadcast_shapes(param_batch, input_shape)
    assert y.shape == log_det.shape == x_back.shape == inverse_log_det.shape == batch
    x_full = np.broadcast_to(x, batch)
    # Reference: every parameter explicitly broadcast to the batch, one call.
    explicit = MixtureGaussianCDF(
        *(
            np.broadcast_to(a, (*batch, k)).astype(DTYPE)
            for a in (logits, means, log_scales)
        )
    )
    y_explicit, log_det_explicit = helpers.forward(explicit, jnp.asarray(x_full))
    np.testing.assert_allclose(y, y_explicit, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(log_det, log_det_explicit, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(x_back, x_full, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(inverse_log_det, -log_det, rtol=1e-4, atol=1e-4)


def test_from_params_is_equivalent_to_the_constructor():
    rng = np.random.default_rng(3)
    params = rng.normal(size=(2, 3, 12)).astype(DTYPE)
    from_params = MixtureGaussianCDF.from_params(params)
    direct = MixtureGaussianCDF(params[..., :4], params[..., 4:8], params[..., 8:])
    assert from_params.num_components == 4
    assert from_params.batch_shape == (2, 3)
    x = rng.normal(size=(2, 3)).astype(DTYPE)
    np.testing.assert_array_equal(from_params.forward(x), direct.forward(x))
    np.testing.assert_array_equal(from_params.inverse(x), direct.inverse(x))
    assert from_params.same_as(direct)


def test_properties_pytree_and_repr():
    bijector = MixtureGaussianCDF(
        jnp.array([0.0, jnp.log(3.0)]),
        jnp.array([-1.0, 1.0]),
        jnp.log(jnp.array([0.5, 2.0])),
    )
    np.testing.assert_allclose(bijector.weights, [0.25, 0.75], rtol=1e-6)
    np.testing.assert_allclose(bijector.scales, [0.5, 2.0], rtol=1e-6)
    np.testing.assert_array_equal(bijector.means, [-1.0, 1.0])
    leaves = jax.tree_util.tree_leaves(bijector)
    assert len(leaves) == 3
    assert all(leaf.shape == (2,) for leaf in leaves)
    assert "num_components=2" in repr(bijector)
    assert "hybrid" in repr(bijector)
    assert isinstance(bijector, distrax.Bijector)
    assert bijector.event_ndims_in == bijector.event_ndims_out == 0
    other = MixtureGaussianCDF(jnp.zeros(2), jnp.zeros(2), jnp.zeros(2))
    assert not bijector.same_as(other)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            dict(logits=jnp.zeros(3), means=jnp.zeros(2), log_scales=jnp.zeros(3)),
            ValueError,
            "same number of components",
        ),
        (
            dict(
                logits=jnp.zeros(3, jnp.int32),
                means=jnp.zeros(3),
                log_scales=jnp.zeros(3),
            ),
            TypeError,
            "`logits` must be a floating",
        ),
        (
            dict(logits=jnp.zeros(()), means=jnp.zeros(()), log_scales=jnp.zeros(())),
            ValueError,
            "`logits` must have a trailing",
        ),
        (
            dict(
                logits=jnp.zeros((2, 3)),
                means=jnp.zeros((4, 3)),
                log_scales=jnp.zeros(3),
            ),
            ValueError,
            "do not broadcast",
        ),
        (
            dict(
                logits=jnp.zeros(3),
                means=jnp.zeros(3),
                log_scales=jnp.zeros(3),
                root_finder="secant",
            ),
            ValueError,
            "root_finder",
        ),
        (
            dict(
                logits=jnp.zeros(3),
                means=jnp.zeros(3),
                log_scales=jnp.zeros(3),
                inverse_grad="adjoint",
            ),
            ValueError,
            "inverse_grad",
        ),
        (
            dict(
                logits=jnp.zeros(3),
                means=jnp.zeros(3),
                log_scales=jnp.zeros(3),
                max_iter=0,
            ),
            ValueError,
            "max_iter",
        ),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        MixtureGaussianCDF(**kwargs)


def test_bad_from_params_and_input_shapes():
    with pytest.raises(ValueError, match=r"size 3K.*\(2, 5\)"):
        MixtureGaussianCDF.from_params(jnp.zeros((2, 5)))
    bijector = MixtureGaussianCDF(
        jnp.zeros((3, 2)), jnp.zeros((3, 2)), jnp.zeros((3, 2))
    )
    with pytest.raises(ValueError, match=r"`x` of shape \(4,\).*\(3,\)"):
        bijector.forward(jnp.zeros(4))
    with pytest.raises(ValueError, match=r"`y` of shape \(4,\)"):
        bijector.inverse(jnp.zeros(4))


def test_integer_inputs_are_promoted_not_truncated():
    bijector = MixtureGaussianCDF(jnp.zeros(2), jnp.array([0.25, -0.25]), jnp.zeros(2))
    y_int = bijector.forward(jnp.array([1, 2], jnp.int32))
    y_float = bijector.forward(jnp.array([1.0, 2.0]))
    assert y_int.dtype == jnp.float32
    np.testing.assert_array_equal(y_int, y_float)


def test_plain_newton_never_returns_an_unconverged_iterate():
    """Plain Newton cycles on this mixture; the safeguarded finish must catch it."""
    bijector = MixtureGaussianCDF(
        jnp.array([0.3, -0.2, 0.5]),
        jnp.array([-2.0, 0.3, 1.8]),
        jnp.array([-0.4, 0.1, -0.9]),
        root_finder="newton",
    )
    y = jnp.array([0.5, 1.0])
    x = bijector.inverse(y)
    np.testing.assert_allclose(bijector.forward(x), y, atol=1e-6)
    np.testing.assert_allclose(x, [1.6345799, 1.9732018], rtol=1e-5)


def _masked_maps_and_grads(bijector, values, weights):
    """Both maps and the parameter gradients of a loss that skips non-finite outputs."""

    def loss(b):
        total, maps = 0.0, []
        for fn in (b.forward_and_log_det, b.inverse_and_log_det):
            out, log_det = fn(values)
            maps.append((out, log_det))
            keep = jnp.isfinite(out) & jnp.isfinite(log_det)
            total = total + jnp.sum(
                jnp.where(keep, weights * (out + 0.5 * log_det), 0.0)
            )
        return total, tuple(maps)

    # The maps come out of the loss's own evaluation: calling them again
    # outside the gradient compiled a second copy of both (the root find's
    # loops are not merged by XLA).
    grads, maps = jax.grad(loss, has_aux=True)(bijector)
    return maps, grads


@functools.cache
def _compiled_for_small_chunks(case):
    """`_masked_maps_and_grads`, jitted afresh for the patched chunk sizes.

    A new function object per case, so that no version compiled elsewhere
    with the default chunk sizes can be reused; both ``irregular_rows``
    parametrisations of a case trace it under the same patches.
    """
    del case
    return jax.jit(lambda *args: _masked_maps_and_grads(*args))


@pytest.mark.parametrize("irregular_rows", [True, False])
@pytest.mark.parametrize("case", ["shared", "per_element"])
def test_chunked_maps_and_gradients_match_one_piece(case, irregular_rows, monkeypatch):
    """The root find, the non-finite policy and the tangent rule run in row chunks.

    With every chunk size patched down to 1024 elements, a batch of ~8k
    elements spread over several chunks must give the outputs and parameter
    gradients of slices small enough to run in one piece (to float32
    summation-order rounding). With ``irregular_rows``, NaN, ±inf and
    saturated inputs sit in several chunks (the rule's per-row stand-ins and
    far tangents); without, the batch takes the rule's regular-only loop.
    "shared": 8210 inputs, one parameter set (the solver's knot table in use,
    not for the slices); no split into chunks of a multiple of 16 rows, so
    the last chunk is padded. "per_element": [N, 2] inputs with [N, 2, K]
    parameters, chunked with the rows.
    """
    for purpose in ("solve", "policy", "tangents"):
        monkeypatch.setitem(_chunks._CPU_CHUNK_ELEMENTS, purpose, 1024)
    maps_and_grads = _compiled_for_small_chunks(case)
    rng = np.random.default_rng(11)
    n = {"shared": 8210, "per_element": 4100}[case]
    param_shape = {"shared": (4,), "per_element": (n, 2, 4)}
    params = (
        rng.normal(size=param_shape[case]),
        rng.normal(size=param_shape[case]) * 2,
        rng.normal(size=param_shape[case]) * 0.4 - 0.3,
    )
    layer = helpers.make_bijector(*params, DTYPE)
    value_shape = (n, 2) if case == "per_element" else (n,)
    values = rng.normal(size=value_shape) * 2
    irregular = [np.nan, np.inf, -np.inf, 3e30, -3e30, 7.0]
    rows = np.linspace(10, n - 10, len(irregular)).astype(int)
    if irregular_rows:
        values[rows] = np.reshape(irregular, (-1,) + (1,) * (values.ndim - 1))
    values = jnp.asarray(values, DTYPE)
    weights = jnp.asarray(rng.uniform(0.5, 1.5, size=value_shape), DTYPE)
    whole_maps, whole_grads = maps_and_grads(layer, values, weights)
    names = ("logits", "means", "log_scales")
    edges = np.linspace(0, n, 6).astype(int)  # slices of < 2 chunks each
    part_maps, part_grads = [], []
    for lo, hi in itertools.pairwise(edges):
        part = layer
        if case == "per_element":
            part = MixtureGaussianCDF(*(getattr(layer, a)[lo:hi] for a in names))
        maps, grads = maps_and_grads(part, values[lo:hi], weights[lo:hi])
        part_maps.append(maps)
        part_grads.append(grads)
    for which in range(2):
        for output in range(2):
            want = np.concatenate([m[which][output] for m in part_maps])
            got = np.asarray(whole_maps[which][output])
            np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    inverse_outputs = np.asarray(whole_maps[1][0])
    if irregular_rows:
        # The saturated inputs came out finite, the infinities infinite.
        assert np.all(np.isfinite(inverse_outputs[rows[3:]]))
        assert np.all(np.isinf(inverse_outputs[rows[1:3]]))
    else:
        assert np.all(np.isfinite(inverse_outputs))
    for a in names:
        got = np.asarray(getattr(whole_grads, a))
        assert np.all(np.isfinite(got))
        if case == "per_element":
            want = np.concatenate([getattr(g, a) for g in part_grads])
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        else:
            want = np.sum([np.asarray(getattr(g, a)) for g in part_grads], axis=0)
            scale = np.max(np.abs(want))
            np.testing.assert_allclose(got, want, atol=2e-4 * scale)


def test_tangent_coefficients_match_a_float64_reference():
    """ρ, the curvature and ``s W`` against scipy in float64, also where f underflows.

    Two unit components 60 apart: midway between them every float32 term
    ``w_k φ(z_k)/σ_k`` underflows (e^-450), so the coefficients are exact only
    if the components are shifted by their largest log term. ``W`` per unit
    ``f`` is compared where it fits the float32 range (1/f itself overflows
    there and is capped); ``W`` per unit ``φ(y)`` (the forward's) in the bulk.
    """
    cases = [
        (
            [0.3, -0.5, 0.1],
            [-1.5, 0.2, 2.0],
            [-0.4, 0.3, -1.0],
            np.linspace(-6.0, 6.0, 49),
        ),
        ([0.0, 0.0], [-30.0, 30.0], [0.0, 0.0], np.linspace(-40.0, 40.0, 41)),
    ]
    coefficients = jax.jit(_tangents.tangent_coefficients, static_argnums=4)
    for logits, means, log_scales, x in cases:
        params = helpers.as_used(
            (np.asarray(logits), np.asarray(means), np.asarray(log_scales)), DTYPE
        )
        log_weights = jax.nn.log_softmax(jnp.asarray(params[0], DTYPE))
        used = (log_weights, jnp.asarray(params[1]), jnp.asarray(params[2]))
        x = np.asarray(x, DTYPE)
        y, log_det = _tangents.forward_and_log_det(jnp.asarray(x), used)
        mixture = _tangents.mixture_arrays(used)
        got = coefficients(jnp.asarray(x), mixture, y, log_det, "density")

        lw, mu, ls = (np.asarray(p, np.float64) for p in used)
        x64 = x.astype(np.float64)[:, None]
        z = (x64 - mu) * np.exp(-ls)
        terms = lw - ls - 0.5 * z**2
        log_norm = scipy.special.logsumexp(terms, axis=-1, keepdims=True)
        sign = np.where(np.asarray(y) > 0, 1.0, -1.0)[:, None]
        rho = np.exp(terms - log_norm)
        curvature = np.sum(rho * z * np.exp(-ls), axis=-1)
        # log(w_k Q(s z_k) / f) with log f = log_norm - log sqrt(2 pi).
        log_w = lw + scipy.special.log_ndtr(-sign * z) - log_norm
        signed_w = sign * np.exp(log_w + 0.5 * np.log(2 * np.pi))

        assert np.all(np.isfinite(np.asarray(got.density_resp)))
        np.testing.assert_allclose(got.density_resp, rho, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(
            got.curvature, curvature, rtol=1e-5, atol=1e-5 * np.max(np.abs(curvature))
        )
        fits = np.abs(signed_w) < 1e15
        assert fits.mean() > 0.5
        np.testing.assert_allclose(
            np.asarray(got.signed_tail_weights)[fits],
            signed_w[fits],
            rtol=1e-5,
            atol=1e-7,
        )
        bulk = np.abs(np.asarray(y)) < 5.0
        latent = coefficients(jnp.asarray(x), mixture, y, log_det, "latent")
        # Per unit φ(y): times f/φ(y).
        log_phi = -0.5 * np.asarray(y, np.float64) ** 2 - 0.5 * np.log(2 * np.pi)
        per_latent = (
            signed_w
            * np.exp(log_norm[:, 0] - 0.5 * np.log(2 * np.pi) - log_phi)[:, None]
        )
        np.testing.assert_allclose(
            np.asarray(latent.signed_tail_weights)[bulk],
            per_latent[bulk],
            rtol=2e-5,
            atol=1e-7,
        )


def test_inverse_gradients_are_the_same_with_irregular_rows_in_the_batch():
    """A batch with NaN, ±inf or saturated y takes the rule's irregular branch.

    The implicit rule skips the per-row selects and far tangents when no ``y``
    is irregular (a ``lax.cond`` over the batch). The regular rows' outputs and
    gradients (for ``y`` and every parameter) must not depend on which branch
    ran: appending irregular rows whose loss weight is zero changes nothing.
    """
    rng = np.random.default_rng(5)
    layer = helpers.make_bijector(
        rng.normal(size=4), rng.normal(size=4) * 2, rng.normal(size=4) * 0.4, DTYPE
    )
    values = jnp.asarray(rng.normal(size=200) * 2, DTYPE)
    irregular = jnp.asarray([np.nan, np.inf, -np.inf, 3e30, -3e30], DTYPE)
    mixed = jnp.concatenate([values[:100], irregular, values[100:]])
    weights = jnp.asarray(rng.uniform(0.5, 1.5, size=200), DTYPE)
    mixed_weights = jnp.concatenate([weights[:100], jnp.zeros(5, DTYPE), weights[100:]])

    @jax.jit
    def value_and_grads(b, v, w):
        def loss(b, v):
            x, log_det = b.inverse_and_log_det(v)
            # Zero-weight rows are masked before use: a where() after x**2
            # would send 0 * inf = NaN back into the cotangent of x = ±inf.
            keep = w > 0
            x, log_det = jnp.where(keep, x, 0.0), jnp.where(keep, log_det, 0.0)
            return jnp.sum(w * (x + 0.5 * log_det + x**2))

        return jax.value_and_grad(loss, argnums=(0, 1))(b, v)

    plain_value, (plain_params, plain_y) = value_and_grads(layer, values, weights)
    mixed_value, (mixed_params, mixed_y) = value_and_grads(layer, mixed, mixed_weights)
    np.testing.assert_allclose(mixed_value, plain_value, rtol=1e-6)
    keep = np.r_[0:100, 105:205]
    np.testing.assert_allclose(np.asarray(mixed_y)[keep], plain_y, rtol=1e-6, atol=1e-7)
    assert np.all(np.asarray(mixed_y)[100:105] == 0)  # the irregular rows: weight 0
    for name in ("logits", "means", "log_scales"):
        np.testing.assert_allclose(
            getattr(mixed_params, name),
            getattr(plain_params, name),
            rtol=1e-5,
            atol=1e-6,
        )


def test_straggler_compaction_matches_the_plain_loop(monkeypatch):
    """Elements still iterating late are finished in a gathered buffer.

    Per-element mixtures (no start table) leave a tail of slow elements; the
    solver moves them into a buffer of 1/8 of the chunk. Roots and log-dets
    must match a solve that iterates the whole batch to the end, and the
    compacted run must actually have gathered some (iterations past the
    point where 1/8 remained).
    """
    rng = np.random.default_rng(5)
    n, k = 4096, 6
    params = (
        jax.nn.log_softmax(jnp.asarray(rng.normal(size=(n, k)) * 2, DTYPE), -1),
        jnp.asarray(rng.normal(size=(n, k)) * 3, DTYPE),
        jnp.asarray(rng.normal(size=(n, k)) - 0.5, DTYPE),
    )
    y = jnp.asarray(rng.normal(size=n) * 2, DTYPE)
    solve = functools.partial(
        _root_finding.solve, options=_root_finding.SolverOptions()
    )
    x, log_det, iterations = jax.jit(solve)(y, params)
    monkeypatch.setattr(_root_finding, "_STRAGGLER_MIN_SIZE", 10**9)
    x_plain, log_det_plain, iterations_plain = jax.jit(lambda y, p: solve(y, p))(
        y, params
    )
    assert int(iterations) == int(iterations_plain) >= 6
    np.testing.assert_allclose(x, x_plain, rtol=4e-7, atol=0)
    np.testing.assert_allclose(log_det, log_det_plain, rtol=1e-6, atol=1e-6)
    # The batch loop stops with stragglers left for the gathered buffer.
    start = _root_finding._initial_state(y, params, None)
    stopped = _root_finding._iterate(
        start, y, params, _root_finding.SolverOptions(), 100, stop_below=n // 8
    )
    assert 0 < int(jnp.sum(~stopped.done)) <= n // 8
    assert int(stopped.iteration) < int(iterations)


@pytest.mark.parametrize("k", [9, 1024])
def test_many_components_match_a_float64_reference(k):
    """Past one unrolled block the components run in a loop of blocks.

    K = 9 pads the last block with zero-weight copies, K = 1024 is the
    KDE-style use. Forward values against float64 scipy, the round trip, and
    the shift invariance of the gradients: moving every mean by δ moves x by
    δ, so Σ_k ∂x/∂μ_k = 1 through the inverse and Σ_k ∂y/∂μ_k = -∂y/∂x through
    the forward, per element.
    """
    rng = np.random.default_rng(k)
    logits = rng.normal(size=k)
    means = np.sort(rng.normal(size=k) * 2.0)
    log_scales = rng.normal(size=k) * 0.2 + np.log(1.5 * k**-0.2)
    layer = helpers.make_bijector(logits, means, log_scales, DTYPE)
    x = np.linspace(-4.0, 4.0, 64).astype(DTYPE)

    lw, mu, ls = (
        np.asarray(p, np.float64)
        for p in helpers.as_used((logits, means, log_scales), DTYPE)
    )
    lw = lw - scipy.special.logsumexp(lw)
    z = (x.astype(np.float64)[:, None] - mu) * np.exp(-ls)
    y_ref = scipy.special.ndtri(np.sum(np.exp(lw) * scipy.special.ndtr(z), axis=-1))
    log_f = scipy.special.logsumexp(lw - ls - 0.5 * z**2, axis=-1) - 0.5 * np.log(
        2 * np.pi
    )
    log_det_ref = log_f - scipy.stats.norm.logpdf(y_ref)

    maps = jax.jit(lambda b, v: (b.forward_and_log_det(v), b.inverse_and_log_det(v)))
    (y, log_det), _ = maps(layer, jnp.asarray(x))
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(log_det, log_det_ref, rtol=1e-4, atol=1e-4)
    _, (x_back, _) = maps(layer, y)
    np.testing.assert_allclose(x_back, x, rtol=1e-5, atol=1e-5)

    def mean_shift_grads(b, v):
        inverse = jax.grad(lambda b: jnp.sum(b.inverse(v)))(b)
        forward = jax.grad(lambda b: jnp.sum(b.forward(v)))(b)
        slope = jax.vmap(jax.grad(b.forward))(v)
        return inverse.means, forward.means, slope

    # Per element: one element per call through vmap over the inputs.
    inverse_means, forward_means, slope = jax.jit(
        jax.vmap(mean_shift_grads, in_axes=(None, 0))
    )(layer, y[:, None])
    np.testing.assert_allclose(np.sum(inverse_means, axis=-1), 1.0, atol=2e-4)
    np.testing.assert_allclose(
        np.sum(forward_means, axis=-1), -slope[:, 0], rtol=2e-4, atol=2e-5
    )
