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
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ._checks import check_arg, check_positive
from ._flat import binary_out
from ._sharding import average_over_ranks, distributed, global_norm, local

SAMPLE_ROLES = ("in", "out", "mega")


class SamplingProtocol:
    """``sampled_params``, ``refreshing`` and ``step`` over the flat buffers (see the module).

    Subclasses implement ``_draw``, ``_collect``, ``_finish_refresh`` and ``_update``."""

    #: whether the method has an outer loop (posterior correction / SVRG)
    corrects: bool = False

    @property
    def collected(self) -> int:
        """Micro-batches evaluated at theta_in since the last step."""
        return self._count["in"]

    @property
    def correction_enabled(self) -> bool:
        return self.corrects and any(g.get("alpha", 0.0) > 0 for g in self.param_groups)

    def _reset_accumulators(self) -> None:
        self._count = {r: 0 for r in SAMPLE_ROLES}
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
        self._clip_grads(at)
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

    def _clip_grads(self, at: str) -> None:
        """Scale the gradients to ``max_grad_norm``. The theta_out pass of a mini-batch takes the
        factor of its theta_in pass (in order, when several are collected), so that the two
        gradients keep their common part and their difference cancels where it should."""
        if self.max_grad_norm is None:
            return
        check_positive("max_grad_norm", self.max_grad_norm)
        grads = [local(p.grad) for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return
        if at == "out" and self._in_clip_scales:
            scale = self._in_clip_scales.pop(0)
        else:
            norms = torch.stack([n.to(self._dtype) for n in torch._foreach_norm(grads)])
            # the norm of the whole gradient, from every rank's shards when sharded
            norm = global_norm(norms, self._shard_group)
            scale = (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
            if at == "in":
                self.last_grad_norm = norm
                self._in_clip_scales.append(scale)
        torch._foreach_mul_(grads, scale.to(grads[0].dtype))

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
        """Take one step with the gradients collected since the last step.

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
        self._before_update()
        self._pc["step"] += 1
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
