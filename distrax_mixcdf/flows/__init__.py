"""Deep flows built from the mixture-CDF layer, one module per family.

* :mod:`~distrax_mixcdf.flows.base`: :class:`Flow`, the API every flow shares
  (``log_prob``/``sample`` with an optional ``context``), and
  :func:`normalizing_flow` for a bare bijector;
* :mod:`~distrax_mixcdf.flows.gaussianization`: greedy Gaussianization flows;
* :mod:`~distrax_mixcdf.flows.coupling`: coupling flows;
* :mod:`~distrax_mixcdf.flows.autoregressive`: masked autoregressive flows;
* :mod:`~distrax_mixcdf.flows.rotations`: the rotations between layers.

Every flow is a pytree whose leaves are exactly its trainable arrays and maps
data to latent in the closed-form direction.
"""

from distrax_mixcdf.flows.autoregressive import AutoregressiveFlow as AutoregressiveFlow
from distrax_mixcdf.flows.autoregressive import (
    autoregressive_flow as autoregressive_flow,
)
from distrax_mixcdf.flows.base import Flow as Flow
from distrax_mixcdf.flows.base import normalizing_flow as normalizing_flow
from distrax_mixcdf.flows.coupling import CouplingFlow as CouplingFlow
from distrax_mixcdf.flows.coupling import coupling_flow as coupling_flow
from distrax_mixcdf.flows.gaussianization import (
    GaussianizationFlow as GaussianizationFlow,
)
from distrax_mixcdf.flows.gaussianization import (
    gaussianization_flow as gaussianization_flow,
)
from distrax_mixcdf.flows.rotations import FixedRotation as FixedRotation
from distrax_mixcdf.flows.rotations import Householder as Householder

__all__ = [
    "AutoregressiveFlow",
    "CouplingFlow",
    "FixedRotation",
    "Flow",
    "GaussianizationFlow",
    "Householder",
    "autoregressive_flow",
    "coupling_flow",
    "gaussianization_flow",
    "normalizing_flow",
]
