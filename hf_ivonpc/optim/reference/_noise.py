"""The draws of the references: the fast optimizers' flat draw per group, split per parameter."""

import torch

from .._random import standard_normal_


def standard_normal_per_param(param_groups, generator):
    """One standard-normal draw per group (as the fast optimizers make it), split per parameter."""
    eps = []
    for group in param_groups:
        n = sum(p.numel() for p in group["params"])
        flat = standard_normal_(torch.empty(n, dtype=group["params"][0].dtype), generator)
        off = 0
        for p in group["params"]:
            eps.append(flat[off:off + p.numel()].view_as(p))
            off += p.numel()
    return eps
