"""``FlatStateOptimizer``: the base class of the fast optimizers, composed by concern.

=====================  ==================================================================
``_checks``            argument validators (ValueError naming argument, value and range)
``_sharding``          DTensor / FSDP2 local views, the shard mesh, all-reduce helpers
``_random``            the seedable generator and the standard-normal fill of a buffer
``_schedule``          ``CorrectionSchedule``: when to refresh, when to correct
``_flat``              ``FlatBuffers``: flat buffers, per-parameter views, parameters <-> mean
``_sampling``          ``SamplingProtocol``: sampled_params / refreshing / step (the protocol
                       a training loop follows is in that module's docstring)
``_checkpoint``        ``FlatCheckpoint``: state_dict / load_state_dict
=====================  ==================================================================

This module builds the optimizer from them (construction, checks, rebinding to sharded
parameters) and re-exports the helpers that code outside ``optim`` imports from here.
"""

from __future__ import annotations

from typing import Iterable

import torch

from ._checkpoint import FlatCheckpoint
from ._checks import (check_arg, check_flag, check_int_min, check_one_device_and_dtype,
                      check_param_list, resolve_state_dtype)
from ._flat import FlatBuffers, default_chunk
from ._random import make_generator
from ._sampling import SamplingProtocol
from ._schedule import CorrectionSchedule, fresh_skip_counters
from ._sharding import shard_mesh
# imported from here by code outside ``optim`` (the trainer, the posterior, the FSDP tests)
from ._sharding import is_sharded, local, local_part  # noqa: F401


class FlatStateOptimizer(CorrectionSchedule, FlatCheckpoint, SamplingProtocol, FlatBuffers,
                         torch.optim.Optimizer):
    """Base class: flat per-group state, a seedable generator, sampling and correction protocol.

    Subclasses set ``persistent_buffers`` (saved in ``state_dict``) and ``transient_buffers``
    (scratch and per-step accumulators), and implement ``_draw``, ``_collect`` and ``_update``
    (and ``_finish_refresh`` when ``corrects``).
    """

    #: whether sharded (DTensor) parameters are supported
    supports_sharding: bool = True
    #: the buffers that ``state_dtype=torch.bfloat16`` stores in bf16 (computed in fp32; the
    #: persistent ones written with stochastic rounding, see ``_kernels.store``); the others fp32
    low_precision_buffers: tuple[str, ...] = ()

    def __init__(self, params: Iterable, defaults: dict, *, seed: int | None = None,
                 generator: torch.Generator | None = None, chunk_size: int | None = None,
                 fused: bool | None = None, refresh_every: int = 10, start_step: int = 0,
                 shared_noise: bool = True, state_dtype: torch.dtype | str | None = None):
        check_int_min("refresh_every", refresh_every, 1)
        check_int_min("start_step", start_step, 0)
        if seed is not None:
            check_int_min("seed", seed, 0)
        if chunk_size is not None:
            check_int_min("chunk_size", chunk_size, 1)
        check_flag("shared_noise", shared_noise)
        check_flag("fused", fused, allow_none=True)
        check_arg("generator", generator, generator is None or isinstance(generator, torch.Generator),
                  "None or a torch.Generator")
        # generators (in a group too) are read once, here: the checks must not consume them
        params = [dict(g, params=list(g["params"])) if isinstance(g, dict) else g for g in params]
        check_param_list(params)
        super().__init__(params, defaults)
        for group in self.param_groups:
            # present from the start: torch.distributed.checkpoint loads only the keys that the
            # state_dict of a fresh optimizer has
            group.setdefault("step", 0)
        all_params = [p for g in self.param_groups for p in g["params"]]
        device, pdtype = check_one_device_and_dtype(all_params)
        self._check_sharding(all_params)
        self._device = device
        # state is fp32 (fp64 when parameters are fp64), whatever the parameters' dtype
        self._dtype = torch.float64 if pdtype == torch.float64 else torch.float32
        #: "float32" or "bfloat16": the storage of the ``low_precision_buffers`` (``_state_dtype``)
        self.state_dtype, self._state_dtype = resolve_state_dtype(state_dtype, self._dtype, type(self))
        self._chunk = chunk_size or default_chunk(self._device)
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
        self._pc = fresh_skip_counters()
        self._sampling: str | None = None
        self._refreshing = False
        self._last_draw: str | None = None
        for gi, group in enumerate(self.param_groups):
            self._check_group(group, gi)
        self._build_buffers()
        self._reset_accumulators()
        self._record_param_versions()

    def _check_group(self, group: dict, gi: int) -> None:
        """Validate a parameter group's hyperparameters (before any state exists)."""

    def _check_sharding(self, params: list[torch.Tensor]) -> None:
        """Set ``_mesh`` and ``_shard_group``: the mesh and process group that shard the
        parameters (None when none is sharded)."""
        self._mesh = None
        self._mesh = shard_mesh(params, type(self).__name__, self.supports_sharding)
        self._shard_group = None if self._mesh is None else self._mesh.get_group()

    def add_param_group(self, param_group: dict) -> None:
        if hasattr(self, "_flat"):
            raise ValueError("add_param_group after construction is not supported: "
                             "create the optimizer with all parameter groups")
        super().add_param_group(param_group)

    def rebind_params(self) -> None:
        """Rebuild the state for the parameters now in ``param_groups``, before the first step.

        Accelerate's FSDP2 preparation swaps an optimizer's parameters for their sharded versions
        in place; the buffers built over the whole parameters are rebuilt over the shards (the
        mean from the parameters, the rest at its initial value)."""
        if self._pc["step"] or self._pc["refreshes"] or any(self._count.values()):
            raise RuntimeError("rebind_params after training started: accepted only before the first "
                               "step and refresh")
        params = [p for g in self.param_groups for p in g["params"]]
        self._check_sharding(params)
        self._device = params[0].device
        self.state.clear()
        self._build_buffers()
        self._reset_accumulators()
        self._record_param_versions()

    # ------------------------------------------------------------------ public surface
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
