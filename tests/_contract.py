"""The transformation contract of every bijector we ship, shared by both dtypes.

A drop-in JAX layer gives the same numbers however it is called. For each
map (forward, forward log-det, inverse, inverse log-det) and each
composition of JAX transformations below, the result per element must match
the unbatched call at that element (`reference`), to float rounding, and be
finite wherever the unbatched call is finite, with NaN and ±inf elements in
the same batch. Inputs run from the bulk to |x − μ| = 1e4·σ (forward) and to
|y| = 30 (float32) / 37 (float64) (inverse). ``chain`` is the log-det of a
distrax ``Chain`` of the layer, an affine map and another layer inverted.
"""

from __future__ import annotations

import functools

import distrax
import jax
import jax.numpy as jnp
import numpy as np

from distrax_mixcdf import MixtureGaussianCDF

MAPS = ("forward", "forward_log_det", "inverse", "inverse_log_det", "chain")

TRANSFORMS = (
    "batched_call",
    "vmap",
    "vmap_grad",
    "vmap_jacfwd",
    "vmap_jacrev",
    "vmap_hessian",
    "per_example_param_grad",
    "grad_of_vmapped_loss",
    "param_grad_of_vmapped_loss",
    "vmap_over_bijectors",
    "jit_inside_vmap",
)

# Every map under every transformation in float32. The chain of three layers
# and float64 (whose batching is the same program in another dtype) take the
# transformations that exercise distinct code: both derivative modes, second
# order, parameter gradients, and batched parameters.
_DISTINCT = (
    "vmap_grad",
    "vmap_jacfwd",
    "vmap_hessian",
    "per_example_param_grad",
    "param_grad_of_vmapped_loss",
    "vmap_over_bijectors",
)
CELLS_FLOAT32 = [
    (name, transform)
    for name in MAPS
    for transform in (_DISTINCT if name == "chain" else TRANSFORMS)
]
CELLS_FLOAT64 = [
    (name, transform) for name in MAPS if name != "chain" for transform in _DISTINCT
]

# The mixture: three components of different widths.
PARAMS = ([0.0, 0.0, 0.0], [-1.0, 0.0, 2.0], [0.0, -0.5, 0.3])


def inputs(name: str, dtype) -> np.ndarray:
    """Bulk to far-tail inputs, NaN and ±inf, for the map ``name``."""
    if name.startswith("forward") or name == "chain":
        widest = np.exp(0.3)
        values = [-3.0, -0.7, 0.0, 1.3, 5.1, 18.0, -20.0, 150.0, -1e3, 1e4 * widest]
        values += [-1e4 * widest]
    else:
        far = 30.0 if dtype == np.float32 else 37.0
        values = [-far, -12.0, -5.0, -0.3, 0.0, 0.8, 3.0, 8.0, 12.0, far]
    return np.asarray([*values, np.nan, np.inf, -np.inf], dtype)


def _map(name: str):
    def f(x, params):
        bijector = MixtureGaussianCDF(*params)
        if name == "chain":
            # A distrax stack: layer, affine, then another layer inverted.
            other = MixtureGaussianCDF(params[0], 0.5 * params[1], params[2] - 0.2)
            chain = distrax.Chain(
                [bijector, distrax.ScalarAffine(0.3, 1.2), distrax.Inverse(other)]
            )
            return chain.forward_and_log_det(x)[1]
        if name == "forward":
            return bijector.forward(x)
        if name == "forward_log_det":
            return bijector.forward_log_det_jacobian(x)
        if name == "inverse":
            return bijector.inverse(x)
        return bijector.inverse_log_det_jacobian(x)

    return f


def params_as(dtype, shift=0.0):
    return tuple(jnp.asarray(np.asarray(p) + shift, dtype) for p in PARAMS)


@functools.cache
def _unbatched(name: str):
    """Compiled scalar-input functions, one per derivative program.

    Each batched derivative is compared with the same derivative program
    called on one element: reverse and forward mode round differently, and
    the contract is about batching, not about the mode.
    """
    f = _map(name)
    return {
        "value": jax.jit(f),
        "grad": jax.jit(jax.grad(f)),
        "jacfwd": jax.jit(jax.jacfwd(f)),
        "hessian": jax.jit(jax.hessian(f)),
        "param_grad": jax.jit(jax.grad(f, argnums=1)),
    }


def _per_element(fn, xs, params_per_element):
    out = [fn(x, p) for x, p in zip(xs, params_per_element)]
    return jax.tree_util.tree_map(lambda *leaves: np.stack(leaves), *out)


def _batched_params(dtype, size):
    """A different mixture per element, for vmap over a batch of bijectors."""
    shifts = np.linspace(-0.2, 0.2, size)
    return tuple(
        jnp.asarray(np.asarray(p)[None, :] + shifts[:, None] * (i + 1), dtype)
        for i, p in enumerate(PARAMS)
    )


def computed_and_expected(name: str, transform: str, dtype):
    """``(got, want)`` pytrees for one cell of the contract matrix."""
    xs = jnp.asarray(inputs(name, dtype))
    params = params_as(dtype)
    f = _map(name)
    unbatched = _unbatched(name)
    value, grad, param_grad = (unbatched[k] for k in ("value", "grad", "param_grad"))
    same = [params] * xs.shape[0]
    if transform == "batched_call":
        return jax.jit(f)(xs, params), _per_element(value, xs, same)
    if transform == "vmap":
        return jax.jit(jax.vmap(f, (0, None)))(xs, params), _per_element(
            value, xs, same
        )
    if transform in ("vmap_grad", "vmap_jacfwd", "vmap_jacrev"):
        derivative = {
            "vmap_grad": jax.grad,
            "vmap_jacfwd": jax.jacfwd,
            "vmap_jacrev": jax.jacrev,
        }[transform]
        got = jax.jit(jax.vmap(derivative(f), (0, None)))(xs, params)
        one = unbatched["jacfwd"] if transform == "vmap_jacfwd" else grad
        return got, _per_element(one, xs, same)
    if transform == "vmap_hessian":
        got = jax.jit(jax.vmap(jax.hessian(f), (0, None)))(xs, params)
        return got, _per_element(unbatched["hessian"], xs, same)
    if transform == "per_example_param_grad":
        got = jax.jit(jax.vmap(jax.grad(f, argnums=1), (0, None)))(xs, params)
        return got, _per_element(param_grad, xs, same)
    if transform == "grad_of_vmapped_loss":

        def loss(xs):
            return jnp.sum(jax.vmap(f, (0, None))(xs, params))

        return jax.jit(jax.grad(loss))(xs), _per_element(grad, xs, same)
    if transform == "param_grad_of_vmapped_loss":
        # The loss masks the irregular elements out, as a user's would.
        regular = np.isfinite(np.asarray(xs))

        def masked_loss(params):
            out = jax.vmap(f, (0, None))(xs, params)
            return jnp.sum(jnp.where(regular, out, 0.0))

        got = jax.jit(jax.grad(masked_loss))(params)
        per = _per_element(param_grad, xs[regular], same)
        return got, jax.tree_util.tree_map(lambda g: g.sum(axis=0), per)
    if transform == "vmap_over_bijectors":
        batch = _batched_params(dtype, xs.shape[0])
        got = jax.jit(jax.vmap(jax.value_and_grad(f)))(xs, batch)
        per_params = [tuple(p[i] for p in batch) for i in range(xs.shape[0])]
        return got, (
            _per_element(value, xs, per_params),
            _per_element(grad, xs, per_params),
        )
    if transform == "jit_inside_vmap":
        got = jax.vmap(jax.jit(jax.grad(f)), (0, None))(xs, params)
        return got, _per_element(grad, xs, same)
    raise ValueError(transform)


def _log_det_conditioning(name: str, dtype) -> np.ndarray:
    """Per element, the rounding a log-det derivative inherits from its terms.

    The tangent of ``log f(x) - log φ(y)`` sums terms of size ``y²`` (``y ẏ``
    and ``Σ ρ z²``) that cancel to O(1) in the tails, so any two float
    programs agree there only to ``eps·y²``, whichever is batched.
    """
    if not name.endswith("log_det") and name != "chain":
        return np.zeros(inputs(name, dtype).shape)
    xs = inputs(name, dtype)
    y = (
        xs
        if name.startswith("inverse")
        else np.asarray(
            _unbatched("forward")["value"](jnp.asarray(xs), params_as(dtype))
        )
    )
    y = np.where(np.isfinite(y), y, 0.0).astype(np.float64)
    return 32 * np.finfo(dtype).eps * (1.0 + 2.0 * np.square(y))


def check(name: str, transform: str, dtype) -> None:
    """Asserts one cell: same numbers, and finite where the reference is."""
    got, want = computed_and_expected(name, transform, dtype)
    # Batched and unbatched programs may round differently (XLA vectorises
    # by batch size), so the floor is relative to the largest entry, plus the
    # log-dets' conditioning in the tails.
    rtol, floor = (1e-4, 1e-5) if dtype == np.float32 else (1e-9, 1e-11)
    conditioning = _log_det_conditioning(name, dtype)
    if transform == "param_grad_of_vmapped_loss":
        conditioning = conditioning[np.isfinite(inputs(name, dtype))].sum()
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        assert g.shape == w.shape, (g.shape, w.shape)
        finite = np.isfinite(w)
        assert finite.sum() >= finite.size // 2, w  # the check is not vacuous
        np.testing.assert_array_equal(np.isfinite(g), finite, err_msg=str((g, w)))
        np.testing.assert_array_equal(g[~finite], w[~finite])
        extra = np.reshape(conditioning, np.shape(conditioning) + (1,) * (w.ndim - 1))
        extra = np.broadcast_to(extra, w.shape)[finite] if w.ndim else extra
        tolerance = rtol * np.abs(w[finite]) + floor * np.max(np.abs(w[finite])) + extra
        np.testing.assert_array_less(
            np.abs(g[finite] - w[finite]), tolerance + 1e-30, err_msg=str((g, w))
        )
