r"""Deep Gaussianization flows: mixture-CDF marginals and rotations, alternated.

:class:`GaussianizationFlow` (RBIG, Laparra et al. 2011; Gaussianization
Flows, Meng et al. 2020) stacks per-dimension
:class:`~distrax_mixcdf.MixtureGaussianCDF` layers with an orthogonal rotation
between consecutive ones. :func:`gaussianization_flow` builds one greedily from
data (fit each layer's marginals on the current latent, then rotate; no
gradients), with held-out rows choosing each marginal's shrinkage towards a
Gaussian and the depth, ready for joint fine-tuning with
:func:`~distrax_mixcdf.fit`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import distrax
import jax
import jax.numpy as jnp
import numpy as np

from distrax_mixcdf._mixture_fit import check_options, fit_columns, smoothing_floor
from distrax_mixcdf._validation import check_data, check_fraction, check_int
from distrax_mixcdf.flows.base import Flow, unrolled
from distrax_mixcdf.flows.rotations import (
    FixedRotation,
    Householder,
    haar_matrix,
    householder_qr,
    pca_matrix,
    reflect,
)
from distrax_mixcdf.mixture_cdf import MixtureGaussianCDF

__all__ = ["GaussianizationFlow", "gaussianization_flow"]

_ROTATIONS = ("householder", "fixed")
_ROTATION_INITS = ("pca", "random")

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
# A greedy layer counts as an improvement when its held-out gain exceeds this
# many standard errors: the anchor weights are chosen on the same rows, which
# makes the gain optimistic.
_GAIN_STANDARD_ERRORS = 2.0


@jax.tree_util.register_pytree_node_class
class GaussianizationFlow(Flow):
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
    learnable :class:`~distrax_mixcdf.Householder` vectors;
    :class:`~distrax_mixcdf.FixedRotation` s contribute none. So
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

    def bijectors(self, context: Any = None) -> list[distrax.Bijector]:
        """``[M_1, R_1, M_2, …, M_L]``: the data → latent layers in order.

        Args:
          context: Must be ``None`` (the flow is unconditional).

        Returns:
          The list of bijectors.
        """
        self._checked_context(context, None)
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

    def _forward(
        self, x: jax.Array, context: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        del context  # unconditional
        return self._scan(x, inverse=False)

    def _inverse(
        self, z: jax.Array, context: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        del context  # unconditional
        return self._scan(z, inverse=True)

    def _scan(self, values: jax.Array, inverse: bool) -> tuple[jax.Array, jax.Array]:
        """Every layer in one ``lax.scan`` (backwards for the inverse)."""
        layers = self._layers()
        if layers is None:  # mixed rotation types: unrolled distrax stack
            return unrolled(self.bijectors(), values, inverse=inverse)
        params, rotation, kind, options = layers
        values = values.astype(jnp.result_type(values.dtype, params[0].dtype))

        def body(carry, layer):
            values, log_det = carry
            mixture_params, rot = layer
            marginal = MixtureGaussianCDF(*mixture_params, **options)
            matrix = _transposed_matrix(rot, kind)
            if inverse:
                values, ld = marginal.inverse_and_log_det(values @ matrix.T)
            else:
                values, ld = marginal.forward_and_log_det(values)
                values = values @ matrix
            return (values, log_det + ld.sum(-1)), None

        init = (values, jnp.zeros(values.shape[:-1], values.dtype))
        (out, log_det), _ = jax.lax.scan(
            body, init, (params, rotation), reverse=inverse
        )
        return out, log_det

    def __repr__(self) -> str:
        kinds = sorted({type(r).__name__ for r in self.rotations}) or ["none"]
        return (
            f"GaussianizationFlow(dim={self.dim}, num_layers={self.num_layers}, "
            f"num_components={self.marginals[0].num_components}, "
            f"rotations={'/'.join(kinds)}, num_params={self.num_params})"
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
    x = check_data(data)
    if num_layers is not None:
        num_layers = check_int(num_layers, "num_layers", 1)
    max_layers = check_int(max_layers, "max_layers", 1)
    num_components = check_int(num_components, "num_components", 1)
    if rotation not in _ROTATIONS:
        raise ValueError(f"`rotation` must be one of {_ROTATIONS}, got {rotation!r}.")
    if rotation_init not in _ROTATION_INITS:
        raise ValueError(
            f"`rotation_init` must be one of {_ROTATION_INITS}, got {rotation_init!r}."
        )
    if rotation_init == "random" and key is None and num_layers != 1:
        raise ValueError('`rotation_init="random"` needs a PRNG `key`.')
    validation_fraction = check_fraction(validation_fraction, "validation_fraction")
    init_options = dict(init_options or {})
    unknown = set(init_options) - {"max_iter", "tol", "bandwidth", "min_scale"}
    if unknown:
        raise ValueError(
            f"`init_options` has unknown keys {sorted(unknown)}; allowed are "
            "max_iter, tol, bandwidth, min_scale."
        )
    check_options(
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
        held_out = check_data(validation_data, "validation_data")
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

    z: jax.Array = jnp.asarray(np.concatenate([fitted, held_out]), dtype)
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
            w = haar_matrix(jax.random.fold_in(rotation_key, layer), dim)
        if rotation == "householder":
            # Flip output signs so that W's Householder QR has R = I: exactly
            # D − 1 reflections, and the flow is unchanged in distribution.
            w = w * householder_qr(w)[1][:, None]
            rot: distrax.Bijector = Householder.from_matrix(w.astype(dtype))
        else:
            rot = FixedRotation(w.astype(dtype))
        rotations.append(rot)
        z = jnp.asarray(rot.forward(z))
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
        smoothing_floor(columns, _FLOOR_FACTOR)
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
    fit = fit_columns(
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
        args = [
            jnp.asarray(a, dtype)
            for a in (log_weights, means, log_scales, *anchor, *tail, grid, tail_weight)
        ]
        choice, gains = _blend_scores(args, z_val)
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
def _blend_scores(mixtures: Sequence[jax.Array], z: jax.Array):
    r"""Held-out choice of the anchor weight per dimension, and the rows' gains.

    ``mixtures`` holds, in order, the fitted components' log-weights, means and
    log-scales ``[D, K]``, the anchor's and the tail's means and log-scales
    ``[D]``, the anchor weights ``alphas [G]`` and the tail weight.
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
    (
        log_weights,
        means,
        log_scales,
        anchor_mean,
        anchor_log_scale,
        tail_mean,
        tail_log_scale,
        alphas,
        tail_weight,
    ) = mixtures

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
        wt = reflect(wt, rotation[i])
    return wt
