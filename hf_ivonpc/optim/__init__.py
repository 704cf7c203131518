"""Optimizers of "SVRG and Beyond via Posterior Correction", fast implementations.

Readable line-by-line twins live in :mod:`hf_ivonpc.optim.reference`.
"""

from ._sampling import NonFiniteError
from .ivon import IVON
from .ivon_pc import IVONPC
from .sampler import MegaBatchSampler
from .svrg import SVRG, VSGDPC, AlphaSVRG

__all__ = ["IVON", "IVONPC", "SVRG", "AlphaSVRG", "VSGDPC", "VONPC", "MegaBatchSampler",
           "NonFiniteError"]


def __getattr__(name):  # VONPC lives in its own module (full covariance, small models)
    if name == "VONPC":
        from .von_pc import VONPC
        return VONPC
    raise AttributeError(name)
