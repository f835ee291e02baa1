r"""Maximum-likelihood training of flows and distributions built on the bijector.

:func:`fit` minimises the mean negative log-likelihood of any model pytree (a
flow, conditional ones with a ``context``; a distribution; a bijector or stack
of bijectors, through :func:`~distrax_mixcdf.normalizing_flow`; or a raw
parameter pytree with a custom loss) with optax, with minibatches, validation,
early stopping, restore-best and skipping of non-finite steps. It returns a
:class:`FitResult`.

How ``fit`` finds the parameters: the model is flattened with
``jax.tree_util.tree_flatten``; every floating-point array leaf is trained and
every other leaf (boolean coupling masks, integer arrays) is kept exactly as
given, and the model is rebuilt from the same treedef inside the loss. This is
deliberately *not* ``equinox.partition``: distrax's ``Jittable`` classifies
leaves by value, so replacing leaves by ``None`` changes the pytree metadata and
the rebuild fails (distrax issue #193). Callables stored on distrax objects
(conditioners, ``MaskedCoupling``'s bijector factory, equinox modules) are
static metadata there, so their weights are invisible to ``fit``: hold trainable
arrays as leaves, or pass a parameter pytree as the model and build the flow
inside ``loss_fn``.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from distrax_mixcdf._validation import (
    check_event_shape,
    is_bijector,
    is_bijector_stack,
)
from distrax_mixcdf.flows.base import Flow, normalizing_flow

__all__ = ["FitResult", "fit"]

# Minimum seconds between progress-bar refreshes: reading the loss forces a
# host-device sync, which we do not want on every step.
_PROGRESS_INTERVAL_S = 0.1

# Module-level, so that `fit` calls without an optimizer share compiled steps.
_DEFAULT_OPTIMIZER = optax.adam(1e-2)

# Restore-best keeps the initial model unless the best evaluation's mean per-row
# validation gain exceeds this many standard errors (see `fit`).
_DEFAULT_IMPROVEMENT_Z = 3.0


# -- fit -----------------------------------------------------------------------------


class FitResult(NamedTuple):
    r"""What :func:`fit` returns.

    With :math:`\theta_t` the parameters after :math:`t` updates and
    :math:`B_t` the (mini)batch of step :math:`t`, the recorded losses are

    .. math::
        \text{losses}[t] = L(\theta_t; B_t), \qquad
        \text{val\_losses}[j] = L(\theta_{s_j}; \text{validation data}),

    with :math:`s_j` = ``val_steps[j]``, and ``model`` holds
    :math:`\theta_{\text{best\_step}}`. So ``losses`` plotted against
    :attr:`train_steps` and ``val_losses`` against ``val_steps`` share one step
    axis; :meth:`plot` draws both.

    Attributes:
      model: The trained model, the same type and structure as the ``model``
        passed in. With validation data (and ``restore_best``), the parameters
        of the best validation evaluation if it beats the initial model by the
        margin of :func:`fit` (``improvement_z``), else the initial model;
        otherwise those after the last step.
      losses: ``np.ndarray [steps_run]``: the training loss of each step's
        (mini)batch, evaluated *before* that step's update. Skipped steps keep
        their non-finite value here.
      val_losses: ``np.ndarray [n_evals]``: validation losses (empty without
        validation data).
      val_steps: ``np.ndarray [n_evals]`` of ints: the number of updates done
        before each validation evaluation (``0`` is the initial model; the last
        step run is always evaluated).
      best_step: The step whose parameters ``model`` holds: the entry of
        ``val_steps`` with the lowest validation loss, or ``0`` if that one
        does not beat the initial model by the margin; the number of steps run
        when there is no validation data (or ``restore_best=False``).
      skipped_steps: How many steps were skipped because the loss, a gradient
        or an updated parameter was non-finite.
    """

    model: Any
    losses: np.ndarray
    val_losses: np.ndarray
    val_steps: np.ndarray
    best_step: int
    skipped_steps: int

    @property
    def train_steps(self) -> np.ndarray:
        """``np.arange(len(losses))``: the step :math:`t` of each training loss."""
        return np.arange(len(self.losses))

    @property
    def best_val_loss(self) -> float:
        """The validation loss of ``model`` (NaN without validation data).

        With ``restore_best`` this is never above ``val_losses[0]``, the
        initial model's: ``val_losses.min()``, or ``val_losses[0]`` where the
        best evaluation's gain is within the margin (``improvement_z``).
        """
        where = np.flatnonzero(self.val_steps == self.best_step)
        return float(self.val_losses[where[-1]]) if where.size else float("nan")

    def plot(self, ax: Any = None, *, smooth: int | None = None) -> Any:
        r"""Plots the training and validation loss curves (needs matplotlib).

        Draws ``losses`` against :attr:`train_steps` (faint), their running
        mean over ``smooth`` steps (default: about 1/50 of the run, at least
        1), ``val_losses`` against ``val_steps`` with markers, and a vertical
        line at ``best_step``, the step whose parameters ``model`` holds.

        Args:
          ax: A matplotlib ``Axes``; default ``plt.gca()``.
          smooth: Window of the running mean of the (minibatch) training loss.

        Returns:
          The ``Axes``.
        """
        import matplotlib.pyplot as plt

        ax = plt.gca() if ax is None else ax
        steps, losses = self.train_steps, self.losses
        window = max(1, len(losses) // 50) if smooth is None else max(1, int(smooth))
        if len(losses):
            ax.plot(steps, losses, color="tab:blue", alpha=0.3, lw=0.8)
            if window > 1 and len(losses) >= window:
                mean = np.convolve(losses, np.ones(window) / window, mode="valid")
                ax.plot(steps[window - 1 :], mean, color="tab:blue", label="training")
            else:
                ax.lines[-1].set(alpha=1.0, label="training")
        if len(self.val_losses):
            ax.plot(
                self.val_steps,
                self.val_losses,
                "o-",
                ms=3,
                color="tab:orange",
                label="validation",
            )
            ax.axvline(self.best_step, color="0.5", ls=":", label="best (returned)")
        ax.set(xlabel="step", ylabel="loss")
        if ax.get_legend_handles_labels()[0]:  # nothing to label after 0 steps
            ax.legend()
        return ax


def _is_floating_array(leaf: Any) -> bool:
    # Python floats are not arrays: on distrax objects they are static metadata
    # anyway, and training them would silently change a leaf's type.
    return isinstance(leaf, (jax.Array, np.ndarray)) and jnp.issubdtype(
        leaf.dtype, jnp.floating
    )


def _leading_size(data: Any, argument: str) -> int:
    leaves = jax.tree_util.tree_leaves(data)
    if not leaves:
        raise ValueError(f"`{argument}` has no arrays.")
    shapes = [jnp.shape(leaf) for leaf in leaves]
    if any(len(s) == 0 for s in shapes) or len({s[0] for s in shapes}) != 1:
        raise ValueError(
            f"`{argument}` must be an array [N, ...] (or a pytree of arrays sharing "
            f"the leading axis N), got shapes {shapes}."
        )
    if shapes[0][0] == 0:
        raise ValueError(f"`{argument}` is empty (shape {shapes[0]}).")
    return int(shapes[0][0])


def _check_positive_int(value: Any, argument: str, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{argument}` must be a positive integer, got {value!r}.")


# The default losses are means of per-row negative log-likelihoods; this maps
# each to the function giving those per-row values (or None where the model's
# log_prob has no leading row axis), for restore-best's margin (see `fit`). A
# custom `loss_fn` has no entry: `fit` cannot tell whether it is a mean over rows.
_ROW_LOSSES: dict[Callable[..., Any], Callable[[Any, Any], jax.Array | None]] = {}


def _rows_of(log_prob: jax.Array, n: int) -> jax.Array | None:
    """``-log_prob`` summed over every axis but the leading (row) axis of size n."""
    if log_prob.ndim == 0 or log_prob.shape[0] != n:
        return None
    return -jnp.sum(jnp.reshape(log_prob, (n, -1)), axis=1)


@functools.cache
def _flow_nll(event_shape: tuple[int, ...]) -> Callable[[Any, Any], jax.Array]:
    # One function object per event shape, so repeated `fit` calls can share the
    # compiled step (the loss is part of its cache key).
    def loss(model, batch):
        log_prob = normalizing_flow(model, event_shape).log_prob(batch)
        return -jnp.sum(log_prob) / batch.shape[0]

    def rows(model, batch):
        log_prob = normalizing_flow(model, event_shape).log_prob(batch)
        return _rows_of(jnp.asarray(log_prob), batch.shape[0])

    _ROW_LOSSES[loss] = rows
    return loss


def _distribution_nll(model: Any, batch: Any) -> jax.Array:
    return (
        -jnp.sum(model.log_prob(batch)) / jax.tree_util.tree_leaves(batch)[0].shape[0]
    )


def _distribution_rows(model: Any, batch: Any) -> jax.Array | None:
    n = jax.tree_util.tree_leaves(batch)[0].shape[0]
    return _rows_of(jnp.asarray(model.log_prob(batch)), n)


def _conditional_nll(model: Any, batch: tuple[Any, Any]) -> jax.Array:
    x, context = batch
    return -jnp.sum(model.log_prob(x, context=context)) / x.shape[0]


def _conditional_rows(model: Any, batch: tuple[Any, Any]) -> jax.Array | None:
    x, context = batch
    return _rows_of(jnp.asarray(model.log_prob(x, context=context)), x.shape[0])


_ROW_LOSSES[_distribution_nll] = _distribution_rows
_ROW_LOSSES[_conditional_nll] = _conditional_rows


def _paired(data: Any, context: Any, names: tuple[str, str]) -> tuple[Any, Any]:
    """``(data, context)`` as arrays, checked to have one context row per example."""
    data, context = jnp.asarray(data), jnp.asarray(context)
    if data.ndim < 1 or context.ndim < 1 or data.shape[0] != context.shape[0]:
        raise ValueError(
            f"`{names[1]}` of shape {context.shape} must have one row per example "
            f"of `{names[0]}` (shape {data.shape}): their leading sizes differ."
        )
    return data, context


def _default_loss(
    model: Any, event_shape: tuple[int, ...] | None
) -> Callable[[Any, Any], jax.Array]:
    """Mean NLL per example, ``-Σ log p(batch) / B`` (sums any batch/event axes)."""
    if is_bijector(model) or is_bijector_stack(model):
        if event_shape is None:
            raise ValueError(
                "A bijector `model` is trained on `data` given as one array "
                "[N, ...]; for pytree data, pass a `loss_fn`."
            )
        return _flow_nll(event_shape)
    if callable(getattr(model, "log_prob", None)):
        return _distribution_nll
    raise TypeError(
        "`model` must be a distribution (with `.log_prob`), a bijector or a "
        "list/tuple of bijectors, or come with a `loss_fn`; got "
        f"{type(model).__name__}."
    )


def _leaf_key(leaf: Any) -> Any:
    """A hashable stand-in for a kept (non-trained) leaf, compared by value."""
    if isinstance(leaf, (jax.Array, np.ndarray)):
        array = np.asarray(leaf)
        return ("array", array.shape, array.dtype.str, array.tobytes())
    hash(leaf)  # raises TypeError for unhashable leaves: no cache key then
    return leaf


class _Spec:
    """Everything static about one training setup; the jit cache key of a step.

    Two ``fit`` calls with equal specs (same treedef, kept leaves equal by value,
    same loss and optimizer objects, same batch size) share one compiled step.
    If some part is unhashable, the spec falls back to identity (no sharing).
    """

    def __init__(
        self,
        treedef,
        trainable,
        kept,
        dtypes,
        loss_fn,
        optimizer,
        batch,
        batch_shardings=None,
    ):
        self.treedef = treedef
        self.trainable = trainable  # tuple[bool]: which leaves are parameters
        self.kept = kept  # the other leaves, exactly as given
        self.dtypes = dtypes  # the parameters' dtypes
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.batch = batch  # minibatch size, or None for the full batch
        # Per data leaf, the sharding a minibatch is constrained to (data-parallel
        # training), or None on one device.
        self.batch_shardings = batch_shardings
        try:
            self._key = (
                treedef,
                trainable,
                tuple(_leaf_key(leaf) for leaf in kept),
                dtypes,
                loss_fn,
                optimizer,
                batch,
                batch_shardings,
            )
            self._hash = hash(self._key)
        except (TypeError, ValueError):
            self._key, self._hash = None, id(self)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if not isinstance(other, _Spec) or self._key is None or other._key is None:
            return False
        try:
            return bool(self._key == other._key)
        except (TypeError, ValueError):  # e.g. array-valued pytree metadata
            return False

    def rebuild(self, params: Sequence[jax.Array]) -> Any:
        """The model with ``params`` in the trainable slots."""
        trained, kept = iter(params), iter(self.kept)
        return jax.tree_util.tree_unflatten(
            self.treedef, [next(trained) if t else next(kept) for t in self.trainable]
        )

    def loss(self, params: Sequence[jax.Array], batch: Any) -> jax.Array:
        value = self.loss_fn(self.rebuild(params), batch)
        if jnp.shape(value) != ():
            raise ValueError(
                f"`loss_fn` must return a scalar, got shape {jnp.shape(value)}."
            )
        return value


def _batch_shardings(data: Any, batch_size: int | None) -> tuple | None:
    """The data leaves' shardings if ``data`` is sharded over several devices.

    Data parallelism is opt-in by placing the data: ``jax.device_put(data,
    NamedSharding(mesh, P("data")))`` shards the leading (example) axis over
    the mesh's ``"data"`` axis.
    """
    leaves = jax.tree_util.tree_leaves(data)
    shardings = [
        s
        for s in (getattr(leaf, "sharding", None) for leaf in leaves)
        if isinstance(s, jax.sharding.NamedSharding)
    ]
    if len(shardings) != len(leaves):
        return None
    if all(len(s.device_set) == 1 for s in shardings):
        return None
    for leaf, sharding in zip(leaves, shardings, strict=True):
        spec = tuple(sharding.spec) + (None,) * (leaf.ndim - len(sharding.spec))
        if any(axis is not None for axis in spec[1:]):
            raise ValueError(
                "Data-parallel `fit` shards only the leading (example) axis; got "
                f"a data leaf of shape {leaf.shape} with PartitionSpec "
                f"{sharding.spec}."
            )
        shards = sharding.shard_shape(leaf.shape)[0]
        if batch_size is not None and batch_size % (leaf.shape[0] // shards):
            raise ValueError(
                f"`batch_size` ({batch_size}) must be divisible by the number of "
                f"data shards ({leaf.shape[0] // shards}) for data-parallel "
                f"training (data of shape {leaf.shape}, {sharding.spec})."
            )
    return tuple(shardings)


def _replicated(sharding: jax.sharding.NamedSharding) -> jax.sharding.NamedSharding:
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())


def _all_finite(tree: Any) -> jax.Array:
    finite = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
    return jnp.all(jnp.stack(finite)) if finite else jnp.asarray(True)


def _keep_if(ok: jax.Array, new: Any, old: Any) -> Any:
    # Per-leaf select that keeps the old leaf's dtype, so the carried state has
    # stable types across steps (one compilation).
    def select(a, b):
        b = jnp.asarray(b)
        return jnp.where(ok, jnp.asarray(a).astype(b.dtype), b)

    return jax.tree_util.tree_map(select, new, old)


@functools.partial(jax.jit, static_argnums=0)
def _train_step(spec: _Spec, params, opt_state, key, skipped, data):
    """One optimizer step; discards the update if anything is non-finite."""
    key, subkey = jax.random.split(key)
    if spec.batch is None:
        batch = data
    else:
        n = jax.tree_util.tree_leaves(data)[0].shape[0]
        index = jax.random.randint(subkey, (spec.batch,), 0, n)
        batch = jax.tree_util.tree_map(lambda a: jnp.take(a, index, axis=0), data)
        if spec.batch_shardings is not None:
            # Data parallel: each device evaluates the loss on its slice of the
            # minibatch; XLA inserts the all-reduce of the gradients.
            batch = jax.tree_util.tree_unflatten(
                jax.tree_util.tree_structure(batch),
                [
                    jax.lax.with_sharding_constraint(leaf, sharding)
                    for leaf, sharding in zip(
                        jax.tree_util.tree_leaves(batch),
                        spec.batch_shardings,
                        strict=True,
                    )
                ],
            )
    value, grads = jax.value_and_grad(spec.loss)(params, batch)
    updates, new_opt_state = spec.optimizer.update(grads, opt_state, params)
    new_params = [
        p.astype(d)
        for p, d in zip(
            jax.tree_util.tree_leaves(optax.apply_updates(params, updates)),
            spec.dtypes,
            strict=True,
        )
    ]
    ok = jnp.isfinite(value) & _all_finite(grads) & _all_finite(new_params)
    params = _keep_if(ok, new_params, params)
    opt_state = _keep_if(ok, new_opt_state, opt_state)
    return params, opt_state, key, skipped + (~ok).astype(skipped.dtype), value


@functools.partial(jax.jit, static_argnums=0)
def _eval_loss(spec: _Spec, params, data):
    """The loss on ``data`` and, where known, its per-row terms ``[N]`` (or None).

    For the default losses the loss is the mean of the per-row terms, computed
    from them: one pass, one compilation.
    """
    row_loss = _ROW_LOSSES.get(spec.loss_fn)
    rows = None if row_loss is None else row_loss(spec.rebuild(params), data)
    if rows is None:
        return spec.loss(params, data), None
    return jnp.sum(rows) / rows.shape[0], rows


def _paired_gain(start_rows: Any, rows: Any) -> tuple[float, float]:
    r"""Mean and standard error of the per-row gains ``start_rows - rows``.

    With :math:`d_i = \ell_i(\theta_0) - \ell_i(\theta)`, :math:`i = 1..n`:
    :math:`\bar d` and :math:`s_d / \sqrt{n}`, :math:`s_d` the sample standard
    deviation (``ddof=1``); the standard error is infinite for :math:`n < 2`.
    Computed in float64.
    """
    gains = np.asarray(start_rows, np.float64) - np.asarray(rows, np.float64)
    n = gains.size
    error = float(gains.std(ddof=1)) / np.sqrt(n) if n > 1 else np.inf
    return float(gains.mean()), float(error)


def _clearly_better(start_rows: Any, rows: Any, z: float) -> bool:
    """Whether ``rows`` beat ``start_rows`` by more than ``z`` standard errors."""
    start_rows = np.asarray(start_rows, np.float64)
    if not np.isfinite(start_rows).all():
        # The start is infinitely bad (or NaN) on some row, and the candidate,
        # chosen by a finite mean validation loss, is not: it wins outright.
        return bool(np.isfinite(np.asarray(rows, np.float64)).all())
    mean, error = _paired_gain(start_rows, rows)
    return bool(mean > z * error)  # False for NaN


class _NoProgress:
    """Stands in for the tqdm bar when ``show_progress=False``."""

    def update(self, n: int = 1) -> None:
        del n

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        del args, kwargs

    def close(self) -> None:
        pass


def fit(
    model: Any,
    data: Any,
    optimizer: optax.GradientTransformation | None = None,
    *,
    context: Any = None,
    steps: int = 1000,
    batch_size: int | None = None,
    key: jax.Array | None = None,
    validation_data: Any = None,
    validation_context: Any = None,
    patience: int | None = None,
    eval_every: int = 10,
    loss_fn: Callable[[Any, Any], jax.Array] | None = None,
    show_progress: bool = True,
    event_shape: Sequence[int] | None = None,
    restore_best: bool = True,
    improvement_z: float = _DEFAULT_IMPROVEMENT_Z,
) -> FitResult:
    r"""Trains ``model`` by maximum likelihood (or any loss) with optax.

    The default loss on a (mini)batch :math:`x_{1..B}` is the mean negative
    log-likelihood per example,

    .. math::
        L(\theta) = -\frac{1}{B}\sum_{i=1}^{B} \log p_\theta(x_i),

    where :math:`\log p_\theta(x_i)` is summed over any batch/event axes the
    model's ``log_prob`` leaves (so a ``distrax.Normal`` with ``[D]`` parameters on
    ``[N, D]`` data scores the joint of the ``D`` independent dimensions). For a
    bijector ``T`` (data → latent), :math:`p_\theta` is
    :func:`normalizing_flow` of it with ``event_shape = data.shape[1:]``.

    Trainable parameters are the floating-point array leaves of
    ``jax.tree_util.tree_flatten(model)``; every other leaf (boolean masks,
    integer arrays) is kept unchanged, and the model is rebuilt from the same
    treedef. Callables stored on distrax objects (conditioners, equinox modules)
    are static there, so their weights are *not* trained: keep trainable arrays
    as leaves, or pass a parameter pytree as ``model`` with a ``loss_fn`` that
    builds the flow from it. Every floating leaf is trained (e.g. the base
    ``loc``/``scale`` of a ``distrax.Transformed`` model): build constants
    inside ``loss_fn`` to freeze them. Likewise, objects that cache arrays
    *derived* from their parameters would have each trained on its own and
    drift apart (``distrax.ScalarAffine(log_scale=s)`` stores ``exp(s)`` and
    ``exp(-s)`` as leaves too): build those inside ``loss_fn`` as well.
    :class:`~distrax_mixcdf.MixtureGaussianCDF` stores only its three raw
    parameters and is safe. The optimizer sees the trainable leaves as a flat
    list in ``tree_flatten`` order.

    One step is a single jit-compiled function, compiled once and reused for
    every step: draw a minibatch (uniformly with replacement, from ``key``),
    take ``value_and_grad`` of the loss and apply the optax update. Later calls
    with the same model structure (non-trained leaves equal by value), the same
    ``loss_fn`` and ``optimizer`` objects (the default ones included) and batch
    size reuse the compiled step; like ``jax.jit``, a ``loss_fn`` is traced
    once, so later changes to Python values it closes over are not seen. If
    the loss, a gradient or an updated parameter is non-finite, the update is
    discarded: parameters and optimizer state stay as they were, and the step
    is counted in ``skipped_steps``.

    Data-parallel training: place ``data`` sharded over its leading axis, e.g.
    ``jax.device_put(data, NamedSharding(Mesh(jax.devices(), ("data",)),
    PartitionSpec("data")))``. ``fit`` then replicates the parameters and
    optimizer state on that mesh and constrains every minibatch to the same
    sharding, so each device evaluates the loss on its slice and XLA all-reduces
    the gradients (``batch_size`` must be divisible by the number of shards).
    The result matches single-device training to float rounding. On several
    hosts, call ``jax.distributed.initialize()`` first and build the global
    array with ``jax.make_array_from_process_local_data``.

    Conditional density estimation: with ``context [N, C]``, the default loss
    is :math:`-\frac{1}{B}\sum_i \log p_\theta(x_i \mid c_i)`, every
    minibatch draws the same rows of ``data`` and ``context``, and the model
    must be a conditional :class:`~distrax_mixcdf.Flow` (or come with a
    ``loss_fn``, which then receives the batch as the pair ``(x, context)``).
    Validation then needs ``validation_context`` beside ``validation_data``.

    With ``validation_data``, the loss on all of it (one batch) is evaluated
    before training (step 0, the model as passed in) and every ``eval_every``
    steps (and after the last step); training stops early after ``patience``
    evaluations in a row without a strictly lower validation loss. With
    ``restore_best``, the candidate is the evaluation :math:`\theta^*` with the
    lowest validation loss, and the initial model :math:`\theta_0` takes part:
    if no step beats it (a good greedy start on a few hundred rows, say), it is
    returned unchanged, so fine-tuning never raises the validation loss.

    On a few dozen validation rows, a gain the size of the validation noise
    would be taken as real and not carry over to new rows, so :math:`\theta^*`
    must also beat :math:`\theta_0` clearly. With :math:`\ell_i(\theta)` the
    negative log-likelihood of validation row :math:`i` (the validation loss
    is their mean over the :math:`N_v` rows) and the paired per-row gains
    :math:`d_i = \ell_i(\theta_0) - \ell_i(\theta^*)`,

    .. math::
        \bar d = \frac{1}{N_v}\sum_{i=1}^{N_v} d_i, \qquad
        \operatorname{se}(\bar d) = \frac{s_d}{\sqrt{N_v}}, \qquad
        s_d^2 = \frac{1}{N_v - 1}\sum_{i=1}^{N_v} (d_i - \bar d)^2,

    :math:`\theta^*` is returned only if :math:`\bar d > z\,
    \operatorname{se}(\bar d)` with :math:`z` = ``improvement_z``, and
    :math:`\theta_0` (``best_step = 0``) otherwise. The default :math:`z = 3`,
    a one-sided paired test at the 0.13% level, is stricter than the usual
    two standard errors because :math:`\theta^*` is the best of :math:`m`
    evaluations on these same rows, which biases its gain upwards: by
    Bonferroni, noise alone passes with probability at most
    :math:`m \cdot 0.13\%` (under 3% for the 20 evaluations of 1000 steps
    checked every 50, and far less in practice, since successive evaluations
    are strongly correlated). Pairing cancels the rows' common difficulty,
    so the test sees how consistently the rows gain, not how much their
    losses vary. A start with a non-finite validation loss is beaten by any
    finite candidate; with one validation row :math:`\operatorname{se}` is
    unknown and :math:`\theta_0` is kept.

    The rule costs nothing beyond the validation passes, which give the
    per-row losses with their mean; those of :math:`\theta_0` and of the best
    evaluation so far are kept (:math:`N_v` numbers each). It needs per-row
    losses, which ``fit`` has for its default negative log-likelihoods (of a
    bijector's flow, a conditional flow, or a distribution whose ``log_prob``
    keeps the row axis; :math:`\ell_i` sums any other axes of row :math:`i`).
    A custom ``loss_fn`` is not split into rows, since it need not be a mean
    over rows (a batch statistic, say): there the lowest validation loss is
    returned, as with ``improvement_z=0``. Early stopping is not affected:
    ``patience`` counts evaluations without a lower mean validation loss.

    The progress bar shows the latest and the best validation loss;
    ``FitResult.plot`` draws the curves.

    Args:
      model: A distrax/TFP distribution (anything with ``.log_prob``), a distrax
        or TFP bijector or list/tuple of them (see :func:`normalizing_flow`), or
        any pytree when ``loss_fn`` is given.
      data: Training data ``[N, ...]``, or (with ``loss_fn``) a pytree of arrays
        sharing the leading axis ``N``.
      optimizer: An optax transformation; default ``optax.adam(1e-2)``.
      context: Per-example contexts ``[N, C]`` of a conditional model, row
        ``i`` belonging to ``data[i]``.
      steps: Maximum number of optimizer steps.
      batch_size: Minibatch size ``B <= N``; ``None`` uses the full batch every
        step.
      key: PRNG key for the minibatches; default ``jax.random.PRNGKey(0)``.
      validation_data: Held-out data of the same structure as ``data``.
      validation_context: The held-out rows' contexts ``[N_v, C]`` (with
        ``context``).
      patience: Evaluations without improvement before stopping; ``None``
        never stops early. Needs ``validation_data``.
      eval_every: Steps between validation evaluations.
      loss_fn: ``loss_fn(model, batch) -> scalar`` replacing the mean NLL;
        ``model`` is rebuilt with traced parameters, so it is the same type as
        the ``model`` passed in.
      show_progress: Show a tqdm progress bar with the current training loss
        and the latest and best validation loss; ``False`` prints nothing.
      event_shape: Event shape of a bijector model's flow; default
        ``data.shape[1:]``.
      restore_best: With validation data, return the best-validation parameters
        (default; subject to ``improvement_z``) rather than the last ones.
      improvement_z: With ``restore_best``, how many standard errors
        :math:`z` the best evaluation's mean per-row validation gain over the
        initial model must exceed (:math:`\bar d > z\,
        \operatorname{se}(\bar d)`, above) for it to be returned instead of
        the initial model. A finite number ``>= 0``; default 3; 0 turns the
        margin off (any lower validation loss wins). Ignored with a custom
        ``loss_fn``.

    Returns:
      A :class:`FitResult`.

    Raises:
      TypeError: If ``model`` has no default loss and ``loss_fn`` is None.
      ValueError: If an argument is malformed (``improvement_z`` negative or
        not finite, say), ``model`` has no floating-point array leaves, or
        ``loss_fn`` does not return a scalar.
    """
    # -- validate -----------------------------------------------------------------
    if context is None and validation_context is not None:
        raise ValueError("`validation_context` was given without `context`.")
    if isinstance(model, Flow) and loss_fn is None:
        if model.context_dim is not None and context is None:
            raise ValueError(
                f"`model` is a conditional flow (context_dim = {model.context_dim}): "
                f"pass `context` of shape [N, {model.context_dim}] beside `data`."
            )
        if model.context_dim is None and context is not None:
            raise ValueError(
                "`model` is an unconditional flow (context_dim = None), but a "
                f"`context` of shape {jnp.shape(context)} was given."
            )
    if context is not None:
        data = _paired(data, context, ("data", "context"))
        if (validation_data is None) != (validation_context is None):
            raise ValueError(
                "With `context`, pass `validation_data` and `validation_context` "
                "together (or neither)."
            )
        if validation_data is not None:
            validation_data = _paired(
                validation_data,
                validation_context,
                ("validation_data", "validation_context"),
            )
        if loss_fn is None:
            if not callable(getattr(model, "log_prob", None)):
                raise TypeError(
                    "With `context`, `model` must have `log_prob(x, context=...)` "
                    f"or come with a `loss_fn`; got {type(model).__name__}."
                )
            loss_fn = _conditional_nll
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"`steps` must be a non-negative integer, got {steps!r}.")
    _check_positive_int(batch_size, "batch_size", allow_none=True)
    _check_positive_int(eval_every, "eval_every")
    _check_positive_int(patience, "patience", allow_none=True)
    if (
        isinstance(improvement_z, bool)
        or not isinstance(improvement_z, (int, float, np.integer, np.floating))
        or not np.isfinite(improvement_z)
        or improvement_z < 0
    ):
        raise ValueError(
            "`improvement_z` must be a finite non-negative number (standard errors "
            f"of the validation gain; 0 turns the margin off), got {improvement_z!r}."
        )
    if patience is not None and validation_data is None:
        raise ValueError("`patience` (early stopping) needs `validation_data`.")

    data = jax.tree_util.tree_map(jnp.asarray, data)
    n = _leading_size(data, "data")
    if batch_size is not None and batch_size > n:
        raise ValueError(
            f"`batch_size` ({batch_size}) exceeds the number of examples N = {n} "
            f"(data of shape {jax.tree_util.tree_map(jnp.shape, data)})."
        )
    full_batch = batch_size is None or batch_size == n
    if validation_data is not None:
        validation_data = jax.tree_util.tree_map(jnp.asarray, validation_data)
        _leading_size(validation_data, "validation_data")
        data_struct = jax.tree_util.tree_structure(data)
        if jax.tree_util.tree_structure(validation_data) != data_struct or any(
            jnp.shape(v)[1:] != jnp.shape(d)[1:]
            for v, d in zip(
                jax.tree_util.tree_leaves(validation_data),
                jax.tree_util.tree_leaves(data),
                strict=True,
            )
        ):
            raise ValueError(
                "`validation_data` must match `data` but for the leading axis: got "
                f"{jax.tree_util.tree_map(jnp.shape, validation_data)} vs "
                f"{jax.tree_util.tree_map(jnp.shape, data)}."
            )

    if loss_fn is None:
        if not isinstance(data, jax.Array):
            event_shape = None  # a pytree: no flow loss (see _default_loss)
        elif event_shape is None:
            event_shape = tuple(data.shape[1:])
        else:
            event_shape = check_event_shape(event_shape, "event_shape")
        loss_fn = _default_loss(model, event_shape)
    optimizer = _DEFAULT_OPTIMIZER if optimizer is None else optimizer
    key = jax.random.PRNGKey(0) if key is None else key

    # -- split the model: floating arrays train, everything else is kept as is ---------
    leaves, treedef = jax.tree_util.tree_flatten(model)
    trainable = tuple(_is_floating_array(leaf) for leaf in leaves)
    if not any(trainable):
        raise ValueError(
            f"`model` ({type(model).__name__}) has no floating-point array leaves to "
            "train (weights held by callables are static; see `fit`'s docstring)."
        )
    # Strong-typed copies: a weak-typed leaf (e.g. distrax.Normal(0., 1.)) would
    # come back strong from the first step and force a second compilation.
    # (Canonicalise first: float64 NumPy leaves become float32 without x64.)
    params = [jnp.asarray(leaf) for leaf, t in zip(leaves, trainable, strict=True) if t]
    params = [jnp.asarray(p, dtype=p.dtype) for p in params]
    spec = _Spec(
        treedef,
        trainable,
        tuple(leaf for leaf, t in zip(leaves, trainable, strict=True) if not t),
        tuple(p.dtype for p in params),
        loss_fn,
        optimizer,
        None if full_batch else batch_size,
        _batch_shardings(data, None if full_batch else batch_size),
    )

    # -- train ---------------------------------------------------------------------
    opt_state = optimizer.init(params)
    skipped = jnp.zeros((), jnp.int32)
    if spec.batch_shardings is not None:
        # Data parallel: parameters, optimizer state, key and counter are
        # replicated on the data's mesh; the batch stays sharded.
        replicated = _replicated(spec.batch_shardings[0])
        params, opt_state, key, skipped = jax.device_put(
            (params, opt_state, key, skipped), replicated
        )
    initial_params, initial_rows = params, None
    losses: list[jax.Array] = []
    val_losses: list[float] = []
    val_steps: list[int] = []
    # (validation loss, step, params, per-row validation losses or None)
    best: tuple[float, int, Any, Any] = (np.inf, 0, params, None)
    since_best = 0

    if show_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="fit", dynamic_ncols=True)
    else:
        bar = _NoProgress()
    postfix: dict[str, str] = {}
    last_refresh = -np.inf

    def refresh(value, force=False):
        # Reading the loss syncs with the device: only do it every
        # _PROGRESS_INTERVAL_S seconds (and at the end).
        nonlocal last_refresh
        now = time.monotonic()
        if show_progress and (force or now - last_refresh >= _PROGRESS_INTERVAL_S):
            last_refresh = now
            postfix["loss"] = f"{float(value):.4g}"
            postfix["skipped"] = str(int(skipped))
            bar.set_postfix(postfix, refresh=True)

    def evaluate(step_count):
        # Returns whether to stop early.
        nonlocal best, since_best, initial_rows
        value, rows = _eval_loss(spec, params, validation_data)
        value = float(value)
        if step_count == 0:
            initial_rows = rows  # kept on the device, for the margin
        val_losses.append(value)
        val_steps.append(step_count)
        if value < best[0]:  # False for NaN: a non-finite loss never improves
            best, since_best = (value, step_count, params, rows), 0
        else:
            since_best += 1
        postfix["val"] = f"{value:.4g}"
        postfix["best"] = f"{best[0]:.4g}@{best[1]}"
        return patience is not None and since_best >= patience

    step_count = 0
    try:
        stop = validation_data is not None and evaluate(0)
        while step_count < steps and not stop:
            params, opt_state, key, skipped, value = _train_step(
                spec, params, opt_state, key, skipped, data
            )
            losses.append(value)
            step_count += 1
            bar.update(1)
            # Evaluate on the grid and after the last step, so `val_steps` always
            # ends at the last step run (early stopping only happens on the grid).
            if validation_data is not None and (
                step_count % eval_every == 0 or step_count == steps
            ):
                stop = evaluate(step_count)
            refresh(value, force=stop or step_count == steps)
    finally:
        bar.close()

    if validation_data is not None and restore_best:
        best_step, final_params = best[1], best[2]
        # The margin, on the per-row validation losses of the start and of the
        # candidate (None for a custom loss: no margin then).
        if (
            best_step != 0
            and improvement_z > 0
            and initial_rows is not None
            and not _clearly_better(initial_rows, best[3], float(improvement_z))
        ):
            best_step, final_params = 0, initial_params
    else:
        best_step, final_params = step_count, params
    return FitResult(
        model=spec.rebuild(final_params),
        losses=np.asarray(jax.device_get(losses), dtype=np.float64).reshape(-1),
        val_losses=np.asarray(val_losses, dtype=np.float64),
        val_steps=np.asarray(val_steps, dtype=np.int64),
        best_step=int(best_step),
        skipped_steps=int(skipped),
    )
