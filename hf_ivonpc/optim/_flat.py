"""The flat buffers of the fast optimizers, and the parameters <-> mean copy.

Every optimizer here keeps its state in *flat* buffers, one per parameter group and per
quantity, in fp32 (fp64 when the parameters are fp64; the ``low_precision_buffers`` in bf16 with
``state_dtype=torch.bfloat16``), and exposes per-parameter views of
them in ``self.state[p]`` so that ``state_dict`` has the usual torch.optim layout.
Whole-buffer arithmetic runs as kernels of ``_kernels`` over the flat buffers, compiled into one
fused loop by ``torch.compile`` where that works and otherwise eagerly in cache-sized chunks (no
model-sized temporaries either way); only the few operations that touch parameters or gradients
run as ``torch._foreach_*`` over the per-parameter views.

The buffer ``mean`` is the master copy of the parameters: the parameters are written from it
after every step and sampling, and it is taken back from them if someone changed them in between.
"""

from __future__ import annotations

import torch

from ._kernels import run_kernel
from ._random import counter_key, standard_normal_
from ._sharding import local, state_view


def default_chunk(device: torch.device) -> int:
    # For the eager fallback: on CPU, chunks of 64k elements keep the intermediates of an update in
    # cache; on accelerators chunks of 16M elements (kernel launches are what costs there, but an
    # eager update or draw makes ten or more temporaries of its chunk's size: a whole-buffer chunk
    # would need ten times the model's memory).
    return 1 << 16 if device.type == "cpu" else 1 << 24


class _Buffers(dict):
    """A group's buffers (or their views) by name; a missing lazy buffer is created on access."""

    def __init__(self, make):
        super().__init__()
        self._make = make

    def __missing__(self, name: str):
        return self._make(name)


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


class FlatBuffers:
    """Flat per-group buffers ``self._flat[gi][name]``, their per-parameter views
    ``self._views[gi][name]``, and the copy between the parameters and the ``mean`` buffer.

    Uses ``persistent_buffers``, ``transient_buffers``, ``_device``, ``_dtype``, ``_chunk``,
    ``fused``, ``generator`` and ``_shard_group`` (set by the optimizer's constructor)."""

    persistent_buffers: tuple[str, ...] = ()
    transient_buffers: tuple[str, ...] = ()
    #: transient buffers created on first use only (a step that never needs one costs no memory)
    lazy_buffers: tuple[str, ...] = ()

    # ------------------------------------------------------------------ buffers
    def _build_buffers(self) -> None:
        """(Re)build every group's buffers over the parameters now in ``param_groups``."""
        self._flat: list[dict[str, torch.Tensor]] = []
        self._views: list[dict[str, list[torch.Tensor]]] = []
        for group in self.param_groups:
            self._init_group(group)

    def _params(self, gi: int) -> list[torch.Tensor]:
        """Group ``gi``'s parameters as plain tensors (each rank's shards when sharded)."""
        ps = self.param_groups[gi]["params"]
        return [local(p) for p in ps] if self._shard_group is not None else ps

    def _init_group(self, group: dict) -> None:
        gi = len(self._flat)
        params = self._params(gi)
        flat = _Buffers(lambda name: self._allocate_lazy(gi, name))
        views = _Buffers(lambda name: (flat[name], views[name])[1])
        for name in self.persistent_buffers + self.transient_buffers:
            if name not in self.lazy_buffers:
                self._allocate(gi, name, flat, views)
        for i, p in enumerate(group["params"]):
            self.state[p] = {name: state_view(p, views[name][i]) for name in self.persistent_buffers}
        self._flat.append(flat)
        self._views.append(views)
        with torch.no_grad():
            torch._foreach_copy_(views["mean"], params)
        self._init_state(group, flat)

    def _allocate_lazy(self, gi: int, name: str) -> torch.Tensor:
        if name not in self.lazy_buffers:
            raise KeyError(name)
        return self._allocate(gi, name)

    def _allocate(self, gi: int, name: str, flat=None, views=None) -> torch.Tensor:
        """Create group ``gi``'s buffer ``name`` (zeros) and its per-parameter views."""
        flat = self._flat[gi] if flat is None else flat
        views = self._views[gi] if views is None else views
        params = self._params(gi)
        buf = torch.zeros(sum(p.numel() for p in params), device=self._device,
                          dtype=self._buffer_dtype(name))
        views[name] = self._split(gi, buf)
        flat[name] = buf
        return buf

    def _split(self, gi: int, buf: torch.Tensor) -> list[torch.Tensor]:
        """A flat tensor laid out as group ``gi``'s buffers, as views shaped as its parameters."""
        offset, out = 0, []
        for p in self._params(gi):
            out.append(buf[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        return out

    def _buffer_dtype(self, name: str) -> torch.dtype:
        """fp32 (fp64 with fp64 parameters), or ``state_dtype`` for the low-precision buffers."""
        return self._state_dtype if name in self.low_precision_buffers else self._dtype

    def _init_state(self, group: dict, flat: dict[str, torch.Tensor]) -> None:
        """Set the initial values of a group's persistent buffers (zeros by default)."""

    def flat_state(self, transient: bool = False) -> list[dict[str, torch.Tensor]]:
        """Per parameter group, its persistent buffers by name as flat tensors (the optimizer's
        own memory, not copies; each rank's shards when the parameters are sharded). With
        ``transient=True`` also the per-step scratch: the noise (``noise``, theta - m of the
        last draw, or of theta_in where IVONPC pairs its out-sample in the update; after a step,
        IVON's holds the next step's noise, drawn ahead) and the
        statistics collected since the last step (``acc_*``); these
        are for inspection only, and overwritten by the next draw or step (a ``lazy_buffers``
        entry is there once a step has needed it)."""
        names = self.persistent_buffers + (self.transient_buffers if transient else ())
        return [{name: flat[name] for name in names if name in flat} for flat in self._flat]

    def state_nbytes(self) -> int:
        """Bytes of optimizer state on this rank: the persistent buffers and the per-step scratch
        allocated so far."""
        return sum(t.nbytes for flat in self._flat for t in flat.values())

    def _views_of(self, gi: int, name: str, idx: list[int]) -> list[torch.Tensor]:
        v = self._views[gi][name]
        return v if len(idx) == len(v) else [v[i] for i in idx]

    # ------------------------------------------------------------------ arithmetic
    def _run(self, fn, tensors: dict, scalars: list[float], ranges: list[slice] | None = None,
             counter: torch.Tensor | None = None, **flags) -> None:
        """Run an element-wise kernel of ``_kernels`` over flat buffers (fused or chunked; with
        ``counter``, a kernel that draws its own noise: see ``_kernels.run_kernel``)."""
        sc = torch.tensor(scalars, dtype=self._dtype, device=self._device)
        n = next(iter(tensors.values())).numel()
        if ranges is None:
            ranges = [slice(0, n)]
        run_kernel(fn, tensors, sc, fused=self.fused, chunk=self._chunk, ranges=ranges,
                   counter=counter, **flags)

    def _draw_standard_normal(self, buf: torch.Tensor) -> None:
        standard_normal_(buf, self.generator, fused=self.fused, chunk=self._chunk)

    def _noise_key(self, buf: torch.Tensor) -> torch.Tensor | None:
        """The key of a counter-based draw into ``buf`` by a kernel (None: ``buf`` is small and is
        filled by ``_draw_standard_normal``)."""
        return counter_key(buf, self.generator)

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
    def _write_params(self, name: str = "mean", groups: list[int] | None = None) -> None:
        """parameters <- buffer ``name`` (of ``groups``; None: all)."""
        for gi in range(len(self.param_groups)) if groups is None else groups:
            torch._foreach_copy_(self._params(gi), self._views[gi][name])
        self._record_param_versions()
