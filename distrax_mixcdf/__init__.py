"""distrax-mixcdf: an exact, learnable Gaussian-mixture CDF bijector for flows.

Public API:

* :class:`MixtureGaussianCDF` -- the bijector (data → standard-normal latent).
* :func:`normalizing_flow` -- the standard-normal density model built from a
  Gaussianizing bijector or stack (``log_prob`` on the closed-form side).
* :func:`fit` / :class:`FitResult` -- maximum-likelihood training with optax.
* :func:`initial_params` / :class:`InitialParams` -- quantile, EM and KDE
  initialisation (also ``MixtureGaussianCDF.from_data``).
* :func:`gaussianization_flow` / :class:`GaussianizationFlow`,
  :func:`coupling_flow` / :class:`CouplingFlow`,
  :func:`autoregressive_flow` / :class:`AutoregressiveFlow` -- deep flows
  built from the layer (conditional ones with ``context_dim``), sharing the
  :class:`Flow` API, with the :class:`Householder` and :class:`FixedRotation`
  rotations.
* :func:`save_checkpoint` / :func:`load_checkpoint` -- atomic, pickle-free
  ``.npz`` checkpoints; :func:`map_in_chunks` -- evaluation of inputs larger
  than memory.
* :func:`ndtri_exp`, :func:`log_survival`, :func:`log_mills_ratio` -- the
  standard-normal tail numerics it is built on, usable on their own.
"""

from importlib.metadata import PackageNotFoundError, version

from distrax_mixcdf._gaussian import log_mills_ratio as log_mills_ratio
from distrax_mixcdf._gaussian import log_survival as log_survival
from distrax_mixcdf._gaussian import ndtri_exp as ndtri_exp
from distrax_mixcdf.checkpoint import Checkpoint as Checkpoint
from distrax_mixcdf.checkpoint import CheckpointError as CheckpointError
from distrax_mixcdf.checkpoint import load_checkpoint as load_checkpoint
from distrax_mixcdf.checkpoint import save_checkpoint as save_checkpoint
from distrax_mixcdf.chunking import map_in_chunks as map_in_chunks
from distrax_mixcdf.flows import AutoregressiveFlow as AutoregressiveFlow
from distrax_mixcdf.flows import CouplingFlow as CouplingFlow
from distrax_mixcdf.flows import FixedRotation as FixedRotation
from distrax_mixcdf.flows import Flow as Flow
from distrax_mixcdf.flows import GaussianizationFlow as GaussianizationFlow
from distrax_mixcdf.flows import Householder as Householder
from distrax_mixcdf.flows import autoregressive_flow as autoregressive_flow
from distrax_mixcdf.flows import coupling_flow as coupling_flow
from distrax_mixcdf.flows import gaussianization_flow as gaussianization_flow
from distrax_mixcdf.flows import normalizing_flow as normalizing_flow
from distrax_mixcdf.initialization import InitialParams as InitialParams
from distrax_mixcdf.initialization import initial_params as initial_params
from distrax_mixcdf.mixture_cdf import MixtureGaussianCDF as MixtureGaussianCDF
from distrax_mixcdf.training import FitResult as FitResult
from distrax_mixcdf.training import fit as fit

try:
    __version__ = version("distrax-mixcdf")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "AutoregressiveFlow",
    "Checkpoint",
    "CheckpointError",
    "CouplingFlow",
    "FitResult",
    "FixedRotation",
    "Flow",
    "GaussianizationFlow",
    "Householder",
    "InitialParams",
    "MixtureGaussianCDF",
    "__version__",
    "autoregressive_flow",
    "coupling_flow",
    "fit",
    "gaussianization_flow",
    "initial_params",
    "load_checkpoint",
    "log_mills_ratio",
    "log_survival",
    "map_in_chunks",
    "ndtri_exp",
    "normalizing_flow",
    "save_checkpoint",
]
