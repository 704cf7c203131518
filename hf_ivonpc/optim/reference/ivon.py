"""Reference IVON: Alg. 4 of the paper without its red parts (alpha = 0), i.e. Shen et al. (2024)."""

from .ivon_pc import IVONPC


class IVON(IVONPC):
    def __init__(self, params, lr, ess, hess_init=1.0, beta1=0.9, beta2=0.99999, weight_decay=1e-4,
                 clip_radius=float("inf"), rescale_lr=True, *, generator=None, seed=0):
        super().__init__(params, lr, ess, hess_init, beta1, beta2, weight_decay, clip_radius,
                         rescale_lr, alpha=0.0, generator=generator, seed=seed)
