"""Comparisons as experiments: cached runs, one tuning rule for every method, intervals, and the
read-off of a run's curve at equal steps, gradient evaluations or time.

Used by ``scripts/evidence.py`` and ``scripts/uncertainty.py``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from transformers import TrainerCallback

#: the seed every tuning run uses; reported runs use other seeds
TUNE_SEED = 1000


@contextmanager
def torch_threads(n: int):
    """Run the block on ``n`` torch threads (a run's CPU time is its cost), then give the caller
    its thread count back."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class CPUClock(TrainerCallback):
    """Process CPU time spent in training steps (evaluation excluded) at each evaluation (one point
    per step, holding every evaluation set's metrics), and the optimizer's diagnostics at each log. With one thread per process, CPU time is the time the
    run would take alone, also when other runs share the machine."""

    def __init__(self):
        self.cpu_s, self.t0, self.points, self.logs = 0.0, None, [], []

    def on_step_begin(self, args, state, control, **kw):
        self.t0 = time.process_time()

    def on_step_end(self, args, state, control, **kw):
        self.cpu_s += time.process_time() - self.t0

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        # several evaluation sets (a dict eval_dataset) report one after another: one point
        if not self.points or self.points[-1]["step"] != state.global_step:
            self.points.append({"step": state.global_step, "cpu_s": self.cpu_s})
        self.points[-1].update({k: v for k, v in (metrics or {}).items() if k.startswith("eval_")
                                and isinstance(v, (int, float))})

    def on_log(self, args, state, control, logs=None, **kw):
        keep = {k: v for k, v in (logs or {}).items() if k.startswith("pc/") or k == "loss"}
        if keep:
            self.logs.append({"step": state.global_step, **keep})


def gradient_evaluations(step: int, batch: int, corrected: bool, start: int = 0, refresh: int = 10,
                         factor: int = 10) -> int:
    """Examples evaluated (forward and backward) in ``step`` optimizer steps: the mini-batches at
    theta_in, from ``start`` on also at theta_out, and a mega-batch of ``factor`` mini-batches at
    every refresh (the first at ``start``)."""
    n = step * batch
    if corrected and step > start:
        done = step - start
        n += done * batch + math.ceil(done / refresh) * factor * batch
    return n


#: what a run's result depends on beside its configuration: the optimizers, the trainer, its
#: arguments and the research code that builds and reads a run (this package but the reports)
CODE_FILES = ("hf_ivonpc/optim/*.py", "hf_ivonpc/trainer.py", "hf_ivonpc/args.py",
              "research/runner.py", "research/lm.py", "research/image.py", "research/logreg.py")


def code_version(extra: tuple[str, ...] = ()) -> str:
    """A hash of the sources in :data:`CODE_FILES` and ``extra`` (patterns alike, e.g. a workload's
    module) (16 hex digits): a cache key holds it, so a run made by other code is never read back
    as this code's (it is stale: trained again, or refused when nothing may be trained)."""
    import hf_ivonpc

    roots = {"hf_ivonpc": Path(hf_ivonpc.__file__).resolve().parent.parent,
             "research": Path(__file__).resolve().parent.parent}
    h = hashlib.sha256()
    for pattern in (*CODE_FILES, *extra):
        root = roots[pattern.split("/")[0]]
        files = sorted(root.glob(pattern))
        if not files:
            raise FileNotFoundError(f"{pattern} matches no file under {root}")
        for f in files:
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def stale_runs(cache: Path, key: dict) -> list[Path]:
    """Cached runs whose key equals ``key`` but for its ``code`` entry (made by other code)."""
    want = {k: v for k, v in key.items() if k != "code"}
    out = []
    for path in sorted(cache.glob("*.json")):
        try:
            other = json.loads(path.read_text()).get("key", {})
        except (OSError, ValueError):
            continue
        if other.get("code") != key.get("code") and {k: v for k, v in other.items() if k != "code"} == want:
            out.append(path)
    return out


def steps_for_budget(budget: int, batch: int, corrected: bool, start_ratio: float = 0.0,
                     refresh: int = 10, factor: int = 10) -> int:
    """The most optimizer steps whose gradient evaluations (:func:`gradient_evaluations`, the
    correction starting at ``ceil(start_ratio x steps)``) fit in ``budget``: the length of a run
    whose own schedule ends at that budget."""
    if budget < batch:
        raise ValueError(f"budget={budget} is invalid: accepted range is at least one batch ({batch})")

    def cost(s: int) -> int:
        return gradient_evaluations(s, batch, corrected, math.ceil(start_ratio * s), refresh, factor)

    lo, hi = 1, budget // batch          # cost(s) >= s batch, so no longer run fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cost(mid) <= budget else (lo, mid - 1)
    return lo


def cached(cache: Path, key: dict, fn: Callable[[], dict]) -> dict:
    """``fn()``'s result for ``key``, computed once: kept as ``cache/<hash>.json`` (written
    atomically, so an interrupted campaign resumes where it stopped)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache / f"{digest}.json"
    if path.is_file():
        return json.loads(path.read_text())
    result = {**fn(), "key": key}
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, path)
    return result


def next_grid_point(v: float, up: bool) -> float:
    """The next value of a 1-3-10 grid above or below ``v``."""
    e = math.floor(math.log10(v) + 1e-9)
    points = [m * 10.0 ** k for k in (e - 1, e, e + 1) for m in (1, 3)]
    return float(f"{min(p for p in points if p > v * 1.01) if up else max(p for p in points if p < v / 1.01):.3g}")


def tune_grids(grids: dict[str, Iterable[float]],
               losses_of: Callable[[list[tuple[str, float]]], dict[tuple[str, float], float]],
               grow: bool = True) -> dict[str, tuple[float, dict[float, float], list[float]]]:
    """The rule every method is tuned by, for several methods at once (their runs can go in
    parallel): evaluate each grid (``losses_of`` gets the (method, value) pairs not yet evaluated
    and returns their final losses); while a method's best value is at an end of its grid, add the
    next 1-3-10 point past that end (``grow``). A diverged run (NaN or inf) is never the best.
    Returns, per method, (best value, every loss, the final grid)."""
    state = {k: (sorted(g), {}) for k, g in grids.items()}
    done: dict[str, float] = {}
    while len(done) < len(state):
        todo = [(k, v) for k, (g, losses) in state.items() if k not in done for v in g if v not in losses]
        if todo:
            for (k, v), loss in losses_of(todo).items():
                state[k][1][v] = loss
        for k, (g, losses) in state.items():
            if k in done:
                continue
            best = min(g, key=lambda v: losses[v] if math.isfinite(losses[v]) else math.inf)
            if grow and best == g[-1]:
                g.append(next_grid_point(best, up=True))
            elif grow and best == g[0]:
                g.insert(0, next_grid_point(best, up=False))
            else:
                done[k] = best
    return {k: (done[k], state[k][1], state[k][0]) for k in state}


def tune_grid(grid: Iterable[float], losses_of: Callable[[list[float]], dict[float, float]],
              grow: bool = True) -> tuple[float, dict[float, float], list[float]]:
    """``tune_grids`` for one method."""
    return tune_grids({"": grid}, lambda pairs: {("", v): loss for v, loss in
                                                  losses_of([v for _, v in pairs]).items()}, grow)[""]


def interp(curve: list[dict], key: str, x: float, y: str = "eval_loss") -> float:
    """The value of ``y`` at ``key`` = x on a run's curve (linear between evaluations)."""
    return float(np.interp(x, [p[key] for p in curve], [p[y] for p in curve]))


def mean_ci(values: list[float]) -> dict:
    """Mean and the half-width of its 95% t-interval."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return {"mean": mean, "ci95": float("nan"), "n": n, "values": values}
    from scipy.stats import t
    half = float(t.ppf(0.975, n - 1)) * statistics.stdev(values) / math.sqrt(n)
    return {"mean": mean, "ci95": half, "n": n, "values": values}


def fmt_ci(ms: dict, digits: int = 3) -> str:
    return (f"{ms['mean']:.{digits}f} ± {ms['ci95']:.{digits}f}" if ms["n"] > 1
            else f"{ms['mean']:.{digits}f}")
