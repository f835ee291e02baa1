"""Default flows on small, awkward data never lose to a full-covariance Gaussian.

Each case is a 100-row training table of a kind that breaks a naive greedy
Gaussianization flow: values rounded to one decimal (ties), curved dependence,
a column that is nearly constant (standard deviation 1e-6 of its value, in raw
units), and heavy tails with strong skew. On each, the default
`gaussianization_flow(x)` (greedy start, then a short `fit` with validation
data) and the default `coupling_flow(key, D, data=x)` after the same `fit` must
score a large held-out sample within 0.05 nats per dimension of a
full-covariance Gaussian fitted to the same rows (the baseline, in NumPy). `fit`
must never return a model whose validation loss is above the one it started
from, and the fine-tuned flow must score the held-out sample no worse than its
start (to 0.005 nats per dimension): `fit` keeps the start unless the
validation gain is clear (restore-best's margin, `improvement_z`).

Every case has the same shapes (100 training rows, 50 validation rows, D = 4)
so that the greedy fits, the training step and the scoring compile once and
are reused (JIT compilation dominates the run time).
"""

import jax
import numpy as np
import optax
import pytest

from distrax_mixcdf import coupling_flow, fit, gaussianization_flow

D, N_TRAIN, N_VAL, N_TEST = 4, 100, 50, 1000
MARGIN = 0.05  # nats per dimension
TUNE_SLACK = 0.005  # nats per dimension: fine-tuning never makes things worse
STEPS = 50
OPTIMIZER = optax.adam(1e-3)  # one object: every fit with the same shapes shares a step


def _correlated(rng, n):
    mix = np.eye(D) + rng.normal(size=(D, D)) / np.sqrt(D)
    return rng.normal(size=(n, D)) @ mix


def _ties(rng, n):
    z = _correlated(rng, n)
    x = np.stack(
        [z[:, 0], np.exp(0.7 * z[:, 1]), z[:, 2] + 0.5 * z[:, 0] ** 2, z[:, 3]]
    )
    return np.round(x.T, 1)  # limited precision: every value on a 0.1 grid


def _tiny(rng, n):
    z = _correlated(rng, n)
    return np.stack(
        [
            z[:, 0],
            z[:, 1] + 0.8 * z[:, 0] ** 2,
            np.tanh(z[:, 2]),
            z[:, 3] * np.exp(0.3 * z[:, 0]),
        ],
        axis=1,
    )


def _nearly_constant(rng, n):
    # Raw units: the last column is 1 + 1e-6 N(0, 1), so in float32 its values
    # sit on a grid of ~8 steps per standard deviation.
    x = _correlated(rng, n)
    x[:, 3] = 1.0 + 1e-6 * x[:, 3]
    return x


def _heavy_and_skewed(rng, n):
    z = _correlated(rng, n)
    t2 = z[:, :2] / np.sqrt(rng.chisquare(2.0, size=(n, 1)) / 2.0)  # Student-t, 2 dof
    return np.concatenate([t2, np.exp(z[:, 2:])], axis=1)  # log-normal


CASES = {
    "ties": (_ties, True),
    "tiny_n": (_tiny, True),
    "nearly_constant_column": (_nearly_constant, False),
    "heavy_tails_and_skew": (_heavy_and_skewed, True),
}


def _split(name):
    make, standardise = CASES[name]
    rng = np.random.default_rng(sorted(CASES).index(name))
    x = make(rng, N_TRAIN + N_VAL + N_TEST).astype(np.float32).astype(np.float64)
    train, val, test = np.split(x, [N_TRAIN, N_TRAIN + N_VAL])
    if standardise:  # as a user would, with the training statistics
        mean, std = train.mean(0), train.std(0)
        train, val, test = ((a - mean) / std for a in (train, val, test))
    return train, val, test


def gaussian_nll(train, test):
    """Held-out NLL per dimension of the MLE full-covariance Gaussian of ``train``."""
    mean = train.mean(0)
    cov = np.cov(train, rowvar=False, bias=True)
    diff = test - mean
    _, log_det = np.linalg.slogdet(cov)
    mahalanobis = np.sum(diff * np.linalg.solve(cov, diff.T).T, axis=1)
    log_density = -0.5 * (mahalanobis + log_det + D * np.log(2 * np.pi))
    return -np.mean(log_density) / D


@jax.jit
def _nll(flow, x):
    return -flow.log_prob(x).mean() / x.shape[-1]


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    train, val, test = _split(request.param)
    f32 = [a.astype(np.float32) for a in (train, val, test)]
    return request.param, gaussian_nll(train, test), *f32


def _tune(flow, train, val):
    result = fit(
        flow, train, OPTIMIZER, steps=STEPS, validation_data=val, show_progress=False
    )
    # Restore includes step 0: the validation loss never ends above the start's.
    assert result.val_steps[0] == 0
    assert result.best_val_loss <= result.val_losses[0]
    return result.model


def test_gaussianization_flow_defaults_match_or_beat_the_gaussian(case):
    name, baseline, train, val, test = case
    greedy = gaussianization_flow(train)
    tuned = _tune(greedy, train, val)
    greedy_nll, tuned_nll = float(_nll(greedy, test)), float(_nll(tuned, test))
    print(
        f"{name}: Gaussian {baseline:.3f}, greedy ({greedy.num_layers} layers) "
        f"{greedy_nll:.3f}, fine-tuned {tuned_nll:.3f} nats/dim"
    )
    assert greedy_nll <= baseline + MARGIN
    assert tuned_nll <= baseline + MARGIN
    assert tuned_nll <= greedy_nll + TUNE_SLACK


def test_coupling_flow_defaults_match_or_beat_the_gaussian(case):
    name, baseline, train, val, test = case
    start = coupling_flow(jax.random.PRNGKey(0), D, data=train)
    tuned = _tune(start, train, val)
    start_nll, tuned_nll = float(_nll(start, test)), float(_nll(tuned, test))
    print(
        f"{name}: Gaussian {baseline:.3f}, coupling start {start_nll:.3f}, "
        f"fine-tuned {tuned_nll:.3f} nats/dim"
    )
    assert tuned_nll <= baseline + MARGIN
    assert tuned_nll <= start_nll + TUNE_SLACK
