"""distrax-mixcdf: an exact, learnable Gaussian-mixture CDF bijector for flows.

Public API:

* :class:`MixtureGaussianCDF` -- the bijector (data → standard-normal latent).
* :func:`normalizing_flow` -- the standard-normal density model built from a
  Gaussianizing bijector or stack (``log_prob`` on the closed-form side).
* :func:`fit` / :class:`FitResult` -- maximum-likelihood training with optax.
* :func:`initial_params` / :class:`InitialParams` -- quantile, EM and KDE
  initialisation (also ``MixtureGaussianCDF.from_data``).
* :func:`ndtri_exp`, :func:`log_survival`, :func:`log_mills_ratio` -- the
  standard-normal tail numerics it is built on, usable on their own.
"""

from importlib.metadata import PackageNotFoundError, version

from distrax_mixcdf._gaussian import log_mills_ratio as log_mills_ratio
from distrax_mixcdf._gaussian import log_survival as log_survival
from distrax_mixcdf._gaussian import ndtri_exp as ndtri_exp
from distrax_mixcdf.initialization import InitialParams as InitialParams
from distrax_mixcdf.initialization import initial_params as initial_params
from distrax_mixcdf.mixture_cdf import MixtureGaussianCDF as MixtureGaussianCDF
from distrax_mixcdf.training import FitResult as FitResult
from distrax_mixcdf.training import fit as fit
from distrax_mixcdf.training import normalizing_flow as normalizing_flow

try:
    __version__ = version("distrax-mixcdf")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "FitResult",
    "InitialParams",
    "MixtureGaussianCDF",
    "__version__",
    "fit",
    "initial_params",
    "log_mills_ratio",
    "log_survival",
    "ndtri_exp",
    "normalizing_flow",
]
