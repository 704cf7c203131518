"""Does the correction pay per example and per second? The budget-matched campaign behind
``scripts/evidence.py``: AdamW, alpha-SVRG, IVON, IVON with a 3x mini-batch, IVON-PC and IVON-PCM,
each on its own schedule for each budget, every one tuned by the same rule.

A budget is a number of gradient evaluations (examples through forward and backward: a corrected
step evaluates its mini-batch twice, a refresh a mega-batch of ``factor`` mini-batches). For each
budget every method gets its own run whose schedule (warm-up, cosine, the correction's start at
``start_ratio`` of its steps) ends exactly there (:func:`research.runner.run_shape`): IVON and
AdamW for as many steps as the budget allows, the corrected methods for about a third of them (the
LM regime: 1,000 and 500 steps at the base budget of 16,000). Budgets are multiples of the
regime's base budget (``--budgets 1,2``), so the result is a curve of final loss against budget
per method, read at each run's annealed end, never mid-schedule.

The rule every method is tuned by, at each budget, on seed 1000 (never reported), by the final
loss on the selection split (LM: half of the validation windows; image: 5,000 training images
never trained on), never on the report split the results are read on:
1. learning rate: each method its own 1-3-10 grid (AdamW's for alpha-SVRG, IVON's for the IVON
   family), grown past whichever end is best, the corrected methods at alpha 0.5 and w 0.01;
2. alpha in {0.25, 0.5, 1.0} for each corrected method at its learning rate;
3. the mean-term weight w in {0.01, 1.0} for IVON-PC and IVON-PCM at their alpha.
rho is the difference between IVON-PC (0) and IVON-PCM (the paper's GPT-2 values 0.6, 0.1).
Every learning-rate curve and each method's largest stable learning rate (the largest of its
grid whose run ends finite and below its starting loss) are reported.

Then every method runs at its tuned settings on seeds 0, 1, 2 (``--seeds``) at each budget.
Results: the final report-split loss per method and budget (equal gradient evaluations, each on
its own schedule), paired differences by seed at equal budget, at equal steps (where a corrected
run and a plain one have the same number of steps), and at equal CPU time (each method's final
loss against its mean CPU seconds over budgets, interpolated in log time at the plain IVON runs'
CPU times; not paired). Intervals are 95% t-intervals over seeds.

The ``continual`` regime (:mod:`research.continual`) asks the paper's per-second question: its
budgets are CPU seconds, each method's steps its budget over its calibrated CPU time per step,
alpha and rho fixed at the paper's continual values (the learning rate is tuned, by the same
rule), IVON and IVON-PCM continuing an IVON pretraining's posterior, AdamW starting fresh.

Every finished run is kept in ``<out>/<regime>/runs/<hash>.json``, keyed by its configuration
and the code version (:func:`research.campaign.code_version`), so an interrupted campaign resumes
and runs made by other code are never mixed in.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import statistics
import time
from pathlib import Path

import numpy as np

from .campaign import TUNE_SEED, cached, code_version, fmt_ci, mean_ci, stale_runs, tune_grids
from .runner import (CORRECTED, METHODS, PAPER_RHO, REGIMES, base_budget, budget_unit, pretrained_folder,
                     run_shape, train_run)

ALPHAS = (0.25, 0.5, 1.0)
#: the corrected methods' alpha while their learning rate is tuned
ALPHA0 = 0.5
WEIGHTS = (0.01, 1.0)
SELECT, REPORT = "eval_select_loss", "eval_report_loss"
#: the differences reported, first minus second
PAIRS = (("ivon_pc", "ivon"), ("ivon_pcm", "ivon"), ("ivon_pcm", "ivon_3x"), ("ivon_3x", "ivon"),
         ("alpha_svrg", "adamw"), ("ivon", "adamw"), ("ivon_pcm", "adamw"))


def run_key(regime: str, cfg: dict) -> dict:
    """A run's cache key: its regime, the regime's settings, its configuration and the code."""
    return {"regime": regime, "spec": REGIMES[regime], "cfg": cfg, "code": code_version()}


def _job(job: tuple) -> dict:
    regime, cfg, cache = job
    return cached(Path(cache), run_key(regime, cfg), lambda: train_run(regime, cfg))


def _refuse(job: tuple) -> dict:
    """``--report_only``: a run that has not finished under this code is an error, not a training."""
    regime, cfg, cache = job
    key = run_key(regime, cfg)

    def missing():
        stale = stale_runs(Path(cache), key)
        why = (f"; {len(stale)} cached run(s) of it were made by other code ({stale[0].name}: code "
               f"{json.loads(stale[0].read_text())['key'].get('code')}, this code {key['code']})") if stale else ""
        raise SystemExit(f"run {cfg} has not finished{why}: run without --report_only")
    return cached(Path(cache), key, missing)


def methods_of(regime: str) -> tuple[str, ...]:
    return tuple(REGIMES[regime].get("methods", METHODS))


class Campaign:
    def __init__(self, regime: str, out: Path, workers: int, report_only: bool = False):
        self.regime, self.out = regime, out
        self.spec = REGIMES[regime]
        self.cache = out / regime / "runs"
        self.pool = mp.get_context("spawn").Pool(workers) if workers > 1 else None
        self.started = time.time()
        self.job = _refuse if report_only else _job
        #: CPU seconds per step of each method (budgets in CPU seconds), from :meth:`calibrate`
        self.cost: dict[str, float] = {}

    def calibrate(self) -> dict[str, float]:
        """Each method's CPU seconds per step, from a run of ``calibration_steps`` (cached, on the
        tuning seed) with the regime's correction start: the budget of a CPU-second regime is
        converted to steps with it."""
        n = self.spec.get("calibration_steps", 4 * self.spec["refresh"])
        runs = self.runs([dict(self.cfg(m, TUNE_SEED, _grid(self.regime, m)[1], None), steps=n, calibration=True)
                          for m in methods_of(self.regime)])
        self.cost = {r["cfg"]["method"]: r["cpu_s"] / n for r in runs}
        return self.cost

    def cfg(self, method: str, seed: int, lr: float, budget, alpha: float | None = None,
            w: float | None = None) -> dict:
        """A run's configuration: the method's correction at ``alpha`` and ``w`` (default: the
        regime's fixed values, else the tuning start), and for CPU-second budgets its steps."""
        c = dict(method=method, seed=seed, lr=lr, budget=budget)
        if method in CORRECTED:
            c["alpha"] = alpha if alpha is not None else self.spec.get("alpha", ALPHA0)
        if method in ("ivon_pc", "ivon_pcm"):
            rho = self.spec.get("rho", PAPER_RHO)
            c.update(w=w if w is not None else self.spec.get("w", WEIGHTS[0]),
                     rho=list(rho) if method == "ivon_pcm" else [0.0, 0.0])
        if budget is not None and budget_unit(self.regime) == "cpu_s":
            c["steps"] = max(1, int(budget / self.cost[method]))
        return c

    def runs(self, cfgs: list[dict]) -> list[dict]:
        jobs = [(self.regime, c, str(self.cache)) for c in cfgs]
        results = []
        it = self.pool.imap(self.job, jobs) if self.pool else map(self.job, jobs)
        for r in it:
            results.append(r)
            print(f"[{time.time() - self.started:7.0f} s] {self.regime} {r['cfg']} -> selection "
                  f"{r['final'][SELECT]:.4f}, report {r['final'][REPORT]:.4f} ({r['cpu_s']:.0f} s cpu)", flush=True)
        return results

    def close(self):
        if self.pool:
            self.pool.close()
            self.pool.join()


def _loss(r: dict, key: str = SELECT) -> float:
    v = r["final"][key]
    return v if math.isfinite(v) else math.inf


def _stable(r: dict) -> bool:
    """The run ends finite and below its starting loss (selection split)."""
    return math.isfinite(r["final"][SELECT]) and r["final"][SELECT] < r["curve"][0][SELECT]


def _grid(regime: str, method: str) -> list[float]:
    return list(REGIMES[regime]["grids"]["adamw" if method in ("adamw", "alpha_svrg") else "ivon"])


def tune(c: Campaign, budget, methods=None, alphas=ALPHAS, weights=WEIGHTS, grow: bool = True) -> dict:
    """The tuning rule of the module docstring at one budget, on TUNE_SEED (a regime that fixes
    alpha, as the continual one does, tunes the learning rate only)."""
    methods = methods or methods_of(c.regime)
    if "alpha" in c.spec:
        alphas, weights = (), ()
    lr_runs: dict[str, dict[float, dict]] = {m: {} for m in methods}

    def losses_of(pairs):   # every method's runs go in parallel
        runs = c.runs([c.cfg(m, TUNE_SEED, v, budget) for m, v in pairs])
        for (m, v), r in zip(pairs, runs):
            lr_runs[m][v] = r
        return {pair: _loss(r) for pair, r in zip(pairs, runs)}

    chosen = tune_grids({m: _grid(c.regime, m) for m in methods}, losses_of, grow=grow)
    tuned: dict = {"budget": budget, "seed": TUNE_SEED, "lr": {}, "lr_curve": {}, "largest_stable_lr": {},
                   "correction": {}, "best": {}}
    for m, (best, losses, _) in chosen.items():
        tuned["lr"][m] = best
        tuned["lr_curve"][m] = {str(v): losses[v] for v in sorted(losses)}
        stable = [v for v, r in lr_runs[m].items() if _stable(r)]
        tuned["largest_stable_lr"][m] = max(stable) if stable else None
    corrected = [m for m in methods if m in CORRECTED]
    at_lr = {m: lr_runs[m][tuned["lr"][m]]["cfg"] for m in corrected}
    rows = {m: {(at_lr[m]["alpha"], at_lr[m].get("w")): _loss(lr_runs[m][tuned["lr"][m]])} for m in corrected}
    first = c.runs([c.cfg(m, TUNE_SEED, tuned["lr"][m], budget, a) for m in corrected for a in alphas
                    if a != at_lr[m]["alpha"]])
    for r in first:
        rows[r["cfg"]["method"]][(r["cfg"]["alpha"], r["cfg"].get("w"))] = _loss(r)
    best_alpha = {m: min(rows[m], key=rows[m].get)[0] for m in corrected}
    second = c.runs([c.cfg(m, TUNE_SEED, tuned["lr"][m], budget, best_alpha[m], w)
                     for m in corrected if m != "alpha_svrg" for w in weights if w != at_lr[m].get("w")])
    for r in second:
        rows[r["cfg"]["method"]][(r["cfg"]["alpha"], r["cfg"]["w"])] = _loss(r)
    for m in corrected:
        a, w = min(rows[m], key=rows[m].get)
        tuned["best"][m] = {"alpha": a, **({} if w is None else {"w": w})}
        tuned["correction"][m] = [{"alpha": a_, "w": w_, "final_selection_loss": v}
                                  for (a_, w_), v in sorted(rows[m].items(), key=lambda kv: (kv[0][1] or 0, kv[0][0]))]
    return tuned


def reported_cfgs(c: Campaign, tuned: dict, seeds) -> list[dict]:
    return [c.cfg(m, s, tuned["lr"][m], tuned["budget"], **tuned["best"].get(m, {}))
            for s in seeds for m in tuned["lr"]]


def _by(runs: list[dict], method: str, budget: int) -> list[dict]:
    return [r for r in runs if r["cfg"]["method"] == method and r["cfg"]["budget"] == budget]


def _log_interp(points: list[tuple[float, float]], x: float) -> float | None:
    """y at x on a curve of (x, y) points, linear in log x; None outside its range."""
    pts = sorted(points)
    xs = [math.log(p[0]) for p in pts]
    if not pts or not xs[0] - 1e-9 <= math.log(x) <= xs[-1] + 1e-9:
        return None
    return float(np.interp(math.log(x), xs, [p[1] for p in pts]))


def _corrected_logs(r: dict, key: str) -> list[float]:
    return [e[key] for e in r["logs"] if key in e and e["step"] > r["start_step"] and math.isfinite(e[key])]


def summarize(runs: list[dict], budgets: list, methods=METHODS) -> dict:
    classifier = "eval_report_accuracy" in runs[0]["final"]
    out: dict = {"budgets": budgets, "methods": {}, "paired": {}, "equal_steps": {}, "equal_time": {}}
    for m in methods:
        per = {}
        for b in budgets:
            g = _by(runs, m, b)
            if not g:
                continue
            s = {"final_report_loss": mean_ci([_loss(r, REPORT) for r in g]),
                 "steps": g[0]["shape"]["steps"], "batch": g[0]["shape"]["batch"],
                 "cpu_s": mean_ci([r["cpu_s"] for r in g]),
                 "examples": g[0]["final"]["examples"]}
            if classifier:
                s["final_report_accuracy"] = mean_ci([r["final"]["eval_report_accuracy"] for r in g])
            for key in ("pc/grad_var_ratio", "pc/hess_var_ratio", "pc/clipped_share", "pc/h_out_negative_share"):
                vals = [statistics.fmean(v) for v in (_corrected_logs(r, key) for r in g) if v]
                if vals:
                    s[key] = mean_ci(vals)
            if all("h_moved" in r for r in g):
                s["h_moved_median"] = mean_ci([r["h_moved"]["median"] for r in g])
            if all("predictive" in r for r in g):
                for how in ("mean", "predictive"):
                    for k in ("accuracy", "nll", "ece"):
                        s[f"{how}_{k}"] = mean_ci([r["predictive"][how][k] for r in g])
            per[str(b)] = s
        if per:
            out["methods"][m] = per
    for a, b in PAIRS:   # paired by seed, at equal budget
        for budget in budgets:
            base = {r["cfg"]["seed"]: r for r in _by(runs, b, budget)}
            pairs = [(r, base[r["cfg"]["seed"]]) for r in _by(runs, a, budget) if r["cfg"]["seed"] in base]
            if pairs:
                out["paired"].setdefault(f"{a} - {b}", {})[str(budget)] = mean_ci(
                    [_loss(x, REPORT) - _loss(y, REPORT) for x, y in pairs])
    for a in CORRECTED:   # equal steps: a corrected run against a plain one of as many steps
        b = "adamw" if a == "alpha_svrg" else "ivon"
        for ba in budgets:
            for bb in budgets:
                ra, rb = _by(runs, a, ba), _by(runs, b, bb)
                if ra and rb and ra[0]["shape"]["steps"] == rb[0]["shape"]["steps"]:
                    base = {r["cfg"]["seed"]: r for r in rb}
                    diffs = [_loss(r, REPORT) - _loss(base[r["cfg"]["seed"]], REPORT) for r in ra
                             if r["cfg"]["seed"] in base]
                    out["equal_steps"][f"{a} - {b}"] = {"steps": ra[0]["shape"]["steps"], "budgets": [ba, bb],
                                                       "difference": mean_ci(diffs)}
    curves = {m: [(v["cpu_s"]["mean"], v["final_report_loss"]["mean"]) for v in per.values()]
              for m, per in out["methods"].items()}
    for b in budgets:   # equal CPU time: at the plain IVON runs' CPU times
        if "ivon" not in out["methods"] or str(b) not in out["methods"]["ivon"]:
            continue
        t = out["methods"]["ivon"][str(b)]["cpu_s"]["mean"]
        out["equal_time"][str(b)] = {"cpu_s": t, "loss": {m: _log_interp(pts, t) for m, pts in curves.items()}}
    return out


def markdown(report: dict) -> str:
    regime, spec, s = report["regime"], report["spec"], report["summary"]
    budgets = s["budgets"]
    unit = ("CPU seconds (each method's steps: the budget over its calibrated CPU time per step, "
            f"{', '.join(f'{m} {v:.3f} s' for m, v in report['cost_per_step'].items())})"
            if report["budget_unit"] == "cpu_s" else
            f"gradient evaluations (base {base_budget(regime):,}: {spec['steps']} steps of batch {spec['batch']})")
    lines = [f"# Evidence: regime `{regime}`, budget-matched", "",
             f"Budgets {', '.join(f'{b:,}' for b in budgets)} {unit}; every run's schedule ends at its budget; the "
             f"correction (alpha-SVRG, IVON-PC, IVON-PCM) starts at {spec['start_ratio']:.0%} of its run, refresh "
             f"every {spec['refresh']} steps from {spec['factor']} mini-batches. Seeds {report['seeds']}; mean ± 95% "
             "interval; loss on the report split (hyperparameters were chosen on the selection split). Code "
             f"{report['code']}.", "", "## Final loss at each budget", "",
             "| method | " + " | ".join(f"{b:,}: loss (steps, CPU s)" for b in budgets) + " |",
             "|---" * (len(budgets) + 1) + "|"]
    for m, per in s["methods"].items():
        cells = [f"{fmt_ci(per[str(b)]['final_report_loss'], 4)} ({per[str(b)]['steps']}, "
                 f"{per[str(b)]['cpu_s']['mean']:.0f})" if str(b) in per else "" for b in budgets]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "Paired differences (same seed, same budget; negative: the first is better):", "",
              "| difference | " + " | ".join(f"{b:,}" for b in budgets) + " |", "|---" * (len(budgets) + 1) + "|"]
    for name, per in s["paired"].items():
        lines.append(f"| {name} | " + " | ".join(fmt_ci(per[str(b)], 4) if str(b) in per else "" for b in budgets) + " |")
    if s["equal_steps"]:
        lines += ["", "At equal steps (a corrected run at a larger budget against a plain one at a smaller):", "",
                  "| difference | steps | budgets | difference |", "|---|---|---|---|"]
        for name, v in s["equal_steps"].items():
            lines.append(f"| {name} | {v['steps']} | {v['budgets'][0]:,} vs {v['budgets'][1]:,} | "
                         f"{fmt_ci(v['difference'], 4)} |")
    if s["equal_time"]:
        lines += ["", "At equal CPU time (each method's final loss over budgets, interpolated in log time at the "
                  "plain IVON runs' CPU times; means, not paired; blank: outside the method's range):", "",
                  "| CPU s | " + " | ".join(s["methods"]) + " |", "|---" * (len(s["methods"]) + 1) + "|"]
        for b, v in s["equal_time"].items():
            lines.append(f"| {v['cpu_s']:.0f} | " + " | ".join(
                "" if v["loss"].get(m) is None else f"{v['loss'][m]:.4f}" for m in s["methods"]) + " |")
    lines += ["", "## Tuning (seed 1000, selection split)", ""]
    for t in report["tuning"]:
        lines += [f"Budget {t['budget']:,}: learning rates " + ", ".join(
            f"{m} {t['lr'][m]} (largest stable {t['largest_stable_lr'][m]})" for m in t["lr"]) + ".", ""]
        lines += ["| method | " + " | ".join(["learning rate: selection loss"]) + " |", "|---|---|"]
        for m, curve in t["lr_curve"].items():
            lines.append(f"| {m} | " + ", ".join(f"{lr}: {v:.4f}" for lr, v in curve.items()) + " |")
        lines += ["", "| method | alpha | w | selection loss |", "|---|---|---|---|"]
        for m, rows in t["correction"].items():
            for row in rows:
                lines.append(f"| {m} | {row['alpha']} | {'' if row['w'] is None else row['w']} | "
                             f"{row['final_selection_loss']:.4f} |")
        lines += ["", f"Chosen: {json.dumps(t['best'])}.", ""]
    lines += ["## Diagnostics (corrected phase, mean over logs and seeds)", "",
              "| method | budget | grad var ratio | hess var ratio | clipped share | h_out negative |", "|---|---|---|---|---|---|"]
    for m, per in s["methods"].items():
        for b, v in per.items():
            cells = [fmt_ci(v[k], 3) if k in v else "" for k in ("pc/grad_var_ratio", "pc/hess_var_ratio",
                                                                 "pc/clipped_share", "pc/h_out_negative_share")]
            if any(cells):
                lines.append(f"| {m} | {float(b):,g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report["summary"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for m, per in s["methods"].items():
        pts = sorted((v["examples"], v["cpu_s"]["mean"], v["final_report_loss"]["mean"],
                      v["final_report_loss"]["ci95"]) for v in per.values())
        ex, cpu, y, ci = (list(t) for t in zip(*pts))
        ci = [0.0 if not math.isfinite(c) else c for c in ci]
        axes[0].errorbar(ex, y, yerr=ci, marker="o", capsize=3, label=m)
        axes[1].errorbar(cpu, y, yerr=ci, marker="o", capsize=3, label=m)
    for ax, xl in zip(axes[:2], ("gradient evaluations (each run on its own schedule)", "CPU time (s)")):
        ax.set_xscale("log")
        ax.set_xlabel(xl)
        ax.set_ylabel("final loss (report split)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    t = report["tuning"][0]
    for m, curve in t["lr_curve"].items():
        lrs = sorted(curve, key=float)
        ys = [curve[v] if math.isfinite(curve[v]) else np.nan for v in lrs]
        axes[2].plot([float(v) for v in lrs], ys, marker="o", label=m)
    axes[2].set_xscale("log")
    axes[2].set_xlabel(f"learning rate (budget {t['budget']:,}, tuning seed)")
    axes[2].set_ylabel("final loss (selection split)")
    finite = [v for c in t["lr_curve"].values() for v in c.values() if math.isfinite(v)]
    if finite:
        axes[2].set_ylim(min(finite) - 0.02, min(max(finite), min(finite) + 1.0) + 0.02)
    axes[2].grid(alpha=0.3)
    axes[2].legend(fontsize=8)
    fig.suptitle(f"regime {report['regime']}: budget-matched, mean over seeds {report['seeds']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def status(regime: str, out: Path) -> str:
    """Every finished run of this code in a campaign that has not finished, as a table (tuning
    runs are on seed 1000 and are not results: they choose the settings)."""
    runs, stale, code = [], 0, code_version()
    spec = json.loads(json.dumps(REGIMES[regime]))          # as stored: tuples read back as lists
    for path in sorted((out / regime / "runs").glob("*.json")):
        r = json.loads(path.read_text())
        if r.get("regime") == regime and r["key"]["spec"] == spec:
            if r["key"].get("code") == code:
                runs.append(r)
            else:
                stale += 1
    lines = [f"# Evidence: regime `{regime}`, status", "",
             f"{len(runs)} finished runs of this code ({code}; {stale} made by other code are not counted) "
             "of a campaign that has not finished: tuning-seed runs choose settings and are not results.", "",
             "| method | budget | seed | lr | alpha | w | steps | selection loss | report loss | CPU s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    order = {m: i for i, m in enumerate(METHODS)}
    for r in sorted(runs, key=lambda r: (r["cfg"].get("budget") or 0, r["cfg"]["seed"], order.get(r["cfg"]["method"], 9),
                                         r["cfg"]["lr"], r["cfg"].get("alpha", 0), r["cfg"].get("w") or 0)):
        c = r["cfg"]
        lines.append(f"| {c['method']} | {c.get('budget') or 'calibration'} | {c['seed']} | {c['lr']} | {c.get('alpha', '')} | "
                     f"{c.get('w', '')} | {r['shape']['steps']} | {r['final'][SELECT]:.4f} | "
                     f"{r['final'][REPORT]:.4f} | {r['cpu_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="scripts/evidence.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regime", choices=sorted(REGIMES), default="lm")
    ap.add_argument("--out", default="docs/results/evidence")
    ap.add_argument("--budgets", default="1,2",
                    help="budgets as multiples of the regime's base budget, comma-separated (default 1,2)")
    ap.add_argument("--workers", type=int, default=1, help="runs in parallel, one thread each")
    ap.add_argument("--seeds", type=int, default=3, help="reported seeds (0 .. seeds - 1)")
    ap.add_argument("--quick", action="store_true",
                    help="a reduced rule (no grid growth, alpha 0.5 and 1, w 0.01): checks the code path")
    ap.add_argument("--report_only", action="store_true", help="only report from finished runs")
    ap.add_argument("--status", action="store_true",
                    help="write <regime>_status.md: every finished run so far (the campaign unfinished)")
    a = ap.parse_args(argv)
    try:
        mults = [float(x) for x in a.budgets.split(",")]
    except ValueError:
        ap.error(f"--budgets={a.budgets!r} is invalid: accepted are comma-separated numbers > 0")
    if not mults or any(not (math.isfinite(x) and x > 0) for x in mults):
        ap.error(f"--budgets={a.budgets!r} is invalid: accepted are comma-separated numbers > 0")
    if a.seeds < 1:
        ap.error(f"--seeds={a.seeds} is invalid: accepted is an integer >= 1")
    if a.workers < 1:
        ap.error(f"--workers={a.workers} is invalid: accepted is an integer >= 1")
    seconds = budget_unit(a.regime) == "cpu_s"
    budgets = sorted({round(x * base_budget(a.regime), 1) if seconds else int(round(x * base_budget(a.regime)))
                      for x in mults})
    for b in budgets:   # every method's schedule must fit: refused here, before any training
        for m in methods_of(a.regime):
            try:
                run_shape(a.regime, {"method": m, "budget": b, "steps": 1 if seconds else None})
            except ValueError as e:
                ap.error(f"--budgets={a.budgets!r} is invalid for {m}: {e}")
    if a.regime == "image":
        from .image import FASHION_HOW, FASHION_MNIST
        if not FASHION_MNIST.is_dir():
            ap.error(f"--regime image needs {FASHION_MNIST}: {FASHION_HOW}")
    out = Path(a.out)
    if a.status:
        text = status(a.regime, out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{a.regime}_status.md").write_text(text)
        print(text)
        return {"status": text}
    if a.regime.startswith("continual") and not a.report_only:   # once, before the workers start
        from .continual import pretrained
        pretrained(pretrained_folder(a.regime), REGIMES[a.regime])
    c = Campaign(a.regime, out, 1 if a.report_only else a.workers, a.report_only)
    kw = dict(alphas=(0.5, 1.0), weights=(WEIGHTS[0],), grow=False) if a.quick else {}
    try:
        if seconds:
            c.calibrate()
        tuning = [tune(c, b, **kw) for b in budgets]
        runs = [r for t in tuning for r in c.runs(reported_cfgs(c, t, range(a.seeds)))]
    finally:
        c.close()
    report = {"regime": a.regime, "spec": REGIMES[a.regime], "seeds": list(range(a.seeds)), "code": code_version(),
              "budgets": budgets, "budget_unit": budget_unit(a.regime), "cost_per_step": c.cost,
              "tuning": tuning, "summary": summarize(runs, budgets, methods_of(a.regime)), "runs": runs}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{a.regime}.json").write_text(json.dumps(report, indent=1, default=str))
    (out / f"{a.regime}.md").write_text(markdown(report))
    plot(report, out / f"{a.regime}.png")
    print((out / f"{a.regime}.md").read_text())
    return report
