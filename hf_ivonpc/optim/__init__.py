"""Optimizers of "SVRG and Beyond via Posterior Correction", fast implementations.

Readable line-by-line twins live in :mod:`hf_ivonpc.optim.reference`.
"""

from .ivon import IVON
from .ivon_pc import IVONPC

__all__ = ["IVON", "IVONPC"]
