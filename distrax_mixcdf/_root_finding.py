"""Inverting the mixture CDF map: batched root finders and the gradient rule.

``x = T⁻¹(y; θ)`` solves ``T(x; θ) = y`` elementwise, where ``T`` is the exact
forward (`_forward.py`). The residual is measured in ``y``-space, where ``T``
is close to linear in both tails, so Newton steps stay well behaved far out.

* Every solver starts inside the closed-form bracket `_forward.cdf_bracket`
  and runs a batch-level ``lax.while_loop`` (no ``vmap`` of a per-element
  loop) on each lane chunk (`_chunks.map_lane_chunks`): a chunk stops once
  all its elements have converged.
* ``"newton"`` takes unsafeguarded Newton steps (for comparison); elements it
  leaves unconverged after ``max_iter`` are finished by ``"hybrid"``.
* ``"hybrid"`` (default) is safeguarded Newton: a Newton step is kept only if
  it lands strictly inside the current bracket and is at most half the step
  before last (Numerical Recipes' rtsafe rule, which also breaks Newton's
  cycles); otherwise the bracket is bisected.
* The start: when many inputs share one parameter set, a 512-knot table of
  roots with cubic Hermite interpolation starts Newton within ~1e-6 and
  tightens the bracket to one knot interval; otherwise the weighted
  component quantile ``Σ w_k (μ_k + σ_k y)``.
* Stopping: after a Newton step δ the remaining error is predicted from the
  curvature ``c = T''/T'`` as ``(|c| + |δ|/σ_min²) δ²/2``, so a converged
  element needs no confirming evaluation; the log-det is carried along the step.
* Gradients come from :func:`implicit_inverse`, the only place the implicit
  function theorem is written down (a ``jax.custom_jvp``, so forward and
  reverse mode, ``vmap`` and higher derivatives all work).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from distrax_mixcdf import _chunks
from distrax_mixcdf._components import log_normalise, reduce_components
from distrax_mixcdf._forward import (
    cdf_bracket,
    forward_with_curvature,
    gather_rows,
    log_det_slope,
    quantile_average,
)
from distrax_mixcdf._irregular import inverse_far, inverse_reach
from distrax_mixcdf._tangents import forward_and_log_det, tangents_at

__all__ = [
    "INVERSE_GRADIENTS",
    "ROOT_FINDERS",
    "SolverOptions",
    "implicit_inverse",
    "inverse_and_log_det",
    "solve",
]

ROOT_FINDERS = ("hybrid", "newton", "bisection")
INVERSE_GRADIENTS = ("implicit", "one_step", "unroll")

Params = tuple[jax.Array, jax.Array, jax.Array]


class SolverOptions(NamedTuple):
    """Static (hashable) settings of the root find.

    Attributes:
      root_finder: One of ``ROOT_FINDERS``.
      tol: Relative tolerance on ``x`` (the dtype's epsilon when ``None``).
      max_iter: Iteration cap of the batch loop.
      inverse_grad: One of ``INVERSE_GRADIENTS``.
    """

    root_finder: str = "hybrid"
    tol: float | None = None
    max_iter: int = 100
    inverse_grad: str = "implicit"


_DEFAULT_OPTIONS = SolverOptions()


class _State(NamedTuple):
    iteration: jax.Array
    x: jax.Array
    log_det: jax.Array  # log T'(x), carried to x by the last step's curvature
    lower: jax.Array
    upper: jax.Array
    last_step: jax.Array
    step_before_last: jax.Array
    done: jax.Array


# The start table: roots at evenly spaced latent knots, per parameter set, with
# their slopes dx/dy. A cubic Hermite interpolant between knots starts Newton
# within ~1e-6 of the root, so one or two steps finish. Built only when the
# parameters are shared by at least _TABLE_MIN_SHARING inputs each.
_TABLE_KNOTS = 512
_TABLE_HALF_RANGE = 7.0
_TABLE_MIN_SHARING = 16 * _TABLE_KNOTS
# A knot is a root found to tolerance, not exactly: widen the knot bracket by
# this fraction of the interval so rounding never excludes the true root.
_KNOT_BRACKET_SLACK = 1e-3


def _trusted_step(dtype) -> float:
    """Largest relative Newton step after which the curvature estimate is trusted."""
    return 1e-6 if jnp.dtype(dtype) == jnp.float64 else 1e-4


def _inverse_min_variance(params: Params) -> jax.Array:
    """``1/σ_min²`` per parameter set, the scale on which the curvature varies."""
    return jnp.exp(-2.0 * reduce_components(jnp.minimum, params[2]))


def _tolerance(options: SolverOptions, dtype) -> float:
    eps = float(jnp.finfo(dtype).eps)
    return eps if options.tol is None else float(options.tol)


def _param_batch_shape(params: Params) -> tuple[int, ...]:
    return jnp.broadcast_shapes(*(p.shape[:-1] for p in params))


def _uses_table(y: jax.Array, params: Params) -> bool:
    param_count = math.prod(_param_batch_shape(params))
    batch_count = math.prod(jnp.broadcast_shapes(y.shape, _param_batch_shape(params)))
    return batch_count >= _TABLE_MIN_SHARING * param_count


def _knot_table(params: Params, options: SolverOptions, dtype):
    """Roots ``x_j`` and slopes ``dx/dy`` at the latent knots, shape ``[..., G]``."""
    knots = jnp.linspace(
        -_TABLE_HALF_RANGE, _TABLE_HALF_RANGE, _TABLE_KNOTS, dtype=dtype
    )
    log_weights, means, log_scales = (p[..., None, :] for p in params)
    knot_params = (log_weights, means, log_scales)
    knot_roots, knot_log_det, _ = solve(knots, knot_params, options, use_table=False)
    return lax.stop_gradient((knot_roots, jnp.exp(knot_log_det)))


def _lookup(table: jax.Array, knot_index: jax.Array) -> jax.Array:
    """``table[..., knot_index]``, ``table``'s batch broadcast but not materialised."""
    batch_shape = knot_index.shape
    lead = table.shape[:-1]
    lead = (1,) * (len(batch_shape) - len(lead)) + tuple(lead)
    table = table.reshape(lead + table.shape[-1:])
    index = tuple(
        lax.broadcasted_iota(jnp.int32, batch_shape, axis) if size > 1 else 0
        for axis, size in enumerate(lead)
    )
    return table[(*index, knot_index)]


def _table_start(y, table, lower, upper):
    """Hermite-interpolated start and a knot-tight bracket for every element."""
    knot_roots, knot_slopes = table
    spacing = 2.0 * _TABLE_HALF_RANGE / (_TABLE_KNOTS - 1)
    position = (y + _TABLE_HALF_RANGE) / spacing
    knot_index = jnp.clip(jnp.floor(position), 0, _TABLE_KNOTS - 2).astype(jnp.int32)
    knot_index = jnp.where(jnp.isfinite(position), knot_index, 0)
    t = position - knot_index
    x0, x1 = _lookup(knot_roots, knot_index), _lookup(knot_roots, knot_index + 1)
    d0, d1 = _lookup(knot_slopes, knot_index), _lookup(knot_slopes, knot_index + 1)
    inside = (t >= 0.0) & (t <= 1.0)
    # Cubic Hermite basis on the unit interval.
    t2, t3 = t * t, t * t * t
    hermite = (
        (2 * t3 - 3 * t2 + 1) * x0
        + (t3 - 2 * t2 + t) * spacing * d0
        + (-2 * t3 + 3 * t2) * x1
        + (t3 - t2) * spacing * d1
    )
    # Beyond the knots the inverse is nearly linear: extrapolate with the end slope.
    below, above = t < 0.0, t > 1.0
    linear = jnp.where(below, x0 + (t * spacing) * d0, x1 + ((t - 1) * spacing) * d1)
    start = jnp.where(inside, jnp.clip(hermite, x0, x1), linear)
    slack = _KNOT_BRACKET_SLACK * (x1 - x0)
    lower = jnp.where(below, lower, jnp.maximum(lower, x0 - slack))
    upper = jnp.where(above, upper, jnp.minimum(upper, x1 + slack))
    return jnp.clip(start, lower, upper), lower, upper


def _initial_state(y: jax.Array, params: Params, table) -> _State:
    """The loop's start from the bracket and the table (or quantile) start.

    ``y`` is finite here: `_solve_chunk` and the policy put a stand-in in place
    of NaN, ±inf and saturated values.
    """
    lower, upper = cdf_bracket(y, params)
    if table is not None:
        x, lower, upper = _table_start(y, table, lower, upper)
    else:
        x = quantile_average(y, params)
    shape = jnp.broadcast_shapes(x.shape, lower.shape, upper.shape)
    width = jnp.broadcast_to(upper - lower, shape)
    return _State(
        iteration=jnp.zeros((), jnp.int32),
        x=jnp.broadcast_to(x, shape),
        log_det=jnp.zeros(shape, y.dtype),
        lower=jnp.broadcast_to(lower, shape),
        upper=jnp.broadcast_to(upper, shape),
        # As in Numerical Recipes' rtsafe, the step history starts at the
        # bracket width, so the first Newton steps are judged by the bracket.
        last_step=width,
        step_before_last=width,
        done=jnp.zeros(shape, bool),
    )


def _evaluate(x, params, differentiable):
    """``(T(x), log T'(x), T''/T')``: one fused primal pass, or differentiable."""
    if not differentiable:
        return forward_with_curvature(x, params)
    y, log_det = forward_and_log_det(x, params)
    return y, log_det, log_det_slope(x, params, y, log_det)


def _step(
    state: _State,
    y: jax.Array,
    params: Params,
    options: SolverOptions,
    differentiable: bool = False,
):
    """One iteration of the chosen solver on the whole batch.

    ``differentiable`` makes the step differentiable by unrolling (for
    ``inverse_grad="unrolled"``); the default evaluates values only.
    """
    x = state.x
    tol = _tolerance(options, x.dtype)
    y_at_x, log_det, curvature = _evaluate(x, params, differentiable)
    residual = y_at_x - y
    lower = jnp.where(residual < 0, x, state.lower)
    upper = jnp.where(residual > 0, x, state.upper)
    midpoint = 0.5 * (lower + upper)
    slope = jnp.exp(log_det)
    inverse_min_variance = _inverse_min_variance(params)
    # Tolerance in y-space: the y resolution plus x's own resolution through T'.
    # The second term linearises T across one resolution step of x, which is
    # only valid while log T' changes little over that step: by at most
    # |c|·Δ + Δ²/σ_min² (c = T''/T' here, c' ≲ 1/σ_min²). With σ = 1 at
    # |x| = 1e8 (float32 spacing 8) T jumps from one tail to the other between
    # neighbouring floats; in the tail of a component a few ulps wide T' grows
    # e-fold within one step and the term accepted x four ulps from the root
    # (found by the fuzz suite).
    x_resolution = tol * jnp.abs(x)
    log_slope_drift = (
        jnp.abs(curvature) * x_resolution
        + jnp.square(x_resolution) * inverse_min_variance
    )
    resolves_components = log_slope_drift <= 0.5
    y_tol = tol * jnp.maximum(1.0, jnp.abs(y)) + jnp.where(
        resolves_components, x_resolution * slope, 0.0
    )
    # "Close enough" without a step needs half the y resolution: in flat
    # regions a full-ulp residual can sit far from the root's x-interval.
    close_enough = jnp.abs(residual) <= y_tol - 0.5 * tol * jnp.maximum(1.0, jnp.abs(y))
    newton_step = -residual / slope

    if options.root_finder == "bisection":
        x_next = midpoint
        converged = (upper - lower) <= 2.0 * tol * jnp.abs(x)
    else:
        newton = x + newton_step
        if options.root_finder == "newton":
            take_newton = jnp.ones_like(state.done)
        else:
            # Keep a Newton step only if it lands strictly inside the bracket and
            # is at most half the step before last (rtsafe's rule): a Newton
            # sequence that stops contracting, such as a two-cycle, falls back to
            # bisection.
            take_newton = (
                (newton > lower)
                & (newton < upper)
                & (jnp.abs(newton_step) <= 0.5 * jnp.abs(state.step_before_last))
            )
        x_next = jnp.where(take_newton, newton, midpoint)
        # Halley's step, the Newton step corrected by the curvature already at
        # hand, converges cubically. It only moves iterates that are not yet
        # converged: every decision to stop is still made on a Newton step.
        halley_factor = 0.5 * curvature * newton_step
        halley = x + newton_step / (1.0 + halley_factor)
        use_halley = (
            (options.root_finder == "hybrid")
            & take_newton
            & (jnp.abs(halley_factor) <= 0.5)
            & (halley > lower)
            & (halley < upper)
        )
        # After a Newton step δ the error left is about |c(ξ)| δ²/2, c = T''/T'
        # somewhere along the step. c itself varies on the scale of the
        # narrowest component (|c'| ≲ 1/σ_min²), so bound |c(ξ)| by
        # |c(x)| + |δ|/σ_min²: at an inflection point c(x) ≈ 0 says nothing.
        # The log-det is carried along the step as log_det + c·δ, with error
        # ≲ δ²/(2σ_min²); that must be within tolerance too.
        step_squared = jnp.square(newton_step)
        curvature_bound = (
            jnp.abs(curvature) + jnp.abs(newton_step) * inverse_min_variance
        )
        relative_step = jnp.abs(residual) / y_tol * tol
        converged = (
            take_newton
            & (0.5 * curvature_bound * step_squared * slope <= y_tol)
            & (
                0.5 * step_squared * inverse_min_variance
                <= tol * jnp.maximum(1.0, jnp.abs(log_det))
            )
            & (relative_step <= _trusted_step(x.dtype))
        )
    # Within tolerance already (or an exact hit): stop here. No further step:
    # where T' is tiny (between far-apart components) a "tiny" y-residual can
    # still mean a huge Newton step, and any x in tolerance is a valid root.
    close_enough = close_enough | (residual == 0)
    # A bracket collapsed to a few floats pins the root whatever T does inside.
    bracket_collapsed = (upper - lower) <= 2.0 * x_resolution
    converged_by_step = converged
    if options.root_finder != "bisection":
        x_next = jnp.where(use_halley & ~converged, halley, x_next)
    converged = converged | close_enough | bracket_collapsed
    # Stopping on the bracket alone returns the point just evaluated: its
    # log-det is exact, where carrying it along a step is not guaranteed.
    x_next = jnp.where(
        close_enough | (bracket_collapsed & ~converged_by_step), x, x_next
    )
    step = x_next - x
    keep = state.done
    return _State(
        iteration=state.iteration + 1,
        x=jnp.where(keep, x, x_next),
        log_det=jnp.where(keep, state.log_det, log_det + curvature * step),
        lower=lower,
        upper=upper,
        last_step=jnp.where(keep, state.last_step, step),
        step_before_last=jnp.where(keep, state.step_before_last, state.last_step),
        done=keep | converged,
    )


def solve(
    y: jax.Array,
    params: Params,
    options: SolverOptions = _DEFAULT_OPTIONS,
    use_table: bool = True,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Solves ``T(x; params) = y`` for ``x`` without any gradient rule.

    NaN, ``±inf`` and ``|y|`` beyond `_irregular.saturation_threshold` (where
    ``y²`` would overflow) are solved at the stand-in ``y = 0`` and their
    outputs replaced by `_irregular.inverse_far`'s, chunk by chunk. Under
    ``vmap`` the solver runs on the whole batch at once (`_chunks.vmap_as_batch`),
    so its loop and its start table are those of a batched call.

    Args:
      y: Latent values, broadcastable against the parameter batch shape.
      params: ``(log_weights, means, log_scales)``, each ``[..., K]``; the
        log-weights may be unnormalised (logits).
      options: Solver settings.
      use_table: Allow the knot-table start (the table's own solve says no).

    Returns:
      ``(x, log_det, iterations)``: the root and the inverse's log-det
      ``log |dx/dy| = -log T'(x)`` of the broadcast batch shape, and the
      largest number of loop iterations a chunk used.
    """
    return _batch_solver(options, use_table)(y, params)


@functools.cache
def _batch_solver(options: SolverOptions, use_table: bool):
    def run(y, params):
        y, params, layout = _chunks.canonical(y, params)
        if not _chunks.has_lanes(params[0], y.shape[1]):
            # Small: normalised once, before the knot table.
            params = (log_normalise(params[0]), *params[1:])
        table = None
        if use_table and _uses_table(y, params):
            table = _knot_table(params, options, y.dtype)
        x, log_det, iterations = _chunks.map_lane_chunks(
            functools.partial(_solve_chunk, options=options),
            (y,),
            (params, table),
            _chunks.chunk_elements("solve"),
        )
        return layout.restore(x), layout.restore(log_det), jnp.max(iterations)

    return _chunks.vmap_as_batch(run)


# Once at most this fraction of a chunk is still iterating, the stragglers are
# gathered into a buffer of that size and finished there: the batch loop
# otherwise pays for every element until the slowest one converges.
_STRAGGLER_SHARE = 8
# Chunks smaller than this iterate whole: gathering would cost more than it saves.
_STRAGGLER_MIN_SIZE = 1024


def _iterate(state, y, params, options, max_iter, stop_below=0):
    """Steps ``state`` until at most ``stop_below`` elements are still iterating.

    Or until ``max_iter`` iterations have run.
    """

    def keep_going(state: _State):
        remaining = jnp.sum(~state.done)
        return (state.iteration < max_iter) & (remaining > stop_below)

    return lax.while_loop(keep_going, lambda s: _step(s, y, params, options), state)


def _finish_stragglers(state, y, params, options, max_iter, capacity):
    """Finishes the elements still iterating in a gathered buffer of ``capacity``.

    Runs only when they fit (the caller stops the batch loop once they do);
    entries past their count are marked done and written nowhere.
    """
    shape = state.x.shape
    size = state.x.size
    remaining = ~state.done.ravel()
    (index,) = jnp.nonzero(remaining, size=capacity, fill_value=size)
    valid = index < size

    def take(array):
        return jnp.broadcast_to(array, shape).ravel().at[index].get(mode="clip")

    sub_params = tuple(gather_rows(p, index % size, shape, trailing=1) for p in params)
    sub_state = state._replace(
        **{
            field: take(getattr(state, field))
            for field in _State._fields
            if field not in ("iteration", "done")
        },
        done=~valid,
    )
    sub_state = _iterate(sub_state, take(y), sub_params, options, max_iter)

    def put(array, values):
        flat = jnp.broadcast_to(array, shape).ravel()
        return flat.at[index].set(values, mode="drop").reshape(shape)

    return state._replace(
        iteration=sub_state.iteration,
        x=put(state.x, sub_state.x),
        log_det=put(state.log_det, sub_state.log_det),
        done=put(state.done, sub_state.done),
    )


def _run(state, y, params, options, max_iter):
    """The batch loop, with its stragglers finished in a compact buffer."""
    size = state.x.size
    if size < _STRAGGLER_MIN_SIZE:
        return _iterate(state, y, params, options, max_iter)
    capacity = size // _STRAGGLER_SHARE
    state = _iterate(state, y, params, options, max_iter, stop_below=capacity)
    return lax.cond(
        jnp.any(~state.done) & (state.iteration < max_iter),
        lambda s: _finish_stragglers(s, y, params, options, max_iter, capacity),
        lambda s: s,
        state,
    )


def _solve_chunk(y, shared, options: SolverOptions):
    """`solve` on one chunk of the batch: its own loop, stopping on its own."""
    params, table = shared
    if _chunks.has_lanes(params[0], y.shape[1]):
        # Per-element logits, normalised chunk by chunk, in cache.
        params = (log_normalise(params[0]), *params[1:])
    # NaN, ±inf and saturated y are solved at 0 and then replaced (`_irregular`).
    # NaN compares False, so it is irregular too.
    regular = jnp.abs(y) <= inverse_reach(params)
    y_regular = jnp.where(regular, y, 0.0)
    state = _initial_state(y_regular, params, table)
    state = _run(state, y_regular, params, options, options.max_iter)
    if options.root_finder == "newton":
        # Plain Newton can cycle or diverge. Never return its last iterate as if
        # it were a root: elements it left unconverged are finished by the
        # safeguarded solver inside the bracket Newton kept updating.
        hybrid = options._replace(root_finder="hybrid")
        state = _run(state, y_regular, params, hybrid, 2 * options.max_iter)

    def replace_irregular(x, log_det):
        # Per-element parameters make the closed forms cost a pass over [N, K]:
        # run them only where the chunk has an irregular element.
        _, x_far, log_det_far = inverse_far(y, params)
        return jnp.where(regular, x, x_far), jnp.where(regular, log_det, log_det_far)

    x, log_det = lax.cond(
        jnp.all(regular),
        lambda x, log_det: (x, log_det),
        replace_irregular,
        state.x,
        -state.log_det,
    )
    return x, log_det, state.iteration


def _unrolled_solve(y: jax.Array, params: Params, options: SolverOptions):
    """``max_iter`` solver steps in a ``lax.scan``, differentiable by unrolling."""
    table = None
    if _uses_table(y, params):
        table = _knot_table(lax.stop_gradient(params), options, y.dtype)
    state = _initial_state(y, params, table)
    state = state._replace(x=lax.stop_gradient(state.x))
    state, _ = lax.scan(
        lambda s, _: (_step(s, y, params, options, differentiable=True), None),
        state,
        None,
        length=options.max_iter,
    )
    return state.x


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def implicit_inverse(y: jax.Array, params: Params, options: SolverOptions):
    r"""The inverse ``x = T⁻¹(y; θ)`` and ``log T'(x)``, with implicit gradients.

    Differentiating ``T(x(y, θ); θ) = y`` gives the tangent rule

    .. math:: \dot x = \frac{\dot y - \partial_\theta T(x;\theta)\,\dot\theta}
                            {\partial_x T(x;\theta)},
              \qquad \partial_x T = e^{\text{log\_det}(x)},

    evaluated at the converged root, never by differentiating solver iterations
    (unrolled bisection has zero gradient). The log-det's tangent follows by the
    chain rule. Both relations are written out once, in closed form, in
    `distrax_mixcdf._tangents.tangents_at` (shared with the forward). The rule is linear
    in the tangents, so JAX transposes it for reverse mode; because it is a
    ``custom_jvp`` (not a ``custom_vjp``), ``jacfwd``, ``jacrev``, ``hessian`` and
    ``vmap`` all work, and second derivatives differentiate the rule itself,
    which calls this function again for the root's own tangent.

    Args:
      y: Latent values.
      params: ``(log_weights, means, log_scales)``, each ``[..., K]``; the
        log-weights may be unnormalised (logits).
      options: Solver settings (static).

    Returns:
      ``(x, log_det)``: the root and the inverse's log-det ``-log T'(x)``.
    """
    x, log_det, _ = solve(y, params, options)
    return x, log_det


@implicit_inverse.defjvp
def _implicit_inverse_jvp(options, primals, tangents):
    y, params = primals
    y_dot, params_dot = tangents
    x, log_det = implicit_inverse(y, params, options)
    # No second forward evaluation: at the root T(x) = y and the solver already
    # returned log T'(x), so the tangent relations need only the per-component
    # responsibilities (one exp and one Mills ratio per component).
    x_dot, _, log_det_dot = tangents_at(
        x, y, log_det, params, None, y_dot, params_dot, solve_for="x"
    )
    return (x, log_det), (x_dot, log_det_dot)


def inverse_and_log_det(
    y: jax.Array, params: Params, options: SolverOptions
) -> tuple[jax.Array, jax.Array]:
    """The inverse map and its log-det with the gradient strategy of ``options``.

    * ``"implicit"``: :func:`implicit_inverse` (exact, first and higher order).
    * ``"one_step"``: one Newton step from the stop-gradient root; exact first
      derivatives at a converged root, for comparison.
    * ``"unroll"``: differentiate through ``max_iter`` unrolled solver steps;
      bisection steps carry no gradient, so this is wrong wherever the solver
      bisected. For teaching and benchmarking only.

    Args:
      y: Latent values.
      params: ``(log_weights, means, log_scales)``, each ``[..., K]``; the
        log-weights may be unnormalised (logits).
      options: Solver settings.

    Returns:
      ``(x, log_det)`` where ``log_det = -log T'(x)`` is the inverse's log-det.
    """
    if options.inverse_grad == "implicit":
        return implicit_inverse(y, params, options)
    params = (log_normalise(params[0]), *params[1:])
    if options.inverse_grad == "one_step":
        root = solve(lax.stop_gradient(y), lax.stop_gradient(params), options)[0]
        y_at_root, log_det = forward_and_log_det(root, params)
        x = root - (y_at_root - y) * jnp.exp(-log_det)
    elif options.inverse_grad == "unroll":
        x = _unrolled_solve(y, params, options)
    else:
        raise ValueError(
            f"inverse_grad must be one of {INVERSE_GRADIENTS}, "
            f"got {options.inverse_grad!r}"
        )
    return x, -forward_and_log_det(x, params)[1]
