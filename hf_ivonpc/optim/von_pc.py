"""VON-PC: Variational Online Newton with Posterior Correction (Alg. 5, Theorem 3, App. A, B.1).

A full-covariance Gaussian ``q = N(m, S^{-1})`` over *all* parameters flattened into one vector of
size ``d``: ``S`` is a dense ``d x d`` matrix and every step computes exact Hessians, so this is for
small models only (``d`` up to a few thousand; ``max_dim`` guards it). The optimizer is
closure-based because it needs the Hessian, not only the gradient::

    opt = VONPC(model.parameters(), lr=1.0, beta=0.1, ess=len(train_set), prior_precision=1e-3)
    for t in range(steps):
        if opt.needs_refresh:                    # outer loop (Alg. 5 lines 3-5)
            opt.refresh([lambda b=b: loss_fn(model, b) for b in megabatch_parts])
        loss = opt.step(lambda: loss_fn(model, next_batch()))   # inner step (lines 7-12)

Every closure returns the *mean* loss of its (micro-/mini-)batch evaluated at whatever values the
parameters hold; it must not call ``backward`` (the optimizer differentiates the returned tensor
with ``torch.autograd.grad``; ``p.grad`` is never touched). The optimizer writes the sampled
``theta`` into the parameters before each call and ``m`` back afterwards, also on an exception.
The readable line-by-line twin is :class:`hf_ivonpc.optim.reference.von_pc.VONPC`.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch

from ._checks import check_arg, check_int_min, check_nonneg, check_positive, check_unit
from ._random import make_generator
from ._schedule import CorrectionSchedule, fresh_counters
from ._sharding import is_sharded

#: the per-group hyperparameters; VON-PC has one posterior over all parameters, so every group
#: must hold the same values (read from ``param_groups[0]``)
HPARAMS = ("lr", "beta", "ess", "prior_precision", "s_init", "alpha", "rho1", "rho2",
           "mean_term_weight")

# rows of the Hessian computed per batched backward pass (bounds the vmap's memory)
_HESS_ROWS = 512


class IndefinitePrecisionError(RuntimeError):
    """The update would make the precision ``S`` lose positive definiteness (nothing was changed)."""


def _check_hparams(h: dict, pre: str = "") -> None:
    check_positive(pre + "lr", h["lr"])
    check_arg(pre + "beta", h["beta"],
              isinstance(h["beta"], (int, float)) and not isinstance(h["beta"], bool)
              and 0 < h["beta"] <= 1, "(0, 1]")
    check_positive(pre + "ess", h["ess"])
    check_nonneg(pre + "prior_precision", h["prior_precision"])
    check_positive(pre + "s_init", h["s_init"])
    check_nonneg(pre + "alpha", h["alpha"])
    check_unit(pre + "rho1", h["rho1"])
    check_unit(pre + "rho2", h["rho2"])
    check_nonneg(pre + "mean_term_weight", h["mean_term_weight"])


class VONPC(CorrectionSchedule, torch.optim.Optimizer):
    r"""Variational Online Newton with Posterior Correction over ``q = N(m, S^{-1})``.

    Notation: ``N = ess``, ``delta = prior_precision``, ``a = alpha``, ``w = mean_term_weight``;
    ``f`` is a closure's mean loss, ``grad f`` and ``hess f`` its exact gradient and Hessian with
    respect to the flattened parameters. Alg. 5 / Eq. 24 are written with sums over examples; here
    every data term is a mean (the paper's ``g_out / N`` *is* ``g_out`` below), which is the same
    update since the paper multiplies each mean by ``N`` again.

    Sampling: ``theta = m + L^{-T} eps`` with ``S = L L^T`` (Cholesky) and ``eps ~ N(0, I)`` from
    ``self.generator``, so ``Cov(theta) = S^{-1}`` (the paper's ``S^{-1/2} eps``). With
    ``noise=False`` every ``theta`` is the mean itself (delta method) and no noise is drawn.

    Outer refresh, ``refresh(closures)`` (lines 3-5, Eq. 23; mega-batches with momentum, Eq. 26),
    closure ``k`` evaluated at its own draw ``theta_k ~ q_in``::

        g_hat = mean_k grad f_k(theta_k),    H_hat = mean_k hess f_k(theta_k)
        g_out <- rho1 g_out + (1 - rho1) g_hat,   H_out <- rho2 H_out + (1 - rho2) H_hat
        m_out <- m,   S_out <- S

    (the first refresh takes ``g_hat``, ``H_hat`` as they are.) Inner step, ``step(closure)``
    (lines 7-12 = Eq. 24 with one Monte-Carlo sample for each expectation),
    ``theta_in ~ N(m, S^{-1})``, ``theta_out ~ N(m_out, S_out^{-1})`` (same ``eps`` when
    ``shared_noise``)::

        H_corr = a (H_out - hess f(theta_out))                       # H_{out\i}   (line 9)
        g_in   = grad f(theta_in) + a (g_out - grad f(theta_out))    # line 8
        H_in   = hess f(theta_in) + H_corr                           # line 10
        S      <- (1 - beta) S + beta N (H_in + delta I)             # line 11, S before m
        m      <- m - lr N S^{-1} (g_in + delta m + w H_corr (m - m_out))   # line 12, new S

    Before the first refresh, before ``start_step``, and whenever ``alpha == 0`` the correction is
    off (``H_corr = 0``, no ``theta_out`` pass): this is VON (Eq. 8) with one sample and separate
    step sizes ``lr`` (mean) and ``beta`` (precision).

    Prior (weight decay, as in App. B, Eq. 25): ``ell_0(theta) = (N delta / 2) |theta|^2``, i.e.
    ``delta/2 |theta|^2`` added to every mean-loss term. Its expectations under ``q`` are exact,
    ``E_q[delta theta] = delta m`` and ``E_q[delta I] = delta I``, so it is not sampled: it adds
    ``delta m`` to the gradient and ``delta I`` to the Hessian of each step, evaluated at
    ``q_in`` only, and never enters ``g_out``, ``H_out`` or the correction terms (there its
    in/out/outer contributions cancel in expectation). ``S`` starts at
    ``N (s_init + delta) I`` (``s_init`` plays IVON's ``hess_init``).

    Positive definiteness: without correction and with a convex loss ``S`` stays positive
    definite, but the corrected ``H_in`` (a difference of mini-batch Hessians at two points) can be
    indefinite even for a convex loss, and so can any Hessian of a non-convex one. By default
    (``keep_pd=False``, the paper's line 11 exactly) no damping is applied: a step that would make
    ``S`` indefinite raises :class:`IndefinitePrecisionError` *before* changing any state (the
    parameters are back at ``m``, the generator is rewound); use a smaller ``beta``, a larger
    ``prior_precision`` or a smaller ``alpha``. With ``keep_pd=True`` line 11 gets the extra term
    of Lin et al. (2020, "Handling the positive-definite constraint in the BLR"), the full-matrix
    form of the term in IVON's ``h`` update::

        G = N (H_in + delta I) - S,    S <- S + beta G + (beta^2 / 2) G S^{-1} G

    which equals ``S/2 + (S + beta G) S^{-1} (S + beta G) / 2`` and is positive definite for any
    ``G``.

    Same randomness in both passes: the global torch RNG (CPU, and CUDA when the parameters live
    there) is saved before the ``theta_in`` call of a step and restored before its ``theta_out``
    call, so dropout masks or augmentations drawn inside the closure are identical in both (note 5
    of the project's paper notes). The optimizer's own noise comes from ``self.generator``.

    Args:
        params: the model's parameters (or groups; all groups must hold the same hyperparameters).
            One device, dtype float32 or float64, all ``requires_grad``, at most ``max_dim``
            elements in total.
        lr: step size of the mean (> 0); ``lr = 1`` with ``beta = 1`` is a Newton step.
        beta: step size of the precision, in (0, 1].
        ess: N, the effective number of examples (> 0), usually the training-set size.
        prior_precision: delta (>= 0), the prior precision per example (see above).
        s_init: initial precision per example (> 0): ``S_0 = N (s_init + delta) I``.
        alpha: weight of the correction (>= 0), as in alpha-SVRG; 0 is plain VON.
        rho1, rho2: weight of the *old* ``g_out`` / ``H_out`` at a refresh, in [0, 1]
            (0: the freshest mega-batch only).
        mean_term_weight: ``w`` (>= 0), the weight of line 12's ``H_{out\i}(m_in - m_out)``.
        refresh_every: inner steps between refreshes (the inner-loop length ``m``, >= 1).
        start_step: steps of plain VON before the correction starts (>= 0).
        noise: sample ``theta`` (True) or use the mean (False: delta method).
        shared_noise: ``theta_out`` reuses ``theta_in``'s standard-normal ``eps`` (common random
            numbers); False draws a fresh one after it. On a 500 x 5 logistic regression (batch 5,
            3 seeds, 15 epochs) both reached 1% of the optimum equally fast, but at lr = 0.5 the
            final excess loss was 1.0-2.0e-3 shared vs 3.0e-3-1.0e-2 independent.
        seed: seed of the noise generator (None: drawn from the global torch RNG).
        generator: a ``torch.Generator`` on the parameters' device to use instead of ``seed``.
        keep_pd: add the positive-definiteness term to line 11 (see above; default False).
        max_dim: the largest accepted ``d`` (default 4096).

    Attributes ``needs_refresh``, ``correction_active``, ``global_step``, ``refreshes`` and
    ``counters`` mean what they mean in :mod:`hf_ivonpc.optim._schedule`. ``state_dict()`` holds
    ``S``, ``m_out``, ``S_out``, ``g_out``, ``H_out``, the step counters and the generator state
    (tensors and plain numbers, loadable with ``torch.load(weights_only=True)``); the mean ``m``
    is the parameters, so save the model too. Not for distributed training (one posterior, one
    generator).
    """

    def __init__(self, params: Iterable, lr: float, beta: float, ess: float,
                 prior_precision: float = 0.0, s_init: float = 1.0, alpha: float = 1.0,
                 rho1: float = 0.0, rho2: float = 0.0, *, mean_term_weight: float = 1.0,
                 refresh_every: int = 10, start_step: int = 0, noise: bool = True,
                 shared_noise: bool = True, seed: int | None = None,
                 generator: torch.Generator | None = None, keep_pd: bool = False,
                 max_dim: int = 4096):
        defaults = dict(lr=lr, beta=beta, ess=ess, prior_precision=prior_precision, s_init=s_init,
                        alpha=alpha, rho1=rho1, rho2=rho2, mean_term_weight=mean_term_weight)
        _check_hparams(defaults)
        check_int_min("refresh_every", refresh_every, 1)
        check_int_min("start_step", start_step, 0)
        check_int_min("max_dim", max_dim, 1)
        check_arg("noise", noise, isinstance(noise, bool), "True or False")
        check_arg("shared_noise", shared_noise, isinstance(shared_noise, bool), "True or False")
        check_arg("keep_pd", keep_pd, isinstance(keep_pd, bool), "True or False")
        if seed is not None:
            check_int_min("seed", seed, 0)
        check_arg("generator", generator, generator is None or isinstance(generator, torch.Generator),
                  "None or a torch.Generator")
        params = [dict(g, params=list(g["params"])) if isinstance(g, dict) else g for g in params]
        if len(params) == 0:
            raise ValueError("params is empty: the optimizer got no parameters")
        super().__init__(params, defaults)
        plist = [p for g in self.param_groups for p in g["params"]]
        self._validate_params(plist, max_dim)
        for gi, group in enumerate(self.param_groups[1:], start=1):
            _check_hparams(group, f"param_groups[{gi}].")
        self._check_groups_agree()

        self._plist = plist
        self._numels = [p.numel() for p in plist]
        self.dim = sum(self._numels)
        self._device = plist[0].device
        self._dtype = plist[0].dtype
        self.refresh_every = refresh_every
        self.start_step = start_step
        self.noise = noise
        self.shared_noise = shared_noise
        self.keep_pd = keep_pd
        if generator is None:
            generator = make_generator(self._device, seed)
        elif generator.device != self._device:
            raise ValueError(f"generator is on {generator.device}: accepted is a generator on the "
                             f"parameters' device {self._device}")
        self.generator = generator
        self._batched_hessian = True

        h = self.param_groups[0]
        s0 = h["ess"] * (h["s_init"] + h["prior_precision"])
        eye = torch.eye(self.dim, dtype=self._dtype, device=self._device)
        self._S = eye * s0                      # precision S_in
        self._L = eye * math.sqrt(s0)           # its Cholesky factor, S = L L^T
        self._m_out: torch.Tensor | None = None
        self._S_out: torch.Tensor | None = None
        self._L_out: torch.Tensor | None = None
        self._g_out: torch.Tensor | None = None
        self._H_out: torch.Tensor | None = None
        self._pc = fresh_counters()

    def add_param_group(self, param_group: dict) -> None:
        if hasattr(self, "_plist"):
            raise ValueError("add_param_group after construction is not supported: the posterior "
                             "covers the parameters given at construction (create a new VONPC)")
        super().add_param_group(param_group)

    # ------------------------------------------------------------------ checks
    @staticmethod
    def _validate_params(plist: list, max_dim: int) -> None:
        if not all(isinstance(p, torch.Tensor) for p in plist):
            raise ValueError("params must be tensors: accepted are torch.nn.Parameter / tensors")
        if len(set(map(id, plist))) != len(plist):
            raise ValueError("params contains the same tensor twice: accepted is each parameter once")
        if any(is_sharded(p) for p in plist):
            raise ValueError("VONPC does not support sharded (DTensor) parameters: it keeps a full "
                             "covariance over all of them")
        devices = {p.device for p in plist}
        dtypes = {p.dtype for p in plist}
        if len(devices) > 1:
            raise ValueError(f"params are on mixed devices {sorted(map(str, devices))}: "
                             "accepted is one device for all parameters")
        if len(dtypes) > 1 or next(iter(dtypes)) not in (torch.float32, torch.float64):
            raise ValueError(f"params have dtype(s) {sorted(map(str, dtypes))}: accepted is one dtype "
                             "for all parameters, float32 or float64 (the mean lives in them)")
        if not all(p.requires_grad for p in plist):
            raise ValueError("params contains a tensor with requires_grad=False: accepted are "
                             "parameters that require grad (leave frozen ones out)")
        d = sum(p.numel() for p in plist)
        if d > max_dim:
            raise ValueError(f"params has d={d} elements in total: accepted is at most max_dim="
                             f"{max_dim} (VON-PC keeps a dense d x d precision and exact Hessians; "
                             "raise max_dim or use IVONPC for large models)")

    def _check_groups_agree(self, groups: Sequence[dict] | None = None) -> None:
        groups = self.param_groups if groups is None else groups
        first = groups[0]
        for gi, group in enumerate(groups[1:], start=1):
            for k in HPARAMS:
                if group[k] != first[k]:
                    raise ValueError(f"param_groups[{gi}].{k}={group[k]!r} differs from "
                                     f"param_groups[0].{k}={first[k]!r}: accepted is the same value in "
                                     "every group (VON-PC has one posterior over all parameters)")

    def _hparams(self) -> dict:
        """Current hyperparameters, checked (schedulers may have changed them) before any update."""
        for gi, group in enumerate(self.param_groups):
            _check_hparams(group, "" if gi == 0 else f"param_groups[{gi}].")
        self._check_groups_agree()
        return self.param_groups[0]

    # ------------------------------------------------------------------ protocol
    @property
    def correction_enabled(self) -> bool:
        return self.param_groups[0]["alpha"] > 0

    # --------------------------------------------------------- flat parameters
    def _get_flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self._plist])

    @torch.no_grad()
    def _set_flat(self, v: torch.Tensor) -> None:
        off = 0
        for p, n in zip(self._plist, self._numels):
            p.copy_(v[off:off + n].view_as(p))
            off += n

    def _randn(self) -> torch.Tensor:
        return torch.randn(self.dim, generator=self.generator, dtype=self._dtype, device=self._device)

    @staticmethod
    def _sample(mean: torch.Tensor, chol: torch.Tensor, eps: torch.Tensor | None) -> torch.Tensor:
        """theta = mean + L^{-T} eps, a draw from N(mean, (L L^T)^{-1}); the mean when eps is None."""
        if eps is None:
            return mean
        return mean + torch.linalg.solve_triangular(chol.mT, eps.unsqueeze(-1), upper=True).squeeze(-1)

    def _rng_state(self):
        cuda = self._device.type == "cuda"
        return torch.get_rng_state(), (torch.cuda.get_rng_state(self._device) if cuda else None)

    def _set_rng_state(self, state) -> None:
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], self._device)

    # ------------------------------------------------------- gradient, Hessian
    def _loss_grad_hess(self, closure: Callable, theta: torch.Tensor):
        """Mean loss, its gradient and exact (symmetrised) Hessian at theta, w.r.t. the flat params."""
        self._set_flat(theta)
        params = self._plist
        with torch.enable_grad():
            loss = closure()
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError(f"closure returned {type(loss).__name__}: accepted is a scalar tensor "
                                 "(the mean loss of its batch)")
            if not loss.requires_grad:
                raise ValueError("closure returned a loss that does not require grad: accepted is a "
                                 "loss computed from the parameters (do not call backward inside it)")
            grads = torch.autograd.grad(loss.reshape(()), params, create_graph=True,
                                        allow_unused=True, materialize_grads=True)
            g = torch.cat([x.reshape(-1) for x in grads])
            if g.requires_grad:
                H = self._hessian_rows(g, params)
            else:  # the loss is linear in the parameters
                H = torch.zeros(self.dim, self.dim, dtype=self._dtype, device=self._device)
        H = H.detach()
        H = 0.5 * (H + H.mT)
        return loss.detach().reshape(()), g.detach(), H

    def _hessian_rows(self, g: torch.Tensor, params: list) -> torch.Tensor:
        d = self.dim
        eye = torch.eye(d, dtype=self._dtype, device=self._device)
        if self._batched_hessian:
            try:  # vectorised: one batched backward (vmap) per block of rows
                blocks = []
                for lo in range(0, d, _HESS_ROWS):
                    rows = torch.autograd.grad(g, params, grad_outputs=eye[lo:lo + _HESS_ROWS],
                                               retain_graph=True, is_grads_batched=True,
                                               allow_unused=True, materialize_grads=True)
                    blocks.append(torch.cat([r.reshape(r.shape[0], -1) for r in rows], dim=1))
                return torch.cat(blocks)
            except RuntimeError:
                # some operation without a vmap rule: fall back to one backward per row, for good
                self._batched_hessian = False
        rows = []
        for i in range(d):
            r = torch.autograd.grad(g[i], params, retain_graph=True, allow_unused=True,
                                    materialize_grads=True)
            rows.append(torch.cat([x.reshape(-1) for x in r]))
        return torch.stack(rows)

    # ------------------------------------------------------------------ outer loop
    def refresh(self, closures: Sequence[Callable]) -> torch.Tensor:
        """Outer refresh from the micro-batches of a mega-batch (lines 3-5, Eq. 23/26).

        Each closure returns the mean loss of one micro-batch; each is evaluated at its own draw
        ``theta ~ q_in`` and ``g_out``, ``H_out`` become the averages over them (blended with
        ``rho1``, ``rho2`` after the first refresh); then ``m_out <- m``, ``S_out <- S``.
        Returns the average loss. On an exception nothing changes.
        """
        try:
            closures = None if callable(closures) else list(closures)
        except TypeError:
            closures = None
        check_arg("closures", closures, bool(closures) and all(callable(c) for c in closures),
                  "a non-empty sequence of callables (one per micro-batch)")
        h = self._hparams()
        m = self._get_flat()
        gen_state = self.generator.get_state()
        try:
            loss_sum = g_sum = H_sum = None
            for closure in closures:
                theta = self._sample(m, self._L, self._randn() if self.noise else None)
                loss, g, H = self._loss_grad_hess(closure, theta)
                if g_sum is None:
                    loss_sum, g_sum, H_sum = loss, g, H
                else:
                    loss_sum, g_sum, H_sum = loss_sum + loss, g_sum + g, H_sum + H
        except BaseException:
            self.generator.set_state(gen_state)
            raise
        finally:
            self._set_flat(m)
        k = len(closures)
        g_hat, H_hat = g_sum / k, H_sum / k
        if self._pc["refreshes"] == 0:
            self._g_out, self._H_out = g_hat, H_hat
        else:
            self._g_out = torch.lerp(self._g_out, g_hat, 1.0 - h["rho1"])
            self._H_out = torch.lerp(self._H_out, H_hat, 1.0 - h["rho2"])
        self._m_out, self._S_out, self._L_out = m.clone(), self._S.clone(), self._L.clone()
        self._pc["refreshes"] += 1
        self._pc["last_refresh"] = self._pc["step"]
        return loss_sum / k

    # ------------------------------------------------------------------ inner step
    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> torch.Tensor:  # type: ignore[override]
        """One inner step (lines 7-12, Eq. 24) on the mini-batch closure; returns its loss at theta_in.

        On an exception (from the closure, or :class:`IndefinitePrecisionError`) nothing changes.
        """
        check_arg("closure", closure, callable(closure),
                  "a callable returning the mean loss of a mini-batch (VON-PC needs Hessians)")
        h = self._hparams()
        N, lr, beta, a = h["ess"], h["lr"], h["beta"], h["alpha"]
        delta, w = h["prior_precision"], h["mean_term_weight"]
        use_correction = self.correction_active
        m = self._get_flat()
        gen_state = self.generator.get_state()
        try:
            eps = self._randn() if self.noise else None
            theta_in = self._sample(m, self._L, eps)
            rng = self._rng_state() if use_correction else None
            loss, g_in, H_in = self._loss_grad_hess(closure, theta_in)
            if use_correction:
                if self.noise and not self.shared_noise:
                    eps = self._randn()
                theta_out = self._sample(self._m_out, self._L_out, eps)
                self._set_rng_state(rng)
                _, g_o, H_o = self._loss_grad_hess(closure, theta_out)
                H_corr = (self._H_out - H_o).mul_(a)             # H_{out\i}
                g_in = g_in + (self._g_out - g_o).mul_(a)
                H_in = H_in + H_corr
            H_in.diagonal().add_(delta)
            if self.keep_pd:
                G = H_in.mul_(N).sub_(self._S)
                Q = G @ torch.cholesky_solve(G, self._L)         # G S^{-1} G
                S = (self._S + beta * G).add_(Q + Q.mT, alpha=0.25 * beta * beta)
            else:
                S = torch.lerp(self._S, H_in.mul_(N), beta)      # (1 - beta) S + beta N H_in
            L, info = torch.linalg.cholesky_ex(S)
            if info.item() != 0:
                raise IndefinitePrecisionError(
                    f"step {self.global_step}: the updated precision S is not positive definite "
                    "(the Hessian estimate has large negative curvature); nothing was changed. "
                    "Use a smaller beta, a larger prior_precision or a smaller alpha.")
            v = g_in.add_(m, alpha=delta)
            if use_correction and w != 0.0:
                v.add_(H_corr @ (m - self._m_out), alpha=w)
            m_new = m - torch.cholesky_solve(v.unsqueeze(-1), L).squeeze(-1).mul_(lr * N)
        except BaseException:
            self.generator.set_state(gen_state)
            self._set_flat(m)
            raise
        self._S, self._L = S, L
        self._set_flat(m_new)
        self._pc["step"] += 1
        return loss

    # ------------------------------------------------------------------ inspection
    def precision(self) -> torch.Tensor:
        """A copy of the posterior precision S (d x d)."""
        return self._S.clone()

    def covariance(self) -> torch.Tensor:
        """The posterior covariance S^{-1} (d x d, new tensor)."""
        return torch.cholesky_inverse(self._L)

    # ------------------------------------------------------------------ state dict
    _STATE_TENSORS = ("S", "m_out", "S_out", "g_out", "H_out")

    def state_dict(self) -> dict:
        sd = super().state_dict()
        t = {"S": self._S, "m_out": self._m_out, "S_out": self._S_out, "g_out": self._g_out,
             "H_out": self._H_out}
        sd["hf_ivonpc"] = {
            "class": type(self).__name__,
            "dim": self.dim,
            "pc": dict(self._pc),
            "generator": self.generator.get_state(),
            **{k: (None if v is None else v.clone()) for k, v in t.items()},
        }
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by ``state_dict``, checking everything before changing anything.

        The mean is the parameters: load the model's saved parameters as well."""
        groups = state_dict.get("param_groups")
        extra = state_dict.get("hf_ivonpc")
        if groups is None or extra is None:
            raise ValueError("state_dict was not saved by VONPC (no 'param_groups' or 'hf_ivonpc')")
        if extra.get("class") != type(self).__name__:
            raise ValueError(f"state_dict was saved by {extra.get('class')}, not {type(self).__name__}")
        if extra.get("dim") != self.dim:
            raise ValueError(f"state_dict is for d={extra.get('dim')} parameters, the optimizer has "
                             f"d={self.dim}")
        if len(groups) != len(self.param_groups) or any(
                len(s["params"]) != len(g["params"]) for s, g in zip(groups, self.param_groups)):
            raise ValueError("state_dict's parameter groups do not match the optimizer's")
        for gi, group in enumerate(groups):
            _check_hparams(group, "" if gi == 0 else f"param_groups[{gi}].")
        self._check_groups_agree(groups)
        shapes = {"S": (self.dim, self.dim), "S_out": (self.dim, self.dim),
                  "H_out": (self.dim, self.dim), "m_out": (self.dim,), "g_out": (self.dim,)}
        pc = extra["pc"]
        new = {}
        for k in self._STATE_TENSORS:
            v = extra.get(k)
            if v is None and (k == "S" or pc["refreshes"] > 0):
                raise ValueError(f"state_dict has no '{k}'")
            if v is not None:
                if not isinstance(v, torch.Tensor) or tuple(v.shape) != shapes[k]:
                    raise ValueError(f"state '{k}' has shape {tuple(getattr(v, 'shape', ()))}, "
                                     f"expected {shapes[k]}")
                v = v.to(device=self._device, dtype=self._dtype).clone()
            new[k] = v
        L, info = torch.linalg.cholesky_ex(new["S"])
        L_out = None
        if new["S_out"] is not None:
            L_out, info_out = torch.linalg.cholesky_ex(new["S_out"])
            info = info + info_out
        if info.item() != 0:
            raise ValueError("state_dict's precision is not positive definite")
        for saved, group in zip(groups, self.param_groups):
            for k, v in saved.items():
                if k != "params":
                    group[k] = v
        self.generator.set_state(extra["generator"].cpu())
        self._pc = {k: int(pc[k]) for k in ("step", "refreshes", "last_refresh")}
        self._S, self._L = new["S"], L
        self._m_out, self._S_out, self._L_out = new["m_out"], new["S_out"], L_out
        self._g_out, self._H_out = new["g_out"], new["H_out"]
