"""hf_ivonpc: variational training with posterior correction (IVON, IVON-PCM and the SVRG family)."""

from .optim import IVON, IVONPC

__version__ = "0.1.0"
__all__ = ["IVON", "IVONPC", "__version__"]
