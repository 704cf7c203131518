"""Where the optimizers' noise comes from.

Each optimizer owns a ``torch.Generator`` (``make_generator``: seeded with ``seed + rank``, so that
ranks draw different noise) and fills its flat noise buffer from it alone with
``standard_normal_``; the global torch RNG plays no part, and the generator's state is in every
``state_dict``. The reference twins draw through the same ``standard_normal_`` so that both can be
compared on the same randomness.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from ._sharding import rank

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_sub_generators: list[torch.Generator] = []


def make_generator(device: torch.device, seed: int | None) -> torch.Generator:
    """The noise generator: seeded with ``seed + rank`` (a seed from the global RNG if None)."""
    generator = torch.Generator(device=device)
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    return generator.manual_seed(seed + rank())


def standard_normal_(buf: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Fill ``buf`` with N(0, 1) draws determined by ``generator`` alone.

    On CPU, large buffers are filled in parallel: per call, one seed per thread is drawn from
    ``generator`` and each thread fills its slice with its own re-seeded generator (exact normal
    draws; the stream depends only on ``generator``'s state and the thread count).
    """
    global _pool
    threads = torch.get_num_threads()
    n = buf.numel()
    if buf.device.type != "cpu" or threads < 2 or n < (1 << 20):
        return buf.normal_(generator=generator)
    seeds = torch.randint(0, 2**62, (threads,), generator=generator).tolist()
    with _lock:
        if _pool is None or _pool._max_workers != threads:
            _pool = ThreadPoolExecutor(max_workers=threads)
        while len(_sub_generators) < threads:
            _sub_generators.append(torch.Generator())
        gens = _sub_generators[:threads]
    step = -(-n // threads)
    parts = [buf[i * step:(i + 1) * step] for i in range(threads)]

    def fill(i: int) -> None:
        gens[i].manual_seed(seeds[i])
        parts[i].normal_(generator=gens[i])

    with _lock:  # the sub-generators are shared: one fill at a time
        list(_pool.map(fill, range(threads)))
    return buf
