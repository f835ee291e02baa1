"""Tests of `distrax_mixcdf.initialization` against independent NumPy/SciPy math.

Float32: this file never enables x64 (dtype expectations follow the global flag,
in case another test module turns it on). Shapes are shared between tests so
the jitted fit compiles only a handful of times.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from scipy.special import logsumexp

from distrax_mixcdf import MixtureGaussianCDF
from distrax_mixcdf.initialization import InitialParams, initial_params

N = 2000
# The default float: float32 unless some other module enabled x64.
DEFAULT_FLOAT = jax.dtypes.canonicalize_dtype(np.float64)

# One jitted forward for all bijectors: it compiles once per (K, input shape),
# where eager dispatch would recompile its pieces in every test.
_forward = jax.jit(lambda bijector, x: bijector.forward(x))
TRUE_WEIGHTS = np.array([0.3, 0.7])
TRUE_MEANS = np.array([-2.0, 1.5])
TRUE_SCALES = np.array([0.5, 1.0])


def _two_component_sample(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    first = rng.uniform(size=n) < TRUE_WEIGHTS[0]
    return np.where(
        first,
        rng.normal(TRUE_MEANS[0], TRUE_SCALES[0], n),
        rng.normal(TRUE_MEANS[1], TRUE_SCALES[1], n),
    )


@pytest.fixture(scope="module")
def bimodal() -> np.ndarray:
    return _two_component_sample(N, seed=0)


@pytest.fixture(scope="module")
def columns(bimodal) -> np.ndarray:
    rng = np.random.default_rng(1)
    return np.stack(
        [bimodal, 3.0 * rng.normal(size=N) + 1.0, rng.exponential(size=N)], axis=1
    )


def _mixture_log_likelihood(x, weights, means, scales) -> float:
    """Mean log density of a 1-D mixture, in float64 with SciPy."""
    x = np.asarray(x, np.float64)[:, None]
    terms = np.log(weights) + stats.norm.logpdf(x, means, scales)
    return float(np.mean(logsumexp(terms, axis=1)))


def _weights(fit: InitialParams) -> np.ndarray:
    logits = np.asarray(fit.logits, np.float64)
    return np.exp(logits - logsumexp(logits, axis=-1, keepdims=True))


def _scales(fit: InitialParams) -> np.ndarray:
    return np.exp(np.asarray(fit.log_scales, np.float64))


def _by_mean(fit: InitialParams):
    order = np.argsort(np.asarray(fit.means))
    return _weights(fit)[order], np.asarray(fit.means)[order], _scales(fit)[order]


# -- quantile ------------------------------------------------------------------


def test_quantile_means_are_the_midpoint_quantiles(columns):
    k = 4
    levels = (np.arange(k) + 0.5) / k
    fit = initial_params(columns, k, "quantile")
    assert fit.means.shape == fit.logits.shape == fit.log_scales.shape == (3, k)
    assert fit.log_likelihood.shape == (3,)
    np.testing.assert_allclose(
        fit.means, np.quantile(columns, levels, axis=0).T, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_array_equal(fit.logits, np.zeros((3, k)))
    assert fit.num_iter == 0
    # One shared scale per dimension.
    np.testing.assert_array_equal(
        fit.log_scales, np.repeat(fit.log_scales[:, :1], k, 1)
    )


def _numpy_quantile_scale(x: np.ndarray, k: int) -> tuple[float, str]:
    """The documented rule, written independently: returns (σ, winning term)."""
    means = np.quantile(x, (np.arange(k) + 0.5) / k)
    matched = x.var() - means.var()
    slices = np.array_split(np.sort(x), k)  # equal sizes: N is a multiple of k
    pooled = sum(((s - s.mean()) ** 2).sum() for s in slices) / x.size
    return float(np.sqrt(max(matched, pooled))), (
        "matched" if matched > pooled else "pooled"
    )


@pytest.mark.parametrize(
    ("k", "winner"),
    [(4, "matched"), (2, "pooled")],
)
def test_quantile_scale_rule(bimodal, k, winner):
    expected, which = _numpy_quantile_scale(bimodal, k)
    # Both branches of the max are exercised: K=2 on this skewed bimodal sample
    # has quantile means more spread than the data (matched variance < 0).
    assert which == winner
    fit = initial_params(bimodal, k, "quantile")
    np.testing.assert_allclose(_scales(fit), np.full(k, expected), rtol=1e-4)


def test_quantile_single_component_is_median_and_std(bimodal):
    fit = initial_params(bimodal, 1, "quantile")
    np.testing.assert_allclose(fit.means, [np.median(bimodal)], rtol=1e-5)
    np.testing.assert_allclose(_scales(fit), [bimodal.std()], rtol=1e-5)


# -- kde -----------------------------------------------------------------------


def _numpy_bandwidth(x: np.ndarray, rule: str) -> float:
    std = x.std(ddof=1)
    shrink = x.size ** (-1 / 5)
    if rule == "scott":
        return 1.06 * std * shrink
    q25, q75 = np.percentile(x, [25, 75])
    return 0.9 * min(std, (q75 - q25) / 1.34) * shrink


@pytest.mark.parametrize("rule", ["scott", "silverman"])
def test_kde_plug_in_bandwidth_and_anchors(bimodal, rule):
    k = 8
    fit = initial_params(bimodal, k, "kde", bandwidth=rule)
    np.testing.assert_allclose(
        _scales(fit), np.full(k, _numpy_bandwidth(bimodal, rule)), rtol=1e-5
    )
    index = (2 * np.arange(k) + 1) * N // (2 * k)
    anchors = np.sort(bimodal).astype(fit.means.dtype)[index]
    np.testing.assert_array_equal(fit.means, anchors)
    np.testing.assert_array_equal(fit.logits, np.zeros(k))
    assert fit.num_iter == 0


def test_kde_fixed_bandwidth_and_silverman_differs(bimodal):
    fixed = initial_params(bimodal, 8, "kde", bandwidth=0.3)
    np.testing.assert_allclose(_scales(fixed), np.full(8, 0.3), rtol=1e-6)
    # On bimodal data IQR/1.34 < std, so Silverman is narrower than Scott.
    scott = initial_params(bimodal, 8, "kde", bandwidth="scott")
    silverman = initial_params(bimodal, 8, "kde", bandwidth="silverman")
    assert float(silverman.log_scales[0]) < float(scott.log_scales[0]) - 0.1


# -- log-likelihood ------------------------------------------------------------


@pytest.mark.parametrize("method", ["quantile", "kde", "em"])
def test_log_likelihood_matches_scipy(bimodal, method):
    fit = initial_params(bimodal, 2, method)
    expected = _mixture_log_likelihood(
        bimodal, _weights(fit), np.asarray(fit.means), _scales(fit)
    )
    assert fit.log_likelihood.shape == ()
    np.testing.assert_allclose(float(fit.log_likelihood), expected, atol=2e-5)


# -- EM ------------------------------------------------------------------------


def test_em_recovers_a_known_mixture(bimodal):
    fit = initial_params(bimodal, 2, "em")
    weights, means, scales = _by_mean(fit)
    # Tolerances are ~4 standard errors at N = 2000 (e.g. sd(ŵ) ≈ 0.010).
    np.testing.assert_allclose(weights, TRUE_WEIGHTS, atol=0.04)
    np.testing.assert_allclose(means, TRUE_MEANS, atol=0.1)
    np.testing.assert_allclose(scales, TRUE_SCALES, rtol=0.1)
    assert 1 < int(fit.num_iter) < 200
    # The MLE beats the true parameters on its own sample, and both cheap starts.
    truth = _mixture_log_likelihood(bimodal, TRUE_WEIGHTS, TRUE_MEANS, TRUE_SCALES)
    assert float(fit.log_likelihood) >= truth - 1e-4
    quantile = initial_params(bimodal, 2, "quantile").log_likelihood
    kde = initial_params(bimodal, 2, "kde").log_likelihood
    assert float(fit.log_likelihood) > float(quantile) + 0.05
    assert float(fit.log_likelihood) > float(kde) + 0.05


def test_em_with_zero_iterations_is_the_quantile_start(bimodal):
    em = initial_params(bimodal, 2, "em", max_iter=0)
    quantile = initial_params(bimodal, 2, "quantile")
    assert int(em.num_iter) == 0
    np.testing.assert_allclose(em.means, quantile.means, rtol=1e-5)
    np.testing.assert_allclose(em.log_scales, quantile.log_scales, atol=1e-5)
    np.testing.assert_allclose(em.logits, quantile.logits, atol=1e-6)
    np.testing.assert_allclose(em.log_likelihood, quantile.log_likelihood, atol=1e-5)


def test_em_iteration_cap_and_tolerance(bimodal):
    start = float(initial_params(bimodal, 2, "em", max_iter=0).log_likelihood)
    capped = initial_params(bimodal, 2, "em", max_iter=3)
    loose = initial_params(bimodal, 2, "em", tol=1e-2)
    full = initial_params(bimodal, 2, "em")
    assert int(capped.num_iter) == 3
    assert int(loose.num_iter) < int(full.num_iter)
    # EM never decreases the likelihood (no component is at the floor here).
    assert start < float(capped.log_likelihood) <= float(full.log_likelihood) + 1e-6
    assert float(loose.log_likelihood) <= float(full.log_likelihood) + 1e-6


def test_em_single_component_is_the_gaussian_mle(bimodal):
    fit = initial_params(bimodal, 1, "em")
    np.testing.assert_allclose(fit.means, [bimodal.mean()], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(_scales(fit), [bimodal.std()], rtol=1e-4)
    np.testing.assert_allclose(
        fit.log_likelihood,
        stats.norm.logpdf(bimodal, bimodal.mean(), bimodal.std()).mean(),
        rtol=1e-5,
    )
    assert int(fit.num_iter) <= 3


def test_em_is_affine_equivariant(bimodal):
    scale, shift = 7.0, 100.0
    base = initial_params(bimodal, 2, "em")
    moved = initial_params(scale * bimodal + shift, 2, "em")
    np.testing.assert_allclose(moved.means, scale * base.means + shift, rtol=1e-4)
    np.testing.assert_allclose(
        moved.log_scales, base.log_scales + np.log(scale), atol=1e-4
    )
    np.testing.assert_allclose(
        moved.log_likelihood, base.log_likelihood - np.log(scale), atol=1e-4
    )


def test_em_variance_floor_stops_a_collapsing_component():
    rng = np.random.default_rng(2)
    spiked = np.concatenate([rng.normal(size=300), np.full(60, 2.0)])
    fit = initial_params(spiked, 3, "em")
    _, means, scales = _by_mean(fit)
    # One component sits on the repeated value, at exactly the default floor.
    assert means[-1] == pytest.approx(2.0, abs=1e-5)
    assert scales[-1] == pytest.approx(1e-3 * spiked.std(), rel=1e-3)
    assert np.all(np.isfinite(fit.log_likelihood))
    floored = initial_params(spiked, 3, "em", min_scale=0.1)
    assert _scales(floored).min() == pytest.approx(0.1, rel=1e-5)
    assert np.all(np.isfinite(np.asarray(floored.logits)))


# -- vectorisation -------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "kwargs"),
    [
        ("quantile", {}),
        ("kde", {"bandwidth": "silverman"}),
        # A fixed, small iteration count: the float32 sums of the M-step round
        # differently at different batch sizes, and near the optimum (where
        # the likelihood is flat) that noise walks the parameters by ~1e-4.
        ("em", {"tol": 0.0, "max_iter": 5}),
    ],
)
def test_columns_equal_per_column_fits(columns, method, kwargs):
    joint = initial_params(columns, 2, method, **kwargs)
    for d in range(columns.shape[1]):
        single = initial_params(columns[:, d], 2, method, **kwargs)
        for name in ("logits", "means", "log_scales", "log_likelihood"):
            np.testing.assert_allclose(
                getattr(joint, name)[d],
                getattr(single, name),
                rtol=1e-5,
                atol=2e-6,
                err_msg=f"{method} {name} dim {d}",
            )
    if method == "em":
        np.testing.assert_array_equal(joint.num_iter, [5, 5, 5])


# -- constant columns -----------------------------------------------------------


@pytest.mark.parametrize("method", ["quantile", "kde", "em"])
def test_constant_column_gets_the_positive_floor(method):
    value = -5.0
    fit = initial_params(np.full(50, value), 1, method)
    floor = 1e-3 * (1.0 + abs(value))
    np.testing.assert_allclose(fit.means, [value])
    np.testing.assert_allclose(_scales(fit), [floor], rtol=1e-5)
    np.testing.assert_allclose(
        fit.log_likelihood, -np.log(floor) - 0.5 * np.log(2 * np.pi), rtol=1e-5
    )
    bijector = MixtureGaussianCDF.from_data(np.full(50, value), 1, method)
    assert np.all(np.isfinite(np.asarray(bijector.scales)))


def test_constant_column_beside_a_varying_one(bimodal):
    data = np.stack([bimodal, np.full(N, 3.0)], axis=1)
    fit = initial_params(data, 1, "quantile")
    assert _scales(fit)[1, 0] == pytest.approx(4e-3, rel=1e-5)
    assert _scales(fit)[0, 0] == pytest.approx(bimodal.std(), rel=1e-5)
    given = initial_params(data, 1, "quantile", min_scale=0.5)
    assert _scales(given)[1, 0] == pytest.approx(0.5, rel=1e-6)
    with pytest.raises(ValueError, match=r"dimension\(s\) \[1\].*shape \(2000, 2\)"):
        initial_params(data, 2, "em")


# -- dtypes --------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype", [np.int32, np.int64, np.float16, np.float32, np.float64]
)
def test_works_in_float32_without_x64(dtype):
    data = (np.arange(40) % 7).astype(dtype)
    fit = initial_params(data, 3, "quantile")
    # float16 is promoted to float32; ints and float64 go to the default float.
    expected = np.float32 if dtype in (np.float16, np.float32) else DEFAULT_FLOAT
    for name in ("logits", "means", "log_scales", "log_likelihood"):
        assert getattr(fit, name).dtype == expected, name
    np.testing.assert_allclose(
        fit.means, np.quantile(data.astype(np.float64), [1 / 6, 0.5, 5 / 6]), rtol=1e-5
    )


# -- errors --------------------------------------------------------------------


def _with(value, index, data):
    data = data.copy()
    data[index] = value
    return data


_GOOD = np.linspace(-1.0, 1.0, 12)


@pytest.mark.parametrize(
    ("x", "k", "kwargs", "match"),
    [
        (_with(np.nan, 3, _GOOD), 2, {}, r"1 NaN or inf.*shape \(12,\)"),
        (_with(np.inf, 0, _GOOD), 2, {}, r"NaN or inf.*shape \(12,\)"),
        (
            _with(-np.inf, ([1, 2], [0, 1]), _GOOD.reshape(6, 2)),
            2,
            {},
            r"NaN or inf in dimension\(s\) \[0, 1\]; shape \(6, 2\)",
        ),
        (np.array([1e300, 0.0, 1.0]), 2, {}, r"overflow float32.*shape \(3,\)"),
        (np.array([0.0, 1.0, 1.0, 0.0]), 3, {}, r"fewer than num_components=3 .*\[2\]"),
        (np.zeros((0,)), 1, {}, r"at least one sample.*shape \(0,\)"),
        (np.zeros((5, 0)), 1, {}, r"at least one sample.*shape \(5, 0\)"),
        (np.float32(1.0), 1, {}, r"\[N\] or \[N, D\].*0-D.*shape \(\)"),
        (np.zeros((4, 2, 2)), 1, {}, r"\[N\] or \[N, D\].*3-D.*shape \(4, 2, 2\)"),
        (_GOOD.astype(np.complex64), 2, {}, r"real numbers.*complex64"),
        (_GOOD, 0, {}, "num_components"),
        (_GOOD, 2.0, {}, "num_components"),
        (_GOOD, True, {}, "num_components"),
        (_GOOD, 2, {"method": "gmm"}, r"`method` must be one of.*'gmm'"),
        (_GOOD, 2, {"bandwidth": "normal"}, "bandwidth"),
        (_GOOD, 2, {"bandwidth": -1.0}, "bandwidth"),
        (_GOOD, 2, {"min_scale": 0.0}, "min_scale"),
        (_GOOD, 2, {"max_iter": -1}, "max_iter"),
        (_GOOD, 2, {"tol": float("nan")}, "tol"),
    ],
)
def test_bad_input_raises_value_error(x, k, kwargs, match):
    if "overflow" in match and DEFAULT_FLOAT != np.float32:
        pytest.skip("float64 data only overflows when x64 is off")
    kwargs = {"method": "quantile", **kwargs}
    with pytest.raises(ValueError, match=match):
        initial_params(x, k, **kwargs)


def test_tracing_raises_type_error():
    with pytest.raises(TypeError, match=r"outside jax\.jit"):
        jax.jit(lambda x: initial_params(x, 2).means)(_GOOD)


# -- the bijector --------------------------------------------------------------


def test_from_data_gaussianizes(columns):
    """Bimodal, Gaussian and exponential columns, K = 8, all three methods."""
    k = 8
    data = jnp.asarray(columns, jnp.float32)
    latents, ks = {}, {}
    for method in ("em", "quantile", "kde"):
        bijector = MixtureGaussianCDF.from_data(columns, k, method=method)
        fit = initial_params(columns, k, method)
        assert bijector.batch_shape == (3,)
        np.testing.assert_array_equal(bijector.means, fit.means)
        np.testing.assert_array_equal(bijector.log_scales, fit.log_scales)
        y = np.asarray(_forward(bijector, data), np.float64)
        assert np.all(np.isfinite(y)), method
        latents[method] = y
        ks[method] = np.array([stats.kstest(c, "norm").statistic for c in y.T])
    # EM: the pushforward of a fitted mixture CDF is N(0, 1) up to sampling.
    np.testing.assert_allclose(latents["em"].std(axis=0), 1.0, atol=0.02)
    np.testing.assert_allclose(latents["em"].mean(axis=0), 0.0, atol=0.02)
    assert np.all(ks["em"] < 0.03)
    # Quantile: a fair warm start (the skewed exponential column is off most).
    np.testing.assert_allclose(latents["quantile"].std(axis=0), 1.0, atol=0.1)
    np.testing.assert_allclose(latents["quantile"].mean(axis=0), 0.0, atol=0.15)
    # KDE: K anchors with a bandwidth sized for N points is undersmoothed, so y
    # is over-dispersed; it is still a rough Gaussianization.
    assert np.all(ks["kde"] < 0.1)
    assert np.all(ks["em"] < ks["quantile"])
    assert np.all(ks["em"] < ks["kde"])


# -- deprecated spellings (kept for one release) -------------------------------


def test_n_components_still_works_and_warns_naming_num_components():
    expected = initial_params(_GOOD, 2)
    with pytest.warns(DeprecationWarning, match="use `num_components`"):
        fit = initial_params(_GOOD, n_components=2)
    np.testing.assert_array_equal(fit.means, expected.means)
    with pytest.warns(DeprecationWarning, match="use `num_components`"):
        bijector = MixtureGaussianCDF.from_data(_GOOD, n_components=2)
    np.testing.assert_array_equal(bijector.means, expected.means)
    with pytest.raises(TypeError, match="both `num_components` and"):
        initial_params(_GOOD, num_components=2, n_components=2)


def test_n_iter_and_loose_fit_options_still_work_and_warn():
    fit = initial_params(_GOOD, 2, "em", max_iter=3)
    with pytest.warns(DeprecationWarning, match="use `num_iter`"):
        assert fit.n_iter == fit.num_iter
    expected = MixtureGaussianCDF.from_data(
        _GOOD, 2, "em", init_options={"max_iter": 3}
    )
    with pytest.warns(DeprecationWarning, match=r"use `init_options=dict\(...\)`"):
        bijector = MixtureGaussianCDF.from_data(_GOOD, 2, "em", max_iter=3)
    np.testing.assert_array_equal(bijector.means, expected.means)
    np.testing.assert_array_equal(bijector.means, fit.means)
