r"""Orthogonal rotation bijectors for deep Gaussianization flows.

Two ``distrax.Bijector`` classes acting on vectors (``event_ndims == 1``), both
volume preserving (:math:`\log|\det J| = 0` exactly) with the transpose as
inverse:

* :class:`Householder` -- a *learnable* orthogonal map, the product of ``L``
  Householder reflections. Its only pytree leaves are the reflection vectors
  ``[..., L, D]``, so ``jax.grad``, optax and :func:`~distrax_mixcdf.fit` train
  them directly. :meth:`Householder.from_matrix` factors any orthogonal matrix
  exactly (Cartan–Dieudonné), which is how a greedy PCA rotation becomes the
  starting point of joint fine-tuning.
* :class:`FixedRotation` -- a constant orthogonal matrix: PCA of data (as in
  RBIG, Laparra et al. 2011) or a random orthogonal matrix from a key. It has no
  pytree leaves: the matrix is static metadata, so ``fit`` (which trains every
  floating-point leaf) leaves it fixed and orthogonal.

Reflections are applied in order, ``vectors[0]`` first, which
:meth:`Householder.from_matrix` relies on. :func:`reflect`,
:func:`householder_qr`, :func:`pca_matrix` and :func:`haar_matrix` are the
array-level pieces the greedy Gaussianization flow uses too.
"""

from __future__ import annotations

from typing import Any

import distrax
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "FixedRotation",
    "Householder",
    "haar_matrix",
    "householder_qr",
    "pca_matrix",
    "reflect",
]


def _as_float_array(name: str, value: Any, min_ndim: int) -> jax.Array:
    array = jnp.asarray(value)
    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise TypeError(
            f"`{name}` must be a floating-point array, got dtype {array.dtype} "
            f"with shape {array.shape}."
        )
    if array.ndim < min_ndim:
        raise ValueError(
            f"`{name}` must have at least {min_ndim} axes, got shape {array.shape}."
        )
    return array


def _check_event(value: jax.Array, dim: int, argument: str, owner: str) -> None:
    if value.ndim < 1 or value.shape[-1] != dim:
        raise ValueError(
            f"`{argument}` of shape {value.shape} must end in the event axis of "
            f"size D = {dim} expected by {owner}."
        )


def reflect(x: jax.Array, v: jax.Array) -> jax.Array:
    r"""Householder reflection :math:`(I - 2 v v^\top / v^\top v)\, x` on the last axis.

    Batch axes of ``x`` and ``v`` broadcast; a zero ``v`` acts as the identity.

    Args:
      x: Vectors ``[..., D]``.
      v: Reflection vectors ``[..., D]``.

    Returns:
      The reflected vectors, the broadcast shape.
    """
    vv = jnp.sum(v * v, axis=-1, keepdims=True)
    # A zero vector defines no reflection; treat it as the identity instead of
    # dividing by zero (its gradient is then zero too, never NaN).
    safe_vv = jnp.where(vv > 0, vv, 1.0)
    coef = jnp.where(vv > 0, 2.0 * jnp.sum(x * v, axis=-1, keepdims=True) / safe_vv, 0)
    return x - coef * v


def householder_qr(matrix: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    r"""Householder QR of :math:`W^\top` on the host, in float64.

    .. math:: W^\top = G_0 \cdots G_{D-2}\, R, \qquad
              G_j = I - 2\,\frac{v_j v_j^\top}{v_j^\top v_j}.

    Args:
      matrix: ``[D, D]`` matrix ``W``.

    Returns:
      ``(vectors, signs)``: the ``D-1`` reflection vectors ``v_j`` and the signs
      of ``diag(R)`` (``R = diag(signs)`` when ``W`` is orthogonal).
    """
    a = np.asarray(matrix, np.float64).T.copy()
    dim = a.shape[0]
    vectors = []
    for j in range(dim - 1):
        col = a[j:, j]
        v = col.copy()
        v[0] += np.copysign(np.linalg.norm(col), col[0])
        v_full = np.zeros(dim)
        v_full[j:] = v
        a = a - 2.0 * np.outer(v_full, v_full @ a) / (v_full @ v_full)
        vectors.append(v_full)
    return vectors, np.where(np.diag(a) < 0, -1.0, 1.0)


class Householder(distrax.Bijector):
    r"""Learnable orthogonal map: a product of Householder reflections.

    With reflection vectors :math:`v_1, \dots, v_L \in \mathbb{R}^D`,

    .. math::
        y = H_L \cdots H_2 H_1\, x,\qquad
        H_l = I - 2\,\frac{v_l v_l^\top}{v_l^\top v_l},\qquad
        \log|\det J| = 0,\qquad x = H_1 H_2 \cdots H_L\, y,

    so ``vectors[0]`` is applied first in the forward direction and the inverse
    (the transpose) applies them in reverse order. The cost is :math:`O(LD)` per
    vector, with no matrix ever formed. ``L = D`` reflections reach every
    orthogonal matrix of determinant :math:`(-1)^D`; each vector's length is
    irrelevant (only its direction matters), and a zero vector acts as the
    identity.

    ``event_ndims_in == event_ndims_out == 1``. ``vectors`` has shape
    ``[..., L, D]``; leading axes are parameter batch axes broadcasting against
    the input's batch axes. The pytree leaves are exactly ``(vectors,)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> rot = Householder(jax.random.normal(jax.random.PRNGKey(0), (3, 3)))
      >>> y, log_det = rot.forward_and_log_det(jnp.ones((5, 3)))
      >>> y.shape, log_det.shape
      ((5, 3), (5,))

    Args:
      vectors: Reflection vectors ``[..., L, D]`` (floating point, ``L >= 0``).

    Raises:
      TypeError: If ``vectors`` is not a floating-point array.
      ValueError: If ``vectors`` has fewer than two axes.
    """

    def __init__(self, vectors: Any):
        super().__init__(event_ndims_in=1, event_ndims_out=1, is_constant_jacobian=True)
        self._vectors = _as_float_array("vectors", vectors, 2)

    # -- pytree: the vectors are the only leaf -------------------------------------

    def tree_flatten(self):
        """The only leaf is ``vectors``."""
        return (self._vectors,), None

    @classmethod
    def tree_unflatten(cls, aux_data, children):
        """Rebuilds without validation (JAX may pass placeholders as leaves)."""
        del aux_data
        bijector = object.__new__(cls)
        distrax.Bijector.__init__(
            bijector, event_ndims_in=1, event_ndims_out=1, is_constant_jacobian=True
        )
        (bijector._vectors,) = children
        return bijector

    # -- construction ------------------------------------------------------------------

    @classmethod
    def from_matrix(cls, matrix: Any) -> Householder:
        r"""The exact Householder factorisation of an orthogonal matrix ``W``.

        Returns the bijector with ``forward(x) = W x`` (``x @ W.T`` on a batch).
        A Householder QR of :math:`W^\top` gives :math:`D-1` reflections and a
        diagonal :math:`R = \operatorname{diag}(\pm 1)`; each :math:`-1` is one
        more reflection (a coordinate flip), so at most :math:`2D-1` vectors
        (exactly :math:`D-1` when :math:`R = I`). Runs on the host in float64.

        Args:
          matrix: Orthogonal ``[D, D]`` matrix (NumPy or JAX, concrete).

        Returns:
          The bijector, with vectors in the dtype of ``matrix``.

        Raises:
          ValueError: If ``matrix`` is not square or not orthogonal.
        """
        w = np.asarray(matrix)
        _check_orthogonal(w, "matrix")
        dtype = w.dtype if np.issubdtype(w.dtype, np.floating) else np.float32
        dim = w.shape[0]
        vectors, signs = householder_qr(w)
        # W^T = G_0 ⋯ G_{D-2} R with R = diag(signs), so W = R G_{D-2} ⋯ G_0.
        # Forward applies vectors[0] first: the QR reflections in order, then
        # R's coordinate flips.
        flips = [np.eye(dim)[j] for j in range(dim) if signs[j] < 0]
        ordered = vectors + flips
        if not ordered:
            return cls(np.zeros((0, dim), dtype))
        return cls(np.stack(ordered).astype(dtype))

    @classmethod
    def random(
        cls, key: jax.Array, dim: int, num_reflections: int | None = None, dtype=None
    ) -> Householder:
        """Random reflection directions (standard-normal vectors).

        Args:
          key: PRNG key.
          dim: The event size ``D``.
          num_reflections: ``L``; default ``D``.
          dtype: Floating dtype; default the JAX default float.

        Returns:
          The bijector.
        """
        if not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"`dim` must be a positive integer, got {dim!r}.")
        count = dim if num_reflections is None else num_reflections
        if not isinstance(count, (int, np.integer)) or count < 0:
            raise ValueError(
                f"`num_reflections` must be a non-negative integer, got {count!r}."
            )
        dtype = jnp.result_type(float) if dtype is None else dtype
        return cls(jax.random.normal(key, (int(count), int(dim)), dtype))

    # -- properties ------------------------------------------------------------------

    @property
    def vectors(self) -> jax.Array:
        """The reflection vectors ``[..., L, D]`` (the stored parameter)."""
        return self._vectors

    @property
    def num_reflections(self) -> int:
        """The number of reflections ``L``."""
        return int(self._vectors.shape[-2])

    @property
    def dim(self) -> int:
        """The event size ``D``."""
        return int(self._vectors.shape[-1])

    def matrix(self) -> jax.Array:
        r"""The orthogonal matrix ``W`` (``forward(x) = W x``), ``[..., D, D]``."""
        eye = jnp.broadcast_to(
            jnp.eye(self.dim, dtype=self._vectors.dtype),
            (*self._vectors.shape[:-2], self.dim, self.dim),
        )
        # Columns of W are the images of the basis vectors.
        return jnp.swapaxes(self.forward(jnp.swapaxes(eye, -1, -2)), -1, -2)

    # -- the map ---------------------------------------------------------------------

    def _apply(
        self, x: Any, order: range, argument: str
    ) -> tuple[jax.Array, jax.Array]:
        x = jnp.asarray(x)
        _check_event(x, self.dim, argument, "this Householder bijector")
        dtype = jnp.result_type(x.dtype, self._vectors.dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            dtype = self._vectors.dtype
        y = x.astype(dtype)
        vectors = self._vectors.astype(dtype)
        for i in order:
            y = reflect(y, vectors[..., i, :])
        return y, jnp.zeros(y.shape[:-1], dtype)

    def forward_and_log_det(self, x: Any) -> tuple[jax.Array, jax.Array]:
        """Computes ``y = H_L ⋯ H_1 x`` and ``log|det J| = 0``.

        Args:
          x: Input ``[..., D]``.

        Returns:
          ``(y [..., D], zeros [...])``.
        """
        return self._apply(x, range(self.num_reflections), "x")

    def inverse_and_log_det(self, y: Any) -> tuple[jax.Array, jax.Array]:
        """Computes ``x = H_1 ⋯ H_L y`` (the transpose) and ``log|det J| = 0``.

        Args:
          y: Input ``[..., D]``.

        Returns:
          ``(x [..., D], zeros [...])``.
        """
        return self._apply(y, range(self.num_reflections - 1, -1, -1), "y")

    def to_tfp(self):
        """This bijector wrapped for TensorFlow Probability (``distrax.to_tfp``).

        Returns:
          A ``tfp.substrates.jax.bijectors.Bijector``.
        """
        return distrax.to_tfp(self)

    def same_as(self, other: distrax.Bijector) -> bool:
        """True if ``other`` is a ``Householder`` with the identical vectors."""
        if type(other) is not type(self):
            return False
        a, b = self._vectors, other._vectors  # type: ignore[attr-defined]
        if a is b:
            return True
        try:
            return a.shape == b.shape and bool(np.array_equal(a, b))
        except (
            jax.errors.ConcretizationTypeError,
            jax.errors.TracerArrayConversionError,
        ):
            return False

    def __repr__(self) -> str:
        return (
            f"Householder(num_reflections={self.num_reflections}, dim={self.dim}, "
            f"dtype={self._vectors.dtype})"
        )


def _check_orthogonal(w: np.ndarray, argument: str) -> None:
    """Raises ``ValueError`` unless ``w`` is square, finite and orthogonal."""
    if w.ndim != 2 or w.shape[0] != w.shape[1] or w.shape[0] < 1:
        raise ValueError(f"`{argument}` must be square [D, D], got shape {w.shape}.")
    eps = np.finfo(w.dtype).eps if np.issubdtype(w.dtype, np.floating) else 1e-7
    tol = max(1e-5, 100 * w.shape[0] * eps)
    if not np.all(np.isfinite(w)):
        raise ValueError(f"`{argument}` must be finite (shape {w.shape}).")
    err = np.max(np.abs(w.astype(np.float64) @ w.T.astype(np.float64) - np.eye(len(w))))
    if err > tol:
        raise ValueError(
            f"`{argument}` of shape {w.shape} is not orthogonal: max |W Wᵀ − I| = "
            f"{err:.3g} > {tol:.3g}."
        )


class _StaticMatrix:
    """A concrete matrix usable as pytree metadata (hashable, compared by value)."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self._hash = hash((array.shape, array.dtype.str, array.tobytes()))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, _StaticMatrix)
            and self.array.shape == other.array.shape
            and self.array.dtype == other.array.dtype
            and bool(np.array_equal(self.array, other.array))
        )


class FixedRotation(distrax.Bijector):
    r"""A constant orthogonal map ``y = W x`` (not trained).

    .. math::
        y = W x,\qquad x = W^\top y,\qquad \log|\det J| = 0,
        \qquad W W^\top = I.

    The matrix is static pytree metadata, not a leaf: the bijector has no
    parameters, so :func:`~distrax_mixcdf.fit` and optax leave it untouched
    (a leaf would be trained like any floating-point array and lose
    orthogonality). Under ``jax.jit`` it is a compile-time constant, and two
    rotations with different matrices compile separately.

    Build it from data with :meth:`pca` (the RBIG rotation) or at random with
    :meth:`random`. ``event_ndims_in == event_ndims_out == 1``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> rot = FixedRotation.random(jax.random.PRNGKey(0), 2)
      >>> rot.inverse(rot.forward(jnp.array([1.0, 2.0]))).round(5)
      Array([1., 2.], dtype=float32)

    Args:
      matrix: Orthogonal ``[D, D]`` matrix (concrete NumPy or JAX array).

    Raises:
      ValueError: If ``matrix`` is not square, finite and orthogonal.
    """

    def __init__(self, matrix: Any):
        super().__init__(event_ndims_in=1, event_ndims_out=1, is_constant_jacobian=True)
        w = np.asarray(matrix)
        if not np.issubdtype(w.dtype, np.floating):
            raise TypeError(
                f"`matrix` must be a floating-point array, got dtype {w.dtype} "
                f"with shape {w.shape}."
            )
        _check_orthogonal(w, "matrix")
        # Store in the dtype JAX will compute in (float64 becomes float32
        # without x64), so applying it never triggers a truncation warning.
        dtype = jax.dtypes.canonicalize_dtype(w.dtype)
        self._matrix = _StaticMatrix(np.array(w, dtype=dtype, copy=True))

    def tree_flatten(self):
        """No leaves: the matrix is static metadata."""
        return (), self._matrix

    @classmethod
    def tree_unflatten(cls, aux_data, children):
        """Rebuilds from the static matrix."""
        del children
        bijector = object.__new__(cls)
        distrax.Bijector.__init__(
            bijector, event_ndims_in=1, event_ndims_out=1, is_constant_jacobian=True
        )
        bijector._matrix = aux_data
        return bijector

    @classmethod
    def pca(cls, data: Any) -> FixedRotation:
        r"""The PCA rotation of ``data`` (RBIG's rotation step).

        With the sample covariance :math:`C = V \Lambda V^\top` (eigenvalues in
        decreasing order), :math:`W = V^\top`, so ``forward`` decorrelates the
        data. Each eigenvector's sign is fixed (largest-magnitude entry
        positive) so the result is deterministic.

        Args:
          data: ``[N, D]`` samples (``N >= 2``, finite).

        Returns:
          The bijector, in the data's floating dtype (float32 for integers).
        """
        x = np.asarray(data)
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"`data` must be [N, D] with N >= 2, got shape {x.shape}.")
        if not np.all(np.isfinite(x)):
            raise ValueError(f"`data` of shape {x.shape} has non-finite values.")
        dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float32
        return cls(pca_matrix(x).astype(dtype))

    @classmethod
    def random(cls, key: jax.Array, dim: int, dtype=None) -> FixedRotation:
        """A Haar-random orthogonal matrix (QR of a Gaussian matrix).

        Args:
          key: PRNG key.
          dim: The event size ``D``.
          dtype: Floating dtype; default the JAX default float.

        Returns:
          The bijector.
        """
        if not isinstance(dim, (int, np.integer)) or dim < 1:
            raise ValueError(f"`dim` must be a positive integer, got {dim!r}.")
        dtype = jnp.result_type(float) if dtype is None else dtype
        return cls(haar_matrix(key, int(dim)).astype(dtype))

    @property
    def dim(self) -> int:
        """The event size ``D``."""
        return int(self._matrix.array.shape[0])

    def matrix(self) -> jax.Array:
        """The orthogonal matrix ``W`` (``forward(x) = W x``), ``[D, D]``."""
        return jnp.asarray(self._matrix.array)

    def _apply(self, x: Any, transpose: bool, argument: str):
        x = jnp.asarray(x)
        _check_event(x, self.dim, argument, "this FixedRotation")
        w = self._matrix.array
        dtype = jnp.result_type(x.dtype, w.dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            dtype = w.dtype
        w = jnp.asarray(w, dtype)
        y = x.astype(dtype) @ (w if transpose else w.T)
        return y, jnp.zeros(y.shape[:-1], dtype)

    def forward_and_log_det(self, x: Any) -> tuple[jax.Array, jax.Array]:
        """Computes ``y = W x`` and ``log|det J| = 0`` on ``[..., D]``."""
        return self._apply(x, False, "x")

    def inverse_and_log_det(self, y: Any) -> tuple[jax.Array, jax.Array]:
        """Computes ``x = Wᵀ y`` and ``log|det J| = 0`` on ``[..., D]``."""
        return self._apply(y, True, "y")

    def to_tfp(self):
        """This bijector wrapped for TensorFlow Probability (``distrax.to_tfp``).

        Returns:
          A ``tfp.substrates.jax.bijectors.Bijector``.
        """
        return distrax.to_tfp(self)

    def same_as(self, other: distrax.Bijector) -> bool:
        """True if ``other`` is a ``FixedRotation`` with the same matrix."""
        return type(other) is type(self) and self._matrix == other._matrix  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        return f"FixedRotation(dim={self.dim}, dtype={self._matrix.array.dtype})"


def pca_matrix(data: np.ndarray) -> np.ndarray:
    r"""The float64 PCA rotation :math:`W = V^\top` of ``data [N, D]``.

    Eigenvectors of the sample covariance in decreasing-eigenvalue order, each
    signed so its largest-magnitude entry is positive.

    Args:
      data: ``[N, D]`` samples.

    Returns:
      ``W`` as a float64 ``[D, D]`` NumPy array.
    """
    x = np.asarray(data, np.float64)
    cov = np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])
    _, vecs = np.linalg.eigh(cov)
    vecs = vecs[:, ::-1]
    signs = np.sign(vecs[np.argmax(np.abs(vecs), axis=0), np.arange(vecs.shape[1])])
    return (vecs * np.where(signs == 0, 1.0, signs)).T


def haar_matrix(key: jax.Array, dim: int) -> np.ndarray:
    r"""A Haar-random orthogonal ``[D, D]`` matrix, in float64 on the host.

    :math:`W = Q \operatorname{diag}(\operatorname{sign} \operatorname{diag} R)`
    for the QR factorisation :math:`G = QR` of a standard-normal ``G`` drawn
    from ``key``: the sign fix makes :math:`W` exactly Haar-distributed
    (Mezzadri 2007).

    Args:
      key: PRNG key.
      dim: ``D``.

    Returns:
      ``W`` as a float64 NumPy array.
    """
    g = np.asarray(jax.random.normal(key, (dim, dim)), np.float64)
    q, r = np.linalg.qr(g)
    return q * np.sign(np.diag(r))
