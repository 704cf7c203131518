"""Fig. 3 of the paper on CPU: SGD, SVRG, IVON, IVON-PC, VSGD-PC and VON-PC on three convex
L2-regularised logistic regressions (scikit-learn's breast cancer 569 x 30 standardised, synthetic
2000 x 20 and 5000 x 100; float64, batch size 5, a constant learning rate per method).

L2 strength delta = 1e-2 (prior precision per example), a constant feature for the bias. Cost is
counted in epochs as the paper counts it: an outer full pass is 1 epoch, a plain inner step B/N, a
corrected inner step 2B/N. Corrected methods refresh from the full training set every m = N/B inner
steps, split in micro-batches of 5 each with its own posterior draw. IVON and IVON-PC: ess = N,
h0 = 0.1, beta1 = 0.9, beta2 = 0.99999, weight decay delta, no clipping, lr is the step size
(rescale_lr=False); IVON-PC: alpha = 1, rho1 = rho2 = 0, shared noise for theta_in/theta_out,
line-14 term weighted by 0.01 (the paper's). VSGD-PC samples N(m, s^2 I) with s IVON's initial
posterior std. VON-PC (full covariance, exact Hessians): beta = B/N, s_init = h0, alpha = 1,
line-12 term weighted by 0.01; a run whose precision turns indefinite counts as failed ("failures"
in the JSON). ``--methods`` also accepts ivon_pc_indep (IVON-PC with independent theta_in and
theta_out draws).

The optimum comes from Newton's method. "Epochs to tol" is the first cost at which the full-batch
training loss (at the mean) is <= optimum * 1.01; reported values are means over seeds 0..S-1 (null
unless every seed reached it); the JSON also gives per-seed values, the spread, and epochs to 0.1%.

Learning rates: ``TUNED_LR`` in this file is HARD-CODED, and is the output of ``--tune``: for
every problem and method, the best of a grid of 8 powers of 2 (moved by 4 values towards an edge
while the best lies on it, the same rule for every method), each run for 30 epochs with seed 1000
(not one of the reported seeds), ranked by epochs to tol among runs that are still within tol at
the end, then by final loss. ``--tune`` re-runs that selection (about 15-25 minutes on one core,
mostly VON-PC on the 101-dim problem) and uses its result; a problem/method missing from the
table, or any ``--delta``/``--batch``/``--micro`` other than the defaults, is tuned the same way
on the fly.

    python scripts/logreg.py --out results/logreg            # 30 epochs, 3 seeds, PNG + JSON
    python scripts/logreg.py --quick                          # < 1 min on one core
    python scripts/logreg.py --tune                           # re-select the learning rates
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_ivonpc.tasks import logreg as L  # noqa: E402

#: output of ``--tune`` (30 epochs, seed 1000); see the module docstring
TUNED_LR: dict[str, dict[str, float]] = {
    "breast_cancer": {"sgd": 2**-3, "svrg": 2**-1, "ivon": 2**-7, "ivon_pc": 2**-5,
                      "vsgd_pc": 2**-2, "von_pc": 2**-6, "ivon_pc_indep": 2**-7},
    "synthetic_2000x20": {"sgd": 2**-5, "svrg": 2**-3, "ivon": 2**-9, "ivon_pc": 2**-7,
                          "vsgd_pc": 2**-3, "von_pc": 2**-7, "ivon_pc_indep": 2**-7},
    "synthetic_5000x100": {"sgd": 2**-7, "svrg": 2**-5, "ivon": 2**-10, "ivon_pc": 2**-8,
                           "vsgd_pc": 2**-5, "von_pc": 2**-8, "ivon_pc_indep": 2**-9},
}
TUNE_SEED = 1000
TUNE_EPOCHS = 30.0
#: --quick: the same problems and learning rates, a shorter budget and fewer seeds
QUICK_EPOCHS = 12.0
QUICK_SEEDS = 1
QUICK_VON_MAX_DIM = 32  # VON-PC's exact Hessians cost most of the time on the 101-dim problem


def parse_args(argv=None) -> argparse.Namespace:
    head, rest = __doc__.split("\n\n", 1)
    ap = argparse.ArgumentParser(description=head, epilog=rest,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/logreg",
                    help="folder for logreg.png and logreg.json")
    ap.add_argument("--json", default=None, help="JSON path (default OUT/logreg.json)")
    ap.add_argument("--png", default=None, help="plot path (default OUT/logreg.png)")
    ap.add_argument("--quick", action="store_true",
                    help=f"{QUICK_EPOCHS:g} epochs, {QUICK_SEEDS} seed(s), tabulated learning "
                         f"rates, VON-PC only where d <= {QUICK_VON_MAX_DIM}")
    ap.add_argument("--epochs", type=float, default=None, help="budget in epochs (default 30)")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds 0..S-1 (default 3)")
    ap.add_argument("--tune", action="store_true",
                    help="re-select every learning rate (see below)")
    ap.add_argument("--tune-epochs", type=float, default=TUNE_EPOCHS)
    ap.add_argument("--tune-seed", type=int, default=TUNE_SEED)
    ap.add_argument("--problems", default=",".join(L.PROBLEMS),
                    help=f"comma-separated subset of {','.join(L.PROBLEMS)}")
    ap.add_argument("--methods", default=",".join(L.METHODS),
                    help=f"comma-separated subset of {','.join(L.METHODS + L.EXTRA_METHODS)}")
    ap.add_argument("--delta", type=float, default=L.DELTA,
                    help="L2 strength (a value other than the default tunes every learning rate)")
    ap.add_argument("--batch", type=int, default=5)
    ap.add_argument("--micro", type=int, default=5, help="micro-batch size of the outer full pass")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("-v", "--verbose", action="store_true", help="a line per tuning run")
    args = ap.parse_args(argv)
    args.epochs = args.epochs or (QUICK_EPOCHS if args.quick else 30.0)
    args.seeds = args.seeds or (QUICK_SEEDS if args.quick else 3)
    args.json = args.json or os.path.join(args.out, "logreg.json")
    args.png = args.png or os.path.join(args.out, "logreg.png")
    for name in args.problems.split(","):
        if name not in L.PROBLEMS:
            ap.error(f"--problems: {name!r} is not one of {list(L.PROBLEMS)}")
    for m in args.methods.split(","):
        if m not in L.METHODS + L.EXTRA_METHODS:
            ap.error(f"--methods: {m!r} is not one of {list(L.METHODS + L.EXTRA_METHODS)}")
    return args


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _mean(xs):
    return sum(xs) / len(xs)


def _std(xs):
    mu = _mean(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / len(xs))


def _mean_if_all(xs):
    return _mean(xs) if all(x is not None for x in xs) else None


def summarize(problem: L.Problem, traces: list[L.Trace], seeds: list[int], lr: float) -> dict:
    ett = [tr.epochs_to_tol(problem.optimum) for tr in traces]
    tight = [tr.epochs_to_tol(problem.optimum, L.TIGHT_TOL) for tr in traces]
    # a run that failed (see "failures") ends where it stopped: its last loss, null if not finite
    finals = [tr.losses[-1] for tr in traces]
    reached = [e for e in ett if e is not None]
    finite = all(math.isfinite(f) for f in finals)
    return {
        "final_loss": _mean(finals) if finite else None,
        "epochs_to_tol": _mean_if_all(ett),
        "lr": lr,
        "seeds": seeds,
        "epochs_to_tol_per_seed": ett,
        "final_loss_per_seed": [f if math.isfinite(f) else None for f in finals],
        "reached_tol": f"{len(reached)}/{len(ett)}",
        f"epochs_to_tol_{L.TIGHT_TOL:g}": _mean_if_all(tight),
        f"epochs_to_tol_{L.TIGHT_TOL:g}_per_seed": tight,
        "failed_runs": sum(tr.diverged for tr in traces),
        "failures": [tr.failure for tr in traces if tr.failure],
        "spread": {
            "epochs_to_tol_std": _std(reached) if len(reached) == len(ett) else None,
            "epochs_to_tol_min": min(reached) if reached else None,
            "epochs_to_tol_max": max(reached) if len(reached) == len(ett) else None,
            "final_loss_min": min(finals) if finite else None,
            "final_loss_max": max(finals) if finite else None,
        },
        "seconds": sum(tr.seconds for tr in traces),
    }


def plot(path: str, problems: list[L.Problem], curves: dict, refreshes: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"sgd": "tab:gray", "svrg": "tab:blue", "ivon": "tab:green", "ivon_pc": "tab:red",
              "ivon_pc_indep": "tab:pink", "vsgd_pc": "tab:purple", "von_pc": "tab:orange"}
    fig, axes = plt.subplots(1, len(problems), figsize=(5.2 * len(problems), 4.6), squeeze=False)
    for ax, pb in zip(axes[0], problems):
        for start in refreshes.get(pb.name, []):
            ax.axvspan(start, start + 1, color="0.88", lw=0)
        for method, (epochs, lo, mid, hi) in curves[pb.name].items():
            c = colors.get(method)
            ax.plot(epochs, mid, color=c, lw=1.4, label=L.LABELS[method])
            ax.fill_between(epochs, lo, hi, color=c, alpha=0.15, lw=0)
        ax.axhline(L.TOL * pb.optimum, color="k", ls="--", lw=1,
                   label=f"{L.TOL:.0%} of optimum")
        ax.set_yscale("log")
        ax.set_xlabel("epochs (outer pass = 1, corrected step = 2B/N)")
        ax.set_title(f"{pb.name} (N={pb.n}, d={pb.d}), L*={pb.optimum:.4f}", fontsize=10)
        ax.grid(alpha=0.3, which="both", lw=0.5)
    axes[0][0].set_ylabel("training loss - optimum")
    fig.suptitle("L2 logistic regression, batch 5, constant learning rates; mean over seeds "
                 "(band: min-max), gray: outer full passes", fontsize=10)
    handles = {}
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles), fontsize=9,
               frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    seeds = list(range(args.seeds))
    methods = args.methods.split(",")
    run_kw = dict(batch=args.batch, micro=args.micro)
    table_valid = args.delta == L.DELTA and args.batch == 5 and args.micro == 5
    out: dict = {"problems": {}}
    problems, curves, refreshes, tuned = [], {}, {}, {}
    t_all = time.perf_counter()
    for name in args.problems.split(","):
        pb = L.load_problem(name, args.delta)
        problems.append(pb)
        entry = {"optimum": pb.optimum, "n": pb.n, "d": pb.d, "delta": pb.delta,
                 "description": pb.description, "epochs": args.epochs, "methods": {},
                 "skipped": {}}
        curves[name] = {}
        log(f"[logreg] {name}: N={pb.n} d={pb.d} optimum={pb.optimum:.10g}")
        for method in methods:
            why = L.skip_reason(pb, method)
            if not why and args.quick and method == "von_pc" and pb.d > QUICK_VON_MAX_DIM:
                why = f"skipped in --quick: d = {pb.d} > {QUICK_VON_MAX_DIM}"
            if why:
                entry["skipped"][method] = why
                log(f"[logreg] {name} {method}: {why}")
                continue
            t0 = time.perf_counter()
            lr, how = TUNED_LR.get(name, {}).get(method), "table"
            if not table_valid:
                lr = None  # the table holds the learning rates of the default problem setup
            if args.tune or lr is None:
                lr, table = L.tune(pb, method, args.tune_epochs, args.tune_seed,
                                   log=log if args.verbose else None, **run_kw)
                how = "tuned"
                tuned.setdefault(name, {})[method] = lr
                grid = {f"{k:.6g}": {"epochs_to_tol": v[1], "final_loss": v[2]}
                        for k, v in table.items()}
            traces = [L.run(pb, method, lr, args.epochs, s, **run_kw) for s in seeds]
            res = summarize(pb, traces, seeds, lr)
            res["lr_source"] = how
            if how == "tuned":
                res["lr_grid"] = grid
            entry["methods"][method] = res
            if method in L.CORRECTED:
                refreshes[name] = traces[0].refreshes
            # all seeds share the evaluation points until one of them stops (divergence)
            k = min(len(tr.epochs) for tr in traces)
            ex = [[max(l - pb.optimum, 1e-16) for l in tr.losses[:k]] for tr in traces]
            curves[name][method] = (traces[0].epochs[:k], [min(c) for c in zip(*ex)],
                                    [_mean(c) for c in zip(*ex)], [max(c) for c in zip(*ex)])
            log(f"[logreg] {name} {method}: lr={lr:.6g} ({how}) epochs_to_tol="
                f"{res['epochs_to_tol']} per seed={res['epochs_to_tol_per_seed']} "
                f"final={res['final_loss']} ({time.perf_counter() - t0:.1f}s)")
        out["problems"][name] = entry
    if tuned:
        log("[logreg] tuned learning rates (paste into TUNED_LR to make them the default):")
        log(json.dumps(tuned, indent=1))
        if table_valid:
            diff = {f"{p}/{m}": (TUNED_LR.get(p, {}).get(m), lr)
                    for p, d in tuned.items() for m, lr in d.items()
                    if TUNED_LR.get(p, {}).get(m) != lr}
            log("[logreg] --tune reproduces TUNED_LR" if not diff else
                f"[logreg] --tune differs from TUNED_LR (table, tuned): {diff}")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    if not args.no_plot:
        plot(args.png, problems, curves, refreshes)
    log(f"[logreg] wrote {args.json}" + ("" if args.no_plot else f" and {args.png}")
        + f" in {time.perf_counter() - t_all:.1f}s")
    return out


if __name__ == "__main__":
    main()
