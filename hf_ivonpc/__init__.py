"""hf_ivonpc: variational training with posterior correction (IVON, IVON-PCM and the SVRG family)."""

from ._version import __version__
from .optim import IVON, IVONPC

__all__ = ["IVON", "IVONPC", "PCTrainer", "PCTrainingArguments", "Posterior", "__version__"]


def __getattr__(name):  # transformers is imported only when the trainer is used
    if name == "PCTrainer":
        from .trainer import PCTrainer
        return PCTrainer
    if name == "PCTrainingArguments":
        from .args import PCTrainingArguments
        return PCTrainingArguments
    if name == "Posterior":
        from .posterior import Posterior
        return Posterior
    raise AttributeError(name)
