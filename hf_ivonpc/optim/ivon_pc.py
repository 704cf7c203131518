"""IVON-PCM: IVON with posterior correction and outer momentum (Alg. 4 of the paper).

``rho1 = rho2 = 0`` gives IVON-PC; ``alpha = 0`` gives IVON exactly (same operations, same state
values, same draws). See ``_sampling`` for the protocol a training loop follows.
"""

from __future__ import annotations

import torch

from . import _kernels as K
from ._flat import binary_out
from .hparams import check as check_hparam
from .hparams import default as _d
from .ivon import IVON

#: the correction's hyperparameters every parameter group carries
PC_GROUP_HPARAMS = ("alpha", "rho1", "rho2", "mean_term_weight")


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

    Defaults: the project's (``hparams.HPARAMS``, the same as ``PCTrainingArguments``), which differ
    from ``IVON``'s ivon-opt-compatible ones in hess_init (1e-3), clip_radius (1e-3), weight_decay
    (0) and rescale_lr (False: ``lr`` is eta itself).

    Args (besides IVON's):
        alpha: weight of the correction (>= 0; 0 is IVON).
        rho1, rho2: outer momentum of g_out and h_out, in [0, 1] (0: always the freshest mega-batch).
        mean_term_weight: w, the weight of line 14's extra mean term (>= 0). The term multiplies a
            noisy Hessian estimate: the paper uses 0.01 for logistic regression and CNNs and 1.0
            with ``clip_radius=1e-3`` for transformers; without tight clipping weight 1 diverges.
        refresh_every: optimizer steps between refreshes (the inner-loop length m, >= 1).
        start_step: optimizer steps without correction first (no second pass, no refresh).
        shared_noise: theta_out reuses theta_in's standard-normal draw (common random numbers).
    """

    persistent_buffers = IVON.persistent_buffers + ("g_out", "h_out", "m_out", "sigma_out")
    # acc_out: the out-samples' noise x grad sum (acc_nxg_out in the kernels); in the common step
    # (see "sampling" below) the out-sample's gradient (acc_g_out), unpaired, and before it
    # theta_out where that is drawn again in fp32 state (``_write_theta_out``); in a refresh, the
    # mega-batch's noise x grad sum
    transient_buffers = IVON.transient_buffers + ("acc_out",)
    lazy_buffers = IVON.lazy_buffers + ("acc_out",)   # from the correction's start
    low_precision_buffers = IVON.low_precision_buffers + ("g_out", "h_out", "sigma_out", "acc_out")
    corrects = True

    # the project's defaults (hparams), the same as PCTrainingArguments'
    def __init__(self, params, lr: float, ess: float, hess_init: float = _d("hess_init"),
                 beta1: float = _d("beta1"), beta2: float = _d("beta2"),
                 weight_decay: float = _d("weight_decay"), mc_samples: int = 1,
                 hess_approx: str = "price", clip_radius: float = _d("clip_radius"),
                 sync: bool = False, debias: bool = True, rescale_lr: bool = _d("rescale_lr"), *,
                 alpha: float = _d("alpha"), rho1: float = _d("rho1"), rho2: float = _d("rho2"),
                 mean_term_weight: float = _d("mean_term_weight"),
                 refresh_every: int = _d("refresh_every"), start_step: int = _d("start_step"),
                 shared_noise: bool = _d("shared_noise"),
                 seed: int | None = None, generator: torch.Generator | None = None,
                 chunk_size: int | None = None, fused: bool | None = None,
                 state_dtype: torch.dtype | str = _d("state_dtype"),
                 regenerate_noise: bool | None = None):
        if hess_approx != "price":
            raise ValueError(f"hess_approx={hess_approx!r} is invalid: accepted is 'price' "
                             "(the correction needs the reparameterisation estimate)")
        super().__init__(params, lr, ess, hess_init, beta1, beta2, weight_decay, mc_samples,
                         hess_approx, clip_radius, sync, debias, rescale_lr, seed=seed,
                         generator=generator, chunk_size=chunk_size, fused=fused,
                         state_dtype=state_dtype, regenerate_noise=regenerate_noise,
                         _pc_defaults=dict(alpha=alpha, rho1=rho1, rho2=rho2,
                                           mean_term_weight=mean_term_weight),
                         refresh_every=refresh_every, start_step=start_step,
                         shared_noise=shared_noise)

    def _check_group(self, group, gi):
        super()._check_group(group, gi)
        pre = "" if gi == 0 else f"param_groups[{gi}]."
        for name in PC_GROUP_HPARAMS:
            check_hparam(name, group[name], pre + name)

    def _synced_buffers(self):
        return ("acc_g", "acc_nxg", "acc_out")

    def _refresh_buffers(self):
        return ("acc_g", "acc_out")

    # ------------------------------------------------------------------ sampling
    # The common step (one in- and one out-sample, shared noise) pairs neither sample with its noise
    # when it is collected: the in-sample's gradient stays in acc_g (as IVON's does) and the
    # out-sample's goes to acc_out (``_write_theta_out`` says where theta_out is formed); the noise
    # buffer keeps theta_in's noise (theta_out's is that times sqrt(ess (h + wd)) sigma_out), and
    # the update forms both products in its loop. Another sample, a sync or a draw before the step
    # pairs them first (``pc_pair_first``), as the collections of later samples do.
    def _unpaired(self, gi: int) -> bool:
        """Whether group gi's in-sample waits unpaired (IVON's lazy collection) and its
        out-sample may wait too (shared noise, no sync): before the out collection, the out draw
        forms theta_out from theta_in's normals (``_write_theta_out``); after it
        (``_count["out"]`` is 1), acc_out holds the out-sample's gradient, unpaired."""
        return self.shared_noise and not self.sync and self._nxg_pending[gi]

    def _materialize_nxg(self, groups=None) -> None:
        for gi in range(len(self.param_groups)):
            if self._unpaired(gi) and self._count["out"] and (groups is None or gi in groups):
                group, flat = self.param_groups[gi], self._flat[gi]
                self._run(K.pc_pair_first, {n: flat[n] for n in (
                    "acc_g", "acc_out", "acc_nxg", "hess", "sigma_out")} | {"noise": self._noise(gi)},
                    [group["ess"], group["weight_decay"], group["alpha"]])
                self._nxg_pending[gi] = False
        super()._materialize_nxg(groups)

    def _correction_buffers(self, gi: int) -> dict[str, torch.Tensor]:
        flat = self._flat[gi]
        return {n: flat[n] for n in ("g_out", "h_out", "m_out", "sigma_out")} | {
            "acc_g_out" if self._unpaired(gi) else "acc_nxg_out": flat["acc_out"]}

    def _draw(self, at: str) -> None:
        if at != "out":
            return super()._draw(at)
        for gi, group in enumerate(self.param_groups):
            # the step's first out-sample, its in-sample unpaired: theta_out from theta_in's normals
            lazy = self._unpaired(gi) and self._count["out"] == 0
            flat = self._flat[gi]
            if lazy:
                self._write_theta_out(gi, group, flat)
                continue
            self._materialize_nxg([gi])   # acc_g is about to receive the outer gradients
            if self.shared_noise:   # the key of the theta_in draw
                self._draws[gi] = ("out", self._draws[gi][1])
                noise = self._noise(gi, fresh=True)
            else:
                noise = self._draw_noise(gi, group, "out")
            binary_out(torch.add, self._params(gi), self._views[gi]["m_out"], self._split(gi, noise))
        # the noise now is theta_out - m_out (or theta_in - m where theta_out was formed from it)
        self._last_draw = "out"

    def _write_theta_out(self, gi: int, group: dict, flat) -> None:
        """parameters <- theta_out = m_out + eps sigma_out with theta_in's standard normals eps,
        which the noise buffer keeps (each parameter written by the kernel itself) or its key
        draws again (into acc_out, which receives the out-sample's gradient next, then copied;
        into a temporary where acc_out is bf16 and cannot hold theta_out)."""
        sc = [group["ess"], group["weight_decay"]]
        names = ("m_out", "hess", "sigma_out")
        key = self._draws[gi][1]
        if self._regenerates(key):   # the noise drawn again in the loop, over the whole buffer
            theta = flat["acc_out"]
            if theta.dtype != flat["mean"].dtype:
                theta = torch.empty_like(flat["mean"])
            self._run(K.pc_theta_out, {"theta": theta} | {n: flat[n] for n in names}, sc,
                      counter=key)
            torch._foreach_copy_(self._params(gi), self._split(gi, theta))
            return
        views = {n: self._views[gi][n] for n in names} | {"noise": self._split(gi, self._noise(gi))}
        for i, p in enumerate(self._params(gi)):
            theta = p if p.is_contiguous() else p.contiguous()   # then written back below
            self._run(K.pc_theta_out, {"theta": theta.view(-1)} |
                      {n: v[i].view(-1) for n, v in views.items()}, sc)
            if theta is not p:
                p.copy_(theta)

    def _fill_noise(self, gi, group, buf, at, key):
        """theta_out's noise: eps sigma_out, with theta_in's eps when shared."""
        if at != "out":
            return super()._fill_noise(gi, group, buf, at, key)
        flat = self._flat[gi]
        if self.shared_noise and not self._regenerates(key):
            # eps = noise / sigma_in, kept in the buffer: noise <- eps sigma_out (no new draw)
            self._run(K.ivon_noise_to_out, {"noise": buf, "hess": flat["hess"],
                                            "sigma_out": flat["sigma_out"]},
                      [group["ess"], group["weight_decay"]])
        elif key is not None:
            self._run(K.ivon_draw_noise_out, {"noise": buf, "hess": flat["hess"],
                                              "sigma_out": flat["sigma_out"]},
                      [group["ess"], group["weight_decay"]], counter=key)
        else:
            self._draw_standard_normal(buf)
            buf.mul_(flat["sigma_out"])

    def _collect(self, gi, group, at, grads, idx):
        if at == "mega":   # the mega-batch's noise x grad sum in acc_out, free between steps
            self._acc(gi, "acc_g", idx, grads)
            self._acc(gi, "acc_out", idx, self._noise_views(gi, idx), grads)
            return
        if at != "out":
            return super()._collect(gi, group, at, grads, idx)
        # diagnostics from the first micro-batch of the step, when it is alone in the buffers
        track = (self.track_diagnostics and self._count["in"] == 1 and self._count["out"] == 0
                 and group["step"] > 0 and len(idx) == len(group["params"]))
        flat = self._flat[gi]
        lazy = self._unpaired(gi) and self._count["out"] == 0   # as its draw was
        pairs = {"noise": self._noise(gi)} if lazy and track else {}
        if track:
            sc = [group["weight_decay"], group["ess"],
                  1.0 / (1.0 - group["beta1"] ** group["step"]) if self.debias else 1.0]
            names = ("acc_g", "hess", "momentum", "h_out") + (() if lazy else ("acc_nxg",))
            self._run(K.pc_stats_plain, {n: flat[n] for n in names} | pairs, sc,
                      out=self._diag_raw[:4])
        if lazy:
            self._acc(gi, "acc_out", idx, grads)
        else:
            self._acc(gi, "acc_g", idx, grads, alpha=-group["alpha"])
            self._acc(gi, "acc_out", idx, self._noise_views(gi, idx), grads)
        if track:
            names = ("acc_g", "hess", "sigma_out", "momentum", "g_out", "h_out") + (
                () if lazy else ("acc_nxg",))
            pairs[("acc_g_out" if lazy else "acc_nxg_out")] = flat["acc_out"]
            self._run(K.pc_stats_corrected, {n: flat[n] for n in names} | pairs,
                      sc + [group["alpha"]], out=self._diag_raw[4:])
            self._diag_raw_ready = True

    # ------------------------------------------------------------------ outer loop
    def _finish_refresh(self, gi, group, flat, first):
        names = ["mean", "hess", "acc_g", "g_out", "h_out", "m_out", "sigma_out"]
        tensors = {n: flat[n] for n in names} | {"acc_nxg": flat["acc_out"]}
        if self.low_precision:   # the last mega draw's noise rounds g_out and h_out
            tensors["bits"] = self._noise(gi)
        self._run(K.ivon_refresh, tensors,
                  [1.0 / self._count["mega"], group["ess"], group["weight_decay"], group["rho1"],
                   1.0 - group["rho1"], group["rho2"], 1.0 - group["rho2"]], first=first)
        if self.track_diagnostics:
            self._diag_h_out_negative += (flat["h_out"] < 0).sum(dtype=torch.float64)
            self._diag_counts[1] += flat["h_out"].numel()
        self._last_mega = self._count["mega"]

    def _before_update(self) -> None:
        if self._diag_raw_ready:
            self._diag_in_per_step = self._count["in"]
        super()._before_update()

    def diagnostics(self) -> dict[str, float]:
        """IVON's diagnostics, and ``window_var_ratio``: the corrected gradient's noise summed over
        a refresh window of m steps, over the plain one's. The mega-batch's own error (variance
        Var/K for a mega-batch of K mini-batches) enters every step of the window alike, so it adds
        alpha^2 m / K to ``grad_var_ratio``: the correction pays while the sum is below 1 (with
        alpha = 1 and m = K it cannot). Exact for rho1 = 0; outer momentum lowers the added term."""
        out = super().diagnostics()
        k, mega = getattr(self, "_diag_in_per_step", None), getattr(self, "_last_mega", None)
        if "grad_var_ratio" in out and k and mega:
            alpha = self.param_groups[0]["alpha"]
            out["window_var_ratio"] = out["grad_var_ratio"] + alpha ** 2 * self.refresh_every * k / mega
        return out
