"""Jitted helpers shared by the reliability and fuzz tests (float32 and float64).

They take the bijector as an argument, so every mixture with the same K and
input shape reuses one compilation.
"""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import strategies as st


@jax.jit
def masked_loss_grads(bijector, values):
    """Gradients of a loss over forward and inverse that masks non-finite inputs."""

    def loss(b, v):
        keep = jnp.isfinite(v)
        total = 0.0
        for fn in (b.forward_and_log_det, b.inverse_and_log_det):
            out, log_det = fn(v)
            total = total + jnp.sum(jnp.where(keep, out + log_det, 0.0))
        return total

    return jax.grad(loss, argnums=(0, 1))(bijector, values)


@st.composite
def extreme_mixtures(draw, k=4):
    """K = 4 mixtures across the reliability envelope.

    Scales from 1e-6 to 1e6, means spread up to e^13.8 ≈ 1e6 times the widest
    scale, logits from -1e4 to 1e4 (vanishing weights), and duplicated
    components.
    """
    max_log_gap = 13.8
    finite = lambda lo, hi: st.floats(lo, hi, allow_nan=False, allow_infinity=False)  # noqa: E731
    extreme = st.sampled_from([-1e4, -50.0, 50.0, 1e4])
    logit = st.one_of(finite(-5.0, 5.0), extreme)
    logits = draw(st.lists(logit, min_size=k, max_size=k))
    log_scales = draw(
        st.lists(finite(np.log(1e-6), np.log(1e6)), min_size=k, max_size=k)
    )
    duplicate = draw(st.booleans())
    if duplicate:  # component 1 is a copy of component 0
        logits[1], log_scales[1] = logits[0], log_scales[0]
    # The spread is relative to the final widest scale.
    spread = float(np.exp(draw(finite(-3.0, max_log_gap)))) * float(
        np.exp(max(log_scales))
    )
    means = [draw(finite(-1.0, 1.0)) * spread for _ in range(k)]
    if duplicate:
        means[1] = means[0]
    return np.array(logits), np.array(means), np.array(log_scales)


def in_foundation_envelope(params, dtype) -> bool:
    """The foundation's envelope: scales within 1e4, weights ≥ 1e-6, and every
    component wider than 1e3 ulps of the means (else x cannot resolve it)."""
    logits, means, log_scales = params
    log_weights = logits - np.logaddexp.reduce(logits)
    resolution = 1e3 * float(np.finfo(dtype).eps) * max(1.0, float(np.abs(means).max()))
    return bool(
        np.ptp(log_scales) <= np.log(1e4)
        and log_weights.min() >= np.log(1e-6)
        and np.exp(log_scales.min()) >= resolution
    )


def sorted_grid(params, size, dtype, seed):
    """Points around every component at its own scale, and far out to 1e4·σ_max."""
    _, means, log_scales = params
    rng = np.random.default_rng(seed)
    scales = np.exp(log_scales)
    local = means[rng.integers(len(means), size=size // 2)] + scales[
        rng.integers(len(means), size=size // 2)
    ] * rng.uniform(-8, 8, size // 2)
    far = means.mean() + np.exp(log_scales.max()) * np.sign(
        rng.normal(size=size - size // 2)
    ) * np.logspace(-1, 4, size - size // 2)
    return np.sort(np.concatenate([local, far]).astype(dtype))
