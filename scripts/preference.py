"""AdamW, IVON and IVON-PCM on the offline DPO workload (``hf-ivonpc dpo``), compared as an
experiment: every method tuned by one rule, then 3 reported seeds with 95% t-intervals.

    python scripts/preference.py --workers 2     # tune, run the seeds, write docs/results/preference/
    python scripts/preference.py --report_only   # rebuild the report from the cached runs only

The workload is the offline default (SmolLM2-135M-Instruct + LoRA on the top two layers, 48
training pairs of math solutions, correct vs corrupted result, 24 steps of 2 pairs, reference =
the adapters disabled, its log-probabilities precomputed); only the optimizer changes.

The rule, for every method: the learning rate on a 1-3-10 grid (each method its own, grown past
whichever end is best), on seed 1000 (never reported), chosen by the final preference loss on 32
validation pairs (other instances of the training templates: neither trained on nor the test
pairs). IVON and IVON-PCM share every other setting (the workload's). Then each method at its
learning rate on seeds 0, 1, 2, and the control that changes one thing only (IVON-PCM at IVON's
tuned learning rate: the correction without a larger step), read on the 32 test pairs (templates
never trained on): the
preference loss, the reward accuracy and margin, at equal steps; the gradient evaluations and the
CPU seconds of each run (process CPU time, the whole run: data, reference log-probabilities,
training, evaluation) are reported beside them (IVON-PCM's correction costs more per step).
Each finished run is cached under ``docs/results/preference/runs`` (keyed by its configuration and
a hash of the code that trains it), so an interrupted campaign resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import shutil
import time
from pathlib import Path

from research.campaign import TUNE_SEED, cached, code_version, fmt_ci, gradient_evaluations, mean_ci, tune_grids

OUT = Path("docs/results/preference")
SEEDS = (0, 1, 2)
#: the sources a run's result depends on beside the optimizers and the trainer
WORKLOAD = ("hf_ivonpc/tasks/dpo.py", "hf_ivonpc/tasks/sft.py", "hf_ivonpc/tasks/gsm8k.py", "hf_ivonpc/trl.py",
            "hf_ivonpc/configs/dpo_offline.yaml")
METHODS = {"adamw": {"pc_method": "none", "optim": "adamw_torch"},
           "ivon": {"pc_method": "ivon"},
           "ivon_pcm": {"pc_method": "ivon_pcm"}}
LR_GRIDS = {"adamw": (1e-4, 3e-4, 1e-3), "ivon": (0.1, 0.3, 1.0), "ivon_pcm": (0.1, 0.3, 1.0)}
#: the arm that adds the correction to IVON and changes nothing else
CONTROL = "ivon_pcm at ivon's lr"
REPORTED = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins")
#: set by --report_only: a run not in the cache is an error, not trained
REPORT_ONLY = False


def run(method: str, seed: int, lr: float, split: str) -> dict:
    """One run of the workload (cached): ``method`` at ``lr`` on ``seed``, evaluated on ``split``."""
    cfg = {**METHODS[method], "learning_rate": lr, "seed": seed, "data_seed": 0, "eval_split": split}
    key = {"cfg": cfg, "code": code_version(WORKLOAD)}

    def train() -> dict:
        if REPORT_ONLY:
            raise SystemExit(f"--report_only: the run {cfg} has not finished (or was made by other code)")
        from hf_ivonpc.tasks import dpo

        out_dir = Path("results/preference") / f"{method}_lr{lr:g}_s{seed}_{split}"
        argv = ["--output_dir", str(out_dir), "--disable_tqdm", "true"]
        for k, v in cfg.items():
            argv += [f"--{k}", str(v)]
        t, cpu = time.perf_counter(), time.process_time()
        metrics = dpo.main(argv)
        wall, cpu = time.perf_counter() - t, time.process_time() - cpu
        logs = json.loads((out_dir / "log_history.json").read_text())
        shutil.rmtree(out_dir, ignore_errors=True)   # the adapter is not kept: the metrics are the result
        return {"metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}, "wall_s": wall, "cpu_s": cpu,
                "curve": [{k: v for k, v in e.items() if k in ("step", "loss", "rewards/accuracies")}
                          for e in logs if "loss" in e]}

    t = time.perf_counter()
    r = cached(OUT / "runs", key, train)
    m = r["metrics"]
    print(f"[{time.strftime('%H:%M:%S')}] {method} lr {lr:g} seed {seed} {split}: loss {m['eval_loss']:.4f}, "
          f"reward accuracy {m['eval_rewards/accuracies']:.3f} ({r['cpu_s']:.0f} CPU s"
          f"{', cached' if time.perf_counter() - t < 1 else ''})", flush=True)
    return r


def _one_thread() -> None:
    """Pool initializer: one torch thread per worker (a run's CPU seconds are then its cost alone)."""
    import torch

    torch.set_num_threads(1)


def run_all(jobs: list[tuple], pool) -> list[dict]:
    """:func:`run` for each ``(method, seed, lr, split)`` of ``jobs``, in the worker pool if any."""
    return pool.starmap(run, jobs) if pool else [run(*j) for j in jobs]


def loss_of(r: dict) -> float:
    loss = r["metrics"]["eval_loss"]
    return loss if math.isfinite(loss) else math.inf


def evaluations(method: str) -> int:
    """Pairs through forward and backward in a run of the offline default (its steps, batch and
    correction settings)."""
    from hf_ivonpc.tasks.cli import read_config

    c = read_config("dpo_offline")
    steps = c["max_steps"]
    return gradient_evaluations(steps, c["per_device_train_batch_size"], method == "ivon_pcm",
                                start=math.ceil(c["pc_start_ratio"] * steps), refresh=c["pc_refresh_steps"],
                                factor=c["pc_megabatch_factor"])


def main(argv=None) -> dict:
    global REPORT_ONLY
    ap = argparse.ArgumentParser(prog="scripts/preference.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--report_only", action="store_true", help="only report from cached runs")
    ap.add_argument("--workers", type=int, default=1, help="runs in parallel, one torch thread each")
    a = ap.parse_args(argv)
    if a.workers < 1:
        ap.error(f"--workers={a.workers} is invalid: accepted is an integer >= 1")
    REPORT_ONLY = a.report_only
    pool = (mp.get_context("spawn").Pool(a.workers, initializer=_one_thread)
            if a.workers > 1 and not a.report_only else None)

    def losses_of(pairs):
        return {p: loss_of(r) for p, r in zip(pairs, run_all([(m, TUNE_SEED, lr, "validation") for m, lr in pairs], pool))}

    tuned = tune_grids({m: LR_GRIDS[m] for m in METHODS}, losses_of)
    # each method at its own tuned learning rate, and the control that changes one thing only:
    # IVON-PCM at IVON's learning rate (the correction alone, not the correction and a larger step)
    arms = {m: (m, lr, losses) for m, (lr, losses, _) in tuned.items()}
    arms[CONTROL] = ("ivon_pcm", tuned["ivon"][0], None)
    reported = run_all([(m, s, lr, "test") for m, lr, _ in arms.values() for s in SEEDS], pool)
    if pool:
        pool.close()
        pool.join()
    report = {"methods": {}, "code": code_version(WORKLOAD), "seeds": list(SEEDS)}
    for i, (name, (m, lr, losses)) in enumerate(arms.items()):
        runs = reported[i * len(SEEDS):(i + 1) * len(SEEDS)]
        report["methods"][name] = {
            "learning_rate": lr, "lr_curve": {str(k): v for k, v in sorted(losses.items())} if losses else None,
            **{k: mean_ci([r["metrics"][k] for r in runs]) for k in REPORTED},
            "cpu_s": mean_ci([r["cpu_s"] for r in runs]), "gradient_evaluations": evaluations(m)}
    base = report["methods"]["ivon"]
    for m in report["methods"]:
        if m == "ivon":
            continue
        for k in REPORTED:
            diffs = [x - y for x, y in zip(report["methods"][m][k]["values"], base[k]["values"])]
            report["methods"][m][f"{k} - ivon"] = mean_ci(diffs)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "preference.json").write_text(json.dumps(report, indent=1))
    (OUT / "README.md").write_text(markdown(report))
    plot(report, OUT / "lr_curves.png")
    print(markdown(report))
    return report


def markdown(report: dict) -> str:
    lines = ["# DPO: AdamW, IVON and IVON-PCM on the offline preference pairs", "",
             "Made by `python scripts/preference.py` (see its docstring for the protocol). SmolLM2-135M-Instruct + "
             "LoRA (top two layers), 48 training pairs (a math solution vs the same with its result changed), 24 "
             f"steps of 2 pairs; test: 32 pairs of templates never trained on. Seeds {report['seeds']}, mean ± 95% t-interval; "
             "the differences are paired by seed.", "",
             "| method | learning rate (tuned) | preference loss | reward accuracy | reward margin | "
             "pairs evaluated | CPU s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for m, r in report["methods"].items():
        lines.append(f"| {m} | {r['learning_rate']:g} | {fmt_ci(r['eval_loss'])} | "
                     f"{fmt_ci(r['eval_rewards/accuracies'])} | {fmt_ci(r['eval_rewards/margins'])} | "
                     f"{r['gradient_evaluations']} | {fmt_ci(r['cpu_s'], 0)} |")
    lines += ["", "Test preference loss per seed: " + "; ".join(
        f"{m} " + ", ".join(f"{v:.3f}" for v in r["eval_loss"]["values"]) for m, r in report["methods"].items()) + ".",
              "", "| difference to IVON | preference loss | reward accuracy | reward margin |", "|---|---:|---:|---:|"]
    for m, r in report["methods"].items():
        if m == "ivon":
            continue
        lines.append(f"| {m} - ivon | {fmt_ci(r['eval_loss - ivon'])} | {fmt_ci(r['eval_rewards/accuracies - ivon'])} | "
                     f"{fmt_ci(r['eval_rewards/margins - ivon'])} |")
    lines += ["", "Validation preference loss against the learning rate (tuning seed):", "",
              "| method | " + " | ".join(["learning rate: loss"]) + " |", "|---|---|"]
    for m, r in report["methods"].items():
        if r["lr_curve"] is None:
            continue
        lines.append(f"| {m} | " + ", ".join(f"{float(k):g}: {v:.4f}" for k, v in r["lr_curve"].items()) + " |")
    lines += ["", "![validation loss against learning rate](lr_curves.png)", ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, family in zip(axes, (("adamw",), ("ivon", "ivon_pcm"))):
        for m in family:
            curve = report["methods"][m]["lr_curve"]
            xs = [float(k) for k in curve]
            ax.plot(xs, [curve[k] for k in curve], "o-", label=m)
        ax.axhline(math.log(2), color="grey", lw=0.8, ls="--", label="ln 2 (the reference)")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("validation preference loss")
        ax.legend(fontsize=8)
    fig.suptitle("DPO, tuning seed: validation loss against learning rate", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
