"""Sharded parameters (FSDP2's ``fully_shard``) and the collectives of the optimizers.

With sharded parameters (DTensors sharded on a 1-D mesh) the flat buffers cover each rank's local
shards only. Every rank draws the noise of its own shards, so the all-gathered theta is one draw
shared by all ranks, and FSDP's reduce-scatter hands each rank the average over ranks of the
gradients at that draw: every statistic is paired with its own noise and no further averaging is
needed (``sync`` must stay False). Gradient clipping all-reduces the squared norm of the shards.
``self.state[p]`` holds DTensors over the same memory, so that ``torch.distributed.checkpoint``
saves and loads the state sharded.

Without sharding, ``sync=True`` averages the collected statistics over the ranks of the default
process group (each rank evaluates its own micro-batches, paired with its own noise).
"""

from __future__ import annotations

from typing import Any

import torch

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


def shard_mesh(params: list[torch.Tensor], owner: str, supported: bool = True):
    """The 1-D device mesh that shards ``params`` (None when none is sharded), checked: all or
    none sharded, Shard placements on one 1-D mesh, and the optimizer ``owner`` supports it."""
    sharded = [p for p in params if is_sharded(p)]
    if not sharded:
        return None
    if len(sharded) != len(params):
        raise ValueError(f"params mixes {len(sharded)} sharded (DTensor) and "
                         f"{len(params) - len(sharded)} plain tensors: accepted is all or none "
                         "sharded (apply fully_shard to the root module too)")
    if not supported:
        raise ValueError(f"{owner} does not support sharded (DTensor) parameters")
    mesh = sharded[0].device_mesh
    for p in sharded:
        if (p.device_mesh != mesh or p.device_mesh.ndim != 1
                or not all(isinstance(pl, Shard) for pl in p.placements)):
            raise ValueError(f"a parameter is a DTensor with placements {p.placements} on mesh "
                             f"{p.device_mesh}: accepted are Shard placements on one 1-D mesh "
                             "(FSDP2's fully_shard)")
    return mesh


def state_view(p: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
    """What ``state[p]`` shows of a buffer view: a DTensor over it for a sharded ``p``."""
    if not is_sharded(p):
        return view
    return DTensor.from_local(view, p.device_mesh, p.placements, run_check=False,
                              shape=p.shape, stride=p.stride())


def rows_over_ranks(row: torch.Tensor, mesh) -> torch.Tensor:
    """A DTensor of shape (world, n) whose row r is rank r's ``row`` (of shape (1, n))."""
    world = mesh.size()
    return DTensor.from_local(row, mesh, [Shard(0)], run_check=False,
                              shape=(world, row.shape[1]), stride=(row.shape[1], 1))


def global_norm(norms: torch.Tensor, group) -> torch.Tensor:
    """The norm of a gradient from the norms of its parts; with a process group ``group`` the
    parts are this rank's shards and the squares are summed over the ranks."""
    if group is None:
        return torch.linalg.vector_norm(norms)
    sq = norms.square().sum()
    torch.distributed.all_reduce(sq, group=group)
    return sq.sqrt()


def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    if distributed():
        return torch.distributed.get_rank()
    return 0


def average_over_ranks(tensors) -> None:
    """Replace each tensor by its average over the ranks of the default group (in place)."""
    world = torch.distributed.get_world_size()
    for t in tensors:
        torch.distributed.all_reduce(t)
        t.div_(world)
