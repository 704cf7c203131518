"""IVON-PCM: IVON with posterior correction and outer momentum (Alg. 4 of the paper).

``rho1 = rho2 = 0`` gives IVON-PC; ``alpha = 0`` gives IVON exactly (same operations, same state
values, same draws). See ``_base`` for the protocol a training loop follows.
"""

from __future__ import annotations

import torch

from ._base import check_nonneg, check_unit
from .ivon import IVON


class IVONPC(IVON):
    r"""IVON with posterior correction of the gradient *and* the Hessian (IVON-PCM).

    Outer refresh (lines 3-5), from micro-batches of a mega-batch each with its own draw
    theta ~ q_in::

        g_out <- rho1 g_out + (1 - rho1) mean(grad)          (the first refresh is taken as is)
        h_out <- rho2 h_out + (1 - rho2) mean(grad (theta - m) / sigma^2)
        m_out <- m,  sigma_out <- sigma

    Inner step (lines 7-16), with theta_in ~ q_in and theta_out ~ q_out::

        g_hat <- g_hat_in - alpha (g_hat_out - g_out)
        h_hat <- h_hat_in - alpha (h_hat_out - h_out)
        ... IVON's momentum and h updates with g_hat, h_hat ...
        g_bar <- (g / (1 - beta1^t) + wd m + w alpha (h_out - h_hat_out)(m - m_out)) / (h + wd)
        m     <- m - lr' clip(g_bar, clip_radius)

    Args (besides IVON's):
        alpha: weight of the correction (>= 0; 0 is IVON).
        rho1, rho2: outer momentum of g_out and h_out, in [0, 1] (0: always the freshest mega-batch).
        mean_term_weight: w, the weight of line 14's extra mean term (>= 0). Default 0.01, the
            paper's value for logistic regression and CNNs: the term multiplies a noisy Hessian
            estimate and at weight 1 without tight clipping it diverges (the README's example
            reaches NaN within 30 steps). The paper's transformer recipe uses 1.0 with
            ``clip_radius=1e-3``.
        refresh_every: optimizer steps between refreshes (the inner-loop length m, >= 1).
        start_step: optimizer steps without correction first (no second pass, no refresh).
        shared_noise: theta_out reuses theta_in's standard-normal draw (common random numbers).
    """

    persistent_buffers = IVON.persistent_buffers + ("g_out", "h_out", "m_out", "sigma_out")
    transient_buffers = IVON.transient_buffers + ("acc_nxg_out",)
    corrects = True

    def __init__(self, params, lr: float, ess: float, hess_init: float = 1.0, beta1: float = 0.9,
                 beta2: float = 0.99999, weight_decay: float = 1e-4, mc_samples: int = 1,
                 hess_approx: str = "price", clip_radius: float = float("inf"), sync: bool = False,
                 debias: bool = True, rescale_lr: bool = True, *, alpha: float = 1.0,
                 rho1: float = 0.0, rho2: float = 0.0, mean_term_weight: float = 0.01,
                 refresh_every: int = 10, start_step: int = 0, shared_noise: bool = True,
                 seed: int | None = None, generator: torch.Generator | None = None,
                 chunk_size: int | None = None):
        if hess_approx != "price":
            raise ValueError(f"hess_approx={hess_approx!r} is invalid: accepted is 'price' "
                             "(the correction needs the reparameterisation estimate)")
        super().__init__(params, lr, ess, hess_init, beta1, beta2, weight_decay, mc_samples,
                         hess_approx, clip_radius, sync, debias, rescale_lr, seed=seed,
                         generator=generator, chunk_size=chunk_size,
                         _pc_defaults=dict(alpha=alpha, rho1=rho1, rho2=rho2,
                                           mean_term_weight=mean_term_weight),
                         refresh_every=refresh_every, start_step=start_step,
                         shared_noise=shared_noise)

    def _check_group(self, group, gi):
        super()._check_group(group, gi)
        pre = "" if gi == 0 else f"param_groups[{gi}]."
        check_nonneg(pre + "alpha", group["alpha"])
        check_unit(pre + "rho1", group["rho1"])
        check_unit(pre + "rho2", group["rho2"])
        check_nonneg(pre + "mean_term_weight", group["mean_term_weight"])

    def _synced_buffers(self):
        return ("acc_g", "acc_nxg", "acc_nxg_out")

    # ------------------------------------------------------------------ sampling
    def _draw(self, at: str) -> None:
        if at != "out":
            return super()._draw(at)
        for gi, group in enumerate(self.param_groups):
            flat = self._flat[gi]
            noise, h, sig_out = flat["noise"], flat["hess"], flat["sigma_out"]
            if self.shared_noise:  # eps = noise / sigma_in, reused: noise_out = eps * sigma_out
                ess, wd = group["ess"], group["weight_decay"]
                for s in self._chunks(noise.numel()):
                    noise[s].mul_(h[s].add(wd).mul_(ess).sqrt_()).mul_(sig_out[s])
            else:
                noise.normal_(generator=self.generator)
                noise.mul_(sig_out)
            torch._foreach_copy_(group["params"], self._views[gi]["m_out"])
            torch._foreach_add_(group["params"], self._views[gi]["noise"])
        # the noise buffer now holds theta_out - m_out
        self._last_draw = "out"

    def _collect(self, gi, group, at, grads, idx):
        if at != "out":
            return super()._collect(gi, group, at, grads, idx)
        self._acc(gi, "acc_g", idx, grads, alpha=-group["alpha"])
        self._acc(gi, "acc_nxg_out", idx, self._views_of(gi, "noise", idx), grads)

    # ------------------------------------------------------------------ outer loop
    def _finish_refresh(self, gi, group, flat, first):
        k = self._count["mega"]
        ess, wd, rho1, rho2 = group["ess"], group["weight_decay"], group["rho1"], group["rho2"]
        for s in self._chunks(flat["mean"].numel()):
            h = flat["hess"][s]
            g_hat = flat["acc_g"][s].mul(1.0 / k)
            h_hat = flat["acc_nxg"][s].mul(1.0 / k).mul_(h.add(wd)).mul_(ess)
            if first:
                flat["g_out"][s].copy_(g_hat)
                flat["h_out"][s].copy_(h_hat)
            else:
                flat["g_out"][s].lerp_(g_hat, 1.0 - rho1)
                flat["h_out"][s].lerp_(h_hat, 1.0 - rho2)
            flat["m_out"][s].copy_(flat["mean"][s])
            flat["sigma_out"][s].copy_(h.add(wd).mul_(ess).rsqrt_())

    # ------------------------------------------------------------------ inner step
    def _correct(self, s, group, k, g_hat, h_hat):
        a = group["alpha"]
        g_hat = g_hat.add(s["g_out"], alpha=a)
        # h_hat_out = mean(grad (theta_out - m_out)) / sigma_out^2
        h_hat_out = s["acc_nxg_out"].mul(1.0 / k).div_(s["sigma_out"].square())
        h_hat = h_hat.sub_(h_hat_out, alpha=a).add_(s["h_out"], alpha=a)
        extra = None
        w = group["mean_term_weight"]
        if w != 0.0:
            extra = s["h_out"].sub(h_hat_out).mul_(s["mean"].sub(s["m_out"])).mul_(w * a)
        return g_hat, h_hat, extra
