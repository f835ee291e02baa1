"""flowjax peers for the benchmarks: size-matched flows and their training loop.

Shared by ``benchmarks/density/run.py`` and ``benchmarks/conditional/run.py``
(which put this folder on ``sys.path``): both compare our flows with flowjax's
rational-quadratic-spline coupling flow (RQ-NSF) and masked autoregressive flow
(MAF) at a matched parameter count, trained at the same budget as ours.
"""

from __future__ import annotations

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import paramax
from flowjax import bijections as fjb
from flowjax import distributions as fjd
from flowjax import flows as fjf

WIDTHS = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def count(tree) -> int:
    """Counts the scalars in the array leaves of a pytree.

    Args:
        tree: Any pytree (a model, or the trainable half of one).

    Returns:
        The total number of array elements.
    """
    return int(sum(np.size(a) for a in jax.tree_util.tree_leaves(tree)))


def flowjax_params(dist):
    """Splits a flowjax model into its trainable arrays and the rest.

    Args:
        dist: A flowjax distribution.

    Returns:
        ``(params, static)`` as ``eqx.partition`` returns them; arrays wrapped in
        ``paramax.NonTrainable`` stay in ``static``.
    """
    return eqx.partition(
        dist,
        eqx.is_inexact_array,
        is_leaf=lambda leaf: isinstance(leaf, paramax.NonTrainable),
    )


def flowjax_model(
    kind: str,
    key,
    dim: int,
    target: int,
    *,
    layers: int,
    knots: int = 8,
    context_dim: int | None = None,
    widths: Sequence[int] = WIDTHS,
):
    """The flowjax flow whose trainable parameter count is closest to ``target``.

    Every width in ``widths`` is built with the same key; the first of the
    closest wins a tie.

    Args:
        kind: ``"rqs"`` for ``coupling_flow`` with a ``RationalQuadraticSpline``
            on [-4, 4] (RQ-NSF); anything else for ``masked_autoregressive_flow``
            (affine MAF).
        key: The flowjax initialisation key.
        dim: Dimension of the data.
        target: The parameter count to match.
        layers: Number of flow layers.
        knots: Spline knots (``"rqs"`` only).
        context_dim: Dimension of the conditioning variables (flowjax's
            ``cond_dim``); ``None`` for an unconditional flow.
        widths: The hidden widths to try.

    Returns:
        ``(dist, n_params, width)``: the flow, its trainable parameter count and
        its hidden width.
    """
    best = None
    for width in widths:
        base = fjd.Normal(jnp.zeros(dim))
        if kind == "rqs":
            dist = fjf.coupling_flow(
                key,
                base_dist=base,
                transformer=fjb.RationalQuadraticSpline(knots=knots, interval=4),
                cond_dim=context_dim,
                flow_layers=layers,
                nn_width=width,
            )
        else:
            dist = fjf.masked_autoregressive_flow(
                key,
                base_dist=base,
                cond_dim=context_dim,
                flow_layers=layers,
                nn_width=width,
            )
        n = count(flowjax_params(dist)[0])
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (dist, n, width)
    return best


def train_flowjax(
    dist,
    train,
    val,
    *,
    steps: int,
    batch: int,
    optimizer: optax.GradientTransformation,
    key,
    eval_every: int,
    context=None,
    val_context=None,
):
    """Maximum likelihood for a flowjax flow, the way ``fit`` trains ours.

    Adam (or any ``optimizer``) on minibatches drawn uniformly with replacement;
    the validation NLL is checked at the start, every ``eval_every`` steps and
    after the last step, and the best parameters seen are returned.

    Args:
        dist: The flowjax distribution to train.
        train: Training rows, shape ``(n, dim)``.
        val: Validation rows.
        steps: Number of optimiser steps.
        batch: Minibatch size.
        optimizer: The optax transformation.
        key: Key for the minibatch draws (split into one key per step).
        eval_every: Steps between validation checks.
        context: Conditioning variables of the training rows (conditional
            flows only).
        val_context: Conditioning variables of the validation rows.

    Returns:
        The trained distribution with the best validation NLL, unwrapped.
    """
    x, x_val = jnp.asarray(train), jnp.asarray(val)
    c = None if context is None else jnp.asarray(context)
    c_val = None if val_context is None else jnp.asarray(val_context)
    params, static = flowjax_params(dist)

    def loss(p, x, c):
        model = paramax.unwrap(eqx.combine(p, static))
        return -jnp.mean(model.log_prob(x, condition=c))

    @eqx.filter_jit
    def step(p, state, k, x, c):
        idx = jax.random.randint(k, (batch,), 0, x.shape[0])
        c_batch = None if c is None else c[idx]
        value, grads = eqx.filter_value_and_grad(loss)(p, x[idx], c_batch)
        updates, state = optimizer.update(grads, state, p)
        return eqx.apply_updates(p, updates), state, value

    eval_loss = eqx.filter_jit(loss)
    state = optimizer.init(params)
    best = (float(eval_loss(params, x_val, c_val)), params)
    keys = jax.random.split(key, steps)
    for i in range(steps):
        params, state, _ = step(params, state, keys[i], x, c)
        if (i + 1) % eval_every == 0 or i + 1 == steps:
            value = float(eval_loss(params, x_val, c_val))
            if value < best[0]:
                best = (value, params)
    return paramax.unwrap(eqx.combine(best[1], static))
