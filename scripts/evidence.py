"""When does posterior correction pay? AdamW, alpha-SVRG, IVON, IVON-PC and IVON-PCM compared as
an experiment, per regime (``research.runner``: ``lm``, ``image``; ``digits`` for tests).

    python scripts/evidence.py --regime lm --workers 2      # ~75 min on 2 cores; resumes if stopped
    python scripts/evidence.py --regime image --workers 2   # ~30 min; needs Debian's dataset-fashion-mnist
    python scripts/evidence.py --regime lm --report_only    # tables and plots from finished runs
    python scripts/evidence.py --regime lm --sweeps         # also Fig. 6: refresh interval, start
    python scripts/evidence.py --regime lm --status         # what has finished so far

The rule every method is tuned by, on seed 1000 (never reported):
1. learning rate: AdamW's and IVON's each the best final validation loss of a 1-3-10 grid that
   grows past whichever end is best; alpha-SVRG inherits AdamW's, IVON-PC and IVON-PCM IVON's
   (as in the paper).
2. the correction: alpha in {0.1, 0.25, 0.5, 1.0} for each corrected method (with the mean-term
   weight w = 0.01 for IVON-PC/PCM), then w in {0.01, 1.0} at the best alpha. IVON-PC has no
   outer momentum (rho = 0), IVON-PCM the paper's GPT-2 values (rho1, rho2) = (0.6, 0.1): rho is
   tuned by comparing the two.
Then every method runs at its tuned settings on seeds 0, 1, 2 (``--seeds``), and is compared at
equal optimizer steps, equal gradient evaluations (examples through forward and backward: a
corrected step evaluates its mini-batch twice, a refresh a mega-batch of 10 mini-batches) and
equal CPU time (each run single-threaded: its CPU time is its cost, whatever else runs beside it).
Intervals are 95% t-intervals over seeds; differences to the baseline are paired by seed.
A control run of IVON with beta2 = 0.99999 (h frozen at h0 over this horizon) shows what the
horizon-aware default beta2 changes. ``--state_dtype`` adds IVON and IVON-PCM with their state in
bf16 (``pc_state_dtype="bfloat16"``), paired by seed against the fp32 runs.

Every finished run is kept in ``<out>/<regime>/runs/<hash>.json`` (small; committed), so an
interrupted campaign resumes and a later run can report or extend it. Writes
``<out>/<regime>.json`` (summary + every run's curve), ``<regime>.md`` and ``<regime>.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import statistics
import time
from pathlib import Path

from research.campaign import TUNE_SEED, cached, code_version, fmt_ci, interp, mean_ci, stale_runs, tune_grids
from research.runner import METHODS, PAPER_RHO, REGIMES, train_run

ALPHAS = (0.1, 0.25, 0.5, 1.0)
WEIGHTS = (0.01, 1.0)
CONTROL = "ivon_beta2_0.99999"
#: the low-precision state runs (``--state_dtype``): these methods, in bf16, against themselves
BF16 = {"ivon": "ivon bf16 state", "ivon_pcm": "ivon_pcm bf16 state"}


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


class Campaign:
    def __init__(self, regime: str, out: Path, workers: int, quick: bool = False):
        self.regime, self.out, self.quick = regime, out, quick
        self.cache = out / regime / "runs"
        self.pool = mp.get_context("spawn").Pool(workers) if workers > 1 else None
        self.started = time.time()
        self.job = _job

    def runs(self, cfgs: list[dict]) -> list[dict]:
        jobs = [(self.regime, c, str(self.cache)) for c in cfgs]
        results = []
        it = self.pool.imap(self.job, jobs) if self.pool else map(self.job, jobs)
        for r in it:
            results.append(r)
            f = r["final"]
            print(f"[{time.time() - self.started:7.0f} s] {self.regime} {r['cfg']} -> "
                  f"eval_loss {f['eval_loss']:.4f} ({r['cpu_s']:.0f} s cpu)", flush=True)
        return results

    def close(self):
        if self.pool:
            self.pool.close()
            self.pool.join()


def _loss(r: dict) -> float:
    v = r["final"]["eval_loss"]
    return v if math.isfinite(v) else math.inf


def tune(c: Campaign, alphas=ALPHAS, weights=WEIGHTS, grow=True) -> dict:
    """Learning rates, then alpha and w of each corrected method, on TUNE_SEED."""
    spec = REGIMES[c.regime]
    tuned: dict = {"seed": TUNE_SEED, "lr": {}, "lr_losses": {}, "correction": {}}
    def losses_of(pairs):   # both families' runs go in parallel
        runs = c.runs([dict(method=fam, seed=TUNE_SEED, lr=v) for fam, v in pairs])
        return {pair: _loss(r) for pair, r in zip(pairs, runs)}
    for fam, (best, losses, _) in tune_grids({f: spec["grids"][f] for f in ("adamw", "ivon")},
                                             losses_of, grow=grow).items():
        tuned["lr"][fam], tuned["lr_losses"][fam] = best, {str(k): v for k, v in sorted(losses.items())}

    def cfg(method, alpha, w):
        base = dict(method=method, seed=TUNE_SEED, lr=tuned["lr"]["adamw" if method == "alpha_svrg" else "ivon"],
                    alpha=alpha)
        if method == "alpha_svrg":
            return base
        return dict(base, w=w, rho=list(PAPER_RHO) if method == "ivon_pcm" else [0.0, 0.0])

    corrected = ("alpha_svrg", "ivon_pc", "ivon_pcm")
    first = c.runs([cfg(m, a, weights[0]) for m in corrected for a in alphas])
    for m in corrected:
        rows = {(r["cfg"]["alpha"], r["cfg"].get("w")): _loss(r) for r in first if r["cfg"]["method"] == m}
        tuned["correction"][m] = rows
    second = [cfg(m, min(((a, w) for (a, w) in tuned["correction"][m]), key=tuned["correction"][m].get)[0], w)
              for m in ("ivon_pc", "ivon_pcm") for w in weights[1:]]
    for r in c.runs(second):
        tuned["correction"][r["cfg"]["method"]][(r["cfg"]["alpha"], r["cfg"]["w"])] = _loss(r)
    best = {}
    for m, rows in tuned["correction"].items():
        a, w = min(rows, key=rows.get)
        best[m] = {"alpha": a, **({} if w is None else {"w": w})}
    tuned["best"] = best
    tuned["correction"] = {m: [{"alpha": a, "w": w, "final_eval_loss": v} for (a, w), v in rows.items()]
                           for m, rows in tuned["correction"].items()}
    return tuned


def reported_cfgs(tuned: dict, seeds) -> list[dict]:
    cfgs = []
    for s in seeds:
        for m in METHODS:
            lr = tuned["lr"]["adamw" if m in ("adamw", "alpha_svrg") else "ivon"]
            c = dict(method=m, seed=s, lr=lr, **tuned["best"].get(m, {}))
            if m in ("ivon_pc", "ivon_pcm"):
                c["rho"] = list(PAPER_RHO) if m == "ivon_pcm" else [0.0, 0.0]
            cfgs.append(c)
        cfgs.append(dict(method="ivon", seed=s, lr=tuned["lr"]["ivon"], extra={"ivon_beta2": 0.99999}))
    return cfgs


def state_dtype_cfgs(tuned: dict, seeds) -> list[dict]:
    """The reported runs of IVON and IVON-PCM with their state in bf16."""
    return [dict(c, extra={"pc_state_dtype": "bfloat16"}) for c in reported_cfgs(tuned, seeds)
            if c["method"] in BF16 and not c.get("extra")]


#: the paper's Fig. 6 sweeps around IVON-PCM's tuned settings (``--sweeps``)
SWEEPS = {"refresh": (5, 20, 40), "start_ratio": (0.25, 0.75)}


def sweep_cfgs(tuned: dict, seeds) -> list[dict]:
    base = [c for c in reported_cfgs(tuned, seeds) if c["method"] == "ivon_pcm"]
    return [dict(c, **{k: v}) for k, values in SWEEPS.items() for v in values for c in base]


def summarize_sweeps(runs: list[dict], sweeps: list[dict], spec: dict) -> dict:
    """Final loss per swept value (the reported IVON-PCM runs are the base value), and for the
    start: the "jump", how much the loss falls over the evaluation interval after the correction
    starts, next to IVON's fall over the same steps (same seeds)."""
    base = [r for r in runs if _name(r) == "ivon_pcm"]
    ivon = {r["cfg"]["seed"]: r for r in runs if _name(r) == "ivon"}
    out = {}
    for key, values in SWEEPS.items():
        rows = {}
        for v in sorted(set(values) | {spec[key]}):
            g = base if v == spec[key] else [r for r in sweeps if r["cfg"].get(key) == v]
            row = {"final_eval_loss": mean_ci([r["final"]["eval_loss"] for r in g])}
            if key == "start_ratio":
                def drop(r, st):
                    return interp(r["curve"], "step", st) - interp(r["curve"], "step", st + spec["eval_every"])
                st = math.ceil(v * spec["steps"])
                row["drop_after_start"] = mean_ci([drop(r, st) for r in g])
                row["ivon_drop_there"] = mean_ci([drop(ivon[r["cfg"]["seed"]], st) for r in g])
            rows[str(v)] = row
        out[key] = rows
    return out


def _name(r: dict) -> str:
    extra = r["cfg"].get("extra") or {}
    if extra.get("pc_state_dtype") == "bfloat16":
        return BF16[r["cfg"]["method"]]
    if extra:
        return CONTROL
    swept = [k for k in SWEEPS if k in r["cfg"]]
    return f"{r['cfg']['method']} {swept[0]}={r['cfg'][swept[0]]}" if swept else r["cfg"]["method"]


def _corrected_logs(r: dict, key: str) -> list[float]:
    return [e[key] for e in r["logs"] if key in e and e["step"] > r["start_step"] and math.isfinite(e[key])]


def summarize(runs: list[dict], regime: str) -> dict:
    groups: dict[str, list[dict]] = {}
    for r in runs:
        if _name(r) in METHODS or _name(r) == CONTROL or _name(r) in BF16.values():
            groups.setdefault(_name(r), []).append(r)
    main = [r for r in runs if _name(r) in METHODS]
    t_eq = min(r["final"]["cpu_s"] for r in main)
    e_eq = min(r["final"]["examples"] for r in main)
    classifier = "eval_accuracy" in runs[0]["final"]
    out = {"equal_cpu_s": t_eq, "equal_examples": e_eq, "methods": {}}
    for name, g in groups.items():
        s = {"final_eval_loss": mean_ci([r["final"]["eval_loss"] for r in g]),
             "eval_loss_at_equal_examples": mean_ci([interp(r["curve"], "examples", e_eq) for r in g]),
             "eval_loss_at_equal_time": mean_ci([interp(r["curve"], "cpu_s", t_eq) for r in g]),
             "cpu_s": mean_ci([r["cpu_s"] for r in g]),
             "examples": mean_ci([r["final"]["examples"] for r in g])}
        if classifier:
            s["final_eval_accuracy"] = mean_ci([r["final"]["eval_accuracy"] for r in g])
            s["accuracy_at_equal_examples"] = mean_ci([interp(r["curve"], "examples", e_eq, "eval_accuracy") for r in g])
            s["accuracy_at_equal_time"] = mean_ci([interp(r["curve"], "cpu_s", t_eq, "eval_accuracy") for r in g])
        for key in ("pc/grad_var_ratio", "pc/hess_var_ratio", "pc/clipped_share", "pc/h_out_negative_share"):
            vals = [statistics.fmean(v) for v in (_corrected_logs(r, key) for r in g) if v]
            if vals:
                s[key] = mean_ci(vals)
        if all("h_moved" in r for r in g):
            s["h_moved_median"] = mean_ci([r["h_moved"]["median"] for r in g])
            s["h_moved_p99"] = mean_ci([r["h_moved"]["p99"] for r in g])
            s["beta2"] = g[0]["h_moved"]["beta2"]
        if all("predictive" in r for r in g):
            for how in ("mean", "predictive"):
                for k in ("accuracy", "nll", "ece"):
                    s[f"{how}_{k}"] = mean_ci([r["predictive"][how][k] for r in g])
        out["methods"][name] = s
    # differences paired by seed: the corrected IVONs against IVON, alpha-SVRG against AdamW
    out["paired"] = {}
    for m, base in (("ivon_pc", "ivon"), ("ivon_pcm", "ivon"), ("alpha_svrg", "adamw"), (CONTROL, "ivon"),
                    ("ivon", "adamw"), ("ivon_pcm", "adamw"), *((v, k) for k, v in BF16.items())):
        if m not in groups or base not in groups:
            continue
        b = {r["cfg"]["seed"]: r for r in groups[base]}
        pairs = [(r, b[r["cfg"]["seed"]]) for r in groups[m] if r["cfg"]["seed"] in b]
        out["paired"][f"{m} - {base}"] = {
            "at_equal_steps": mean_ci([x["final"]["eval_loss"] - y["final"]["eval_loss"] for x, y in pairs]),
            "at_equal_examples": mean_ci([interp(x["curve"], "examples", e_eq) - interp(y["curve"], "examples", e_eq)
                                          for x, y in pairs]),
            "at_equal_time": mean_ci([interp(x["curve"], "cpu_s", t_eq) - interp(y["curve"], "cpu_s", t_eq)
                                      for x, y in pairs])}
    return out


def markdown(report: dict) -> str:
    regime, spec, s, tuned = report["regime"], report["spec"], report["summary"], report["tuning"]
    lines = [f"# Evidence: regime `{regime}`", "",
             f"{spec['steps']} steps of batch {spec['batch']}; correction (alpha-SVRG, IVON-PC, IVON-PCM) from "
             f"{spec['start_ratio']:.0%} of the run, refresh every {spec['refresh']} steps from a mega-batch of "
             f"{spec['factor']} mini-batches. Seeds {report['seeds']}; mean ± 95% interval.", "",
             "## Tuning (seed 1000)", "",
             f"Learning rates: AdamW {tuned['lr']['adamw']} (of {tuned['lr_losses']['adamw']}), "
             f"IVON {tuned['lr']['ivon']} (of {tuned['lr_losses']['ivon']}).", "",
             "| method | alpha | w | final validation loss |", "|---|---|---|---|"]
    for m, rows in tuned["correction"].items():
        for row in sorted(rows, key=lambda x: (x["w"] or 0, x["alpha"])):
            lines.append(f"| {m} | {row['alpha']} | {row['w'] if row['w'] is not None else ''} | "
                         f"{row['final_eval_loss']:.4f} |")
    lines += ["", f"Chosen: {json.dumps(tuned['best'])}.", "", "## Methods", "",
              f"Equal examples: {s['equal_examples']:,} gradient evaluations; equal time: "
              f"{s['equal_cpu_s']:.0f} s of CPU time (the cheapest method's budget).", ""]
    cols = ["final_eval_loss", "eval_loss_at_equal_examples", "eval_loss_at_equal_time", "cpu_s"]
    if "final_eval_accuracy" in next(iter(s["methods"].values())):
        cols += ["final_eval_accuracy", "accuracy_at_equal_examples", "accuracy_at_equal_time"]
    lines += ["| method | " + " | ".join(c.replace("_", " ") for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, v in s["methods"].items():
        lines.append(f"| {name} | " + " | ".join(fmt_ci(v[c], 1 if c == "cpu_s" else 4) for c in cols) + " |")
    lines += ["", "Paired differences (same seed; negative: the first method is better):", "",
              "| difference | equal steps | equal examples | equal time |", "|---|---|---|---|"]
    for name, v in s["paired"].items():
        lines.append(f"| {name} | " + " | ".join(fmt_ci(v[k], 4) for k in ("at_equal_steps", "at_equal_examples",
                                                                          "at_equal_time")) + " |")
    lines += ["", "## Diagnostics (corrected phase, mean over logs and seeds)", "",
              "| method | grad var ratio | hess var ratio | clipped share | h_out negative | h moved (median, p99) | beta2 |",
              "|---|---|---|---|---|---|---|"]
    for name, v in s["methods"].items():
        cells = [fmt_ci(v[k], 3) if k in v else "" for k in ("pc/grad_var_ratio", "pc/hess_var_ratio",
                                                             "pc/clipped_share", "pc/h_out_negative_share")]
        moved = (f"{v['h_moved_median']['mean']:.3g}, {v['h_moved_p99']['mean']:.3g}" if "h_moved_median" in v else "")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {moved} | {v.get('beta2', '')} |")
    if "sweeps" in report:
        lines += ["", "## IVON-PCM sweeps (Fig. 6), reported seeds", "",
                  "| swept | value | final validation loss | loss fall after the start | IVON's fall there |",
                  "|---|---|---|---|---|"]
        for key, rows in report["sweeps"].items():
            for v, row in rows.items():
                extra = [fmt_ci(row[k], 4) if k in row else "" for k in ("drop_after_start", "ivon_drop_there")]
                lines.append(f"| {key} | {v} | {fmt_ci(row['final_eval_loss'], 4)} | " + " | ".join(extra) + " |")
    pred = [(n, v) for n, v in s["methods"].items() if "mean_nll" in v]
    if pred:
        lines += ["", "## Posterior predictive (8 draws) against the mean, test set", "",
                  "| method | accuracy mean / predictive | NLL mean / predictive | ECE mean / predictive |",
                  "|---|---|---|---|"]
        for n, v in pred:
            lines.append(f"| {n} | " + " | ".join(f"{fmt_ci(v['mean_' + k], 4)} / {fmt_ci(v['predictive_' + k], 4)}"
                                                for k in ("accuracy", "nll", "ece")) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    runs = [r for r in report["runs"] if _name(r) in METHODS]
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
    for ax, key, xl in zip(axes, ("step", "examples", "cpu_s"),
                           ("optimizer steps", "gradient evaluations", "CPU time (s)")):
        for m in METHODS:
            g = [r for r in runs if r["cfg"]["method"] == m]
            if not g:
                continue
            xs = np.mean([[p[key] for p in r["curve"]] for r in g], axis=0)
            ys = np.mean([[p["eval_loss"] for p in r["curve"]] for r in g], axis=0)
            ax.plot(xs, ys, marker="o", ms=3, label=m)
        ax.set_xlabel(xl)
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
        tail = [p["eval_loss"] for r in runs for p in r["curve"][2:]]
        if tail:
            ax.set_ylim(min(tail) - 0.02, max(tail) + 0.02)
    axes[0].legend()
    ax = axes[3]
    for m in ("alpha_svrg", "ivon_pc", "ivon_pcm"):
        for key, style in (("pc/grad_var_ratio", "-"), ("pc/hess_var_ratio", "--")):
            pts = [(e["step"], e[key]) for r in runs if r["cfg"]["method"] == m for e in r["logs"] if key in e]
            if pts:
                steps = sorted({p for p, _ in pts})
                ax.plot(steps, [np.mean([v for p, v in pts if p == s]) for s in steps], style,
                        label=f"{m} {key.split('/')[1].split('_')[0]}")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("optimizer steps")
    ax.set_ylabel("variance ratio (corrected / plain)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.suptitle(f"regime {report['regime']}: mean over seeds {report['seeds']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweeps(report: dict, path: Path) -> None:
    """The Fig. 6 analogue: final loss against the refresh interval, and the validation curves of
    each correction start beside IVON's (the "jump" after the start)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    spec, rows = report["spec"], report["sweeps"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    xs = sorted(rows["refresh"], key=float)
    mean = [rows["refresh"][x]["final_eval_loss"]["mean"] for x in xs]
    half = [rows["refresh"][x]["final_eval_loss"]["ci95"] for x in xs]
    a.errorbar([float(x) for x in xs], mean, yerr=half, marker="o", capsize=3, label="IVON-PCM")
    ivon = [r for r in report["runs"] if _name(r) == "ivon"]
    ivon_final = mean_ci([r["final"]["eval_loss"] for r in ivon])
    a.axhline(ivon_final["mean"], color="gray", ls="--", label="IVON")
    a.set_xscale("log", base=2)
    a.set_xlabel("refresh interval m (steps)")
    a.set_ylabel("final validation loss")
    a.legend()
    a.grid(alpha=0.3)
    base = [r for r in report["runs"] if _name(r) == "ivon_pcm"]
    shown = []
    for v in sorted(rows["start_ratio"], key=float):
        g = base if float(v) == spec["start_ratio"] else [
            r for r in report["runs"] if r["cfg"].get("start_ratio") == float(v)]
        steps = np.mean([[q["step"] for q in r["curve"]] for r in g], axis=0)
        curve = np.mean([[q["eval_loss"] for q in r["curve"]] for r in g], axis=0)
        shown.append(curve[2:])
        b.plot(steps, curve, marker="o", ms=3, label=f"IVON-PCM, start {float(v):.0%}")
    steps = np.mean([[q["step"] for q in r["curve"]] for r in ivon], axis=0)
    b.plot(steps, np.mean([[q["eval_loss"] for q in r["curve"]] for r in ivon], axis=0), "k--", label="IVON")
    tail = np.concatenate(shown)
    b.set_ylim(tail.min() - 0.02, tail.max() + 0.02)
    b.set_xlabel("optimizer steps")
    b.set_ylabel("validation loss")
    b.legend(fontsize=8)
    b.grid(alpha=0.3)
    fig.suptitle(f"regime {report['regime']}: IVON-PCM sweeps, mean over seeds {report['seeds']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def status(regime: str, out: Path) -> str:
    """Every finished run of a campaign that has not finished, as a table (tuning runs are on
    seed 1000 and are not results: they choose the settings)."""
    runs, stale, code = [], 0, code_version()
    for path in sorted((out / regime / "runs").glob("*.json")):
        r = json.loads(path.read_text())
        if r.get("regime") == regime and r["key"]["spec"] == REGIMES[regime]:
            if r["key"].get("code") == code:
                runs.append(r)
            else:
                stale += 1
    lines = [f"# Evidence: regime `{regime}`, status", "",
             f"{len(runs)} finished runs of this code ({code}; {stale} made by other code are not "
             "counted) of a campaign that has not finished: tuning-seed runs choose settings and are "
             "not results. Final validation loss at equal steps:", "",
             "| method | seed | lr | alpha | w | rho | final validation loss | CPU s |", "|---|---|---|---|---|---|---|---|"]
    order = {m: i for i, m in enumerate(METHODS)}
    for r in sorted(runs, key=lambda r: (r["cfg"]["seed"], order.get(r["cfg"]["method"], 9), r["cfg"]["lr"],
                                         r["cfg"].get("alpha", 0), r["cfg"].get("w") or 0)):
        c = r["cfg"]
        lines.append(f"| {_name(r)} | {c['seed']} | {c['lr']} | {c.get('alpha', '')} | {c.get('w', '')} | "
                     f"{c.get('rho', '')} | {r['final']['eval_loss']:.4f} | {r['cpu_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regime", choices=sorted(REGIMES), default="lm")
    ap.add_argument("--out", default="docs/results/evidence")
    ap.add_argument("--workers", type=int, default=1, help="runs in parallel, one thread each")
    ap.add_argument("--seeds", type=int, default=3, help="reported seeds (0 .. seeds - 1)")
    ap.add_argument("--quick", action="store_true",
                    help="a reduced grid (alpha 0.25 and 1, w 0.01, no growth): checks the code path")
    ap.add_argument("--report_only", action="store_true", help="only report from finished runs")
    ap.add_argument("--status", action="store_true",
                    help="write <regime>_status.md: every finished run so far (the campaign unfinished)")
    ap.add_argument("--sweeps", action="store_true",
                    help="also IVON-PCM's refresh interval (5, 20, 40) and correction start (25%%, 75%%) "
                         "at its tuned settings, on the reported seeds (Fig. 6)")
    ap.add_argument("--state_dtype", action="store_true",
                    help="also IVON and IVON-PCM with pc_state_dtype='bfloat16' on the reported seeds")
    a = ap.parse_args(argv)
    if a.seeds < 1:
        ap.error(f"--seeds={a.seeds} is invalid: accepted is an integer >= 1")
    if a.workers < 1:
        ap.error(f"--workers={a.workers} is invalid: accepted is an integer >= 1")
    if a.regime == "image":
        from research.image import FASHION_HOW, FASHION_MNIST
        if not FASHION_MNIST.is_dir():
            ap.error(f"--regime image needs {FASHION_MNIST}: {FASHION_HOW}")
    out = Path(a.out)
    if a.status:
        text = status(a.regime, out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{a.regime}_status.md").write_text(text)
        print(text)
        return {"status": text}
    c = Campaign(a.regime, out, 1 if a.report_only else a.workers, a.quick)
    if a.report_only:   # nothing new is trained
        c.job = _refuse
    try:
        kw = dict(alphas=(0.25, 1.0), weights=(0.01,), grow=False) if a.quick else {}
        tuned = tune(c, **kw)
        runs = c.runs(reported_cfgs(tuned, range(a.seeds)))
        sweeps = c.runs(sweep_cfgs(tuned, range(a.seeds))) if a.sweeps else []
        if a.state_dtype:
            runs += c.runs(state_dtype_cfgs(tuned, range(a.seeds)))
    finally:
        c.close()
    report = {"regime": a.regime, "spec": REGIMES[a.regime], "seeds": list(range(a.seeds)), "tuning": tuned,
              "summary": summarize(runs, a.regime), "runs": runs + sweeps}
    if sweeps:
        report["sweeps"] = summarize_sweeps(runs, sweeps, REGIMES[a.regime])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{a.regime}.json").write_text(json.dumps(report, indent=1, default=str))
    (out / f"{a.regime}.md").write_text(markdown(report))
    plot(report, out / f"{a.regime}.png")
    if sweeps:
        plot_sweeps(report, out / f"{a.regime}_sweeps.png")
    print((out / f"{a.regime}.md").read_text())
    return report


if __name__ == "__main__":
    main()
