"""The protocol of the flat-state optimizers: sample, collect, refresh, step.

The protocol of posterior correction, shared by IVON-PCM and the SVRG family::

    if opt.needs_refresh:                      # every `refresh_every` steps from `start_step`
        with opt.refreshing():                 # outer statistics from a mega-batch
            for mb in megabatch:               # each micro-batch gets its own draw
                with opt.sampled_params(train=True, at="mega"):
                    loss(mb).backward()
    with opt.sampled_params(train=True):       # theta_in ~ q_in
        loss(batch).backward()
    if opt.correction_active:
        with opt.sampled_params(train=True, at="out"):   # theta_out ~ q_out
            loss(batch).backward()
    opt.step()

Leaving a ``sampled_params(train=True)`` block *consumes* the gradients: they are added to the
optimizer's accumulators and ``p.grad`` is set to ``None``, so the next pass starts clean.
Parameters whose ``grad`` is None are skipped: their mean and state stay as they are.

Non-finite gradients (a NaN or inf loss, a bf16 overflow) never reach the state. Each collection
checks one number of the gradients it takes (the clipping norm where ``max_grad_norm`` is set, no
extra pass; otherwise the sum of each gradient tensor). ``step()`` then skips a step whose
theta_in or theta_out gradients were not finite, and the end of ``refreshing()`` discards a
mega-batch with a non-finite micro-batch: the mean, h, the momentum, the outer statistics and the
generator stay as they were before the step's (the refresh's) first draw, so what follows is
what a run without that step (refresh) computes. A discarded refresh keeps the previous outer
statistics (before the first refresh, the correction waits for the next good one). The counts are
in ``counters`` (``skipped_steps``, ``skipped_refreshes``, ``consecutive_skips``), and
``max_skipped_steps`` consecutive skips raise a ``NonFiniteError`` naming the step and the pass.
The ranks that share a step agree: with sharded parameters (FSDP) and with ``sync`` (each rank
collects its own micro-batches, as PCTrainer's DDP runs do) the flags are summed over the ranks
before the decision; under DDP without ``sync`` the gradients are all-reduced, so every rank sees
the same ones.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ._checks import check_arg, check_positive
from ._flat import binary_out
from ._sharding import average_over_ranks, distributed, global_norm, local
from .hparams import BY_FIELD

SAMPLE_ROLES = ("in", "out", "mega")
#: how an error names the pass of each role
PASS_NAMES = {"in": "theta_in", "out": "theta_out", "mega": "refresh (mega-batch)"}


class NonFiniteError(RuntimeError):
    """Too many consecutive steps (and refreshes) skipped for non-finite gradients."""


class SamplingProtocol:
    """``sampled_params``, ``refreshing`` and ``step`` over the flat buffers (see the module).

    Subclasses implement ``_draw``, ``_collect``, ``_finish_refresh`` and ``_update``."""

    #: whether the method has an outer loop (posterior correction / SVRG)
    corrects: bool = False
    #: consecutive skipped steps and refreshes (non-finite gradients) after which a
    #: ``NonFiniteError`` is raised (``pc_max_skipped_steps`` in PCTrainer)
    max_skipped_steps: int = BY_FIELD["pc_max_skipped_steps"].default

    @property
    def collected(self) -> int:
        """Micro-batches evaluated at theta_in since the last step."""
        return self._count["in"]

    @property
    def correction_enabled(self) -> bool:
        return self.corrects and any(g.get("alpha", 0.0) > 0 for g in self.param_groups)

    def _reset_accumulators(self) -> None:
        self._count = {r: 0 for r in SAMPLE_ROLES}
        #: per role, whether a collected gradient was not finite (a tensor: no synchronization)
        self._nonfinite = torch.zeros(len(SAMPLE_ROLES), dtype=torch.float32, device=self._device)
        #: the generator's state before the first draw of the step (or refresh), restored when it
        #: is skipped
        self._rng_before: torch.Tensor | None = None
        self._in_clip_scales: list[torch.Tensor] = []
        self._seen = [[False] * len(g["params"]) for g in self.param_groups]
        self._written = [set() for _ in self.param_groups]

    # ------------------------------------------------------------------ sampling
    @contextmanager
    def sampled_params(self, train: bool = False, at: str = "in"):
        """Replace the parameters by a draw from the posterior for the duration of the block.

        ``at="in"`` draws theta_in ~ q_in (the current posterior); ``at="out"`` draws theta_out ~ q_out
        (the snapshot of the last refresh; with ``shared_noise`` it reuses the noise of the last
        ``"in"`` draw); ``at="mega"`` draws a fresh theta ~ q_in for a micro-batch of the mega-batch
        (only inside ``refreshing()``). With ``train=True`` the gradients left in ``p.grad`` are
        collected on exit and consumed. The parameters are restored on exit, also on an exception
        (then nothing is collected; after an exception at theta_out, whose mini-batch cannot be
        paired any more, the whole step's collection is dropped and the next pass starts the
        step afresh).
        """
        check_arg("at", at, at in SAMPLE_ROLES, f"one of {SAMPLE_ROLES}")
        if self._sampling is not None:
            raise RuntimeError("sampled_params blocks cannot be nested")
        if at == "mega" and not self._refreshing:
            raise RuntimeError('sampled_params(at="mega") is only valid inside refreshing()')
        if at != "mega" and self._refreshing:
            raise RuntimeError(f'sampled_params(at="{at}") inside refreshing(): use at="mega"')
        if at == "out" and not self.correction_active:
            raise RuntimeError('sampled_params(at="out") before any refresh: '
                               "check `correction_active` first")
        if at == "out" and self.shared_noise and self._last_draw != "in":
            raise RuntimeError('with shared_noise, sampled_params(at="out") must follow the '
                               'at="in" pass of the same mini-batch')
        self._sync_mean()
        if self._rng_before is None:
            self._rng_before = self.generator.get_state()
        with torch.no_grad():
            self._draw(at)
            self._record_param_versions()
        self._last_draw = at
        self._sampling = at
        try:
            yield
        except BaseException:
            self._sampling = None
            self._write_params()
            if at == "out":
                self._reset_accumulators()
                self._last_draw = None
            raise
        self._sampling = None
        try:
            if train:
                with torch.no_grad():
                    self._collect_role(at)
        finally:
            self._write_params()

    def _collect_role(self, at: str) -> None:
        norm = self._clip_grads(at)
        self._check_finite(at, norm)
        for gi, group in enumerate(self.param_groups):
            idx = [i for i, p in enumerate(group["params"]) if p.grad is not None]
            if not idx:
                continue
            grads = [local(group["params"][i].grad) for i in idx]
            if any(g.is_sparse for g in grads):
                raise ValueError("sparse gradients are not supported")
            if grads[0].dtype != self._dtype:
                grads = [g.to(self._dtype) for g in grads]
            self._collect(gi, group, at, grads, idx)
            if at == "in":
                for i in idx:
                    self._seen[gi][i] = True
            for i in idx:
                group["params"][i].grad = None
        self._count[at] += 1

    def _grads(self) -> list[torch.Tensor]:
        return [local(p.grad) for g in self.param_groups for p in g["params"] if p.grad is not None]

    def _grad_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """The norm of the whole gradient, from every rank's shards when sharded."""
        norms = torch.stack([n.to(self._dtype) for n in torch._foreach_norm(grads)])
        return global_norm(norms, self._shard_group)

    def _clip_grads(self, at: str) -> torch.Tensor | None:
        """Scale the gradients to ``max_grad_norm``. The theta_out pass of a mini-batch takes the
        factor of its theta_in pass (in order, when several are collected), so that the two
        gradients keep their common part and their difference cancels where it should. Returns
        the norm it computed (None where it computed none)."""
        if self.max_grad_norm is None:
            return None
        check_positive("max_grad_norm", self.max_grad_norm)
        grads = self._grads()
        if not grads:
            return None
        norm = None
        if at == "out" and self._in_clip_scales:
            scale = self._in_clip_scales.pop(0)
        else:
            norm = self._grad_norm(grads)
            scale = (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
            if at == "in":
                self.last_grad_norm = norm
                self._in_clip_scales.append(scale)
        torch._foreach_mul_(grads, scale.to(grads[0].dtype))
        return norm

    def _check_finite(self, at: str, norm: torch.Tensor | None) -> None:
        """Record whether the gradients collected now are finite: the clipping norm is, where
        there is one (no extra pass), else the sum of their entries is (one reduction per tensor,
        about 4x cheaper on CPU than a norm). Either is finite exactly when every entry is, short
        of an overflow beyond 3e38, which no trainable gradient reaches (and which is skipped
        too). Each rank sums its own shards: the flags are combined over ranks at the step."""
        if norm is None:
            grads = self._grads()
            if not grads:
                return
            norm = torch.stack([g.sum(dtype=self._dtype) for g in grads]).sum()
        i = SAMPLE_ROLES.index(at)
        self._nonfinite[i:i + 1].add_((~torch.isfinite(norm)).to(self._nonfinite.dtype).reshape(1))

    def _nonfinite_passes(self) -> list[str]:
        """The roles whose collected gradients were not finite, on any rank that shares the step
        (one all-reduce of three numbers over the shard group, or over all ranks with ``sync``,
        where each rank collects its own micro-batches; with DDP's all-reduced gradients and no
        ``sync`` every rank sees the same gradients, so the same flags). The step's one
        synchronization."""
        flags = self._nonfinite
        if self._shard_group is not None:
            flags = flags.clone()
            torch.distributed.all_reduce(flags, group=self._shard_group)
        elif self.sync and distributed():
            flags = flags.clone()
            torch.distributed.all_reduce(flags)
        return [r for r, f in zip(SAMPLE_ROLES, flags.tolist()) if f > 0]

    def _skip(self, what: str, passes: list[str]) -> None:
        """Drop what was collected, set the generator back to before the first draw, count the
        skip, and raise once ``max_skipped_steps`` skips follow each other."""
        if self._rng_before is not None:
            self.generator.set_state(self._rng_before)
        self._forget_step()
        self._pc["skipped_" + what] += 1
        self._pc["consecutive_skips"] += 1
        n = self._pc["consecutive_skips"]
        if n >= self.max_skipped_steps:
            step = self._pc["step"] + 1
            raise NonFiniteError(
                f"{n} consecutive optimizer steps and refreshes were skipped for non-finite "
                f"gradients (max_skipped_steps={self.max_skipped_steps}; pc_max_skipped_steps in "
                f"PCTrainingArguments); the last one, at step {step}, in the "
                f"{' and '.join(PASS_NAMES[p] for p in passes)} pass. The state is that of "
                f"step {step - 1}: look for NaN or inf in the data or the loss, or lower the "
                f"learning rate")

    def _forget_step(self) -> None:
        """Drop the collected statistics of a skipped step or refresh (subclasses also drop what
        they measured from them)."""
        self._reset_accumulators()
        self._last_draw = None

    def _acc(self, gi: int, name: str, idx: list[int], src: list[torch.Tensor],
             other: list[torch.Tensor] | None = None, alpha: float = 1.0) -> None:
        """Accumulator ``name`` (+)= alpha * src (* other): the first write of a step overwrites.

        A bf16 accumulator (``state_dtype``) is updated tensor by tensor in fp32 and rounded to
        nearest once, as the mixed-dtype ops would, but on torch's vectorized paths."""
        dst = self._views_of(gi, name, idx)
        cast = dst[0].dtype != src[0].dtype
        if name not in self._written[gi]:
            self._written[gi].add(name)
            if len(idx) == len(self._views[gi][name]) and alpha == 1.0:
                if other is None:
                    torch._foreach_copy_(dst, src)
                elif cast:
                    for d, s, o in zip(dst, src, other):
                        d.copy_(torch.mul(s, o))
                else:
                    binary_out(torch.mul, dst, src, other)
                return
            self._flat[gi][name].zero_()
        if cast:
            for i, (d, s) in enumerate(zip(dst, src)):
                t = d.to(s.dtype)
                if other is None:
                    t.add_(s, alpha=alpha)
                else:
                    t.addcmul_(s, other[i], value=alpha)
                d.copy_(t)
        elif other is None:
            torch._foreach_add_(dst, src, alpha=alpha)
        else:
            torch._foreach_addcmul_(dst, src, other, value=alpha)

    # ------------------------------------------------------------------ outer loop
    @contextmanager
    def refreshing(self):
        """Accumulate outer statistics from the micro-batches evaluated inside the block."""
        if not self.corrects:
            raise RuntimeError(f"{type(self).__name__} has no outer loop")
        if self._sampling is not None or self._refreshing:
            raise RuntimeError("refreshing() cannot be nested or used inside sampled_params")
        if self._count["in"] or self._count["out"]:
            raise RuntimeError("refreshing() between the passes of an inner step: "
                               "call step() first")
        self._refreshing = True
        try:
            yield
        except BaseException:
            self._refreshing = False
            self._reset_accumulators()
            raise
        self._refreshing = False
        if self._count["mega"] == 0:
            self._reset_accumulators()
            raise ValueError("refreshing() block collected no gradients: evaluate at least one "
                             'micro-batch with sampled_params(train=True, at="mega")')
        bad = self._nonfinite_passes()
        if bad:   # the previous outer statistics stay; the next refresh is at its usual step
            self._pc["last_refresh"] = self._pc["step"]
            self._skip("refreshes", bad)
            return
        with torch.no_grad():
            self._before_refresh()
            for gi, group in enumerate(self.param_groups):
                self._finish_refresh(gi, group, self._flat[gi], first=self._pc["refreshes"] == 0)
        self._pc["refreshes"] += 1
        self._pc["last_refresh"] = self._pc["step"]
        self._reset_accumulators()

    # ------------------------------------------------------------------ inner step
    @torch.no_grad()
    def step(self, closure=None):
        """Take one step with the gradients collected since the last step (or skip it, changing
        nothing but the skip counts, when they were not finite: see the module).

        With a ``closure``, it is called (with grad enabled) before the update; as in ivon-opt, the
        closure does its own sampling (``with opt.sampled_params(train=True): ...``)."""
        loss = None
        if closure is not None:
            n = self.defaults.get("mc_samples", 1)
            losses = []
            for _ in range(n):
                with torch.enable_grad():
                    losses.append(closure())
            loss = sum(losses) / n
        check_arg("grad_reduction", self.grad_reduction, self.grad_reduction in ("mean", "sum"),
                  "'mean' or 'sum'")
        k = self._count["in"]
        if k == 0:
            raise ValueError("step() with no collected gradients: evaluate the loss inside "
                             "`with optimizer.sampled_params(train=True):` and call backward() first")
        if self.correction_active and self._count["out"] != k:
            raise ValueError(f"correction is active but {k} mini-batch(es) were evaluated at theta_in "
                             f"and {self._count['out']} at theta_out: evaluate each at both")
        self._sync_mean()
        bad = self._nonfinite_passes()
        if bad:   # nothing is written: the parameters hold the mean already
            self._skip("steps", bad)
            return loss
        self._before_update()
        self._pc["step"] += 1
        self._pc["consecutive_skips"] = 0
        use_correction = self.correction_active
        for gi, group in enumerate(self.param_groups):
            group["step"] = group.get("step", 0) + 1
            seen = self._seen[gi]
            if all(seen):
                ranges = [slice(0, self._flat[gi]["mean"].numel())]
            else:  # parameters without gradients keep mean and state unchanged
                ranges, off = [], 0
                for p, s in zip(self._params(gi), seen):
                    if s:
                        ranges.append(slice(off, off + p.numel()))
                    off += p.numel()
            self._update(self._flat[gi], group, k if self.grad_reduction == "mean" else 1,
                         use_correction, ranges)
        self._write_params()
        self._reset_accumulators()
        self._last_draw = None
        return loss

    # ------------------------------------------------------------------ statistics over ranks
    def _before_update(self) -> None:
        """Run by step() after the checks, before the update."""
        self._all_reduce(self._synced_buffers())

    def _before_refresh(self) -> None:
        """Run at the end of refreshing(), before the outer statistics are formed."""
        self._all_reduce(self._refresh_buffers())

    def _synced_buffers(self) -> tuple[str, ...]:
        return ("acc_g",)

    def _refresh_buffers(self) -> tuple[str, ...]:
        return ("acc_g",)

    def _all_reduce(self, names) -> None:
        """With ``sync``, average the collected statistics over ranks (each rank has paired its
        gradients with its own noise first, so a Hessian estimate stays unbiased)."""
        if self.sync and self._shard_group is not None:
            raise ValueError("sync=True with sharded (FSDP) parameters: accepted is sync=False, since "
                             "FSDP's reduce-scatter already averages gradients made with shared noise")
        if self.sync and distributed():
            average_over_ranks([flat[name] for flat in self._flat for name in names])

    # ------------------------------------------------------------------ subclass API
    def _draw(self, at: str) -> None:
        raise NotImplementedError

    def _collect(self, gi: int, group: dict, at: str, grads: list[torch.Tensor], idx: list[int]) -> None:
        raise NotImplementedError

    def _finish_refresh(self, gi, group, flat, first) -> None:
        raise NotImplementedError

    def _update(self, flat: dict[str, torch.Tensor], group: dict, k: int, use_correction: bool,
                ranges: list[slice]) -> None:
        """One step over the given ranges of a group's flat buffers (``k`` in-samples collected)."""
        raise NotImplementedError
