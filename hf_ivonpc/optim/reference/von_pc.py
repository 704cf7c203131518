"""Reference VON-PC, written line by line from Alg. 5 / Eq. 24 of the paper. Slow and readable.

Full Gaussian ``q = N(m, S^{-1})`` over all parameters flattened into one vector. Every data term is
the *mean* loss of a batch, so the paper's ``g_out / N`` and ``H_out / N`` are the ``g_out`` and
``H_out`` kept here, and its ``grad ell_i`` is the gradient of the mini-batch's mean loss.
The prior ``delta/2 |theta|^2`` per example enters at q_in only, in closed form (App. B, Eq. 25).

The Hessian is built one row at a time (one backward pass per row). Draws come from the generator
in the same order as in the fast :class:`hf_ivonpc.optim.von_pc.VONPC` (one ``torch.randn(d)`` per
``theta``: in a refresh one per closure; in a step one for theta_in, then one for theta_out only
when the noise is not shared), and ``S^{-1/2} eps`` is ``L^{-T} eps`` with ``S = L L^T``, so the
two can be compared on the same randomness. Same driving API: ``needs_refresh``,
``correction_active``, ``global_step``, ``refresh(closures)``, ``step(closure)``.
"""

from __future__ import annotations

import torch


class VONPC:
    def __init__(self, params, lr, beta, ess, prior_precision=0.0, s_init=1.0, alpha=1.0,
                 rho1=0.0, rho2=0.0, *, mean_term_weight=1.0, refresh_every=10, start_step=0,
                 noise=True, shared_noise=True, seed=0, generator=None, keep_pd=False):
        params = list(params)
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        self.params = [p for g in groups for p in g["params"]]
        self.lr, self.beta, self.N = lr, beta, ess            # Alg. 5's alpha (mean) and beta (S)
        self.delta = prior_precision
        self.alpha, self.rho1, self.rho2, self.w = alpha, rho1, rho2, mean_term_weight
        self.refresh_every, self.start_step = refresh_every, start_step
        self.noise, self.shared_noise, self.keep_pd = noise, shared_noise, keep_pd
        self.generator = generator or torch.Generator().manual_seed(seed)
        p0 = self.params[0]
        self.dtype, self.device = p0.dtype, p0.device
        self.d = sum(p.numel() for p in self.params)
        # line 1: initialise m_in (the parameters) and S_in = N (s0 + delta) I
        self.S_in = ess * (s_init + prior_precision) * torch.eye(self.d, dtype=self.dtype, device=self.device)
        self.m_out = self.S_out = self.g_out = self.H_out = None
        self.t = 0                 # inner steps taken
        self.refreshes = 0
        self.last_refresh = -1

    # --------------------------------------------------------------- driving API
    @property
    def global_step(self):
        return self.t

    @property
    def needs_refresh(self):
        return (self.alpha > 0 and self.t >= self.start_step
                and (self.t - self.start_step) % self.refresh_every == 0 and self.last_refresh != self.t)

    @property
    def correction_active(self):
        return self.alpha > 0 and self.refreshes > 0 and self.t >= self.start_step

    # --------------------------------------------------------------- helpers
    def get_m(self):
        return torch.cat([p.detach().reshape(-1) for p in self.params]).clone()

    def set_params(self, v):
        with torch.no_grad():
            off = 0
            for p in self.params:
                p.copy_(v[off:off + p.numel()].view_as(p))
                off += p.numel()

    def draw_eps(self):
        return torch.randn(self.d, generator=self.generator, dtype=self.dtype, device=self.device)

    def sample(self, m, S, eps):
        """theta = m + S^{-1/2} eps, with S^{-1/2} = L^{-T} for the Cholesky factor S = L L^T."""
        if not self.noise:
            return m                                    # delta method: theta = m
        L = torch.linalg.cholesky(S)
        return m + torch.linalg.solve_triangular(L.T, eps.reshape(-1, 1), upper=True).reshape(-1)

    def grad_and_hessian(self, closure, theta):
        """Mean loss, gradient and Hessian at theta: the Hessian row by row (one backward each)."""
        self.set_params(theta)
        with torch.enable_grad():
            loss = closure()
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True,
                                        materialize_grads=True)
            g = torch.cat([x.reshape(-1) for x in grads])
            H = torch.zeros(self.d, self.d, dtype=self.dtype, device=self.device)
            if g.requires_grad:
                for i in range(self.d):
                    row = torch.autograd.grad(g[i], self.params, retain_graph=True, allow_unused=True,
                                              materialize_grads=True)
                    H[i] = torch.cat([x.reshape(-1) for x in row]).detach()
        H = 0.5 * (H + H.T)
        return loss.detach(), g.detach(), H

    # --------------------------------------------------------------- outer loop
    def refresh(self, closures):
        m_in = self.get_m()
        g_sum = torch.zeros(self.d, dtype=self.dtype, device=self.device)
        H_sum = torch.zeros(self.d, self.d, dtype=self.dtype, device=self.device)
        loss_sum = 0.0
        for closure in closures:
            # line 3: theta_in = m_in + S_in^{-1/2} eps, a fresh eps for each micro-batch
            eps = self.draw_eps() if self.noise else None
            theta_in = self.sample(m_in, self.S_in, eps)
            loss, g, H = self.grad_and_hessian(closure, theta_in)
            loss_sum = loss_sum + loss
            g_sum = g_sum + g          # line 3: g_out <- sum grad
            H_sum = H_sum + H          # line 4: H_out <- sum hess
        K = len(closures)
        g_hat, H_hat = g_sum / K, H_sum / K
        if self.refreshes == 0:        # the first mega-batch estimate is taken as is
            self.g_out, self.H_out = g_hat, H_hat
        else:                          # Eq. 26: g_out <- rho1 g_out + (1 - rho1) g_hat (same for H)
            self.g_out = self.rho1 * self.g_out + (1 - self.rho1) * g_hat
            self.H_out = self.rho2 * self.H_out + (1 - self.rho2) * H_hat
        # line 5: m_out <- m_in (and S_out <- S_in, App. A after Eq. 23)
        self.m_out, self.S_out = m_in, self.S_in.clone()
        self.set_params(m_in)
        self.refreshes += 1
        self.last_refresh = self.t
        return loss_sum / K

    # --------------------------------------------------------------- inner step
    def step(self, closure):
        m_in = self.get_m()
        N, a, delta = self.N, self.alpha, self.delta
        I = torch.eye(self.d, dtype=self.dtype, device=self.device)
        correct = self.correction_active
        # line 8: theta_in = m_in + S_in^{-1/2} eps
        eps = self.draw_eps() if self.noise else None
        theta_in = self.sample(m_in, self.S_in, eps)
        rng = torch.get_rng_state()     # the closure's own randomness is replayed at theta_out
        loss, grad_in, hess_in = self.grad_and_hessian(closure, theta_in)
        if correct:
            # theta_out = m_out + S_out^{-1/2} eps (the same eps with shared noise)
            if self.noise and not self.shared_noise:
                eps = self.draw_eps()
            theta_out = self.sample(self.m_out, self.S_out, eps)
            torch.set_rng_state(rng)
            _, grad_out, hess_out = self.grad_and_hessian(closure, theta_out)
            # line 8: g_in <- grad ell_i(theta_in) - grad ell_i(theta_out) + g_out / N  (alpha-weighted)
            g_in = grad_in - a * grad_out + a * self.g_out
            # line 9: H_out\i <- H_out / N - hess ell_i(theta_out)  (alpha-weighted)
            H_out_minus_i = a * (self.H_out - hess_out)
        else:
            # plain VON (Eq. 8): no correction
            g_in = grad_in
            H_out_minus_i = torch.zeros(self.d, self.d, dtype=self.dtype, device=self.device)
        # line 10: H_in <- hess ell_i(theta_in) + H_out\i      (+ the prior's delta I, Eq. 25)
        H_in = hess_in + H_out_minus_i + delta * I
        # line 11: S_in <- (1 - beta) S_in + beta N H_in       (S before m, App. A)
        S_old = self.S_in
        self.S_in = (1 - self.beta) * S_old + self.beta * N * H_in
        if self.keep_pd:
            # Lin et al. (2020): + beta^2/2 G S^{-1} G with G = N H_in - S keeps S positive definite
            G = N * H_in - S_old
            GSinvG = G @ torch.linalg.solve(S_old, G)
            self.S_in = self.S_in + self.beta ** 2 / 2 * (GSinvG + GSinvG.T) / 2
        # line 12: m_in <- m_in - lr N S_in^{-1} [g_in + H_out\i (m_in - m_out)]  (+ delta m_in)
        direction = g_in + delta * m_in
        if correct:
            direction = direction + self.w * H_out_minus_i @ (m_in - self.m_out)
        m_in = m_in - self.lr * N * torch.linalg.solve(self.S_in, direction)
        self.set_params(m_in)
        self.t += 1
        return loss
