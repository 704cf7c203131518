"""Mega-batch sampling for the outer refresh, independent of the inner loop's data order."""

from __future__ import annotations

import torch

from ._checks import check_arg, check_int_min


class MegaBatchSampler:
    """Draws mega-batches of ``factor`` mini-batches of ``batch_size`` examples at random.

    Sampling is without replacement within a mega-batch and independent of the inner loop
    (App. D.3 of the paper found this better). It has its own seeded generator, and
    ``state_dict`` / ``load_state_dict`` make a resumed run draw the same mega-batches.

    >>> sampler = MegaBatchSampler(num_examples=1000, batch_size=8, factor=10, seed=0)
    >>> micro_batches = sampler.sample()      # list of 10 index tensors of 8 examples each
    """

    def __init__(self, num_examples: int, batch_size: int, factor: int, seed: int = 0):
        check_int_min("num_examples", num_examples, 1)
        check_int_min("batch_size", batch_size, 1)
        check_int_min("megabatch_factor", factor, 1)
        check_int_min("seed", seed, 0)
        check_arg("megabatch_factor", factor, factor * batch_size <= num_examples,
                  f"an integer in [1, {num_examples // batch_size}] (the mega-batch, factor x "
                  f"batch_size = {factor * batch_size}, cannot exceed the {num_examples} examples)")
        self.num_examples, self.batch_size, self.factor = num_examples, batch_size, factor
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self, index: int | None = None) -> list[torch.Tensor]:
        """The next mega-batch, as ``factor`` index tensors; with ``index`` the ``index``-th
        mega-batch of this seed, drawn without touching the sampler's state (stateless: a resumed
        run that knows how many refreshes it made draws the same ones)."""
        gen = self.generator
        if index is not None:
            check_int_min("index", index, 0)
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        idx = torch.randperm(self.num_examples, generator=gen)[: self.factor * self.batch_size]
        return list(idx.split(self.batch_size))

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "num_examples": self.num_examples,
                "batch_size": self.batch_size, "factor": self.factor}

    def load_state_dict(self, state: dict) -> None:
        for k in ("num_examples", "batch_size", "factor"):
            if state[k] != getattr(self, k):
                raise ValueError(f"sampler state has {k}={state[k]}, this sampler {getattr(self, k)}")
        self.generator.set_state(state["generator"])
