"""The paper's GPT-2 ablations (App. D.2, Fig. 6), scaled to a CPU: a small GPT-2 on Shakespeare.

    python scripts/ablate.py --tune --sweep_seeds 2  # everything below (~80 min on 2 quiet cores)
    python scripts/ablate.py --quick                 # the same code path in ~2 minutes (1 seed, 12 steps)
    python scripts/ablate.py --experiments methods --seeds 5
    python scripts/ablate.py --tune                  # select the two learning rates first (once)

Experiments (``--experiments``, comma-separated):
- ``methods``: AdamW, alpha-SVRG (over AdamW), IVON, IVON-PC (rho = 0) and IVON-PCM at the same
  number of optimizer steps, and compared at the same wall-clock time and at the same number of
  gradient evaluations (examples x passes: a corrected step evaluates its mini-batch twice, a
  refresh evaluates the mega-batch once), by linear interpolation of each run's validation curve.
- ``alpha``: IVON-PCM's alpha in {0, 0.25, 0.5, 0.75, 1} (the paper's U shape).
- ``refresh``: IVON-PCM's refresh interval in {5, 10, 20, 40} steps.
- ``noise``: shared vs independent draws for theta_in and theta_out.
- ``start``: the correction starting at 0, 1/4 and 1/2 of the run (the paper's "jump").

Fairness: every run sees the same data order (the seed fixes the windows and their order), is
evaluated on the same validation windows, and has the same step budget. Learning rates: AdamW's and
IVON's are each the best (final validation loss, seed 1000, not a reported seed) of a grid in
factors of ~3 that starts at 4 points and grows by one point past whichever end is best until the
best is inside it (``--tune``), the same rule for both; alpha-SVRG inherits AdamW's and IVON-PC/IVON-PCM inherit
IVON's, as in the paper. ``--tune`` writes its losses and choices to ``tuning.json`` in ``--out``;
later runs read the learning rates from there (and refuse to run without it, except ``--quick``).

Writes ``ablations.json`` (every run's curve and the summaries), ``ablations.md`` (tables) and PNGs
to ``--out`` (default ``docs/results``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain import PretrainArguments, build_trainer  # noqa: E402

from hf_ivonpc import PCTrainingArguments  # noqa: E402
from hf_ivonpc.tasks.campaign import interp, next_grid_point  # noqa: E402

GRIDS = {"adamw": [3e-4, 1e-3, 3e-3, 1e-2], "ivon": [0.1, 0.3, 1.0, 3.0]}
TUNE_SEED = 1000


class Clock(TrainerCallback):
    """Wall time of training (evaluation excluded) at each evaluation."""

    def __init__(self):
        self.train_time, self.t0, self.points = 0.0, None, []

    def on_step_begin(self, args, state, control, **kw):
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.train_time += time.perf_counter() - self.t0

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        self.points.append({"step": state.global_step, "time_s": self.train_time,
                            "eval_loss": metrics["eval_loss"]})


def gradient_evaluations(step: int, cfg: dict) -> int:
    """Examples evaluated up to ``step``: inner passes, theta_out passes and mega-batches."""
    b = cfg["batch"]
    n = step * b
    method, start = cfg["method"], cfg.get("start", 0)
    if method in ("alpha_svrg", "ivon_pc", "ivon_pcm") and step > start:
        corrected = step - start
        refreshes = math.ceil(corrected / cfg.get("refresh", 10))
        n += corrected * b + refreshes * cfg.get("factor", 10) * b
    return n


def run(cfg: dict, base: dict, out: Path) -> dict:
    """One training run; ``cfg``: method, seed, lr and the correction's settings. A finished run
    is kept in ``out/../cache`` and not repeated (an interrupted ablation resumes)."""
    key = hashlib.sha256(json.dumps([cfg, base], sort_keys=True).encode()).hexdigest()[:16]
    cached = out.parent / "cache" / f"{key}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    result = _train(cfg, base, out)
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(result))
    return result


def _train(cfg: dict, base: dict, out: Path) -> dict:
    m = cfg["method"]
    pc = {"none": "none", "adamw": "none", "alpha_svrg": "alpha_svrg", "ivon": "ivon"}.get(m, "ivon_pcm")
    args = PretrainArguments(dataset="shakespeare", block_size=base["block"], n_layer=base["n_layer"],
                             n_head=base["n_head"], n_embd=base["n_embd"], max_eval_windows=base["eval_windows"])
    kw = dict(output_dir=str(out), pc_method=pc, max_steps=base["steps"], learning_rate=cfg["lr"],
              per_device_train_batch_size=base["batch"], per_device_eval_batch_size=32,
              lr_scheduler_type="cosine", warmup_steps=base["steps"] // 10, weight_decay=1e-6,
              max_grad_norm=1.0, eval_strategy="steps", eval_steps=base["eval_every"], eval_on_start=True,
              logging_steps=base["eval_every"], save_strategy="no", report_to=[], disable_tqdm=True,
              use_cpu=True, seed=cfg["seed"])
    if pc in ("alpha_svrg", "ivon_pcm"):
        kw.update(pc_start_step=cfg["start"], pc_refresh_steps=cfg["refresh"], pc_megabatch_factor=cfg["factor"],
                  pc_alpha=cfg["alpha"], pc_shared_noise=cfg.get("shared", True))
    if pc == "ivon_pcm":
        rho = (0.0, 0.0) if m == "ivon_pc" else (0.6, 0.1)
        kw.update(pc_rho1=rho[0], pc_rho2=rho[1])
    if pc == "none":
        kw.update(weight_decay=0.1, adam_beta2=0.95)
    clock = Clock()
    trainer, info = build_trainer(args, PCTrainingArguments(**kw), callbacks=[clock])
    trainer.train()
    curve = [dict(p, examples=gradient_evaluations(p["step"], dict(cfg, batch=base["batch"])))
             for p in clock.points]
    return {**cfg, "curve": curve, "final_eval_loss": curve[-1]["eval_loss"], "train_time_s": clock.train_time,
            "n_params": info["n_params"]}


def mean_spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/results")
    ap.add_argument("--experiments", default="methods,alpha,refresh,noise,start")
    ap.add_argument("--seeds", type=int, default=3, help="seeds of the methods comparison")
    ap.add_argument("--sweep_seeds", type=int, default=None, help="seeds of each sweep (default: --seeds)")
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--quick", action="store_true", help="1 seed, 12 steps, a tiny model: checks the code path")
    ap.add_argument("--tune", action="store_true", help="re-select AdamW's and IVON's learning rates first")
    a = ap.parse_args(argv)
    base = dict(steps=a.steps, batch=8, block=64, n_layer=2, n_head=2, n_embd=64, eval_windows=96,
                eval_every=a.steps // 8)
    if a.quick:
        base.update(steps=12, eval_every=4, n_embd=32, eval_windows=16)
        a.seeds = a.sweep_seeds = 1
    out = Path(a.out)
    scratch = out / "_runs"
    lr = tuned_learning_rates(a, base, out)
    report: dict = {"base": base, "tuned_lr": lr, "runs": {}}
    half = base["steps"] // 2
    pc = dict(start=half, refresh=10, factor=10, alpha=1.0)
    if a.quick:
        pc.update(start=4, refresh=2, factor=2)
    seeds = range(a.seeds)
    sweep_seeds = range(a.sweep_seeds if a.sweep_seeds is not None else a.seeds)
    exps = a.experiments.split(",")
    cfgs: dict[str, list[dict]] = {}
    if "methods" in exps:
        cfgs["methods"] = [dict(method=m, seed=s, lr=lr["adamw" if m in ("adamw", "alpha_svrg") else "ivon"],
                                **({**pc, "alpha": 0.5} if m == "alpha_svrg" else pc if m.startswith("ivon_") else {}))
                           for m in ("adamw", "alpha_svrg", "ivon", "ivon_pc", "ivon_pcm") for s in seeds]
    if "alpha" in exps:
        cfgs["alpha"] = [dict(method="ivon_pcm", seed=s, lr=lr["ivon"], **{**pc, "alpha": al})
                         for al in (0.0, 0.25, 0.5, 0.75, 1.0) for s in sweep_seeds]
    if "refresh" in exps:
        cfgs["refresh"] = [dict(method="ivon_pcm", seed=s, lr=lr["ivon"], **{**pc, "refresh": r})
                           for r in ((2, 4) if a.quick else (5, 10, 20, 40)) for s in sweep_seeds]
    if "noise" in exps:
        cfgs["noise"] = [dict(method="ivon_pcm", seed=s, lr=lr["ivon"], **pc, **({} if sh else {"shared": False}))
                         for sh in (True, False) for s in sweep_seeds]
    if "start" in exps:
        cfgs["start"] = [dict(method="ivon_pcm", seed=s, lr=lr["ivon"], **{**pc, "start": st})
                         for st in sorted({0, base["steps"] // 4, half}) for s in sweep_seeds]
    warm_up(base, scratch / "warmup")
    done: dict[str, dict] = {}
    for exp, lst in cfgs.items():
        report["runs"][exp] = []
        for cfg in lst:
            key = json.dumps(cfg, sort_keys=True)
            if key not in done:   # a configuration shared by two experiments runs once
                t = time.perf_counter()
                done[key] = run(cfg, base, scratch / exp)
                print(f"{exp}: {cfg} -> {done[key]['final_eval_loss']:.4f} ({time.perf_counter() - t:.0f} s)", flush=True)
            report["runs"][exp].append(done[key])
    report["summary"] = summarize(report["runs"], base)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablations.json").write_text(json.dumps(report, indent=1))
    (out / "ablations.md").write_text(markdown(report["summary"], base))
    plot(report, out)
    print((out / "ablations.md").read_text())
    return report


def warm_up(base: dict, out: Path) -> None:
    """Run every method for a few steps so that no timed run pays for compiling the optimizer's kernels."""
    short = dict(base, steps=4, eval_every=2)
    pc = dict(start=1, refresh=2, factor=2, alpha=1.0)
    for m in ("adamw", "alpha_svrg", "ivon", "ivon_pc", "ivon_pcm"):
        _train(dict(method=m, seed=0, lr=1e-3, **({} if m in ("adamw", "ivon") else pc)), short, out)


def tuned_learning_rates(a, base: dict, out: Path) -> dict:
    """AdamW's and IVON's learning rates: from ``--tune`` now, or from the ``tuning.json`` it wrote."""
    path = out / "tuning.json"
    if a.tune:
        warm_up(base, out / "_runs" / "warmup")
        tuning = {"base": base, "seed": TUNE_SEED, "grids": dict(GRIDS), "final_eval_loss": {}, "lr": {}}
        for m, grid in GRIDS.items():
            grid, losses = list(grid), {}
            while True:
                for v in grid:
                    if str(v) not in losses:
                        losses[str(v)] = run({"method": m, "seed": TUNE_SEED, "lr": v}, base,
                                             out / "_runs" / "tune")["final_eval_loss"]
                best = min(grid, key=lambda v: losses[str(v)])
                if best == grid[-1]:
                    grid.append(next_grid_point(grid[-1], up=True))
                elif best == grid[0]:
                    grid.insert(0, next_grid_point(grid[0], up=False))
                else:
                    break
            tuning["grids"][m] = grid
            tuning["final_eval_loss"][m] = losses
            tuning["lr"][m] = float(best)
            print(f"tuned {m}: {losses} -> {best}", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(tuning, indent=1))
        return tuning["lr"]
    if a.quick:
        return {"adamw": GRIDS["adamw"][2], "ivon": GRIDS["ivon"][2]}
    if not path.exists():
        raise SystemExit(f"{path} does not exist: run with --tune once to select the learning rates")
    tuning = json.loads(path.read_text())
    if tuning["base"] != base:
        raise SystemExit(f"{path} was tuned for {tuning['base']}, not {base}: run with --tune again")
    return tuning["lr"]


def _label(r: dict, exp: str) -> str:
    return {"methods": r["method"], "alpha": f"alpha={r.get('alpha')}", "refresh": f"refresh={r.get('refresh')}",
            "noise": "shared" if r.get("shared", True) else "independent", "start": f"start={r.get('start')}"}[exp]


def summarize(runs: dict, base: dict) -> dict:
    summary = {}
    for exp, lst in runs.items():
        groups: dict[str, list[dict]] = {}
        for r in lst:
            groups.setdefault(_label(r, exp), []).append(r)
        s = {name: {"final_eval_loss": mean_spread([r["final_eval_loss"] for r in g]),
                    "train_time_s": mean_spread([r["train_time_s"] for r in g])} for name, g in groups.items()}
        if exp == "methods":
            t_common = min(r["curve"][-1]["time_s"] for r in lst)
            e_common = min(r["curve"][-1]["examples"] for r in lst)
            for name, g in groups.items():
                s[name]["eval_loss_at_equal_time"] = mean_spread([interp(r["curve"], "time_s", t_common) for r in g])
                s[name]["eval_loss_at_equal_examples"] = mean_spread([interp(r["curve"], "examples", e_common) for r in g])
            summary["equal_time_s"], summary["equal_examples"] = t_common, e_common
        if exp == "start":   # the "jump": how much the loss falls in the evaluation interval after
            # the correction starts, and how much IVON's (same seed, from "methods") falls there
            ivon = {r["seed"]: r for r in runs.get("methods", []) if r["method"] == "ivon"}
            for name, g in groups.items():
                st = g[0]["start"]
                if st > 0:
                    def drop(r):
                        return interp(r["curve"], "step", st) - interp(r["curve"], "step", st + base["eval_every"])
                    s[name]["drop_after_start"] = mean_spread([drop(r) for r in g])
                    if all(r["seed"] in ivon for r in g):
                        s[name]["ivon_drop_there"] = mean_spread([drop(ivon[r["seed"]]) for r in g])
        summary[exp] = s
    return summary


def _fmt(ms: dict) -> str:
    return f"{ms['mean']:.4f} ± {ms['std']:.4f}" if ms["n"] > 1 else f"{ms['mean']:.4f}"


def markdown(summary: dict, base: dict) -> str:
    lines = [f"GPT-2 {base['n_layer']} layers x {base['n_embd']}, context {base['block']}, batch {base['batch']}, "
             f"{base['steps']} steps on Shakespeare; validation loss, mean ± std over seeds.", ""]
    for exp, s in summary.items():
        if not isinstance(s, dict):
            continue
        cols = ["final_eval_loss", "train_time_s"] + [c for c in ("eval_loss_at_equal_time", "eval_loss_at_equal_examples",
                                                                   "drop_after_start", "ivon_drop_there")
                                                      if any(c in v for v in s.values())]
        lines += [f"### {exp}", "", "| | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for name, v in s.items():
            lines.append(f"| {name} | " + " | ".join(_fmt(v[c]) if c in v else "" for c in cols) + " |")
        lines.append("")
    if "equal_time_s" in summary:
        lines.append(f"Equal time: {summary['equal_time_s']:.1f} s of training; equal examples: "
                     f"{summary['equal_examples']:,} gradient evaluations.")
    return "\n".join(lines) + "\n"


def plot(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    if "methods" in runs:
        fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
        for ax, key, xl in zip(axes, ("step", "time_s", "examples"),
                               ("optimizer steps", "training time (s)", "gradient evaluations")):
            for name in dict.fromkeys(r["method"] for r in runs["methods"]):
                g = [r for r in runs["methods"] if r["method"] == name]
                xs = np.mean([[p[key] for p in r["curve"]] for r in g], axis=0)
                ys = np.mean([[p["eval_loss"] for p in r["curve"]] for r in g], axis=0)
                ax.plot(xs, ys, marker="o", ms=3, label=name)
            ax.set_xlabel(xl)
            ax.set_ylabel("validation loss")
            ax.grid(alpha=0.3)
            # the first evaluations fall steeply: zoom on the rest, where the methods differ
            losses = [p["eval_loss"] for r in runs["methods"] for p in r["curve"]]
            third = [r["curve"][min(2, len(r["curve"]) - 1)]["eval_loss"] for r in runs["methods"]]
            ax.set_ylim(min(losses) - 0.05, max(third) + 0.05)
        axes[0].legend()
        fig.tight_layout()
        fig.savefig(out / "ablation_methods.png", dpi=110)
        plt.close(fig)
    sweeps = [e for e in ("alpha", "refresh", "noise", "start") if e in runs]
    if sweeps:
        fig, axes = plt.subplots(1, len(sweeps), figsize=(4.5 * len(sweeps), 3.6), squeeze=False)
        for ax, exp in zip(axes[0], sweeps):
            s = report["summary"][exp]
            names = list(s)
            means = [s[n]["final_eval_loss"]["mean"] for n in names]
            stds = [s[n]["final_eval_loss"]["std"] for n in names]
            ax.errorbar(range(len(names)), means, yerr=stds, marker="o", capsize=3)
            ax.set_xticks(range(len(names)), [n.split("=")[-1] for n in names])
            ax.set_title(exp)
            ax.set_ylabel("final validation loss")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "ablation_sweeps.png", dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    main()
