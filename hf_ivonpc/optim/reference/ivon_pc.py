"""Reference IVON-PCM, written line by line from Alg. 4 of the paper. Slow and readable.

Per-parameter Python loops, one quantity per line, the paper's names. It draws its noise from the
generator in the same order as the fast implementation (one ``standard_normal_`` over each parameter
group's concatenated size per draw), so the two can be compared on the same randomness.
It drives like the fast optimizers (``needs_refresh``, ``refreshing()``,
``sampled_params(train, at)``, ``correction_active``, ``step()``).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..hparams import default as _d
from ._noise import standard_normal_per_param


class IVONPC:
    # the defaults of the fast IVONPC (the project's, from hparams)
    def __init__(self, params, lr, ess, hess_init=_d("hess_init"), beta1=_d("beta1"),
                 beta2=_d("beta2"), weight_decay=_d("weight_decay"), clip_radius=_d("clip_radius"),
                 rescale_lr=_d("rescale_lr"), *, alpha=_d("alpha"), rho1=_d("rho1"), rho2=_d("rho2"),
                 mean_term_weight=_d("mean_term_weight"), refresh_every=_d("refresh_every"),
                 start_step=_d("start_step"), shared_noise=_d("shared_noise"), generator=None, seed=0):
        params = list(params)
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        defaults = dict(lr=lr, ess=ess, hess_init=hess_init, beta1=beta1, beta2=beta2,
                        weight_decay=weight_decay, clip_radius=clip_radius, alpha=alpha,
                        rho1=rho1, rho2=rho2, mean_term_weight=mean_term_weight)
        self.param_groups = [{**defaults, **g, "params": list(g["params"])} for g in groups]
        self.rescale_lr = rescale_lr
        self.refresh_every, self.start_step, self.shared_noise = refresh_every, start_step, shared_noise
        self.generator = generator or torch.Generator().manual_seed(seed)
        self.t = 0                     # optimizer steps taken
        self.refreshes = 0
        self.last_refresh = -1
        self.state = {}
        for group in self.param_groups:
            for p in group["params"]:
                # line 1: m_in <- weights, h_in <- h0, g <- 0
                self.state[p] = dict(m=p.detach().clone(),
                                     g=torch.zeros_like(p),
                                     h=torch.full_like(p, group["hess_init"]),
                                     g_out=torch.zeros_like(p), h_out=torch.zeros_like(p),
                                     m_out=torch.zeros_like(p), sigma_out=torch.zeros_like(p))
        self.samples = {"in": [], "out": [], "mega": []}   # (theta - m, grad) pairs per parameter
        self.eps = None
        self.in_refresh = False

    # sigma = 1 / sqrt(kappa (h + delta))
    @staticmethod
    def sigma(h, group):
        return 1.0 / torch.sqrt(group["ess"] * (h + group["weight_decay"]))

    @property
    def correction_enabled(self):
        return any(g["alpha"] > 0 for g in self.param_groups)

    @property
    def needs_refresh(self):
        return (self.correction_enabled and self.t >= self.start_step
                and (self.t - self.start_step) % self.refresh_every == 0 and self.last_refresh != self.t)

    @property
    def correction_active(self):
        return self.correction_enabled and self.refreshes > 0 and self.t >= self.start_step

    def _standard_normal(self):
        return standard_normal_per_param(self.param_groups, self.generator)

    @contextmanager
    def sampled_params(self, train=False, at="in"):
        if at in ("in", "mega") or not self.shared_noise:
            self.eps = self._standard_normal()
        pairs = []
        k = 0
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    st = self.state[p]
                    if at == "out":   # line 7: theta_out ~ N(m_out, sigma_out^2)
                        theta = st["m_out"] + st["sigma_out"] * self.eps[k]
                    else:             # lines 3 and 7: theta_in ~ N(m_in, sigma_in^2)
                        theta = st["m"] + self.sigma(st["h"], group) * self.eps[k]
                    pairs.append(theta)
                    p.copy_(theta)
                    k += 1
        try:
            yield
        finally:
            with torch.no_grad():
                sample = []
                k = 0
                for group in self.param_groups:
                    for p in group["params"]:
                        st = self.state[p]
                        center = st["m_out"] if at == "out" else st["m"]
                        sample.append((pairs[k] - center, p.grad.detach().clone()))
                        p.copy_(st["m"])
                        p.grad = None
                        k += 1
        if train:
            self.samples[at].append(sample)

    @contextmanager
    def refreshing(self):
        self.in_refresh = True
        yield
        self.in_refresh = False
        mega = self.samples["mega"]
        M = len(mega)
        k = 0
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state[p]
                sig2 = self.sigma(st["h"], group) ** 2
                # line 3: g_hat_out <- mean of grad over the mega-batch (each micro-batch its own draw)
                g_hat_out = sum(s[k][1] for s in mega) / M
                # line 4 (Hessian part): mean of grad (theta - m) / sigma^2
                h_hat_out = sum(s[k][1] * s[k][0] for s in mega) / M / sig2
                if self.refreshes == 0:   # first refresh taken as is
                    st["g_out"], st["h_out"] = g_hat_out, h_hat_out
                else:                     # line 4: outer momentum
                    st["g_out"] = group["rho1"] * st["g_out"] + (1 - group["rho1"]) * g_hat_out
                    st["h_out"] = group["rho2"] * st["h_out"] + (1 - group["rho2"]) * h_hat_out
                # line 5: m_out <- m_in, sigma_out <- sigma_in
                st["m_out"] = st["m"].clone()
                st["sigma_out"] = self.sigma(st["h"], group)
                k += 1
        self.samples["mega"] = []
        self.refreshes += 1
        self.last_refresh = self.t

    @torch.no_grad()
    def step(self):
        corrected = self.correction_active
        self.t += 1
        t = self.t
        s_in, s_out = self.samples["in"], self.samples["out"]
        B = len(s_in)
        k = 0
        for group in self.param_groups:
            a, d, b1, b2 = group["alpha"], group["weight_decay"], group["beta1"], group["beta2"]
            eta = group["lr"] * (group["hess_init"] + d) if self.rescale_lr else group["lr"]
            for p in group["params"]:
                st = self.state[p]
                sig2_in = self.sigma(st["h"], group) ** 2
                # line 8: g_hat_in and h_hat_in = g_hat_in (theta_in - m_in) / sigma_in^2
                g_hat_in = sum(s[k][1] for s in s_in) / B
                h_hat_in = sum(s[k][1] * s[k][0] for s in s_in) / B / sig2_in
                if corrected:
                    # line 9: g_hat_out and h_hat_out = g_hat_out (theta_out - m_out) / sigma_out^2
                    g_hat_out = sum(s[k][1] for s in s_out) / B
                    h_hat_out = sum(s[k][1] * s[k][0] for s in s_out) / B / st["sigma_out"] ** 2
                    # line 10: corrected gradient and Hessian
                    g_hat = g_hat_in - a * (g_hat_out - st["g_out"])
                    h_hat = h_hat_in - a * (h_hat_out - st["h_out"])
                else:
                    g_hat, h_hat = g_hat_in, h_hat_in
                h = st["h"]
                # line 11: momentum
                st["g"] = b1 * st["g"] + (1 - b1) * g_hat
                # line 12: Hessian with the positivity term
                st["h"] = b2 * h + (1 - b2) * h_hat + 0.5 * (1 - b2) ** 2 * (h - h_hat) ** 2 / (h + d)
                # line 13: debiasing
                g_bar = st["g"] / (1 - b1 ** t)
                # line 14: preconditioned direction, with the extra mean term (weighted)
                num = g_bar + d * st["m"]
                if corrected:
                    w = group["mean_term_weight"]
                    num = num + w * a * (st["h_out"] - h_hat_out) * (st["m"] - st["m_out"])
                g_bar = num / (st["h"] + d)
                # line 15: clipped mean update
                st["m"] = st["m"] - eta * torch.clamp(g_bar, -group["clip_radius"], group["clip_radius"])
                # line 16: sigma_in follows from h (computed where needed)
                p.copy_(st["m"])
                k += 1
        self.samples = {"in": [], "out": [], "mega": []}
