"""Machinery shared by the fast optimizers.

Every optimizer here keeps its state in *flat* buffers, one per parameter group and per
quantity, in fp32 (fp64 when the parameters are fp64), and exposes per-parameter views of
them in ``self.state[p]`` so that ``state_dict`` has the usual torch.optim layout.
Whole-buffer arithmetic runs as kernels of ``_kernels`` over the flat buffers, compiled into one
fused loop by ``torch.compile`` where that works and otherwise eagerly in cache-sized chunks (no
model-sized temporaries either way); only the few operations that touch parameters or gradients
run as ``torch._foreach_*`` over the per-parameter views.

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

Sharded parameters (FSDP2's ``fully_shard``: DTensors sharded on a 1-D mesh): the flat buffers
cover each rank's local shards only. Every rank draws the noise of its own shards, so the
all-gathered theta is one draw shared by all ranks, and FSDP's reduce-scatter hands each rank the
average over ranks of the gradients at that draw: every statistic is paired with its own noise
and no further averaging is needed (``sync`` must stay False). Gradient clipping all-reduces the
squared norm of the shards. ``self.state[p]`` holds DTensors over the same memory, so that
``torch.distributed.checkpoint`` saves and loads the state sharded.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterable

import torch

from . import _kernels, hparams
from ._kernels import run_kernel

SAMPLE_ROLES = ("in", "out", "mega")

try:  # DTensor: FSDP2's sharded parameters
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = Shard = None


def is_sharded(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (the tensor itself otherwise), without autograd tracking."""
    if is_sharded(t):
        with torch.no_grad():
            return t.to_local()
    return t


def local_part(p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """The part of a full-size tensor ``full`` that this rank holds of the sharded parameter ``p``."""
    if not is_sharded(p):
        return full
    if is_sharded(full):
        return local(full)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return full[tuple(slice(o, o + n) for o, n in zip(offset, shape))]
#: with ``fused=None``, groups smaller than this run eagerly (a compiled call costs ~0.1 ms)
FUSE_MIN_NUMEL = 1 << 16


def check_arg(name: str, value: Any, ok: bool, accepted: str) -> None:
    """Raise a ValueError naming the argument and its accepted range."""
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: accepted range is {accepted}")


check_positive = hparams.POSITIVE.check
check_nonneg = hparams.NONNEG.check
check_beta = hparams.BETA.check
check_unit = hparams.UNIT.check
check_radius = hparams.RADIUS.check
check_int_min = hparams.check_int_min


def _default_chunk(device: torch.device) -> int:
    # For the eager fallback: on CPU, chunks of 64k elements keep the intermediates of an update in
    # cache; on accelerators one chunk is the whole buffer (kernel launches are what costs there).
    return 1 << 16 if device.type == "cpu" else 1 << 62


class CorrectionSchedule:
    """When to refresh and when to correct, from ``self._pc`` (step, refreshes, last_refresh),
    ``start_step``, ``refresh_every`` and the subclass's ``correction_enabled``."""

    @property
    def global_step(self) -> int:
        """Number of optimizer steps taken."""
        return self._pc["step"]

    @property
    def needs_refresh(self) -> bool:
        """True when the outer statistics must be refreshed before the next inner step."""
        s = self._pc["step"]
        return (self.correction_enabled and s >= self.start_step
                and (s - self.start_step) % self.refresh_every == 0
                and self._pc["last_refresh"] != s)

    @property
    def correction_active(self) -> bool:
        """True when the next step needs the mini-batch evaluated at theta_out too."""
        return self.correction_enabled and self._pc["refreshes"] > 0 and self._pc["step"] >= self.start_step


class FlatStateOptimizer(CorrectionSchedule, torch.optim.Optimizer):
    """Base class: flat per-group state, a seedable generator, sampling and correction protocol.

    Subclasses set ``persistent_buffers`` (saved in ``state_dict``) and ``transient_buffers``
    (scratch and per-step accumulators), and implement ``_draw``, ``_collect`` and ``_update``.
    """

    persistent_buffers: tuple[str, ...] = ()
    transient_buffers: tuple[str, ...] = ()
    #: whether sharded (DTensor) parameters are supported
    supports_sharding: bool = True
    #: whether the method has an outer loop (posterior correction / SVRG)
    corrects: bool = False

    def __init__(self, params: Iterable, defaults: dict, *, seed: int | None = None,
                 generator: torch.Generator | None = None, chunk_size: int | None = None,
                 fused: bool | None = None, refresh_every: int = 10, start_step: int = 0,
                 shared_noise: bool = True):
        check_int_min("refresh_every", refresh_every, 1)
        check_int_min("start_step", start_step, 0)
        if seed is not None:
            check_int_min("seed", seed, 0)
        if chunk_size is not None:
            check_int_min("chunk_size", chunk_size, 1)
        params = list(params)
        if len(params) == 0:
            raise ValueError("params is empty: the optimizer got no parameters")
        flat_list = [q for g in params for q in g["params"]] if isinstance(params[0], dict) else params
        if len(set(map(id, flat_list))) != len(flat_list):
            raise ValueError("params contains the same tensor twice: accepted is each parameter once")
        super().__init__(params, defaults)
        for group in self.param_groups:
            # present from the start: torch.distributed.checkpoint loads only the keys that the
            # state_dict of a fresh optimizer has
            group.setdefault("step", 0)
        all_params = [p for g in self.param_groups for p in g["params"]]
        devices = {p.device for p in all_params}
        dtypes = {p.dtype for p in all_params}
        if len(devices) > 1:
            raise ValueError(f"params are on mixed devices {sorted(map(str, devices))}: "
                             "accepted is one device for all parameters")
        if len(dtypes) > 1:
            raise ValueError(f"params have mixed dtypes {sorted(map(str, dtypes))}: "
                             "accepted is one floating dtype for all parameters")
        pdtype = next(iter(dtypes))
        if not pdtype.is_floating_point:
            raise ValueError(f"params have dtype {pdtype}: accepted are floating dtypes")
        self._shard_group = self._check_sharding(all_params)
        self._device = next(iter(devices))
        # state is fp32 (fp64 when parameters are fp64), whatever the parameters' dtype
        self._dtype = torch.float64 if pdtype == torch.float64 else torch.float32
        self._chunk = chunk_size or _default_chunk(self._device)
        self.fused = fused
        #: how the micro-batches collected for one step combine: "mean" (each gradient is a full
        #: estimate, as in a plain loop or with MC samples) or "sum" (each is a part of the window's
        #: gradient, already scaled as Trainer scales losses for gradient accumulation; noise x grad
        #: pairs are summed the same way, which weights each draw by its share of the window)
        self.grad_reduction = "mean"
        #: average the collected statistics over ranks at each step and refresh (set it when each
        #: rank evaluates its own micro-batches without DDP's gradient all-reduce)
        self.sync = False
        #: clip each collected micro-batch gradient to this global norm (None: no clipping); the
        #: noise x grad pairs are formed from the clipped gradient. ``last_grad_norm`` holds the
        #: norm of the last gradient collected at theta_in, before clipping (a tensor: no sync).
        self.max_grad_norm: float | None = None
        self.last_grad_norm: torch.Tensor | None = None
        self.refresh_every = refresh_every
        self.start_step = start_step
        self.shared_noise = shared_noise
        self.generator = generator if generator is not None else make_generator(self._device, seed)
        self._pc = {"step": 0, "refreshes": 0, "last_refresh": -1}
        self._sampling: str | None = None
        self._refreshing = False
        self._last_draw: str | None = None
        self._flat: list[dict[str, torch.Tensor]] = []
        self._views: list[dict[str, list[torch.Tensor]]] = []
        for gi, group in enumerate(self.param_groups):
            self._check_group(group, gi)
        for group in self.param_groups:
            self._init_group(group)
        self._reset_accumulators()
        self._record_param_versions()

    # ------------------------------------------------------------------ buffers
    def _check_sharding(self, params: list[torch.Tensor]):
        """The process group that shards the parameters (None when none is sharded)."""
        sharded = [p for p in params if is_sharded(p)]
        self._mesh = None
        if not sharded:
            return None
        if len(sharded) != len(params):
            raise ValueError(f"params mixes {len(sharded)} sharded (DTensor) and "
                             f"{len(params) - len(sharded)} plain tensors: accepted is all or none "
                             "sharded (apply fully_shard to the root module too)")
        if not self.supports_sharding:
            raise ValueError(f"{type(self).__name__} does not support sharded (DTensor) parameters")
        mesh = sharded[0].device_mesh
        for p in sharded:
            if (p.device_mesh != mesh or p.device_mesh.ndim != 1
                    or not all(isinstance(pl, Shard) for pl in p.placements)):
                raise ValueError(f"a parameter is a DTensor with placements {p.placements} on mesh "
                                 f"{p.device_mesh}: accepted are Shard placements on one 1-D mesh "
                                 "(FSDP2's fully_shard)")
        self._mesh = mesh
        return mesh.get_group()

    def rebind_params(self) -> None:
        """Rebuild the state for the parameters now in ``param_groups``, before the first step.

        Accelerate's FSDP2 preparation swaps an optimizer's parameters for their sharded versions
        in place; the buffers built over the whole parameters are rebuilt over the shards (the
        mean from the parameters, the rest at its initial value)."""
        if self._pc["step"] or self._pc["refreshes"] or any(self._count.values()):
            raise RuntimeError("rebind_params after training started: accepted only before the first "
                               "step and refresh")
        params = [p for g in self.param_groups for p in g["params"]]
        self._shard_group = self._check_sharding(params)
        self._device = params[0].device
        self.state.clear()
        self._flat, self._views = [], []
        for group in self.param_groups:
            self._init_group(group)
        self._reset_accumulators()
        self._record_param_versions()

    def flat_state(self) -> list[dict[str, torch.Tensor]]:
        """Per parameter group, its persistent buffers by name as flat tensors (the optimizer's
        own memory, not copies; each rank's shards when the parameters are sharded)."""
        return [{name: flat[name] for name in self.persistent_buffers} for flat in self._flat]

    def state_nbytes(self) -> int:
        """Bytes of optimizer state on this rank: the persistent buffers and the per-step scratch."""
        return sum(t.nbytes for flat in self._flat for t in flat.values())

    @property
    def refreshes(self) -> int:
        """Refreshes of the outer statistics so far."""
        return self._pc["refreshes"]

    @property
    def process_group(self):
        """The process group that shards the parameters (None when they are not sharded)."""
        return self._shard_group

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def sharded(self) -> bool:
        """Whether the parameters are sharded over ranks (FSDP2)."""
        return self._shard_group is not None

    def _params(self, gi: int) -> list[torch.Tensor]:
        """Group ``gi``'s parameters as plain tensors (each rank's shards when sharded)."""
        ps = self.param_groups[gi]["params"]
        return [local(p) for p in ps] if self._shard_group is not None else ps

    def _state_view(self, p: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
        """What ``self.state[p]`` shows of a buffer view: a DTensor over it for a sharded ``p``."""
        if not is_sharded(p):
            return view
        return DTensor.from_local(view, p.device_mesh, p.placements, run_check=False,
                                  shape=p.shape, stride=p.stride())

    def _init_group(self, group: dict) -> None:
        gi = len(self._flat)
        params = self._params(gi)
        numel = sum(p.numel() for p in params)
        flat = {name: torch.zeros(numel, device=self._device, dtype=self._dtype)
                for name in self.persistent_buffers + self.transient_buffers}
        views: dict[str, list[torch.Tensor]] = {name: [] for name in flat}
        offset = 0
        for p in params:
            n = p.numel()
            for name, buf in flat.items():
                views[name].append(buf[offset:offset + n].view_as(p))
            offset += n
        for i, p in enumerate(group["params"]):
            self.state[p] = {name: self._state_view(p, views[name][i]) for name in self.persistent_buffers}
        self._flat.append(flat)
        self._views.append(views)
        with torch.no_grad():
            torch._foreach_copy_(views["mean"], params)
        self._init_state(group, flat)

    def _init_state(self, group: dict, flat: dict[str, torch.Tensor]) -> None:
        """Set the initial values of a group's persistent buffers (zeros by default)."""

    def add_param_group(self, param_group: dict) -> None:
        if hasattr(self, "_flat"):
            raise ValueError("add_param_group after construction is not supported: "
                             "create the optimizer with all parameter groups")
        super().add_param_group(param_group)

    def _run(self, fn, tensors: dict, scalars: list[float], ranges: list[slice] | None = None,
             **flags) -> None:
        """Run an element-wise kernel of ``_kernels`` over flat buffers (fused or chunked)."""
        sc = torch.tensor(scalars, dtype=self._dtype, device=self._device)
        n = next(iter(tensors.values())).numel()
        if ranges is None:
            ranges = [slice(0, n)]
        fused = self.fused
        if fused is None and n < FUSE_MIN_NUMEL:
            fused = False  # compiling pays off only for large buffers
        run_kernel(fn, tensors, sc, fused=fused, chunk=self._chunk, ranges=ranges, **flags)

    def _draw_standard_normal(self, buf: torch.Tensor) -> None:
        _kernels.standard_normal_(buf, self.generator)

    # ------------------------------------------------- parameters <-> mean buffer
    def _param_versions(self) -> list[tuple[int, int]]:
        return [(p._version, p.data_ptr()) for gi in range(len(self.param_groups)) for p in self._params(gi)]

    def _record_param_versions(self) -> None:
        self._versions = self._param_versions()

    def _sync_mean(self) -> None:
        """Take the mean from the parameters if someone changed them outside the optimizer."""
        if self._param_versions() != self._versions:
            with torch.no_grad():
                for gi in range(len(self.param_groups)):
                    torch._foreach_copy_(self._views[gi]["mean"], self._params(gi))
            self._record_param_versions()

    @torch.no_grad()
    def _write_params(self, name: str = "mean") -> None:
        for gi in range(len(self.param_groups)):
            torch._foreach_copy_(self._params(gi), self._views[gi][name])
        self._record_param_versions()

    # ------------------------------------------------------------ the protocol
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

    @contextmanager
    def sampled_params(self, train: bool = False, at: str = "in"):
        """Replace the parameters by a draw from the posterior for the duration of the block.

        ``at="in"`` draws theta_in ~ q_in (the current posterior); ``at="out"`` draws theta_out ~ q_out
        (the snapshot of the last refresh; with ``shared_noise`` it reuses the noise of the last
        ``"in"`` draw); ``at="mega"`` draws a fresh theta ~ q_in for a micro-batch of the mega-batch
        (only inside ``refreshing()``). With ``train=True`` the gradients left in ``p.grad`` are
        collected on exit and consumed. The parameters are restored on exit, also on an exception
        (then nothing is collected).
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
            if self._shard_group is None:
                norm = torch.linalg.vector_norm(norms)
            else:   # the norm of the whole gradient, from every rank's shards
                sq = norms.square().sum()
                torch.distributed.all_reduce(sq, group=self._shard_group)
                norm = sq.sqrt()
            scale = (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
            if at == "in":
                self.last_grad_norm = norm
                self._in_clip_scales.append(scale)
        torch._foreach_mul_(grads, scale.to(grads[0].dtype))

    def _views_of(self, gi: int, name: str, idx: list[int]) -> list[torch.Tensor]:
        v = self._views[gi][name]
        return v if len(idx) == len(v) else [v[i] for i in idx]

    def _acc(self, gi: int, name: str, idx: list[int], src: list[torch.Tensor],
             other: list[torch.Tensor] | None = None, alpha: float = 1.0) -> None:
        """Accumulator ``name`` (+)= alpha * src (* other): the first write of a step overwrites."""
        dst = self._views_of(gi, name, idx)
        if name not in self._written[gi]:
            self._written[gi].add(name)
            if len(idx) == len(self._views[gi][name]) and alpha == 1.0:
                if other is None:
                    torch._foreach_copy_(dst, src)
                else:
                    binary_out(torch.mul, dst, src, other)
                return
            self._flat[gi][name].zero_()
        if other is None:
            torch._foreach_add_(dst, src, alpha=alpha)
        else:
            torch._foreach_addcmul_(dst, src, other, value=alpha)

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

    # ------------------------------------------------------------ state dict
    def state_dict(self) -> dict:
        sd = super().state_dict()
        extra = {"pc": dict(self._pc), "class": type(self).__name__}
        if self._mesh is None:
            sd["hf_ivonpc"] = {**extra, "generator": self.generator.get_state()}
        else:
            # torch.distributed.checkpoint keeps only "state" and "param_groups" and saves a plain
            # tensor once for all ranks: the counters travel in the first group, and each rank's
            # generator state as its row of a DTensor sharded over the ranks
            g = self.generator.get_state().to(self._device).view(1, -1)
            world = self._mesh.size()
            gen = DTensor.from_local(g, self._mesh, [Shard(0)], run_check=False,
                                     shape=(world, g.shape[1]), stride=(g.shape[1], 1))
            sd["param_groups"][0]["hf_ivonpc"] = {**extra, "generator": gen}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by ``state_dict``, checking every size before changing anything."""
        groups = state_dict.get("param_groups")
        if groups is None or "state" not in state_dict:
            raise ValueError("state_dict is missing 'state' or 'param_groups'")
        if len(groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(groups)} parameter groups, the optimizer has "
                             f"{len(self.param_groups)}")
        extra = state_dict.get("hf_ivonpc")
        if extra is None and groups:   # a sharded optimizer's (see state_dict)
            extra = groups[0].get("hf_ivonpc")
        if extra is None:
            raise ValueError("state_dict was not saved by an hf_ivonpc optimizer (no 'hf_ivonpc' entry)")
        if extra.get("class") != type(self).__name__:
            raise ValueError(f"state_dict was saved by {extra.get('class')}, not {type(self).__name__}")
        saved_state = state_dict["state"]
        plan = []
        for gi, (group, saved) in enumerate(zip(self.param_groups, groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"parameter group {gi} has {len(group['params'])} parameters, "
                                 f"the state_dict {len(saved['params'])}")
            for i, (p, key) in enumerate(zip(group["params"], saved["params"])):
                st = saved_state.get(key)
                if st is None:
                    raise ValueError(f"state_dict has no state for parameter {key}")
                for name in self.persistent_buffers:
                    t = st.get(name)
                    if not isinstance(t, torch.Tensor) or t.shape != p.shape:
                        raise ValueError(f"state '{name}' of parameter {key} has shape "
                                         f"{getattr(t, 'shape', None)}, expected {tuple(p.shape)}")
                    plan.append((gi, i, name, t))
        with torch.no_grad():
            for gi, i, name, t in plan:
                self._views[gi][name][i].copy_(local_part(self.param_groups[gi]["params"][i], t))
            for group, saved in zip(self.param_groups, groups):
                for k, v in saved.items():
                    if k not in ("params", "hf_ivonpc"):
                        group[k] = v
            self._pc = dict(extra["pc"])
            self.generator.set_state(local(extra["generator"]).reshape(-1).cpu())
            # the parameters are the source of truth for the mean, unless they hold a rounded
            # copy of the fp32 master kept here (low-precision parameters)
            for gi in range(len(self.param_groups)):
                for p, m in zip(self._params(gi), self._views[gi]["mean"]):
                    if p.dtype == self._dtype or not torch.equal(m.to(p.dtype), p.detach()):
                        m.copy_(p.detach())
            self._after_load()
        self._reset_accumulators()
        self._record_param_versions()

    def _after_load(self) -> None:
        """Recompute derived buffers after loading."""

    def _check_group(self, group: dict, gi: int) -> None:
        """Validate a parameter group's hyperparameters (before any state exists)."""

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
        if self.sync and torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            for flat in self._flat:
                for name in names:
                    torch.distributed.all_reduce(flat[name])
                    flat[name].div_(world)

    # ------------------------------------------------------------ subclass API
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


def binary_out(op, out: list[torch.Tensor], a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    """out[i] = op(a[i], b[i]) in one pass over memory.

    On CPU a loop of ``op(..., out=)`` (one kernel per tensor, as CPU foreach does internally)
    reads and writes each element once; elsewhere two foreach kernels (copy, then in place)."""
    if out and out[0].device.type == "cpu":
        for o, x, y in zip(out, a, b):
            op(x, y, out=o)
        return
    torch._foreach_copy_(out, a)
    {torch.mul: torch._foreach_mul_, torch.add: torch._foreach_add_}[op](out, b)


def make_generator(device: torch.device, seed: int | None) -> torch.Generator:
    """The noise generator: seeded with ``seed + rank`` (a seed from the global RNG if None)."""
    generator = torch.Generator(device=device)
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    return generator.manual_seed(seed + _rank())


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0
