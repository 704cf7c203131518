"""Reference IVON: Alg. 4 of the paper without its red parts (alpha = 0), i.e. Shen et al. (2024)."""

from ..hparams import default as _d
from .ivon_pc import IVONPC


class IVON(IVONPC):
    # the defaults of the fast IVON (ivon-opt's where they differ from the project's)
    def __init__(self, params, lr, ess, hess_init=_d("hess_init", True), beta1=_d("beta1", True),
                 beta2=_d("beta2", True), weight_decay=_d("weight_decay", True),
                 clip_radius=_d("clip_radius", True), rescale_lr=_d("rescale_lr", True), *,
                 generator=None, seed=0):
        super().__init__(params, lr, ess, hess_init, beta1, beta2, weight_decay, clip_radius,
                         rescale_lr, alpha=0.0, generator=generator, seed=seed)
