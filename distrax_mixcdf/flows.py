r"""Deep normalizing flows built from the mixture-CDF layer.

Two flow families, each a pytree whose leaves are exactly its trainable arrays,
with the distrax bijector stack built from those leaves on every call:

* :class:`GaussianizationFlow` (RBIG, Laparra et al. 2011; Gaussianization
  Flows, Meng et al. 2020): ``L`` per-dimension
  :class:`~distrax_mixcdf.MixtureGaussianCDF` layers with an orthogonal rotation
  between consecutive ones. :func:`gaussianization_flow` builds it greedily from
  data (RBIG: fit each layer's marginals on the current latent, then rotate; no
  gradients), ready for joint maximum-likelihood fine-tuning with
  :func:`~distrax_mixcdf.fit`.
* :class:`CouplingFlow` (Flow++-style, Ho et al. 2019): an optional marginal
  mixture-CDF layer followed by ``distrax.MaskedCoupling`` layers whose inner
  bijector is :meth:`MixtureGaussianCDF.from_params` and whose conditioner is a
  small pure-JAX MLP; :func:`coupling_flow` builds it.

Why the stack is rebuilt from the parameters: distrax's ``Jittable`` treats any
callable attribute (a coupling conditioner, an ``equinox`` module) as static
metadata, so weights stored *inside* a distrax bijector are invisible to
``jax.grad`` and to ``fit``. Here the flow object holds the raw arrays as pytree
leaves, and :attr:`~GaussianizationFlow.distribution` creates the
``distrax.Transformed`` (whose coupling conditioners close over the leaves)
each time it is read. Every method (``log_prob``, ``sample``, ...) goes through
it, so ``jax.jit``, ``jax.grad``, optax and ``fit(flow, data)`` all see every
parameter. The conditioner is a hand-written MLP rather than an equinox module
because equinox is not a runtime dependency of this package and the MLP's
parameters must be plain leaves anyway.

Both flows map data to latent in the *forward* direction (closed form, used by
``log_prob``); sampling runs each mixture layer's root-find inverse.

What a maintainer may change: the conditioner's architecture and initial scale,
the coupling masks, the log-scale bound, as long as `tests/test_flows.py` stays
green. Keep fixed: the public names, the rule that the leaves are exactly the
trainable arrays (no leaf that must not be trained, no weights hidden in
callables) and the data → latent direction.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import distrax
import jax
import jax.numpy as jnp
import numpy as np

from distrax_mixcdf.mixture_cdf import MixtureGaussianCDF
from distrax_mixcdf.rotations import (
    FixedRotation,
    Householder,
    _householder_qr,
    _reflect,
    pca_matrix,
)
from distrax_mixcdf.training import normalizing_flow

__all__ = [
    "CouplingFlow",
    "GaussianizationFlow",
    "coupling_flow",
    "gaussianization_flow",
]

_ROTATIONS = ("householder", "fixed")
_ROTATION_INITS = ("pca", "random")

# Bound on the conditioner's log-scales, |log σ| < 5 (σ in [0.0067, 148]) on
# standardised latents: keeps a coupling layer's Jacobian and its root-find
# inverse well conditioned however large the MLP output grows during training.
_LOG_SCALE_BOUND = 5.0


class _FlowMethods:
    """``log_prob``/``sample``/... delegated to the ``distribution`` property."""

    @property
    def distribution(self) -> distrax.Transformed:
        """The density model (a fresh ``distrax.Transformed`` on every read)."""
        return normalizing_flow(list(reversed(self.bijectors())), (self.dim,))

    @property
    def bijector(self) -> distrax.Bijector:
        """The data → latent map as one ``distrax.Chain`` (event rank 1)."""
        return distrax.Inverse(self.distribution.bijector)

    def bijectors(self) -> list[distrax.Bijector]:  # pragma: no cover - abstract
        """The data → latent bijectors, in the order they act on data."""
        raise NotImplementedError

    @property
    def dim(self) -> int:  # pragma: no cover - abstract
        """The event size ``D``."""
        raise NotImplementedError

    def log_prob(self, x: Any) -> jax.Array:
        r"""Log-density :math:`\log p(x)`, ``[..., D] -> [...]`` (closed form).

        Equal to ``self.distribution.log_prob(x)``, but computed by one
        ``lax.scan`` over the layers, so ``jax.jit`` compiles one layer instead
        of ``L`` (the mixture CDF is large to compile).
        """
        x = self._checked(x, "x")
        z, log_det = self._scan_forward(x)
        return _std_normal_log_prob(z) + log_det

    def sample(self, *, seed: Any, sample_shape: Any = ()) -> jax.Array:
        """Samples ``sample_shape + (D,)`` through the root-find inverse."""
        return self.sample_and_log_prob(seed=seed, sample_shape=sample_shape)[0]

    def sample_and_log_prob(
        self, *, seed: Any, sample_shape: Any = ()
    ) -> tuple[jax.Array, jax.Array]:
        r"""Samples and their log-densities in one pass (one root find per layer).

        With ``z = jax.random.normal(seed, sample_shape + (D,))`` and
        :math:`x = T^{-1}(z)`,
        :math:`\log p(x) = \log\mathcal{N}(z) - \log|\det\partial x/\partial z|`.
        Same distribution as ``self.distribution.sample_and_log_prob``, scanned
        over the layers like :meth:`log_prob`.
        """
        shape = (sample_shape,) if isinstance(sample_shape, int) else sample_shape
        shape = (*tuple(shape), self.dim)
        z = jax.random.normal(seed, shape, self._dtype())
        x, log_det = self._scan_inverse(z)
        return x, _std_normal_log_prob(z) - log_det

    def _checked(self, x: Any, argument: str) -> jax.Array:
        x = jnp.asarray(x)
        if x.ndim < 1 or x.shape[-1] != self.dim:
            raise ValueError(
                f"`{argument}` of shape {x.shape} must end in the event axis of "
                f"size D = {self.dim}."
            )
        return x

    def _dtype(self) -> Any:
        leaves = jax.tree_util.tree_leaves(self)
        return jnp.result_type(*leaves) if leaves else jnp.result_type(float)

    def _scan_forward(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        raise NotImplementedError  # pragma: no cover - abstract

    def _scan_inverse(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
        raise NotImplementedError  # pragma: no cover - abstract

    def forward(self, x: Any) -> jax.Array:
        """Data → latent, ``[..., D] -> [..., D]`` (``bijector.forward``, scanned)."""
        return self._scan_forward(self._checked(x, "x"))[0]

    def inverse(self, z: Any) -> jax.Array:
        """Latent → data by root finds (``self.bijector.inverse``, scanned)."""
        return self._scan_inverse(self._checked(z, "z"))[0]

    def to_tfp(self):
        """The density model as a TFP ``TransformedDistribution``.

        Returns:
          ``tfd.TransformedDistribution(tfd.MultivariateNormalDiag(0, 1),
          tfb.Invert(chain))`` where ``chain`` is ``distrax.to_tfp`` of the
          data → latent stack.
        """
        from tensorflow_probability.substrates import jax as tfp

        tfd, tfb = tfp.distributions, tfp.bijectors
        base = self.distribution.distribution
        dtype = base.dtype
        return tfd.TransformedDistribution(
            tfd.MultivariateNormalDiag(jnp.zeros(self.dim, dtype)),
            tfb.Invert(distrax.to_tfp(self.bijector)),
        )

    def num_params(self) -> int:
        """The number of trainable scalars (the sizes of all leaves)."""
        return int(sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(self)))


def _std_normal_log_prob(z: jax.Array) -> jax.Array:
    return -0.5 * jnp.sum(z * z, axis=-1) - 0.5 * z.shape[-1] * np.log(2 * np.pi)


def _check_data(data: Any, argument: str = "data") -> np.ndarray:
    x = np.asarray(data)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 1:
        raise ValueError(
            f"`{argument}` must be [N, D] with N >= 2 and D >= 1, got shape {x.shape}."
        )
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(
            f"`{argument}` must be floating point, got dtype {x.dtype} "
            f"(shape {x.shape})."
        )
    if not np.all(np.isfinite(x)):
        raise ValueError(f"`{argument}` of shape {x.shape} has non-finite values.")
    return x


def _check_int(value: Any, argument: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(
            f"`{argument}` must be an integer >= {minimum}, got {value!r}."
        )
    if value < minimum:
        raise ValueError(
            f"`{argument}` must be an integer >= {minimum}, got {value!r}."
        )
    return int(value)


# -- Gaussianization flow ------------------------------------------------------------


@jax.tree_util.register_pytree_node_class
class GaussianizationFlow(_FlowMethods):
    r"""Deep Gaussianization flow: mixture-CDF marginals and rotations, alternated.

    The data → latent map with ``L`` marginal layers :math:`M_l` (a
    :class:`~distrax_mixcdf.MixtureGaussianCDF` with ``[D, K]`` parameters, one
    mixture per dimension) and ``L − 1`` orthogonal rotations :math:`R_l` is

    .. math::
        T = M_L \circ R_{L-1} \circ M_{L-1} \circ \cdots \circ R_1 \circ M_1,
        \qquad
        \log p(x) = \log\mathcal{N}\big(T(x); 0, I\big)
            + \sum_{l=1}^{L}\sum_{d=1}^{D}
              \log\Big|\frac{\partial M_{l,d}}{\partial z_d}\Big|,

    (the rotations have :math:`\log|\det| = 0`). There is no rotation after the
    last marginal layer: the standard-normal base is rotation invariant, so it
    would add parameters with an identically zero gradient.

    The pytree leaves are the marginals' ``(logits, means, log_scales)`` and the
    learnable :class:`~distrax_mixcdf.rotations.Householder` vectors;
    :class:`~distrax_mixcdf.rotations.FixedRotation` s contribute none. So
    ``fit(flow, data)`` fine-tunes everything jointly, and ``jax.jit`` /
    ``jax.grad`` take the flow as an argument. Build one with
    :func:`gaussianization_flow`.

    Args:
      marginals: ``L >= 1`` ``MixtureGaussianCDF`` s with parameters ``[D, K]``.
      rotations: ``L − 1`` bijectors with ``event_ndims == 1`` acting on ``D``
        vectors (``Householder`` or ``FixedRotation``).

    Raises:
      TypeError: If a member has the wrong type.
      ValueError: If the counts or shapes disagree.
    """

    def __init__(
        self,
        marginals: Sequence[MixtureGaussianCDF],
        rotations: Sequence[distrax.Bijector],
    ):
        marginals, rotations = tuple(marginals), tuple(rotations)
        if not marginals:
            raise ValueError("`marginals` must hold at least one layer, got none.")
        if len(rotations) != len(marginals) - 1:
            raise ValueError(
                f"`rotations` must have len(marginals) - 1 = {len(marginals) - 1} "
                f"members (one between consecutive marginals), got {len(rotations)}."
            )
        for i, m in enumerate(marginals):
            if not isinstance(m, MixtureGaussianCDF) or len(m.batch_shape) != 1:
                raise TypeError(
                    f"`marginals[{i}]` must be a MixtureGaussianCDF with parameters "
                    f"[D, K], got {m!r}."
                )
        dims = {m.batch_shape[0] for m in marginals}
        if len(dims) != 1:
            raise ValueError(
                "All `marginals` must have the same D, got batch shapes "
                f"{[m.batch_shape for m in marginals]}."
            )
        (dim,) = dims
        for i, r in enumerate(rotations):
            if not isinstance(r, (Householder, FixedRotation)):
                raise TypeError(
                    f"`rotations[{i}]` must be a Householder or FixedRotation, got "
                    f"{type(r).__name__}."
                )
            if r.dim != dim or (isinstance(r, Householder) and r.vectors.ndim != 2):
                raise ValueError(
                    f"`rotations[{i}]` must act on D = {dim} (the marginals' D) "
                    f"without parameter batch axes, got {r!r}."
                )
        self.marginals = marginals
        self.rotations = rotations

    def tree_flatten(self):
        """Children are the marginals and rotations (their arrays are the leaves)."""
        return (self.marginals, self.rotations), None

    @classmethod
    def tree_unflatten(cls, aux_data, children):
        """Rebuilds without validation (JAX may pass placeholders as leaves)."""
        del aux_data
        flow = object.__new__(cls)
        flow.marginals, flow.rotations = children
        return flow

    @property
    def dim(self) -> int:
        """The event size ``D``."""
        return int(self.marginals[0].batch_shape[0])

    @property
    def num_layers(self) -> int:
        """The number of marginal layers ``L``."""
        return len(self.marginals)

    def bijectors(self) -> list[distrax.Bijector]:
        """``[M_1, R_1, M_2, …, M_L]``: the data → latent layers in order."""
        layers: list[distrax.Bijector] = [self.marginals[0]]
        for rotation, marginal in zip(self.rotations, self.marginals[1:]):
            layers += [rotation, marginal]
        return layers

    def _layers(self):
        """Stacked per-layer arrays for ``lax.scan``, or None if not uniform.

        Returns ``(mixture params [L, D, K] x3, rotation arrays [L, ...],
        kind, options)``; the last layer gets the identity rotation (zero
        Householder vectors, which act as the identity, or the identity matrix).
        """
        ms, rots, dim = self.marginals, self.rotations, self.dim
        if (
            len({m.solver_options for m in ms}) != 1
            or len({(m.num_components, m.logits.dtype) for m in ms}) != 1
        ):
            return None
        params = tuple(
            jnp.stack([getattr(m, name) for m in ms])
            for name in ("logits", "means", "log_scales")
        )
        dtype = params[0].dtype
        householders = [r for r in rots if isinstance(r, Householder)]
        fixed = [r for r in rots if isinstance(r, FixedRotation)]
        if len(householders) == len(rots):
            if len({r.vectors.shape for r in householders}) > 1:
                return None
            count = householders[0].num_reflections if householders else 0
            vectors = [r.vectors.astype(dtype) for r in householders]
            rotation = jnp.stack([*vectors, jnp.zeros((count, dim), dtype)])
            kind = "householder"
        elif len(fixed) == len(rots):
            mats = [r.matrix().T.astype(dtype) for r in fixed]
            rotation = jnp.stack([*mats, jnp.eye(dim, dtype=dtype)])
            kind = "matrix"
        else:
            return None
        return params, rotation, kind, ms[0].solver_options._asdict()

    def _scan_forward(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        layers = self._layers()
        if layers is None:  # mixed rotation types: unrolled distrax stack
            return _unrolled(self.bijectors(), x, inverse=False)
        params, rotation, kind, options = layers
        x = x.astype(jnp.result_type(x.dtype, params[0].dtype))

        def body(carry, layer):
            z, log_det = carry
            (logits, means, log_scales), rot = layer
            y, ld = MixtureGaussianCDF(
                logits, means, log_scales, **options
            ).forward_and_log_det(z)
            return (y @ _transposed_matrix(rot, kind), log_det + ld.sum(-1)), None

        init = (x, jnp.zeros(x.shape[:-1], x.dtype))
        (z, log_det), _ = jax.lax.scan(body, init, (params, rotation))
        return z, log_det

    def _scan_inverse(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
        layers = self._layers()
        if layers is None:
            return _unrolled(self.bijectors(), z, inverse=True)
        params, rotation, kind, options = layers

        def body(carry, layer):
            x, log_det = carry
            (logits, means, log_scales), rot = layer
            x = x @ _transposed_matrix(rot, kind).T
            x, ld = MixtureGaussianCDF(
                logits, means, log_scales, **options
            ).inverse_and_log_det(x)
            return (x, log_det + ld.sum(-1)), None

        init = (z, jnp.zeros(z.shape[:-1], z.dtype))
        (x, log_det), _ = jax.lax.scan(body, init, (params, rotation), reverse=True)
        return x, log_det

    def __repr__(self) -> str:
        kinds = sorted({type(r).__name__ for r in self.rotations}) or ["none"]
        return (
            f"GaussianizationFlow(dim={self.dim}, num_layers={self.num_layers}, "
            f"num_components={self.marginals[0].num_components}, "
            f"rotations={'/'.join(kinds)}, num_params={self.num_params()})"
        )


def gaussianization_flow(
    data: Any,
    num_layers: int,
    num_components: int = 8,
    *,
    rotation: str = "householder",
    rotation_init: str = "pca",
    key: jax.Array | None = None,
    method: str = "em",
    solver_options: dict[str, Any] | None = None,
    init_options: dict[str, Any] | None = None,
) -> GaussianizationFlow:
    r"""A Gaussianization flow initialised greedily from data (RBIG).

    Layer by layer, with :math:`z_0 = x`: fit the marginals
    :math:`M_l` = ``MixtureGaussianCDF.from_data(z, K, method)``, map
    :math:`z \leftarrow M_l(z)`, then (but after the last layer) choose the
    rotation :math:`W_l` -- PCA of the current :math:`z` (RBIG) or a
    Haar-random orthogonal matrix -- and map :math:`z \leftarrow W_l z`. No
    gradients are used. The result is a usable density model on its own; joint
    fine-tuning of every layer with :func:`~distrax_mixcdf.fit` then improves it.

    With ``rotation="householder"`` each :math:`W_l` is stored *exactly* as a
    learnable product of Householder reflections (PCA eigenvector signs are
    chosen so that :math:`D - 1` reflections suffice), so fine-tuning starts
    from the greedy solution and also trains the rotations; with
    ``rotation="fixed"`` the rotations are constants and only the marginals
    train.

    Example:
      >>> import jax
      >>> from distrax_mixcdf import fit, gaussianization_flow
      >>> x = jax.random.normal(jax.random.PRNGKey(0), (512, 2)) ** 3
      >>> flow = gaussianization_flow(x, num_layers=4, num_components=8)
      >>> flow.log_prob(x[:3]).shape
      (3,)
      >>> tuned = fit(flow, x, steps=50, show_progress=False).model
      >>> flow.sample(seed=jax.random.PRNGKey(1), sample_shape=(5,)).shape
      (5, 2)

    Args:
      data: Training data ``[N, D]`` (floating point, finite, ``N >= 2``).
      num_layers: The number ``L >= 1`` of marginal layers.
      num_components: Mixture components ``K`` per dimension and layer.
      rotation: ``"householder"`` (learnable) or ``"fixed"``.
      rotation_init: ``"pca"`` (RBIG) or ``"random"`` (needs ``key``).
      key: PRNG key for ``rotation_init="random"``.
      method: The marginals' initialisation: ``"em"`` (default; a maximum-
        likelihood fit, which makes each greedy layer a density fit), or
        ``"quantile"`` or ``"kde"`` (see :func:`~distrax_mixcdf.initial_params`).
      solver_options: Options of every marginal's inverse (``root_finder``,
        ``tol``, ``max_iter``, ``inverse_grad``).
      init_options: Options of the marginal fits (``max_iter``, ``tol``,
        ``bandwidth``, ``min_scale``); a ``min_scale`` floor (in latent units)
        regularises the greedy fit on small data sets.

    Returns:
      The :class:`GaussianizationFlow`.

    Raises:
      ValueError: If an argument is malformed.
    """
    x = _check_data(data)
    num_layers = _check_int(num_layers, "num_layers", 1)
    num_components = _check_int(num_components, "num_components", 1)
    if rotation not in _ROTATIONS:
        raise ValueError(f"`rotation` must be one of {_ROTATIONS}, got {rotation!r}.")
    if rotation_init not in _ROTATION_INITS:
        raise ValueError(
            f"`rotation_init` must be one of {_ROTATION_INITS}, got {rotation_init!r}."
        )
    if rotation_init == "random" and key is None and num_layers > 1:
        raise ValueError('`rotation_init="random"` needs a PRNG `key`.')
    dim = x.shape[1]
    dtype = jax.dtypes.canonicalize_dtype(x.dtype)
    z = jnp.asarray(x, dtype)
    init_options = dict(init_options or {})
    marginals, rotations = [], []
    keys = jax.random.split(
        key if key is not None else jax.random.PRNGKey(0), num_layers
    )
    for layer in range(num_layers):
        marginal = MixtureGaussianCDF.from_data(
            z, num_components, method, solver_options=solver_options, **init_options
        )
        marginals.append(marginal)
        z = _jit_forward(marginal, z)
        if layer == num_layers - 1:
            break
        if rotation_init == "pca":
            w = pca_matrix(np.asarray(z))
        else:
            g = np.asarray(jax.random.normal(keys[layer], (dim, dim)), np.float64)
            q, r = np.linalg.qr(g)
            w = q * np.sign(np.diag(r))
        if rotation == "householder":
            # Flip output signs so that W's Householder QR has R = I: exactly
            # D − 1 reflections, and the flow is unchanged in distribution.
            w = w * _householder_qr(w)[1][:, None]
            rot: distrax.Bijector = Householder.from_matrix(w.astype(dtype))
        else:
            rot = FixedRotation(w.astype(dtype))
        rotations.append(rot)
        z = rot.forward(z)
    return GaussianizationFlow(marginals, rotations)


@jax.jit
def _jit_forward(bijector: distrax.Bijector, z: Any) -> Any:
    # Module-level jit: every greedy layer has the same shapes, so the mixture's
    # forward compiles once per (N, D, K) instead of running op by op.
    return bijector.forward(z)


def _transposed_matrix(rotation: jax.Array, kind: str) -> jax.Array:
    """``Wᵀ`` of one layer: ``z @ Wᵀ`` applies the rotation to row vectors."""
    if kind == "matrix":
        return rotation
    # Row j of Wᵀ is W e_j: reflect the identity's rows. O(L D²), done once per
    # call rather than per data point.
    wt = jnp.eye(rotation.shape[-1], dtype=rotation.dtype)
    for i in range(rotation.shape[0]):
        wt = _reflect(wt, rotation[i])
    return wt


def _unrolled(
    bijectors: Sequence[distrax.Bijector], x: Any, inverse: bool
) -> tuple[Any, Any]:
    """Applies data → latent layers (or their inverses) one by one, summing log-dets."""
    log_det = jnp.zeros(x.shape[:-1], x.dtype)
    for b in reversed(bijectors) if inverse else bijectors:
        if b.event_ndims_in == 0:
            b = distrax.Block(b, 1)
        x, ld = b.inverse_and_log_det(x) if inverse else b.forward_and_log_det(x)
        log_det = log_det + ld
    return x, log_det


# -- coupling flow -------------------------------------------------------------------


def _identity_mixture(num_components: int) -> np.ndarray:
    """Raw ``[3K]`` params of an equal-weight mixture with mean 0, variance 1.

    Means on a symmetric grid with variance 1/2 and every σ² = 1/2, so the mixture
    CDF is close to Φ (the layer starts near the identity) while its components
    differ (identical components would receive identical gradients forever).
    """
    grid = np.linspace(-1.0, 1.0, num_components)
    spread = np.var(grid)
    means = grid * np.sqrt(0.5 / spread) if spread > 0 else grid
    log_scale = 0.5 * np.log(0.5) if num_components > 1 else 0.0
    return np.concatenate(
        [np.zeros(num_components), means, np.full(num_components, log_scale)]
    )


def _mlp(layers: Sequence[tuple[jax.Array, jax.Array]], x: jax.Array) -> jax.Array:
    for i, (w, b) in enumerate(layers):
        x = x @ w + b
        if i < len(layers) - 1:
            x = jax.nn.silu(x)
    return x


def _coupling_step(layer, values, num_components, options, inverse):
    """One masked coupling layer of the scanned stack, either direction.

    ``layer`` is ``(conditioner weights, mask)``; masked entries pass through
    and condition the mixture parameters of the others. Returns the new values
    and the layer's log-det summed over the event axis.
    """
    weights, mask = layer
    params = _conditioner_params(weights, jnp.where(mask, values, 0), num_components)
    bijector = MixtureGaussianCDF.from_params(params, **options)
    mapped = bijector.inverse_and_log_det if inverse else bijector.forward_and_log_det
    out, log_det = mapped(values)
    return jnp.where(mask, values, out), jnp.where(mask, 0, log_det).sum(-1)


def _conditioner_params(
    weights: Sequence[tuple[jax.Array, jax.Array]], masked_x: Any, k: int
) -> jax.Array:
    """The MLP's ``[..., D, 3K]`` mixture parameters, log-scales bounded."""
    out = _mlp(weights, masked_x)
    out = out.reshape((*out.shape[:-1], masked_x.shape[-1], 3 * k))
    logits, means, log_scales = jnp.split(out, 3, axis=-1)
    log_scales = _LOG_SCALE_BOUND * jnp.tanh(log_scales / _LOG_SCALE_BOUND)
    return jnp.concatenate([logits, means, log_scales], axis=-1)


@jax.tree_util.register_pytree_node_class
class CouplingFlow(_FlowMethods):
    r"""Coupling flow with mixture-CDF inner bijectors (Flow++-style).

    Each coupling layer :math:`l` keeps the coordinates :math:`x_m` where
    ``masks[l]`` is true and Gaussianizes the others, each with its own
    ``K``-component mixture whose parameters an MLP computes from the kept
    coordinates:

    .. math::
        y_{\bar m} = \Phi^{-1}\Big(\sum_k w_k(x_m)\,
            \Phi\Big(\frac{x_{\bar m} - \mu_k(x_m)}{\sigma_k(x_m)}\Big)\Big),
        \qquad y_m = x_m,

    i.e. ``distrax.MaskedCoupling`` with :meth:`MixtureGaussianCDF.from_params`
    (see :attr:`distribution`), optionally preceded by a per-dimension marginal
    mixture-CDF layer. The MLP sees ``x`` with the transformed coordinates
    zeroed (``D`` inputs) and emits ``D · 3K`` values (the kept coordinates'
    share is unused), so every layer has the same shapes and :meth:`log_prob`
    scans over them. The log-scales are bounded smoothly,
    :math:`\log\sigma = 5\tanh(s/5)`.

    The pytree leaves are the optional marginal's three arrays and the MLP
    weights and biases (``conditioners[l]`` is a tuple of ``(W, b)`` pairs);
    the masks, ``K`` and the solver options are static. Build one with
    :func:`coupling_flow`.

    Args:
      marginal: A ``MixtureGaussianCDF`` with parameters ``[D, K']`` applied
        first, or ``None``.
      conditioners: One MLP per coupling layer: a sequence of ``(W, b)`` with
        ``W [n_in, n_out]`` and ``b [n_out]``, from ``D`` inputs to ``D · 3K``
        outputs; SiLU between layers.
      masks: One boolean ``[D]`` mask per layer (true = kept), each with at
        least one true and one false entry.
      num_components: ``K`` of the coupling mixtures.
      solver_options: Options of the inner bijectors' inverse.

    Raises:
      ValueError: If the shapes or counts disagree.
    """

    def __init__(
        self,
        marginal: MixtureGaussianCDF | None,
        conditioners: Sequence[Sequence[tuple[Any, Any]]],
        masks: Sequence[Any],
        num_components: int,
        *,
        solver_options: dict[str, Any] | None = None,
    ):
        masks = tuple(tuple(bool(v) for v in np.asarray(m).reshape(-1)) for m in masks)
        conditioners = tuple(
            tuple((jnp.asarray(w), jnp.asarray(b)) for w, b in layer)
            for layer in conditioners
        )
        num_components = _check_int(num_components, "num_components", 1)
        if len(masks) != len(conditioners) or not masks:
            raise ValueError(
                f"`masks` ({len(masks)}) and `conditioners` ({len(conditioners)}) "
                "must have the same, non-zero length."
            )
        dim = len(masks[0])
        for i, (mask, layer) in enumerate(zip(masks, conditioners)):
            if len(mask) != dim or sum(mask) in (0, dim):
                raise ValueError(
                    f"`masks[{i}]` must have D = {dim} entries with at least one "
                    f"kept and one transformed, got {mask}."
                )
            want_out = dim * 3 * num_components
            shapes = [(tuple(w.shape), tuple(b.shape)) for w, b in layer]
            ok = (
                bool(layer)
                and all(len(ws) == 2 and bs == ws[1:] for ws, bs in shapes)
                and all(a[0][1] == b[0][0] for a, b in itertools.pairwise(shapes))
            )
            if not ok or shapes[0][0][0] != dim or shapes[-1][0][1] != want_out:
                raise ValueError(
                    f"`conditioners[{i}]` must map D = {dim} inputs to D * 3K = "
                    f"{want_out} outputs through [n_in, n_out] weights and [n_out] "
                    f"biases, got shapes {shapes}."
                )
        if marginal is not None and (
            not isinstance(marginal, MixtureGaussianCDF)
            or marginal.batch_shape != (dim,)
        ):
            raise ValueError(
                f"`marginal` must be None or a MixtureGaussianCDF with parameters "
                f"[D={dim}, K], got {marginal!r}."
            )
        self.marginal = marginal
        self.conditioners = conditioners
        self._static = (
            masks,
            num_components,
            tuple(sorted((solver_options or {}).items())),
        )

    def tree_flatten(self):
        """Children: the marginal and the MLP weights; masks/K/options are static."""
        return (self.marginal, self.conditioners), self._static

    @classmethod
    def tree_unflatten(cls, aux_data, children):
        """Rebuilds without validation (JAX may pass placeholders as leaves)."""
        flow = object.__new__(cls)
        flow.marginal, flow.conditioners = children
        flow._static = aux_data
        return flow

    @property
    def masks(self) -> tuple[tuple[bool, ...], ...]:
        """One boolean mask per coupling layer (true = kept unchanged)."""
        return self._static[0]

    @property
    def num_components(self) -> int:
        """``K`` of the coupling mixtures."""
        return self._static[1]

    @property
    def dim(self) -> int:
        """The event size ``D``."""
        return len(self.masks[0])

    def _coupling(self, layer: int) -> distrax.MaskedCoupling:
        weights, k = self.conditioners[layer], self.num_components
        options = dict(self._static[2])
        return distrax.MaskedCoupling(
            mask=jnp.asarray(self.masks[layer]),
            conditioner=lambda masked_x: _conditioner_params(weights, masked_x, k),
            bijector=lambda p: MixtureGaussianCDF.from_params(p, **options),
        )

    def bijectors(self) -> list[distrax.Bijector]:
        """``[marginal?, coupling_1, …]``: the data → latent layers in order."""
        layers: list[distrax.Bijector] = (
            [] if self.marginal is None else [self.marginal]
        )
        return layers + [self._coupling(i) for i in range(len(self.masks))]

    def _stacked(self):
        shapes = {
            tuple(tuple(w.shape) + tuple(b.shape) for w, b in layer)
            for layer in self.conditioners
        }
        if len(shapes) != 1:
            return None
        weights = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *self.conditioners)
        return weights, jnp.asarray(self.masks)

    def _scan_forward(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        stacked = self._stacked()
        if stacked is None:
            return _unrolled(self.bijectors(), x, inverse=False)
        k, options = self.num_components, dict(self._static[2])
        x = x.astype(jnp.result_type(x.dtype, self._dtype()))
        log_det = jnp.zeros(x.shape[:-1], x.dtype)
        if self.marginal is not None:
            x, ld = self.marginal.forward_and_log_det(x)
            log_det = log_det + ld.sum(-1)

        def body(carry, layer):
            z, log_det = carry
            y, ld = _coupling_step(layer, z, k, options, inverse=False)
            return (y, log_det + ld), None

        (z, log_det), _ = jax.lax.scan(body, (x, log_det), stacked)
        return z, log_det

    def _scan_inverse(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
        stacked = self._stacked()
        if stacked is None:
            return _unrolled(self.bijectors(), z, inverse=True)
        k, options = self.num_components, dict(self._static[2])

        def body(carry, layer):
            y, log_det = carry
            x, ld = _coupling_step(layer, y, k, options, inverse=True)
            return (x, log_det + ld), None

        init = (z, jnp.zeros(z.shape[:-1], z.dtype))
        (x, log_det), _ = jax.lax.scan(body, init, stacked, reverse=True)
        if self.marginal is not None:
            x, ld = self.marginal.inverse_and_log_det(x)
            log_det = log_det + ld.sum(-1)
        return x, log_det

    def __repr__(self) -> str:
        hidden = [int(w.shape[1]) for w, _ in self.conditioners[0][:-1]]
        return (
            f"CouplingFlow(dim={self.dim}, num_layers={len(self.masks)}, "
            f"num_components={self.num_components}, hidden={hidden}, "
            f"marginal={self.marginal is not None}, num_params={self.num_params()})"
        )


def coupling_flow(
    key: jax.Array,
    dim: int,
    *,
    num_layers: int = 4,
    num_components: int = 8,
    hidden_sizes: Sequence[int] = (32, 32),
    data: Any = None,
    marginal_components: int | None = None,
    method: str = "quantile",
    solver_options: dict[str, Any] | None = None,
    dtype: Any = None,
) -> CouplingFlow:
    r"""A coupling flow with mixture-CDF couplings and MLP conditioners.

    Each layer keeps the masked coordinates :math:`x_m` and maps the others by
    a mixture CDF whose parameters an MLP computes from them,
    :math:`y_{\bar m} = \Phi^{-1}\big(\sum_k w_k(x_m)\,
    \Phi((x_{\bar m} - \mu_k(x_m))/\sigma_k(x_m))\big)`, :math:`y_m = x_m`
    (see :class:`CouplingFlow`).

    Masks alternate: for ``D = 2`` between ``[True, False]`` and ``[False,
    True]``; otherwise each pair of layers keeps a random half of the
    coordinates (from ``key``) and then its complement, so every coordinate is
    transformed once per pair. Hidden layers use SiLU; weights start
    LeCun-normal, the output layer 100x smaller with a bias that makes every
    coupling start near the identity (see :class:`CouplingFlow`). With
    ``data``, a per-dimension marginal mixture layer initialised by
    ``MixtureGaussianCDF.from_data`` comes first.

    Example:
      >>> import jax
      >>> from distrax_mixcdf import coupling_flow, fit
      >>> x = jax.random.normal(jax.random.PRNGKey(0), (512, 2)) ** 3
      >>> flow = coupling_flow(jax.random.PRNGKey(1), 2, num_layers=4, data=x)
      >>> flow = fit(flow, x, steps=50, show_progress=False).model
      >>> flow.log_prob(x[:3]).shape
      (3,)

    Args:
      key: PRNG key for the weights and the masks.
      dim: The event size ``D >= 2``.
      num_layers: The number of coupling layers.
      num_components: ``K`` of each coupling mixture.
      hidden_sizes: Hidden widths of each conditioner MLP.
      data: Optional training data ``[N, D]`` for the marginal layer.
      marginal_components: ``K`` of the marginal layer (default
        ``num_components``).
      method: The marginal layer's initialisation method.
      solver_options: Options of every mixture's inverse.
      dtype: Floating dtype of the weights (default: the data's, or JAX's
        default float).

    Returns:
      The :class:`CouplingFlow`.

    Raises:
      ValueError: If an argument is malformed.
    """
    dim = _check_int(dim, "dim", 2)
    num_layers = _check_int(num_layers, "num_layers", 1)
    num_components = _check_int(num_components, "num_components", 1)
    hidden = [_check_int(h, "hidden_sizes", 1) for h in hidden_sizes]
    marginal = None
    if data is not None:
        x = _check_data(data)
        if x.shape[1] != dim:
            raise ValueError(f"`data` of shape {x.shape} does not have D = {dim}.")
        if dtype is None:
            dtype = jax.dtypes.canonicalize_dtype(x.dtype)
        marginal = MixtureGaussianCDF.from_data(
            jnp.asarray(x, dtype),
            _check_int(
                num_components if marginal_components is None else marginal_components,
                "marginal_components",
                1,
            ),
            method,
            solver_options=solver_options,
        )
    dtype = jnp.result_type(float) if dtype is None else dtype
    mask_key, weight_key = jax.random.split(key)
    masks = []
    for layer in range(num_layers):
        if dim == 2:
            mask = np.array([layer % 2 == 0, layer % 2 == 1])
        elif layer % 2 == 0:
            perm = np.asarray(
                jax.random.permutation(jax.random.fold_in(mask_key, layer), dim)
            )
            mask = np.zeros(dim, bool)
            mask[perm[: dim // 2]] = True
        else:
            mask = ~masks[-1]
        masks.append(mask)
    identity = _identity_mixture(num_components)
    conditioners = []
    for layer in range(num_layers):
        sizes = [dim, *hidden, dim * 3 * num_components]
        keys = jax.random.split(jax.random.fold_in(weight_key, layer), len(sizes) - 1)
        mlp = []
        for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
            w = jax.random.normal(keys[i], (n_in, n_out), dtype) / np.sqrt(n_in)
            if i == len(sizes) - 2:
                w = w * 0.01
                b = jnp.asarray(np.tile(identity, dim), dtype)
            else:
                b = jnp.zeros(n_out, dtype)
            mlp.append((w, b))
        conditioners.append(mlp)
    return CouplingFlow(
        marginal, conditioners, masks, num_components, solver_options=solver_options
    )
