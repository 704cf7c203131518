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

from . import _kernels as K
from ._base import FlatStateOptimizer
from ._checks import check_arg, check_flag, check_int_min, check_positive
from .hparams import check as check_hparam
from .hparams import default

#: the hyperparameters every parameter group carries (checked per group)
GROUP_HPARAMS = ("hess_init", "beta1", "beta2", "weight_decay", "clip_radius")


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
        fused: compile the element-wise updates with ``torch.compile`` into one loop over memory
            (True: always; None: for groups of >= 65536 elements, falling back to eager chunks
            with a warning if compilation fails; False: never).
        chunk_size: elements per chunk of the eager update (default: 65536 on CPU, 2^24 on GPU).
        state_dtype: ``"float32"`` (default) or ``"bfloat16"`` (``torch.bfloat16``):
            momentum, h and the per-step gradient statistics (and IVONPC's g_out, h_out and
            sigma_out) in bf16, computed in fp32; momentum, h and the outer statistics are written
            with stochastic rounding. The mean and the noise stay fp32. IVON keeps 14 instead of
            20 bytes per parameter, IVONPC 26 instead of 40 (10 and 22 with ``regenerate_noise``).
        regenerate_noise: for groups of at least ``_random.COUNTER_MIN`` (2^20) elements, whose
            noise comes from the counter-based generator: draw the noise again from its key
            wherever a step needs it (the collection, the update) instead of keeping it in a
            buffer from the draw to the step: 4 bytes per parameter less (a model-sized temporary
            exists only within the draw, a collection or the update, never during the forward
            and backward passes), for one more draw per use. None (default): on accelerators,
            where drawing costs less than storing and reading back; not on CPU, where the draws
            and the temporaries' page faults make IVON's step about 1.5x slower. The numbers are
            the same either way (the same expressions from the same counters; bit for bit on
            the CPUs tested, within a few ulps wherever a CPU vectorizes two kernels differently).
    """

    persistent_buffers = ("mean", "momentum", "hess")
    transient_buffers = ("noise", "acc_g", "acc_nxg")
    # a step's only in-sample pairs noise and gradient inside the update: acc_nxg is needed only
    # with several in-samples per step, sync or gradsq (see ``_collect``, and IVONPC's); the
    # noise buffer is not needed by groups that regenerate their noise
    lazy_buffers = ("noise", "acc_nxg")
    low_precision_buffers = ("momentum", "hess", "acc_g", "acc_nxg")

    # ivon-opt 0.1.3's defaults (a drop-in replacement); IVONPC and PCTrainer use the project's
    def __init__(self, params, lr: float, ess: float,
                 hess_init: float = default("hess_init", ivon_opt=True),
                 beta1: float = default("beta1", ivon_opt=True),
                 beta2: float = default("beta2", ivon_opt=True),
                 weight_decay: float = default("weight_decay", ivon_opt=True), mc_samples: int = 1,
                 hess_approx: str = "price",
                 clip_radius: float = default("clip_radius", ivon_opt=True), sync: bool = False,
                 debias: bool = True, rescale_lr: bool = default("rescale_lr", ivon_opt=True), *,
                 seed: int | None = None,
                 generator: torch.Generator | None = None, chunk_size: int | None = None,
                 fused: bool | None = None,
                 state_dtype: torch.dtype | str = default("state_dtype", ivon_opt=True),
                 regenerate_noise: bool | None = None,
                 _pc_defaults: dict | None = None, **pc_kwargs):
        check_int_min("mc_samples", mc_samples, 1)
        check_flag("regenerate_noise", regenerate_noise, allow_none=True)
        check_flag("sync", sync)
        check_flag("debias", debias)
        check_hparam("rescale_lr", rescale_lr)
        check_arg("hess_approx", hess_approx, hess_approx in ("price", "gradsq"), "'price' or 'gradsq'")
        defaults = dict(lr=lr, ess=ess, hess_init=hess_init, beta1=beta1, beta2=beta2,
                        weight_decay=weight_decay, clip_radius=clip_radius, mc_samples=mc_samples)
        defaults.update(_pc_defaults or {})
        self.hess_approx = hess_approx
        self.debias = debias
        self.rescale_lr = rescale_lr
        self.mc_samples = mc_samples
        self.regenerate_noise = regenerate_noise
        #: per group, (key, (ess, weight_decay)) of the noise the last step drew ahead into the
        #: group's buffer (see ``_peek_next_keys``)
        self._ahead: dict[int, tuple] = {}
        super().__init__(params, defaults, seed=seed, generator=generator, chunk_size=chunk_size,
                         fused=fused, state_dtype=state_dtype, **pc_kwargs)
        self.sync = sync
        #: compute what ``diagnostics()`` reports (a few reductions per step, no extra pass of the
        #: model); off by default, on in PCTrainer unless ``pc_log_diagnostics=False``
        self.track_diagnostics = False
        self._reset_diagnostics()

    def _check_group(self, group: dict, gi: int) -> None:
        pre = "" if gi == 0 else f"param_groups[{gi}]."
        check_positive(pre + "lr", group["lr"])
        for name in ("ess",) + GROUP_HPARAMS:
            check_hparam(name, group[name], pre + name)

    def _init_state(self, group, flat):
        flat["hess"].fill_(group["hess_init"])

    # ------------------------------------------------------------------ sampling
    def _regenerates(self, key: torch.Tensor | None) -> bool:
        """Whether a draw with this counter key is drawn again where needed (not kept)."""
        if key is None:
            return False
        if self.regenerate_noise is None:
            return self._device.type != "cpu"
        return self.regenerate_noise

    def _noise(self, gi: int, fresh: bool = False) -> torch.Tensor:
        """Group ``gi``'s noise of its last draw (theta - center), flat: the noise buffer (drawn
        into it when ``fresh``), or, when the group regenerates its noise, drawn again from the
        draw's key into a temporary."""
        at, key = self._draws[gi]
        flat = self._flat[gi]
        if self._regenerates(key):
            buf = torch.empty_like(flat["mean"])
        elif fresh:
            buf = flat["noise"]
        else:
            return flat["noise"]
        self._fill_noise(gi, self.param_groups[gi], buf, at, key)
        return buf

    def _noise_views(self, gi: int, idx: list[int]) -> list[torch.Tensor]:
        views = self._split(gi, self._noise(gi))
        return views if len(idx) == len(views) else [views[i] for i in idx]

    def _fill_noise(self, gi: int, group: dict, buf: torch.Tensor, at: str,
                    key: torch.Tensor | None) -> None:
        """buf <- N(0, I) / sqrt(ess (h + wd)) (drawn in the same pass for large groups)."""
        tensors = {"noise": buf, "hess": self._flat[gi]["hess"]}
        sc = [group["ess"], group["weight_decay"]]
        if key is not None:
            self._run(K.ivon_draw_noise, tensors, sc, counter=key)
            return
        self._draw_standard_normal(buf)
        self._run(K.ivon_scale_noise, tensors, sc)

    def _draw_noise(self, gi: int, group: dict, at: str = "in") -> torch.Tensor:
        """A fresh draw of group ``gi``'s noise (recorded for the step), flat."""
        key = self._noise_key(self._flat[gi]["mean"])
        self._draws[gi] = (at, key)
        if at in ("in", "mega") and self._drawn_ahead(gi, group, key):
            return self._flat[gi]["noise"]
        self._ahead.pop(gi, None)
        return self._noise(gi, fresh=True)

    def _draw(self, at: str) -> None:
        self._materialize_nxg()
        for gi, group in enumerate(self.param_groups):
            torch._foreach_add_(self._params(gi), self._split(gi, self._draw_noise(gi, group, at)))

    # ------------------------------------------------------------------ drawing ahead
    # On CPU, a group that keeps its counter-based noise has the next draw's noise written by the
    # update's loop (where the draw's arithmetic overlaps the update's memory traffic, and costs no
    # pass of its own): the step peeks at the key the next draw will take from the generator (and
    # sets the generator back), and the draw itself still takes its key then; it uses the buffer
    # as it is if the key and the noise's ess and weight_decay are the ones the step drew with,
    # and draws afresh otherwise (another generator, someone else's draw in between, a changed
    # ess). The generator is used exactly as without it, so the numbers, the state_dict and a
    # resumed run are the same.
    def _peek_next_keys(self) -> dict[int, torch.Tensor]:
        """The keys the next draw will take, for the leading groups that draw ahead."""
        if self._device.type != "cpu":   # comparing keys there would synchronize
            return {}
        state, keys = self.generator.get_state(), {}
        for gi, flat in enumerate(self._flat):
            key = self._noise_key(flat["mean"])   # None (and nothing drawn): filled by normal_
            if key is None or self._regenerates(key):
                break   # a later group's key depends on what this one's draw will consume
            keys[gi] = key
        self.generator.set_state(state)
        return keys

    def _after_load(self) -> None:
        super()._after_load()
        self._ahead = {}   # drawn with the h before the load

    def _drawn_ahead(self, gi: int, group: dict, key: torch.Tensor | None) -> bool:
        """Whether the noise buffer holds this draw's noise already (see above)."""
        ahead = self._ahead.pop(gi, None)
        return (ahead is not None and key is not None and torch.equal(ahead[0], key)
                and ahead[1] == (group["ess"], group["weight_decay"]))

    def _collect(self, gi, group, at, grads, idx):
        # A step's first and only in-sample (the common case) leaves noise x grad unformed: the
        # update kernel forms it from `noise` and `acc_g` (one pass over memory less). It is
        # formed here if anything else comes first (another draw, a sync).
        lazy = (at == "in" and self.hess_approx == "price" and "acc_g" not in self._written[gi]
                and len(idx) == len(group["params"]))
        self._acc(gi, "acc_g", idx, grads)
        if lazy:
            self._written[gi].add("acc_nxg")
            self._nxg_pending[gi] = True
        elif self.hess_approx == "price":
            self._acc(gi, "acc_nxg", idx, self._noise_views(gi, idx), grads)
        else:
            self._acc(gi, "acc_nxg", idx, grads, grads)

    def _reset_accumulators(self) -> None:
        super()._reset_accumulators()
        self._nxg_pending = [False] * len(self.param_groups)
        #: per group, the role and counter key of the last draw of the step (None before one)
        self._draws: list[tuple[str, torch.Tensor | None] | None] = [None] * len(self.param_groups)

    def _forget_step(self) -> None:
        super()._forget_step()
        self._ahead = {}   # the skipped step's draws may have overwritten the noise drawn ahead
        self._diag_raw.zero_()
        self._diag_raw_ready = False

    def _materialize_nxg(self, groups: list[int] | None = None) -> None:
        """Form the noise x grad products left to the update (of ``groups``; None: all)."""
        for gi, pending in enumerate(self._nxg_pending):
            if pending and (groups is None or gi in groups):
                flat = self._flat[gi]
                key = self._draws[gi][1]
                if self._regenerates(key):   # the noise drawn again in the product's loop
                    group = self.param_groups[gi]
                    self._run(K.ivon_nxg_drawing, {"out": flat["acc_nxg"], "hess": flat["hess"],
                                                   "grad": flat["acc_g"]},
                              [group["ess"], group["weight_decay"]], counter=key)
                else:
                    self._run(K.product, {"out": flat["acc_nxg"], "a": self._noise(gi),
                                          "b": flat["acc_g"]}, [])
                self._nxg_pending[gi] = False

    def _all_reduce(self, names) -> None:
        if self.sync:
            self._materialize_nxg()
        super()._all_reduce(names)

    def _synced_buffers(self) -> tuple[str, ...]:
        return ("acc_g", "acc_nxg")

    def _refresh_buffers(self) -> tuple[str, ...]:
        return ("acc_g", "acc_nxg")

    # ------------------------------------------------------------------ update
    def _correction_buffers(self, gi: int) -> dict[str, torch.Tensor]:
        """The buffers the update of group ``gi`` reads for the correction, by the update
        kernel's names (IVONPC)."""
        raise NotImplementedError

    def _step_size(self, group: dict) -> float:
        lr = group["lr"]
        return lr * (group["hess_init"] + group["weight_decay"]) if self.rescale_lr else lr

    def _before_update(self) -> None:
        super()._before_update()
        if self._diag_raw_ready:   # one micro-batch's sums, scaled to the step it is a part of
            c = float(self._count["in"]) if self.grad_reduction == "sum" else 1.0
            self._diag_var[:4] += K.variances_from_stats(self._diag_raw, c)
            self._diag_var[4] += 1
            self._diag_raw.zero_()
            self._diag_raw_ready = False

    def _update(self, flat, group, k, use_correction, ranges):
        b1, b2 = group["beta1"], group["beta2"]
        r = group["clip_radius"]
        a = group.get("alpha", 0.0)
        scalars = [1.0 / k, b1, 1.0 - b1, b2, 1.0 - b2, 0.5 * (1.0 - b2) ** 2,
                   group["weight_decay"], group["ess"] / k,
                   1.0 - b1 ** group["step"] if self.debias else 1.0, self._step_size(group),
                   r if r != float("inf") else 0.0, a, a * group.get("mean_term_weight", 0.0)]
        names = ["mean", "momentum", "hess", "acc_g"]
        gi = next(i for i, f in enumerate(self._flat) if f is flat)
        pending = self._nxg_pending[gi]
        if not pending:
            names.append("acc_nxg")
        tensors = {n: flat[n] for n in names}
        if use_correction:
            tensors.update(self._correction_buffers(gi))
        clip = r != float("inf")
        track = self.track_diagnostics and clip
        if track:
            self._diag_counts[0] += sum(sl.stop - sl.start for sl in ranges)
        flags = dict(price=self.hess_approx == "price", clip=clip,
                     mean_term=use_correction and group.get("mean_term_weight", 0.0) != 0.0,
                     clipped=self._diag_clipped if track else None)
        key = self._draws[gi][1]
        if gi == 0:
            self._ahead = {g: (k, None) for g, k in self._peek_next_keys().items()}
        full = ranges == [slice(0, flat["mean"].numel())]
        if pending and self._regenerates(key) and full:
            # the noise is drawn again inside the update's loop (no temporary, no pass)
            self._run(K.ivon_update_drawing, tensors, scalars + [group["ess"]], counter=key,
                      low_bits=self.low_precision, **flags)
            return
        if gi in self._ahead and full:
            # the next draw's noise written in the update's loop, into the buffer that the update
            # reads this step's noise from
            next_key = self._ahead[gi][0]
            tensors["noise"] = flat["noise"]
            self._run(K.ivon_update_drawing, tensors, scalars + [group["ess"]], counter=next_key,
                      ahead=True, read_noise=bool(pending), low_bits=self.low_precision, **flags)
            self._ahead[gi] = (next_key, (group["ess"], group["weight_decay"]))
            return
        self._ahead.pop(gi, None)
        if pending or self.low_precision:
            noise = self._noise(gi)
            if pending:
                tensors["noise"] = noise
            if self.low_precision:   # the noise's low mantissa bits round the bf16 buffers
                tensors["bits"] = noise
        self._run(K.ivon_update, tensors, scalars, ranges, **flags)

    # ------------------------------------------------------------------ diagnostics
    def _reset_diagnostics(self) -> None:
        f64 = dict(dtype=torch.float64, device=self._device)
        #: summed over the steps since the last ``diagnostics()``: the variances of the plain and
        #: corrected gradient and Hessian estimates, and the number of steps they come from
        self._diag_var = torch.zeros(5, **f64)
        #: the sums of one micro-batch of the current step (``_kernels.pc_stats_*``)
        self._diag_raw = torch.zeros(14, **f64)
        self._diag_raw_ready = False
        self._diag_clipped = torch.zeros(1, **f64)     # coordinates clipped
        self._diag_h_out_negative = torch.zeros(1, **f64)
        self._diag_counts = [0, 0]                    # coordinates updated, h_out entries

    def rebind_params(self) -> None:
        super().rebind_params()
        self._reset_diagnostics()   # on the shards' device

    @torch.no_grad()
    def diagnostics(self) -> dict[str, float]:
        """What the optimizer measured since the last call (then reset), for logging:

        - ``grad_var_ratio``: variance of the corrected gradient estimate over that of the plain
          one, summed over coordinates (1: the correction removes nothing; < 1: a gain; > 1: it
          adds variance). ``hess_var_ratio``: the same for the Hessian estimate. From one
          micro-batch per corrected step, with no extra evaluation of the model (see
          ``_kernels.pc_stats_plain``); ``var_steps`` says how many steps they average.
        - ``clipped_share``: share of coordinate updates that hit ``clip_radius``.
        - ``h_out_negative_share``: share of negative entries of h_out at the refreshes.

        Only what was measured is returned (nothing while ``track_diagnostics`` is False).
        Collective when the parameters are sharded or ``sync`` is set: every rank must call it."""
        var = self._diag_var.clone()
        counts = torch.cat([self._diag_clipped, self._diag_h_out_negative,
                            torch.tensor(self._diag_counts, dtype=torch.float64, device=self._device)])
        if self._shard_group is not None:   # the sums of every rank's shards
            torch.distributed.all_reduce(var, group=self._shard_group)
            torch.distributed.all_reduce(counts, group=self._shard_group)
            var[4] /= torch.distributed.get_world_size(self._shard_group)
        elif self.sync and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(var)   # each rank measured its own micro-batches
            var /= torch.distributed.get_world_size()
        self._reset_diagnostics()
        vx, vy, hx, hy, n = var.tolist()
        clipped, negative, updated, entries = counts.tolist()
        out: dict[str, float] = {}
        if n > 0:
            out.update(grad_var_ratio=vy / vx if vx > 0 else float("nan"),
                       hess_var_ratio=hy / hx if hx > 0 else float("nan"), var_steps=n)
        if updated > 0:
            out["clipped_share"] = clipped / updated
        if entries > 0:
            out["h_out_negative_share"] = negative / entries
        return out

    # ------------------------------------------------------------------ inspection
    @property
    def low_precision(self) -> bool:
        """Whether the ``low_precision_buffers`` are kept in bf16 (``state_dtype``)."""
        return self._state_dtype != self._dtype

    @torch.no_grad()
    def posterior_std(self) -> list[torch.Tensor]:
        """sigma = 1 / sqrt(ess (h + weight_decay)) per parameter (new tensors)."""
        return [sigma_from_hess(h, group) for gi, group in enumerate(self.param_groups)
                for h in self._views[gi]["hess"]]


def sigma_from_hess(h: torch.Tensor, group: dict) -> torch.Tensor:
    """sigma = 1 / sqrt(ess (h + weight_decay)) for a parameter of ``group`` (a new tensor; fp32
    for an h kept in bf16)."""
    if h.dtype in (torch.bfloat16, torch.float16):
        h = h.float()
    return h.add(group["weight_decay"]).mul_(group["ess"]).rsqrt_()
