"""Reference SVRG (Alg. 1), VSGD-PC (Alg. 3) and alpha-SVRG, slow and readable.

``svrg`` and ``vsgd_pc`` follow the paper's pseudo-code literally, over a finite sum given by a
per-example gradient function; they are what Theorem 2 is tested on. ``AlphaSVRG`` is a
per-parameter twin of the fast optimizer (same protocol, same draws) for equality tests.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ._noise import standard_normal_per_param


def svrg(grad_i, theta, N, m, eta, outer_iters, pick):
    """Alg. 1. ``grad_i(i, theta)`` is the gradient of example i; ``pick()`` returns an index.

    Returns the list of iterates theta_in after every inner step."""
    trajectory = []
    for _ in range(outer_iters):                                   # line 2
        g_out = sum(grad_i(j, theta) for j in range(N))            # line 3
        theta_out = theta.clone()                                  # line 4
        for _ in range(m):                                         # line 5
            i = pick()                                             # line 6
            g_in = grad_i(i, theta) - grad_i(i, theta_out) + g_out / N   # line 7
            theta = theta - eta * g_in                             # line 8
            trajectory.append(theta.clone())
    return trajectory


def vsgd_pc(grad_i, m_in, N, m, eta, outer_iters, pick, noise):
    """Alg. 3. ``noise()`` returns epsilon ~ N(0, I) (Theorem 2: return zeros to get SVRG)."""
    trajectory = []
    for _ in range(outer_iters):                                   # line 2
        theta_in = m_in + noise()                                  # line 3: theta_in = m_in + eps
        g_out = sum(grad_i(j, theta_in) for j in range(N))         # line 3
        theta_out = theta_in                                       # line 4
        for _ in range(m):                                         # line 5
            i = pick()                                             # line 6
            theta_in = m_in + noise()                              # line 7
            g_in = grad_i(i, theta_in) - grad_i(i, theta_out) + g_out / N
            m_in = m_in - eta * g_in                               # line 8
            trajectory.append(m_in.clone())
    return trajectory


class AlphaSVRG:
    """alpha-SVRG over SGD or AdamW with optional isotropic noise, one parameter at a time."""

    def __init__(self, params, lr, alpha=1.0, base="sgd", momentum=0.0, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0.0, noise_std=0.0, rho1=0.0, *, refresh_every=10, start_step=0,
                 shared_noise=True, generator=None, seed=0):
        params = list(params)
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        defaults = dict(lr=lr, alpha=alpha, momentum=momentum, betas=betas, eps=eps,
                        weight_decay=weight_decay, noise_std=noise_std, rho1=rho1)
        self.param_groups = [{**defaults, **g, "params": list(g["params"])} for g in groups]
        self.base = base
        self.refresh_every, self.start_step, self.shared_noise = refresh_every, start_step, shared_noise
        self.generator = generator or torch.Generator().manual_seed(seed)
        self.t, self.refreshes, self.last_refresh = 0, 0, -1
        self.state = {p: dict(m=p.detach().clone(), g_out=torch.zeros_like(p), m_out=torch.zeros_like(p),
                              buf=None, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                      for g in self.param_groups for p in g["params"]}
        self.grads = {"in": [], "out": [], "mega": []}
        self.eps_draw = None

    @property
    def needs_refresh(self):
        return (any(g["alpha"] > 0 for g in self.param_groups) and self.t >= self.start_step
                and (self.t - self.start_step) % self.refresh_every == 0 and self.last_refresh != self.t)

    @property
    def correction_active(self):
        return any(g["alpha"] > 0 for g in self.param_groups) and self.refreshes > 0 and self.t >= self.start_step

    def _standard_normal(self):
        return standard_normal_per_param(self.param_groups, self.generator)

    @contextmanager
    def sampled_params(self, train=False, at="in"):
        noisy = any(g["noise_std"] > 0 for g in self.param_groups)
        if noisy and (at != "out" or not self.shared_noise):
            self.eps_draw = self._standard_normal()
        k = 0
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    center = self.state[p]["m_out"] if at == "out" else self.state[p]["m"]
                    theta = center + group["noise_std"] * self.eps_draw[k] if group["noise_std"] > 0 else center
                    p.copy_(theta)
                    k += 1
        yield
        with torch.no_grad():
            grads = []
            for group in self.param_groups:
                for p in group["params"]:
                    grads.append(p.grad.detach().clone())
                    p.copy_(self.state[p]["m"])
                    p.grad = None
        if train:
            self.grads[at].append(grads)

    @contextmanager
    def refreshing(self):
        yield
        mega = self.grads["mega"]
        k = 0
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state[p]
                g_hat = sum(g[k] for g in mega) / len(mega)          # mega-batch gradient
                if self.refreshes == 0:
                    st["g_out"] = g_hat
                else:
                    st["g_out"] = group["rho1"] * st["g_out"] + (1 - group["rho1"]) * g_hat
                st["m_out"] = st["m"].clone()                         # snapshot
                k += 1
        self.grads["mega"] = []
        self.refreshes += 1
        self.last_refresh = self.t

    @torch.no_grad()
    def step(self):
        corrected = self.correction_active
        self.t += 1
        t = self.t
        g_in, g_out = self.grads["in"], self.grads["out"]
        k = 0
        for group in self.param_groups:
            a, lr, wd = group["alpha"], group["lr"], group["weight_decay"]
            for p in group["params"]:
                st = self.state[p]
                g = sum(x[k] for x in g_in) / len(g_in)
                if corrected:   # alpha-SVRG: g_in - alpha (g_i(theta_out) - g_out)
                    g = g - a * (sum(x[k] for x in g_out) / len(g_out) - st["g_out"])
                if self.base == "sgd":
                    g = g + wd * st["m"]
                    if group["momentum"]:
                        st["buf"] = g.clone() if st["buf"] is None else group["momentum"] * st["buf"] + g
                        g = st["buf"]
                    st["m"] = st["m"] - lr * g
                else:           # AdamW (Loshchilov & Hutter), torch's formulation
                    b1, b2 = group["betas"]
                    st["m"] = st["m"] * (1 - lr * wd)
                    st["exp_avg"] = b1 * st["exp_avg"] + (1 - b1) * g
                    st["exp_avg_sq"] = b2 * st["exp_avg_sq"] + (1 - b2) * g * g
                    m_hat = st["exp_avg"] / (1 - b1 ** t)
                    v_hat = st["exp_avg_sq"] / (1 - b2 ** t)
                    st["m"] = st["m"] - lr * m_hat / (v_hat.sqrt() + group["eps"])
                p.copy_(st["m"])
                k += 1
        self.grads = {"in": [], "out": [], "mega": []}
