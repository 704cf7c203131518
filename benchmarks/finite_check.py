"""Cost of the non-finite check: one optimizer step (sampling, collection, update) with and without
it, IVON and IVON-PCM, with and without gradient clipping, in one process.

Each collection checks that its gradients are finite (``SamplingProtocol._check_finite``): from
the clipping norm where ``max_grad_norm`` is set (Trainer's default; free for the theta_in and
mega-batch passes), else from one sum per gradient tensor. The "without" variants replace that
method by a no-op on their own optimizer; everything else is the same code. Gradients are fixed
random tensors assigned to ``p.grad`` (no model), on a GPT-2-like mix of shapes. Variants are
interleaved round-robin, warm-up repetitions first, medians reported. Usage::

    PYTHONPATH=. python benchmarks/finite_check.py [--params 19e6] [--reps 15] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from hf_ivonpc.optim import IVON, IVONPC


def shapes_for(n_params: float) -> list[tuple[int, ...]]:
    """An embedding, square matrices and vectors, about ``n_params`` numbers in all."""
    out, total = [(6282, 768)], 6282 * 768
    while total < n_params:
        out += [(768, 768), (768,)]
        total += 768 * 768 + 768
    return out


def make_step(cls, shapes, check: bool, clip: float | None):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(0.02 * torch.randn(s, generator=g)) for s in shapes]
    grads = [1e-3 * torch.randn(s, generator=g) for s in shapes]
    kw = dict(lr=0.1, ess=1e6, hess_init=1e-3, rescale_lr=False, seed=0)
    if cls is IVONPC:   # the correction active, no refresh in the timed steps
        kw.update(alpha=0.5, refresh_every=10 ** 9, start_step=0)
    opt = cls(params, **kw)
    opt.max_grad_norm = clip
    if not check:
        opt._check_finite = lambda at, norm: None
    if cls is IVONPC:
        with opt.refreshing():
            with opt.sampled_params(train=True, at="mega"):
                for p, gr in zip(params, grads):
                    p.grad = gr.clone()

    def step():
        with opt.sampled_params(train=True):
            for p, gr in zip(params, grads):
                p.grad = gr
        if cls is IVONPC:
            with opt.sampled_params(train=True, at="out"):
                for p, gr in zip(params, grads):
                    p.grad = gr
        opt.step()
    return step


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", type=float, default=19e6)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    shapes = shapes_for(a.params)
    variants = {f"{cls.__name__.lower()}_{'clip' if clip else 'noclip'}_{'check' if check else 'none'}":
                make_step(cls, shapes, check, clip)
                for cls in (IVON, IVONPC) for clip in (None, 1.0) for check in (True, False)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(a.warmup + a.reps):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            variants[k]()
            if r >= a.warmup:
                times[k].append((time.perf_counter() - t) * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    n = sum(torch.Size(s).numel() for s in shapes)
    result = {"params": n, "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
              "reps": a.reps, "median_ms": med,
              "check_overhead": {k[:-6]: med[k] / med[k[:-6] + "_none"] - 1 for k in med if k.endswith("_check")}}
    print(f"{n / 1e6:.1f}M parameters, {result['threads']} threads, median of {a.reps}")
    for k in med:
        if k.endswith("_check"):
            base = k[:-6]
            print(f"{base:16s} without {med[base + '_none']:7.1f} ms   with {med[k]:7.1f} ms   "
                  f"+{100 * result['check_overhead'][base]:.0f}%")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
