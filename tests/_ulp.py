"""Equality of two code paths up to a stated number of units in the last place (ulps).

Bit-for-bit equality is a property of the same operations on the same layout in the same process
(a resumed run against an uninterrupted one, alpha = 0 against IVON, two DDP ranks): those tests
use ``torch.equal``. Two *different* paths (a compiled and an eager kernel, kept and regenerated
noise, a contiguous and a transposed parameter, two chunkings or thread counts) round each
operation correctly but not necessarily identically: which instructions a vector width, a BLAS
code path (MKL takes another on non-Intel CPUs) or a vectorized loop's scalar tail uses is a
property of the CPU, not of the code. Those tests assert agreement within a bound in ulps and say
in the test why the bound holds.

The ulp is that of the tensor's largest magnitude (``ulps_apart``): an element near zero that
results from cancellation carries the absolute error of the numbers it was computed from, not a
relative error of its own.
"""

from __future__ import annotations

import math

import torch


def ulp_of(x: float, dtype: torch.dtype) -> float:
    """The spacing of ``dtype``'s numbers at magnitude ``x`` (its smallest normal's below it)."""
    fi = torch.finfo(dtype)
    x = max(abs(x), fi.tiny)
    return fi.eps * 2.0 ** math.floor(math.log2(x))


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in ulps of the largest magnitude of ``a`` and ``b`` (0 where they are equal;
    inf where only one is non-finite)."""
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    if torch.equal(a, b):
        return 0.0
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    if not torch.equal(fa, fb) or not torch.equal(a[~fa], b[~fb]):
        return math.inf
    a64, b64 = a[fa].double(), b[fb].double()
    scale = max(a64.abs().max().item(), b64.abs().max().item())
    return (a64 - b64).abs().max().item() / ulp_of(scale, a.dtype)


def assert_within_ulps(a: torch.Tensor, b: torch.Tensor, ulps: float, what: str = "") -> None:
    """|a - b| <= ``ulps`` ulps of the tensors' largest magnitude (see the module)."""
    d = ulps_apart(a, b)
    assert d <= ulps, f"{what}: {d:.3g} ulps apart (bound {ulps}) on {a.dtype} of shape {tuple(a.shape)}"
