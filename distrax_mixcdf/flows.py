r"""Deep normalizing flows built from the mixture-CDF layer.

Two flow families, each a pytree whose leaves are exactly its trainable arrays,
with the distrax bijector stack built from those leaves on every call:

* :class:`GaussianizationFlow` (RBIG, Laparra et al. 2011; Gaussianization
  Flows, Meng et al. 2020): ``L`` per-dimension
  :class:`~distrax_mixcdf.MixtureGaussianCDF` layers with an orthogonal rotation
  between consecutive ones. :func:`gaussianization_flow` builds it greedily from
  data (RBIG: fit each layer's marginals on the current latent, then rotate; no
  gradients), with held-out rows choosing each marginal's shrinkage towards a
  Gaussian and the depth, ready for joint maximum-likelihood fine-tuning with
  :func:`~distrax_mixcdf.fit`.
* :class:`CouplingFlow` (Flow++-style, Ho et al. 2019): an optional first stage
  (a marginal mixture-CDF layer, or the short greedy Gaussianization flow that
  :func:`coupling_flow` builds from data) followed by ``distrax.MaskedCoupling``
  layers whose inner bijector is :meth:`MixtureGaussianCDF.from_params` and
  whose conditioner is a small pure-JAX MLP.

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
the coupling masks, the log-scale bound, the greedy construction's constants
(anchor weights, smoothing floor, tail, stopping rule), as long as
`tests/test_flows.py` and `tests/test_small_data.py` stay green. Keep fixed:
the public names, the rule that the leaves are exactly the trainable arrays (no
leaf that must not be trained, no weights hidden in callables) and the data →
latent direction.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import distrax
import jax
import jax.numpy as jnp
import numpy as np

from distrax_mixcdf.initialization import (
    _check_options,
    _fit_columns,
    _smoothing_floor,
)
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

# Anchor weights α a greedy marginal may take (the share of its anchor
# component), in increasing order. Never 0: the anchor keeps every point's
# density within log(1/α) of a Gaussian's, whatever the fitted components do.
_ANCHOR_WEIGHTS = (1e-3, 0.01, 0.03, 0.1, 0.2, 0.35, 0.5, 0.65, 0.8, 0.9, 0.97, 0.999)
# Without held-out rows nothing can be chosen: a fixed, cautious weight and the
# depth of a Gaussian copula (marginals, rotation, marginals).
_UNVALIDATED_ANCHOR_WEIGHT = 0.1
_UNVALIDATED_LAYERS = 2
_MIN_VALIDATION_ROWS = 8
# The data-driven depth: stop after this many layers in a row without a
# significant held-out gain (gains come in bursts: a PCA rotation of a nearly
# whitened latent often finds nothing, the next one does), and never go
# deeper than the cap.
_PATIENCE = 4
_MAX_LAYERS = 32
_MIN_LAYERS = 2
# Smoothing floor of the fitted components, as a multiple of the
# rule-of-thumb bandwidth of the column.
_FLOOR_FACTOR = 0.5
# Every greedy marginal keeps a fixed share of its mass on a wide
# Gaussian, twice the column's spread: held-out rows are too few to show the
# tails, and beyond the training range this component's density beats the
# fitted ones' by far, at a cost of at most -log(1 - 0.01) nats elsewhere.
_TAIL_WEIGHT = 0.01
_TAIL_SCALE = 2.0
# Deepest data-driven stem of a coupling flow: enough for the Gaussian-copula
# start; the couplings model the rest.
_STEM_MAX_LAYERS = 4
# Default anchor weight of the coupling mixtures: caps what one coupling can
# cost a held-out point near log(200) nats per coordinate, for at most
# 0.01 nats per coordinate where the learned mixture fits.
_COUPLING_ANCHOR_WEIGHT = 0.01
# The anchor is N(0, 2²): wider than the standard-normal latent, so its floor
# costs a far-out point nothing (its density beats φ there) and the anchor
# alone would map outliers inwards.
_ANCHOR_LOG_SCALE = float(np.log(2.0))
# Variance of the coupling mixtures' initial means (see _identity_mixture).
_IDENTITY_SPREAD = 0.1
# A greedy layer counts as an improvement when its held-out gain exceeds this
# many standard errors: the anchor weights are chosen on the same rows, which
# makes the gain optimistic.
_GAIN_STANDARD_ERRORS = 2.0


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
    num_layers: int | None = None,
    num_components: int = 8,
    *,
    rotation: str = "householder",
    rotation_init: str = "pca",
    key: jax.Array | None = None,
    method: str = "em",
    solver_options: dict[str, Any] | None = None,
    init_options: dict[str, Any] | None = None,
    validation_data: Any = None,
    validation_fraction: float = 0.2,
    max_layers: int = _MAX_LAYERS,
) -> GaussianizationFlow:
    r"""A Gaussianization flow initialised greedily from data (RBIG).

    Layer by layer, with :math:`z_0 = x`: fit the marginals :math:`M_l` to the
    current latent :math:`z`, map :math:`z \leftarrow M_l(z)`, then (but after
    the last layer) choose the rotation :math:`W_l` -- PCA of the current
    :math:`z` (RBIG) or a Haar-random orthogonal matrix -- and map
    :math:`z \leftarrow W_l z`. No gradients are used. The result is a usable
    density model on its own; joint fine-tuning of every layer with
    :func:`~distrax_mixcdf.fit` then improves it.

    Each marginal of layer :math:`l` and dimension :math:`d` is a *shrunk*
    mixture of ``K + 2`` components: ``K`` fitted to the column (``method``,
    every scale at least a smoothing floor: half the rule-of-thumb bandwidth
    :math:`1.06 \min(s_d, \mathrm{IQR}_d / 1.349)\, N^{-1/5}`, and at least the
    column's resolution, its smallest gap between distinct values), an
    *anchor* :math:`g_d` with weight :math:`\alpha_d`, and a fixed *tail*,

    .. math::
        f_{l,d}(z) = (1 - \tau)\Big[(1 - \alpha_d) \sum_{k=1}^{K} w_k\,
            \mathcal N(z; \mu_k, \sigma_k^2) + \alpha_d\, g_d(z)\Big]
            + \tau\, \mathcal N(z; m_d, (2 s_d)^2),

    with :math:`\tau = 0.01` and :math:`m_d, s_d` the column's mean and
    standard deviation. The anchor :math:`g_d` is the column's Gaussian
    :math:`\mathcal N(m_d, s_d^2)` (with :math:`\alpha_d` near 1 the layer
    standardises the column), or :math:`\mathcal N(0, 1)` where :math:`m_d`
    and :math:`\log s_d` are both within a standard error of 0 (the layer is
    then close to the identity). Held-out rows choose :math:`\alpha_d \in
    [10^{-3}, 0.999]` per dimension by the one-standard-error rule: the
    largest (the simplest model) whose mean held-out log-density is within a
    standard error of the best one's. The floor keeps fitted components from
    collapsing onto tied values or single points; the anchor and the tail
    bound what a point the fit did not see can lose,
    :math:`f_{l,d} \ge \tau\,\mathcal N(z; m_d, 4 s_d^2)`, a density that
    beyond the training range exceeds the fitted components' by far. Two
    layers of standardising anchors, with the PCA rotation between them, are
    the full-covariance Gaussian up to the weights :math:`1 - \alpha` and
    :math:`\tau`, so the greedy path contains that baseline.

    Because :math:`\log\mathcal N(M(z)) + \log M'(z) = \log f(z)` and rotations
    leave :math:`\mathcal N(0, I)` unchanged, adding layer :math:`l` changes the
    held-out log-likelihood of the flow truncated there by exactly

    .. math::
        \Delta_l = \frac{1}{N_v} \sum_{n} r_n, \qquad
        r_n = \sum_d \log f_{l,d}(z_{nd}) - \log \varphi(z_{nd}).

    With ``num_layers=None`` the depth is data-driven. The first two layers
    are always built (for ``D >= 2``): with the rotation between them they are
    a Gaussian copula, whose held-out choices include the full-covariance
    Gaussian. A later layer counts as an improvement when :math:`\Delta_l`
    exceeds twice its standard error :math:`\operatorname{sd}(r)/\sqrt{N_v}`
    (the anchor weights were chosen on the same rows, which makes
    :math:`\Delta_l` optimistic); building stops after four layers in a row
    without one (or at ``max_layers``), and the flow ends at the last
    improving layer. So small or nearly Gaussian data get shallow flows, and
    more data buys depth.

    The held-out rows are ``validation_data`` if given (then every row of
    ``data`` is fitted), else a random ``validation_fraction`` of ``data``
    (from ``key``), which the fits do not see. With fewer than 8 held-out rows
    there is nothing to choose by: every anchor weight is :math:`\alpha = 0.1`,
    and ``num_layers=None`` means 2.

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
      num_layers: The number ``L >= 1`` of marginal layers, or ``None`` (the
        default) for the data-driven depth described above.
      num_components: Fitted mixture components ``K`` per dimension and layer
        (each marginal has ``K + 2``: the anchor and the tail besides).
      rotation: ``"householder"`` (learnable) or ``"fixed"``.
      rotation_init: ``"pca"`` (RBIG) or ``"random"`` (needs ``key``).
      key: PRNG key for the held-out split and ``rotation_init="random"``;
        default ``jax.random.PRNGKey(0)``.
      method: How the fitted components are initialised: ``"em"`` (default; a
        maximum-likelihood fit, which makes each greedy layer a density fit),
        or ``"quantile"`` or ``"kde"`` (see
        :func:`~distrax_mixcdf.initial_params`).
      solver_options: Options of every marginal's inverse (``root_finder``,
        ``tol``, ``max_iter``, ``inverse_grad``).
      init_options: Options of the marginal fits (``max_iter``, ``tol``,
        ``bandwidth``, ``min_scale``); a ``min_scale`` (in latent units)
        replaces the data-driven smoothing floor.
      validation_data: Held-out rows ``[N_v, D]`` for the anchor weights and
        the depth; default: split off from ``data``.
      validation_fraction: The share of ``data`` held out when
        ``validation_data`` is not given, in ``[0, 1)``.
      max_layers: The most layers the data-driven depth may reach.

    Returns:
      The :class:`GaussianizationFlow`.

    Raises:
      ValueError: If an argument is malformed.
    """
    x = _check_data(data)
    if num_layers is not None:
        num_layers = _check_int(num_layers, "num_layers", 1)
    max_layers = _check_int(max_layers, "max_layers", 1)
    num_components = _check_int(num_components, "num_components", 1)
    if rotation not in _ROTATIONS:
        raise ValueError(f"`rotation` must be one of {_ROTATIONS}, got {rotation!r}.")
    if rotation_init not in _ROTATION_INITS:
        raise ValueError(
            f"`rotation_init` must be one of {_ROTATION_INITS}, got {rotation_init!r}."
        )
    if rotation_init == "random" and key is None and num_layers != 1:
        raise ValueError('`rotation_init="random"` needs a PRNG `key`.')
    if isinstance(validation_fraction, bool) or not (
        isinstance(validation_fraction, (int, float, np.integer, np.floating))
        and 0 <= validation_fraction < 1
    ):
        raise ValueError(
            f"`validation_fraction` must be a number in [0, 1), got "
            f"{validation_fraction!r}."
        )
    init_options = dict(init_options or {})
    unknown = set(init_options) - {"max_iter", "tol", "bandwidth", "min_scale"}
    if unknown:
        raise ValueError(
            f"`init_options` has unknown keys {sorted(unknown)}; allowed are "
            "max_iter, tol, bandwidth, min_scale."
        )
    _check_options(
        num_components,
        method,
        init_options.get("max_iter", 200),
        init_options.get("tol", 1e-6),
        init_options.get("bandwidth", "scott"),
        init_options.get("min_scale"),
    )
    dim = x.shape[1]
    dtype = jax.dtypes.canonicalize_dtype(x.dtype)
    key = jax.random.PRNGKey(0) if key is None else key
    split_key, rotation_key = jax.random.split(key)
    if validation_data is not None:
        held_out = _check_data(validation_data, "validation_data")
        if held_out.shape[1] != dim:
            raise ValueError(
                f"`validation_data` of shape {held_out.shape} does not have the "
                f"data's D = {dim}."
            )
        fitted = x
    else:
        n_val = int(validation_fraction * x.shape[0])
        if n_val >= _MIN_VALIDATION_ROWS and x.shape[0] - n_val >= 2:
            order = np.asarray(jax.random.permutation(split_key, x.shape[0]))
            fitted, held_out = x[order[n_val:]], x[order[:n_val]]
        else:
            fitted, held_out = x, x[:0]
    if len(held_out) < _MIN_VALIDATION_ROWS:
        held_out = held_out[:0]
    n_fit = fitted.shape[0]
    if num_layers is not None:
        depth = num_layers
    else:
        depth = max_layers if len(held_out) else min(_UNVALIDATED_LAYERS, max_layers)

    z = jnp.asarray(np.concatenate([fitted, held_out]), dtype)
    marginals: list[MixtureGaussianCDF] = []
    rotations: list[distrax.Bijector] = []
    # The first two layers (marginals, rotation, marginals) are always kept:
    # they are the Gaussian copula, which contains the full-covariance Gaussian.
    minimum = min(_MIN_LAYERS if dim > 1 else 1, depth)
    keep, stalled = minimum, 0
    for layer in range(depth):
        marginal, gains = _greedy_marginal(
            z[:n_fit], z[n_fit:], num_components, method, init_options, solver_options
        )
        marginals.append(marginal)
        if gains is not None:
            gain = float(np.mean(gains))
            error = float(np.std(gains)) / np.sqrt(len(gains))
            if gain > _GAIN_STANDARD_ERRORS * error:
                keep, stalled = max(len(marginals), minimum), 0
            elif len(marginals) > minimum:
                stalled += 1
        if layer == depth - 1 or (num_layers is None and stalled >= _PATIENCE):
            break
        z = _jit_forward(marginal, z)
        z_fit = np.asarray(z[:n_fit])
        if rotation_init == "pca":
            w = pca_matrix(z_fit)
        else:
            g = np.asarray(
                jax.random.normal(jax.random.fold_in(rotation_key, layer), (dim, dim)),
                np.float64,
            )
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
    if num_layers is None:
        # End at the last layer that improved the held-out likelihood.
        marginals, rotations = marginals[:keep], rotations[: keep - 1]
    return GaussianizationFlow(marginals, rotations)


def _greedy_marginal(
    z_fit: jax.Array,
    z_val: jax.Array,
    num_components: int,
    method: str,
    init_options: dict[str, Any],
    solver_options: dict[str, Any] | None,
) -> tuple[MixtureGaussianCDF, np.ndarray | None]:
    """One greedy marginal layer: ``K`` fitted components, an anchor, a tail.

    Returns the layer and the held-out rows' log-likelihood gains ``r_n`` over
    the standard normal (``None`` without held-out rows).
    """
    columns = np.asarray(z_fit).T
    dtype, (dim, n) = columns.dtype, columns.shape
    min_scale = init_options.get("min_scale")
    floors = (
        _smoothing_floor(columns, _FLOOR_FACTOR)
        if min_scale is None
        else np.full(dim, float(min_scale))
    )
    # The anchor is the column's Gaussian (scale floored), or N(0, 1) -- the
    # identity -- where the fitted rows cannot tell the two apart (mean and log
    # standard deviation within a standard error of 0; there, either choice
    # costs about 1/N nats): a standard column keeps an exact identity.
    # The tail is the column's Gaussian, widened.
    mean, log_std = columns.mean(1), np.log(np.maximum(columns.std(1), floors))
    standard = (np.abs(mean) <= np.exp(log_std) / np.sqrt(n)) & (
        np.abs(log_std) <= 1 / np.sqrt(2 * n)
    )
    anchor = (np.where(standard, 0.0, mean), np.where(standard, 0.0, log_std))
    tail = (mean, log_std + np.log(_TAIL_SCALE))
    fit = _fit_columns(
        columns,
        num_components,
        method,
        floors,
        init_options.get("max_iter", 200),
        init_options.get("tol", 1e-6),
        init_options.get("bandwidth", "scott"),
    )
    log_weights = np.asarray(jax.nn.log_softmax(fit[0], axis=-1))
    means, log_scales = np.asarray(fit[1]), np.asarray(fit[2])
    grid, tail_weight = np.asarray(_ANCHOR_WEIGHTS), _TAIL_WEIGHT
    if z_val.shape[0] == 0:
        alpha = np.full(dim, _UNVALIDATED_ANCHOR_WEIGHT)
        gains = None
    else:
        args = (log_weights, means, log_scales, *anchor, *tail, grid, tail_weight)
        choice, gains = _blend_scores(*(jnp.asarray(a, dtype) for a in args), z_val)
        alpha = grid[np.asarray(choice)]
        gains = np.asarray(gains, np.float64)
    # Weights: (1 - τ)(1 - α) on the fitted components, (1 - τ)α on the
    # anchor, τ on the tail.
    body = np.log1p(-tail_weight)
    logits = [
        body + np.log1p(-alpha)[:, None] + log_weights,
        body + np.log(alpha)[:, None],
        np.full((dim, 1), np.log(tail_weight)),
    ]
    params = [
        np.concatenate(logits, 1),
        np.concatenate([means, anchor[0][:, None], tail[0][:, None]], 1),
        np.concatenate([log_scales, anchor[1][:, None], tail[1][:, None]], 1),
    ]
    marginal = MixtureGaussianCDF(
        *(jnp.asarray(p, dtype) for p in params), **(solver_options or {})
    )
    return marginal, gains


@jax.jit
def _blend_scores(
    log_weights,
    means,
    log_scales,
    anchor_mean,
    anchor_log_scale,
    tail_mean,
    tail_log_scale,
    alphas,
    tail_weight,
    z,
):
    r"""Held-out choice of the anchor weight per dimension, and the rows' gains.

    For fitted components ``[D, K]``, an anchor and a tail ``[D]`` (the tail
    with weight :math:`\tau`), increasing anchor weights ``[G]`` and held-out
    latents ``[N, D]``, scores every mixture
    :math:`h = (1 - \tau)\big((1 - \alpha) f + \alpha g\big) + \tau t` by its
    mean log-density per dimension, then applies the one-standard-error rule:
    of the weights whose paired shortfall :math:`\overline{\log h^* - \log h}`
    against the best one's :math:`h^*` is within its standard error, it takes
    the largest (the simplest model). Why: a handful of held-out rows cannot
    tell close candidates apart, and the simpler one is the safer guess on new
    data.

    Returns:
      ``(choice [D], gains [N])``: the chosen index into ``alphas`` per
      dimension, and per row :math:`\sum_d \log h_d(z_{nd}) -
      \log\varphi(z_{nd})` under the chosen weights.
    """

    def log_normal(x, mean, log_scale):
        u = (x - mean) * jnp.exp(-log_scale)
        return -0.5 * u * u - log_scale - 0.5 * np.log(2 * np.pi)

    log_f = jax.nn.logsumexp(
        log_weights + log_normal(z[..., None], means, log_scales), axis=-1
    )
    log_g = log_normal(z, anchor_mean, anchor_log_scale)
    log_t = jnp.log(tail_weight) + log_normal(z, tail_mean, tail_log_scale)

    def blend(alpha):  # [N, D]
        body = jnp.logaddexp(jnp.log1p(-alpha) + log_f, jnp.log(alpha) + log_g)
        return jnp.logaddexp(jnp.log1p(-tail_weight) + body, log_t)

    # α [D] broadcasts: blend(α) scores each dimension with its own weight.
    scores = jax.lax.map(lambda a: blend(a).mean(axis=0), alphas)  # [G, D]
    best = blend(alphas[jnp.argmax(scores, axis=0)])

    def within_error(alpha):
        shortfall = best - blend(alpha)
        error = shortfall.std(axis=0) / np.sqrt(z.shape[0])
        return shortfall.mean(axis=0) <= error

    close = jax.lax.map(within_error, alphas)  # [G, D]; the best is always close
    choice = jnp.argmax(jnp.where(close, jnp.arange(len(alphas))[:, None], -1), 0)
    gains = blend(alphas[choice]) - log_normal(z, 0.0, 0.0)
    return choice, gains.sum(-1)


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
    r"""Raw ``[3K]`` params of an equal-weight mixture close to :math:`\Phi`.

    Every :math:`\sigma = 1`, means on a symmetric grid with variance
    :math:`v = 0.1`, so :math:`f = \varphi * \text{grid}` and, by Jensen,
    :math:`\log f(z) - \log\varphi(z) = \log\overline{e^{z\mu - \mu^2/2}}
    \ge -v/2` everywhere: a coupling starts within 0.05 nats of the identity
    even at far-out points (narrower components would have lighter tails than
    :math:`\Phi` and cost held-out outliers many nats). The components still
    differ: identical ones would receive identical gradients forever.
    """
    grid = np.linspace(-1.0, 1.0, num_components)
    spread = np.var(grid)
    means = grid * np.sqrt(_IDENTITY_SPREAD / spread) if spread > 0 else grid
    return np.concatenate([np.zeros(num_components), means, np.zeros(num_components)])


def _mlp(layers: Sequence[tuple[jax.Array, jax.Array]], x: jax.Array) -> jax.Array:
    for i, (w, b) in enumerate(layers):
        x = x @ w + b
        if i < len(layers) - 1:
            x = jax.nn.silu(x)
    return x


def _coupling_step(layer, values, num_components, anchor, options, inverse):
    """One masked coupling layer of the scanned stack, either direction.

    ``layer`` is ``(conditioner weights, mask)``; masked entries pass through
    and condition the mixture parameters of the others. Returns the new values
    and the layer's log-det summed over the event axis.
    """
    weights, mask = layer
    params = _conditioner_params(
        weights, jnp.where(mask, values, 0), num_components, anchor
    )
    bijector = MixtureGaussianCDF.from_params(params, **options)
    mapped = bijector.inverse_and_log_det if inverse else bijector.forward_and_log_det
    out, log_det = mapped(values)
    return jnp.where(mask, values, out), jnp.where(mask, 0, log_det).sum(-1)


def _conditioner_params(
    weights: Sequence[tuple[jax.Array, jax.Array]],
    masked_x: Any,
    k: int,
    anchor: float = 0.0,
) -> jax.Array:
    """The MLP's mixture parameters, log-scales bounded.

    ``[..., D, 3K]``, or with ``anchor > 0`` ``[..., D, 3(K + 1)]``: the ``K``
    learned components share weight ``1 - anchor`` and a fixed ``N(0, 2²)``
    component gets ``anchor``.
    """
    out = _mlp(weights, masked_x)
    out = out.reshape((*out.shape[:-1], masked_x.shape[-1], 3 * k))
    logits, means, log_scales = jnp.split(out, 3, axis=-1)
    log_scales = _LOG_SCALE_BOUND * jnp.tanh(log_scales / _LOG_SCALE_BOUND)
    if anchor > 0:
        zero = jnp.zeros_like(logits[..., :1])
        logits = jnp.concatenate(
            [
                np.log1p(-anchor) + jax.nn.log_softmax(logits, axis=-1),
                zero + np.log(anchor),
            ],
            axis=-1,
        )
        means = jnp.concatenate([means, zero], axis=-1)
        log_scales = jnp.concatenate([log_scales, zero + _ANCHOR_LOG_SCALE], axis=-1)
    return jnp.concatenate([logits, means, log_scales], axis=-1)


@jax.tree_util.register_pytree_node_class
class CouplingFlow(_FlowMethods):
    r"""Coupling flow with mixture-CDF inner bijectors (Flow++-style).

    Each coupling layer :math:`l` keeps the coordinates :math:`x_m` where
    ``masks[l]`` is true and Gaussianizes the others, each with its own
    ``K``-component mixture whose parameters an MLP computes from the kept
    coordinates:

    .. math::
        y_{\bar m} = \Phi^{-1}\Big((1 - \alpha)\sum_k w_k(x_m)\,
            \Phi\Big(\frac{x_{\bar m} - \mu_k(x_m)}{\sigma_k(x_m)}\Big)
            + \alpha\,\Phi(x_{\bar m} / 2)\Big),
        \qquad y_m = x_m,

    with a fixed *anchor* weight :math:`\alpha` (``anchor_weight``, default
    0) on a fixed :math:`\mathcal N(0, 2^2)` component. The anchor puts a
    floor under every conditional density, :math:`f(u \mid x_m) \ge
    \alpha\,\varphi(u/2)/2`, so however the MLP extrapolates at a point unlike
    the training data, a coupling costs that point at most
    :math:`\log(2/\alpha) - 3u^2/8` nats per coordinate more than the identity
    would (nothing beyond :math:`|u| \approx 3.8` for :math:`\alpha = 0.01`),
    while a well-fitting coupling loses at most :math:`-\log(1 - \alpha)`.

    This is ``distrax.MaskedCoupling`` with
    :meth:`MixtureGaussianCDF.from_params` (see :attr:`distribution`),
    optionally preceded by a first stage: a per-dimension marginal mixture-CDF
    layer or a whole :class:`GaussianizationFlow` (what :func:`coupling_flow`
    builds from data).
    The MLP sees ``x`` with the transformed coordinates zeroed (``D`` inputs)
    and emits ``D · 3K`` values (the kept coordinates' share is unused), so
    every layer has the same shapes and :meth:`log_prob` scans over them. The
    log-scales are bounded smoothly,
    :math:`\log\sigma = 5\tanh(s/5)`.

    The pytree leaves are the optional first stage's arrays and the MLP
    weights and biases (``conditioners[l]`` is a tuple of ``(W, b)`` pairs);
    the masks, ``K``, the anchor weight and the solver options are static.
    Build one with :func:`coupling_flow`.

    Args:
      marginal: The first stage, applied to data before the couplings: a
        ``MixtureGaussianCDF`` with parameters ``[D, K']``, a
        ``GaussianizationFlow`` on ``D`` dimensions, or ``None``.
      conditioners: One MLP per coupling layer: a sequence of ``(W, b)`` with
        ``W [n_in, n_out]`` and ``b [n_out]``, from ``D`` inputs to ``D · 3K``
        outputs; SiLU between layers.
      masks: One boolean ``[D]`` mask per layer (true = kept), each with at
        least one true and one false entry.
      num_components: ``K`` of the coupling mixtures (learned components; the
        anchor, if any, is one more).
      solver_options: Options of the inner bijectors' inverse.
      anchor_weight: :math:`\alpha \in [0, 1)`, the fixed weight of the
        ``N(0, 2²)`` anchor component of every coupling mixture; 0 for none.

    Raises:
      ValueError: If the shapes or counts disagree.
    """

    def __init__(
        self,
        marginal: MixtureGaussianCDF | GaussianizationFlow | None,
        conditioners: Sequence[Sequence[tuple[Any, Any]]],
        masks: Sequence[Any],
        num_components: int,
        *,
        solver_options: dict[str, Any] | None = None,
        anchor_weight: float = 0.0,
    ):
        masks = tuple(tuple(bool(v) for v in np.asarray(m).reshape(-1)) for m in masks)
        conditioners = tuple(
            tuple((jnp.asarray(w), jnp.asarray(b)) for w, b in layer)
            for layer in conditioners
        )
        num_components = _check_int(num_components, "num_components", 1)
        if isinstance(anchor_weight, bool) or not (
            isinstance(anchor_weight, (int, float, np.integer, np.floating))
            and 0 <= anchor_weight < 1
        ):
            raise ValueError(
                f"`anchor_weight` must be a number in [0, 1), got {anchor_weight!r}."
            )
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
        if marginal is not None and not (
            (
                isinstance(marginal, MixtureGaussianCDF)
                and marginal.batch_shape == (dim,)
            )
            or (isinstance(marginal, GaussianizationFlow) and marginal.dim == dim)
        ):
            raise ValueError(
                f"`marginal` must be None, a MixtureGaussianCDF with parameters "
                f"[D={dim}, K] or a GaussianizationFlow on D={dim}, got {marginal!r}."
            )
        self.marginal = marginal
        self.conditioners = conditioners
        self._static = (
            masks,
            num_components,
            tuple(sorted((solver_options or {}).items())),
            float(anchor_weight),
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
    def anchor_weight(self) -> float:
        r""":math:`\alpha`, the fixed weight of each coupling's anchor component."""
        return self._static[3]

    @property
    def dim(self) -> int:
        """The event size ``D``."""
        return len(self.masks[0])

    def _coupling(self, layer: int) -> distrax.MaskedCoupling:
        weights, k = self.conditioners[layer], self.num_components
        options, anchor = dict(self._static[2]), self.anchor_weight
        return distrax.MaskedCoupling(
            mask=jnp.asarray(self.masks[layer]),
            conditioner=lambda masked_x: _conditioner_params(
                weights, masked_x, k, anchor
            ),
            bijector=lambda p: MixtureGaussianCDF.from_params(p, **options),
        )

    def bijectors(self) -> list[distrax.Bijector]:
        """``[first stage…, coupling_1, …]``: the data → latent layers in order."""
        if self.marginal is None:
            layers: list[distrax.Bijector] = []
        elif isinstance(self.marginal, GaussianizationFlow):
            layers = self.marginal.bijectors()
        else:
            layers = [self.marginal]
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
        anchor = self.anchor_weight
        x = x.astype(jnp.result_type(x.dtype, self._dtype()))
        log_det = jnp.zeros(x.shape[:-1], x.dtype)
        if isinstance(self.marginal, GaussianizationFlow):
            x, ld = self.marginal._scan_forward(x)
            log_det = log_det + ld
        elif self.marginal is not None:
            x, ld = self.marginal.forward_and_log_det(x)
            log_det = log_det + ld.sum(-1)

        def body(carry, layer):
            z, log_det = carry
            y, ld = _coupling_step(layer, z, k, anchor, options, inverse=False)
            return (y, log_det + ld), None

        (z, log_det), _ = jax.lax.scan(body, (x, log_det), stacked)
        return z, log_det

    def _scan_inverse(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
        stacked = self._stacked()
        if stacked is None:
            return _unrolled(self.bijectors(), z, inverse=True)
        k, options = self.num_components, dict(self._static[2])
        anchor = self.anchor_weight

        def body(carry, layer):
            y, log_det = carry
            x, ld = _coupling_step(layer, y, k, anchor, options, inverse=True)
            return (x, log_det + ld), None

        init = (z, jnp.zeros(z.shape[:-1], z.dtype))
        (x, log_det), _ = jax.lax.scan(body, init, stacked, reverse=True)
        if isinstance(self.marginal, GaussianizationFlow):
            x, ld = self.marginal._scan_inverse(x)
            log_det = log_det + ld
        elif self.marginal is not None:
            x, ld = self.marginal.inverse_and_log_det(x)
            log_det = log_det + ld.sum(-1)
        return x, log_det

    def __repr__(self) -> str:
        hidden = [int(w.shape[1]) for w, _ in self.conditioners[0][:-1]]
        return (
            f"CouplingFlow(dim={self.dim}, num_layers={len(self.masks)}, "
            f"num_components={self.num_components}, hidden={hidden}, "
            f"marginal={type(self.marginal).__name__ if self.marginal else None}, "
            f"num_params={self.num_params()})"
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
    method: str = "em",
    solver_options: dict[str, Any] | None = None,
    dtype: Any = None,
    stem_layers: int | None = None,
    anchor_weight: float = _COUPLING_ANCHOR_WEIGHT,
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
    coupling start near the identity (see :class:`CouplingFlow`).

    With ``data``, a greedy :func:`gaussianization_flow` of the data comes
    first (the *stem*; its depth is data-driven, at most
    ``_STEM_MAX_LAYERS`` = 4 layers, unless ``stem_layers`` fixes it). Its
    first two layers are per-dimension marginals with a PCA rotation between
    them, so before any training the flow is already a Gaussian copula of
    the data, at least as good on held-out rows as the full-covariance
    Gaussian in the typical case; the couplings, which start near the
    identity, then only have to model what is left. On a few hundred rows,
    where the couplings' MLPs overfit within a few steps, this start is what
    :func:`~distrax_mixcdf.fit` with ``validation_data`` falls back to.

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
      data: Optional training data ``[N, D]`` for the stem.
      marginal_components: ``K`` of the stem's marginals (default
        ``num_components``).
      method: The stem marginals' initialisation method (see
        :func:`gaussianization_flow`).
      solver_options: Options of every mixture's inverse.
      dtype: Floating dtype of the weights (default: the data's, or JAX's
        default float).
      stem_layers: The stem's number of marginal layers, or ``None`` for the
        data-driven depth.
      anchor_weight: The fixed weight :math:`\alpha` of each coupling
        mixture's ``N(0, 2²)`` anchor component (see :class:`CouplingFlow`);
        0 turns it off.

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
        marginal = gaussianization_flow(
            np.asarray(x, dtype),
            stem_layers,
            _check_int(
                num_components if marginal_components is None else marginal_components,
                "marginal_components",
                1,
            ),
            method=method,
            solver_options=solver_options,
            max_layers=_STEM_MAX_LAYERS,
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
        marginal,
        conditioners,
        masks,
        num_components,
        solver_options=solver_options,
        anchor_weight=anchor_weight,
    )
