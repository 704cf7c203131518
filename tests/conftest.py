import gc
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module", autouse=True)
def _frozen_heap():
    """Move what is alive when a test module starts (torch, transformers, the modules they import
    lazily, compiled kernels: over 500k objects) out of the garbage collector's reach.
    Trainer.train() ends with Accelerate's free_memory, a full gc.collect(), which would otherwise
    walk all of it: ~0.25 s per trained Trainer, and the suite trains hundreds. Only objects that
    survived a collection are frozen (the previous module's fixtures are torn down by then), and
    everything a test creates is collected as before."""
    gc.collect()
    gc.freeze()
    yield


def use_eager_kernels(mp: pytest.MonkeyPatch) -> None:
    """The optimizers' eager kernels, never compiled, drawing their noise with ``normal_``: for
    tests of a script's or a config's plumbing, whose kernels are compiled and checked against
    their references in test_ivon*.py and test_svrg.py (the counter-based draws too). Each
    compiled specialization costs a fresh machine about 2.5 s; an eager counter-based draw of the
    noise of a 135M-parameter model about 2.5 s on 2 cores, against 0.7 s with ``normal_``."""
    from hf_ivonpc.optim import _kernels, _random

    mp.setattr(_kernels, "FUSE_MIN_NUMEL", 1 << 62)
    mp.setattr(_random, "COUNTER_MIN", 1 << 62)


@pytest.fixture
def eager_kernels(monkeypatch):
    """``use_eager_kernels`` for one test."""
    use_eager_kernels(monkeypatch)
