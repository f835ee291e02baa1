"""distrax-mixcdf: an exact, learnable Gaussian-mixture CDF bijector for flows.

Public API:

* :class:`MixtureGaussianCDF` -- the bijector (data → standard-normal latent).
* :func:`ndtri_exp`, :func:`log_survival`, :func:`log_mills_ratio` -- the
  standard-normal tail numerics it is built on, usable on their own.
"""

from importlib.metadata import PackageNotFoundError, version

from distrax_mixcdf._gaussian import log_mills_ratio as log_mills_ratio
from distrax_mixcdf._gaussian import log_survival as log_survival
from distrax_mixcdf._gaussian import ndtri_exp as ndtri_exp
from distrax_mixcdf.mixture_cdf import MixtureGaussianCDF as MixtureGaussianCDF

try:
    __version__ = version("distrax-mixcdf")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "MixtureGaussianCDF",
    "__version__",
    "log_mills_ratio",
    "log_survival",
    "ndtri_exp",
]
