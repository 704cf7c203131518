"""The point-estimate and isotropic-Gaussian members of the family.

* :class:`SVRG` (Alg. 1, Johnson & Zhang 2013) over SGD.
* :class:`AlphaSVRG` (Yin et al. 2025): the correction scaled by ``alpha``, fed to SGD (with
  momentum) or AdamW; the baseline of every experiment in the paper.
* :class:`VSGDPC` (Alg. 3): variational SGD with posterior correction over ``N(m, noise_std^2 I)``;
  with ``noise_std=0`` it *is* SVRG (Theorem 2).

All follow the protocol of :mod:`hf_ivonpc.optim._sampling` (``needs_refresh``, ``refreshing()``,
``sampled_params(train=True, at=...)``, ``correction_active``, ``step()``).
"""

from __future__ import annotations

import math

import torch

from . import _kernels as K
from ._base import FlatStateOptimizer
from ._checks import check_arg, check_beta, check_nonneg, check_positive, check_unit
from ._flat import binary_out


class AlphaSVRG(FlatStateOptimizer):
    r"""alpha-SVRG over SGD or AdamW, optionally with Gaussian perturbation (VSGD-PC).

    Gradient fed to the base optimizer at an inner step::

        g <- mean grad(theta_in) - alpha (mean grad(theta_out) - g_out)

    with ``theta_in = m + noise_std eps`` and ``theta_out = m_out + noise_std eps`` (the same ``eps``
    with ``shared_noise``), and ``g_out`` the mean gradient over the last mega-batch (blended with
    weight ``rho1`` on the old value after the first refresh).

    Args:
        params: parameters or groups (one device and dtype).
        lr: learning rate (> 0).
        alpha: weight of the correction (>= 0; 0 is the base optimizer).
        base: ``"sgd"`` or ``"adamw"``.
        momentum: SGD momentum in [0, 1) (torch.optim.SGD's convention, no dampening).
        betas, eps: AdamW's.
        weight_decay: L2 (SGD) or decoupled (AdamW) weight decay (>= 0).
        noise_std: standard deviation of the isotropic Gaussian (>= 0; 0: point estimate).
        rho1: outer momentum of g_out, in [0, 1].
        refresh_every, start_step, shared_noise, seed, generator, chunk_size: as in ``IVONPC``.
    """

    corrects = True

    def __init__(self, params, lr: float, alpha: float = 1.0, base: str = "sgd", momentum: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, noise_std: float = 0.0, rho1: float = 0.0, *,
                 refresh_every: int = 10, start_step: int = 0, shared_noise: bool = True,
                 seed: int | None = None, generator: torch.Generator | None = None,
                 chunk_size: int | None = None, fused: bool | None = None):
        check_arg("base", base, base in ("sgd", "adamw"), "'sgd' or 'adamw'")
        self.base = base
        self.persistent_buffers = ("mean", "g_out", "m_out") + (
            ("momentum_buffer",) if base == "sgd" else ("exp_avg", "exp_avg_sq"))
        self.transient_buffers = ("noise", "acc_g")
        defaults = dict(lr=lr, alpha=alpha, momentum=momentum, betas=tuple(betas), eps=eps,
                        weight_decay=weight_decay, noise_std=noise_std, rho1=rho1)
        super().__init__(params, defaults, seed=seed, generator=generator, chunk_size=chunk_size,
                         fused=fused, refresh_every=refresh_every, start_step=start_step,
                         shared_noise=shared_noise)

    def _check_group(self, group, gi):
        pre = "" if gi == 0 else f"param_groups[{gi}]."
        check_positive(pre + "lr", group["lr"])
        check_nonneg(pre + "alpha", group["alpha"])
        check_beta(pre + "momentum", group["momentum"])
        b = group["betas"]
        check_arg(pre + "betas", b, isinstance(b, (tuple, list)) and len(b) == 2, "a pair (beta1, beta2)")
        check_beta(pre + "betas[0]", b[0])
        check_beta(pre + "betas[1]", b[1])
        check_positive(pre + "eps", group["eps"])
        check_nonneg(pre + "weight_decay", group["weight_decay"])
        check_nonneg(pre + "noise_std", group["noise_std"])
        check_unit(pre + "rho1", group["rho1"])

    # ------------------------------------------------------------------ sampling
    def _draw(self, at: str) -> None:
        for gi, group in enumerate(self.param_groups):
            params, views, sd = self._params(gi), self._views[gi], group["noise_std"]
            fresh = not (at == "out" and self.shared_noise)
            if sd > 0 and fresh:
                self._draw_standard_normal(self._flat[gi]["noise"])
                self._flat[gi]["noise"].mul_(sd)
            if at == "out" and sd > 0:
                binary_out(torch.add, params, views["m_out"], views["noise"])
            elif at == "out":
                torch._foreach_copy_(params, views["m_out"])
            elif sd > 0:
                torch._foreach_add_(params, views["noise"])

    def _collect(self, gi, group, at, grads, idx):
        alpha = -group["alpha"] if at == "out" else 1.0
        self._acc(gi, "acc_g", idx, grads, alpha=alpha)

    def _finish_refresh(self, gi, group, flat, first):
        self._run(K.svrg_refresh, {n: flat[n] for n in ("mean", "acc_g", "g_out", "m_out")},
                  [1.0 / self._count["mega"], group["rho1"], 1.0 - group["rho1"]], first=first)

    # ------------------------------------------------------------------ update
    def _update(self, flat, group, k, use_correction, ranges):
        lr, wd, t = group["lr"], group["weight_decay"], group["step"]
        corr = {"g_out": flat["g_out"]} if use_correction else {}
        if self.base == "sgd":
            names = ("mean", "acc_g", "momentum_buffer")
            self._run(K.sgd_update, {**{n: flat[n] for n in names}, **corr},
                      [1.0 / k, lr, wd, group["momentum"], group["alpha"]], ranges,
                      first=t == 1, momentum=group["momentum"] != 0.0)
        else:
            b1, b2 = group["betas"]
            names = ("mean", "acc_g", "exp_avg", "exp_avg_sq")
            self._run(K.adamw_update, {**{n: flat[n] for n in names}, **corr},
                      [1.0 / k, 1.0 - lr * wd, b1, 1.0 - b1, b2, 1.0 - b2, group["eps"],
                       lr / (1.0 - b1 ** t), math.sqrt(1.0 - b2 ** t), group["alpha"]], ranges)


class SVRG(AlphaSVRG):
    """SVRG (Alg. 1): alpha = 1 over plain SGD (optionally with momentum and weight decay)."""

    def __init__(self, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0, *,
                 refresh_every: int = 10, start_step: int = 0, **kwargs):
        super().__init__(params, lr, alpha=1.0, base="sgd", momentum=momentum,
                         weight_decay=weight_decay, refresh_every=refresh_every,
                         start_step=start_step, **kwargs)


class VSGDPC(AlphaSVRG):
    """VSGD-PC (Alg. 3): SVRG evaluated at draws of ``N(m, noise_std^2 I)``; ``noise_std=0`` is SVRG."""

    def __init__(self, params, lr: float, noise_std: float = 1.0, weight_decay: float = 0.0, *,
                 refresh_every: int = 10, start_step: int = 0, shared_noise: bool = True, **kwargs):
        super().__init__(params, lr, alpha=1.0, base="sgd", weight_decay=weight_decay,
                         noise_std=noise_std, refresh_every=refresh_every, start_step=start_step,
                         shared_noise=shared_noise, **kwargs)
