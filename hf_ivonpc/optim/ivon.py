"""IVON: variational learning of a diagonal Gaussian posterior (Shen et al., 2024).

Keyword-compatible with ivon-opt 0.1.3 (``from ivon import IVON`` -> ``from hf_ivonpc.optim import
IVON``), without its known defects: sampling is exception-safe, the step counter, the generator
and every buffer are in ``state_dict`` (tensors and numbers only, loadable with
``torch.load(weights_only=True)``), parameters whose ``grad`` is None are skipped, noise comes from
a seedable ``torch.Generator`` (offset by the rank when distributed), and the state is fp32 (the
mean included) whatever the parameters' dtype, so bf16 parameters do not freeze ``h``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ._base import (FlatStateOptimizer, check_arg, check_beta, check_int_min, check_nonneg,
                    check_positive, check_radius)


class IVON(FlatStateOptimizer):
    r"""Improved Variational Online Newton.

    Posterior ``q = N(m, diag(sigma^2))`` with ``sigma^2 = 1 / (ess * (h + weight_decay))``.
    One step (Alg. 4 of the paper without the red parts)::

        g     <- beta1 g + (1 - beta1) mean(grad)                      # momentum
        h_hat <- ess (h + wd) mean(grad * (theta - m))                 # Price / reparameterisation
        h     <- beta2 h + (1 - beta2) h_hat + 0.5 (1 - beta2)^2 (h - h_hat)^2 / (h + wd)
        m     <- m - lr' clip((g / (1 - beta1^t) + wd m) / (h + wd), clip_radius)

    Args:
        params: parameters or parameter groups (one device and dtype for all).
        lr: learning rate. With ``rescale_lr=True`` (ivon-opt's default) the step size is
            ``lr * (hess_init + weight_decay)``; with ``rescale_lr=False`` it is ``lr`` itself
            (the paper's eta, e.g. 0.3 for GPT-2).
        ess: effective sample size (kappa), usually the training-set size.
        hess_init: initial Hessian h0 (> 0).
        beta1, beta2: momentum of g and h, in [0, 1).
        weight_decay: delta (>= 0), the prior precision per example.
        mc_samples: samples per step when ``step(closure)`` is used.
        hess_approx: ``"price"`` (reparameterisation, default) or ``"gradsq"``.
        clip_radius: element-wise clipping of the preconditioned step (inf: off).
        sync: all-reduce the collected statistics across ranks in ``step`` (each rank pairs its own
            noise with its own gradients first, so the Hessian estimate stays unbiased).
        debias: debias the momentum.
        rescale_lr: see ``lr``.
        seed / generator: source of the noise (a generator seeded with ``seed + rank``).
        chunk_size: elements per chunk of the fused update (default: 65536 on CPU, all on GPU).
    """

    persistent_buffers = ("mean", "momentum", "hess")
    transient_buffers = ("noise", "acc_g", "acc_nxg")

    def __init__(self, params, lr: float, ess: float, hess_init: float = 1.0, beta1: float = 0.9,
                 beta2: float = 0.99999, weight_decay: float = 1e-4, mc_samples: int = 1,
                 hess_approx: str = "price", clip_radius: float = float("inf"), sync: bool = False,
                 debias: bool = True, rescale_lr: bool = True, *, seed: int | None = None,
                 generator: torch.Generator | None = None, chunk_size: int | None = None,
                 _pc_defaults: dict | None = None, **pc_kwargs):
        check_int_min("mc_samples", mc_samples, 1)
        check_arg("hess_approx", hess_approx, hess_approx in ("price", "gradsq"), "'price' or 'gradsq'")
        defaults = dict(lr=lr, ess=ess, hess_init=hess_init, beta1=beta1, beta2=beta2,
                        weight_decay=weight_decay, clip_radius=clip_radius, mc_samples=mc_samples)
        defaults.update(_pc_defaults or {})
        self.hess_approx = hess_approx
        self.sync = sync
        self.debias = debias
        self.rescale_lr = rescale_lr
        self.mc_samples = mc_samples
        super().__init__(params, defaults, seed=seed, generator=generator, chunk_size=chunk_size,
                         **pc_kwargs)

    def _check_group(self, group: dict, gi: int) -> None:
        pre = "" if gi == 0 else f"param_groups[{gi}]."
        check_positive(pre + "lr", group["lr"])
        check_positive(pre + "ess", group["ess"])
        check_positive(pre + "hess_init", group["hess_init"])
        check_beta(pre + "beta1", group["beta1"])
        check_beta(pre + "beta2", group["beta2"])
        check_nonneg(pre + "weight_decay", group["weight_decay"])
        check_radius(pre + "clip_radius", group["clip_radius"])

    def _init_state(self, group, flat):
        flat["hess"].fill_(group["hess_init"])

    # ------------------------------------------------------------------ sampling
    def _draw_noise(self, gi: int, group: dict) -> None:
        """noise <- N(0, I) / sqrt(ess (h + wd))."""
        flat = self._flat[gi]
        noise, h = flat["noise"], flat["hess"]
        noise.normal_(generator=self.generator)
        ess, wd = group["ess"], group["weight_decay"]
        for s in self._chunks(noise.numel()):
            noise[s].div_(h[s].add(wd).mul_(ess).sqrt_())

    def _draw(self, at: str) -> None:
        for gi, group in enumerate(self.param_groups):
            self._draw_noise(gi, group)
            torch._foreach_add_(group["params"], self._views[gi]["noise"])

    def _collect(self, gi, group, at, grads, idx):
        self._acc(gi, "acc_g", idx, grads)
        if self.hess_approx == "price":
            self._acc(gi, "acc_nxg", idx, self._views_of(gi, "noise", idx), grads)
        else:
            self._acc(gi, "acc_nxg", idx, grads, grads)

    def _before_update(self) -> None:
        if self.sync and dist.is_available() and dist.is_initialized():
            world = dist.get_world_size()
            for flat in self._flat:
                for name in self._synced_buffers():
                    dist.all_reduce(flat[name])
                    flat[name].div_(world)

    def _synced_buffers(self) -> tuple[str, ...]:
        return ("acc_g", "acc_nxg")

    # ------------------------------------------------------------------ update
    def _step_size(self, group: dict) -> float:
        lr = group["lr"]
        return lr * (group["hess_init"] + group["weight_decay"]) if self.rescale_lr else lr

    def _h_hat(self, s: dict, group: dict, k: int, hpd: torch.Tensor) -> torch.Tensor:
        """Mean Hessian estimate of this step's in-samples; ``hpd`` is h + wd with the old h
        (the one the noise was drawn with)."""
        if self.hess_approx == "price":
            return s["acc_nxg"].mul(hpd).mul_(group["ess"] / k)
        return s["acc_nxg"].mul(group["ess"] / k)

    def _update(self, s, group, k, use_correction):
        # 15 elementwise operations on one cache-sized chunk (Alg. 4, lines 8 and 11-16)
        b1, b2, wd = group["beta1"], group["beta2"], group["weight_decay"]
        m, mom, h = s["mean"], s["momentum"], s["hess"]
        g_hat = s["acc_g"].mul_(1.0 / k) if k != 1 else s["acc_g"]
        hpd = h.add(wd)
        h_hat = self._h_hat(s, group, k, hpd)
        extra = None
        if use_correction:
            g_hat, h_hat, extra = self._correct(s, group, k, g_hat, h_hat)
        mom.lerp_(g_hat, 1.0 - b1)
        d2 = h.sub(h_hat).square_()
        h.mul_(b2).add_(h_hat, alpha=1.0 - b2).addcdiv_(d2, hpd, value=0.5 * (1.0 - b2) ** 2)
        # clip((mom / debias + wd m) / (h + wd), r) = clip((mom + debias wd m) / (h + wd), debias r) / debias
        debias = 1.0 - b1 ** group["step"] if self.debias else 1.0
        num = torch.add(mom, m, alpha=wd * debias)
        if extra is not None:
            num.add_(extra, alpha=debias)
        u = num.div_(h.add(wd))
        r = group["clip_radius"]
        if r != float("inf"):
            u.clamp_(-r * debias, r * debias)
        m.sub_(u, alpha=self._step_size(group) / debias)

    def _correct(self, s, group, k, g_hat, h_hat):
        raise NotImplementedError

    # ------------------------------------------------------------------ inspection
    @torch.no_grad()
    def posterior_std(self) -> list[torch.Tensor]:
        """sigma = 1 / sqrt(ess (h + weight_decay)) per parameter (new tensors)."""
        out = []
        for gi, group in enumerate(self.param_groups):
            for h in self._views[gi]["hess"]:
                out.append(h.add(group["weight_decay"]).mul_(group["ess"]).rsqrt_())
        return out
