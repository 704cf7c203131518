"""Slow, readable twins of the optimizers, written line by line from the paper's pseudo-code."""

from .ivon import IVON
from .ivon_pc import IVONPC
from .svrg import AlphaSVRG, svrg, vsgd_pc
from .von_pc import VONPC

__all__ = ["IVON", "IVONPC", "AlphaSVRG", "svrg", "vsgd_pc", "VONPC"]
