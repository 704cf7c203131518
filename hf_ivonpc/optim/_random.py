"""Where the optimizers' noise comes from.

Each optimizer owns a ``torch.Generator`` (``make_generator``: seeded with ``seed + rank``, so that
ranks draw different noise) and draws its noise from it alone; the global torch RNG plays no part,
and the generator's state is in every ``state_dict``.

A buffer of fewer than ``COUNTER_MIN`` elements is filled by ``normal_`` with the generator. A
larger one draws four 32-bit keys from the generator and takes its normals from the
counter-based generator of ``_kernels.standard_normal_pairs``, inside the compiled kernel that
uses them (IVON draws, scales and writes its noise in one pass), in parallel, and the same for any
thread count, chunking or device. ``standard_normal_`` makes either draw into a buffer: the
reference twins draw through it, so that both sides see the same randomness.
"""

from __future__ import annotations

import torch

from . import _kernels as K
from ._sharding import rank

#: buffers of at least this many elements draw from the counter-based generator (read at each
#: draw: a test may lower it to exercise that path on small problems)
COUNTER_MIN = 1 << 20


def make_generator(device: torch.device, seed: int | None) -> torch.Generator:
    """The noise generator: seeded with ``seed + rank`` (a seed from the global RNG if None)."""
    generator = torch.Generator(device=device)
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    return generator.manual_seed(seed + rank())


def counter_key(buf: torch.Tensor, generator: torch.Generator) -> torch.Tensor | None:
    """The key of a counter-based draw into ``buf`` (None when ``buf`` is filled by ``normal_``):
    four random 32-bit keys from ``generator`` and the counter offset 0, as int64 on buf's device
    (drawn there: no host synchronization)."""
    if buf.numel() < COUNTER_MIN:
        return None
    keys = torch.randint(-2**31, 2**31, (5,), generator=generator, dtype=torch.int64,
                         device=generator.device)
    keys[4] = 0
    return keys.to(buf.device)


def standard_normal_(buf: torch.Tensor, generator: torch.Generator, *,
                     fused: bool | None = None, chunk: int = 1 << 16) -> torch.Tensor:
    """Fill ``buf`` (flat) with N(0, 1) draws determined by ``generator`` alone."""
    key = counter_key(buf, generator)
    if key is None:
        return buf.normal_(generator=generator)
    sc = torch.zeros(1, dtype=buf.dtype, device=buf.device)
    K.run_kernel(K.normal_fill, {"out": buf}, sc, fused=fused, chunk=chunk,
                 ranges=[slice(0, buf.numel())], counter=key)
    return buf
