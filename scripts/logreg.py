"""Fig. 3 of the paper on CPU: SGD, SVRG, IVON, IVON-PC, VSGD-PC and VON-PC on three convex
L2-regularised logistic regressions (scikit-learn's breast cancer 569 x 30 standardised, synthetic
2000 x 20 and 5000 x 100; float64, batch size 5, a constant learning rate per method).

L2 strength delta = 1e-2 (prior precision per example), a constant feature for the bias. Cost is
counted in epochs as the paper counts it: an outer full pass is 1 epoch, a plain inner step B/N, a
corrected inner step 2B/N. Corrected methods refresh from the full training set every m = N/B inner
steps, split in micro-batches of 5 each with its own posterior draw. IVON and IVON-PC: ess = N,
h0 = 0.1, beta1 = 0.9, beta2 = 0.99999, weight decay delta, no clipping, lr is the step size
(rescale_lr=False); IVON-PC: tuned alpha (below), rho1 = rho2 = 0, shared noise for
theta_in/theta_out, line-14 term weighted by 0.01 (the paper's). VSGD-PC samples N(m, s^2 I) with s
IVON's initial posterior std. VON-PC (full covariance, exact Hessians): beta = B/N, s_init = h0,
tuned alpha, line-12 term weighted by 0.01; a run whose precision turns indefinite counts as failed
("failures" in the JSON). ``--methods`` also accepts ivon_pc_indep (IVON-PC with independent
theta_in and theta_out draws, tuned alpha). SVRG (Alg. 1) and VSGD-PC (Alg. 3, SVRG at draws of an
isotropic Gaussian) are alpha = 1 by definition and are not given an alpha.

The optimum comes from Newton's method. "Epochs to tol" is the first cost at which the full-batch
training loss (at the mean) is <= optimum * 1.01, "inner steps to tol" the number of inner
(optimizer) steps taken by then (an outer pass takes none, a corrected step costs twice a plain
one: at equal epochs a corrected method has taken less than half the steps); reported values are
means over seeds 0..S-1 (null unless every seed reached it); the JSON also gives per-seed values,
the spread, and both to 0.1%. The PNG has one column per problem, the loss against epochs (top)
and against inner steps (bottom).

Learning rates: ``TUNED_LR`` in this file is HARD-CODED, and is the output of ``--tune``: for
every problem and method, the best of a grid of 8 powers of 2 (moved by 4 values towards an edge
while the best lies on it, the same rule for every method), each run for 30 epochs with seed 1000
(not one of the reported seeds), ranked by epochs to tol among runs that are still within tol at
the end, then by final loss. ``--tune`` re-runs that selection (with the alphas below, 68 minutes
on a shared core for all seven methods, 28 of them VON-PC on the 101-dim problem) and uses its
result; a problem/method missing from the table, or any ``--delta``/``--batch``/``--micro`` other
than the defaults, is tuned the same way on the fly.

alpha (IVON-PC, IVON-PC indep., VON-PC): ``TUNED_ALPHA`` is HARD-CODED too, from the same ``--tune``
run: alpha in {0.1, 0.25, 0.5, 1.0} and the learning rate are selected jointly on seed 1000 (for
every alpha, the learning rate by the rule above; then the alpha whose best run ranks first by the
same rule; a tie goes to the larger alpha). ``TUNED_ALPHA_LR`` holds each alpha's best learning
rate and ``TUNED_LR`` the one at the selected alpha. Jointly, because a smaller alpha (less
correction, noisier steps) wants a smaller learning rate (IVON-PC on the 101-dim problem: 2**-8 at
alpha = 1, 2**-10 at 0.1): at alpha = 1's learning rate the smaller alphas would be handicapped.
Without ``--tune`` and ``--quick`` the tuning
seed's run at every alpha (with its tabulated learning rate) is repeated, so that the JSON holds
the per-alpha results behind the selection ("alpha_grid") and says whether they still select
``TUNED_ALPHA`` ("alpha_reproduced"); this takes about half of the default run's 7 minutes.

    python scripts/logreg.py --out results/logreg            # 30 epochs, 3 seeds, PNG + JSON
    python scripts/logreg.py --quick                          # < 1 min on one core
    python scripts/logreg.py --tune                           # re-select learning rates, alphas
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import time

from research import logreg as L
from research.campaign import torch_threads

#: output of ``--tune`` (30 epochs, seed 1000); see the module docstring. For the methods of
#: ``L.ALPHA_METHODS`` the learning rate at the selected alpha (``TUNED_ALPHA``)
TUNED_LR: dict[str, dict[str, float]] = {
    "breast_cancer": {"sgd": 2**-3, "svrg": 2**-1, "ivon": 2**-7, "ivon_pc": 2**-5,
                      "vsgd_pc": 2**-2, "von_pc": 2**-6, "ivon_pc_indep": 2**-7},
    "synthetic_2000x20": {"sgd": 2**-5, "svrg": 2**-3, "ivon": 2**-9, "ivon_pc": 2**-7,
                          "vsgd_pc": 2**-3, "von_pc": 2**-7, "ivon_pc_indep": 2**-6},
    "synthetic_5000x100": {"sgd": 2**-7, "svrg": 2**-5, "ivon": 2**-10, "ivon_pc": 2**-8,
                           "vsgd_pc": 2**-5, "von_pc": 2**-8, "ivon_pc_indep": 2**-9},
}
#: output of ``--tune`` (joint with the learning rate, seed 1000): the selected alpha ...
TUNED_ALPHA: dict[str, dict[str, float]] = {
    "breast_cancer": {"ivon_pc": 1.0, "von_pc": 0.5, "ivon_pc_indep": 0.1},
    "synthetic_2000x20": {"ivon_pc": 0.5, "von_pc": 0.5, "ivon_pc_indep": 0.5},
    "synthetic_5000x100": {"ivon_pc": 1.0, "von_pc": 1.0, "ivon_pc_indep": 1.0},
}
#: ... and each alpha's best learning rate on the tuning seed
TUNED_ALPHA_LR: dict[str, dict[str, dict[float, float]]] = {
    "breast_cancer": {
        "ivon_pc": {0.1: 2**-6, 0.25: 2**-6, 0.5: 2**-6, 1.0: 2**-5},
        "von_pc": {0.1: 2**-7, 0.25: 2**-7, 0.5: 2**-6, 1.0: 2**-6},
        "ivon_pc_indep": {0.1: 2**-7, 0.25: 2**-7, 0.5: 2**-7, 1.0: 2**-7}},
    "synthetic_2000x20": {
        "ivon_pc": {0.1: 2**-8, 0.25: 2**-7, 0.5: 2**-7, 1.0: 2**-7},
        "von_pc": {0.1: 2**-7, 0.25: 2**-7, 0.5: 2**-7, 1.0: 2**-7},
        "ivon_pc_indep": {0.1: 2**-8, 0.25: 2**-7, 0.5: 2**-6, 1.0: 2**-7}},
    "synthetic_5000x100": {
        "ivon_pc": {0.1: 2**-10, 0.25: 2**-10, 0.5: 2**-9, 1.0: 2**-8},
        "von_pc": {0.1: 2**-9, 0.25: 2**-9, 0.5: 2**-8, 1.0: 2**-8},
        "ivon_pc_indep": {0.1: 2**-10, 0.25: 2**-10, 0.5: 2**-10, 1.0: 2**-9}},
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
    stt = [tr.steps_to_tol(problem.optimum) for tr in traces]
    stt_tight = [tr.steps_to_tol(problem.optimum, L.TIGHT_TOL) for tr in traces]
    # a run that failed (see "failures") ends where it stopped: its last loss, null if not finite
    finals = [tr.losses[-1] for tr in traces]
    reached = [e for e in ett if e is not None]
    finite = all(math.isfinite(f) for f in finals)
    return {
        "final_loss": _mean(finals) if finite else None,
        "epochs_to_tol": _mean_if_all(ett),
        "inner_steps_to_tol": _mean_if_all(stt),
        "lr": lr,
        "seeds": seeds,
        "epochs_to_tol_per_seed": ett,
        "final_loss_per_seed": [f if math.isfinite(f) else None for f in finals],
        "reached_tol": f"{len(reached)}/{len(ett)}",
        f"epochs_to_tol_{L.TIGHT_TOL:g}": _mean_if_all(tight),
        f"epochs_to_tol_{L.TIGHT_TOL:g}_per_seed": tight,
        "inner_steps_to_tol_per_seed": stt,
        f"inner_steps_to_tol_{L.TIGHT_TOL:g}": _mean_if_all(stt_tight),
        f"inner_steps_to_tol_{L.TIGHT_TOL:g}_per_seed": stt_tight,
        "inner_steps_per_seed": [tr.steps[-1] for tr in traces],
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


def plot(path: str, problems: list[L.Problem], curves: dict, refreshes: dict,
         alphas: dict | None = None) -> None:
    """Top row: excess loss against epochs; bottom row: against inner steps. ``curves[problem]
    [method] = (epochs, steps, lo, mean, hi)``, ``refreshes[problem] = (epochs, steps)`` of the
    outer passes, ``alphas[problem][method]`` the tuned alphas (written in the top panels)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"sgd": "tab:gray", "svrg": "tab:blue", "ivon": "tab:green", "ivon_pc": "tab:red",
              "ivon_pc_indep": "tab:pink", "vsgd_pc": "tab:purple", "von_pc": "tab:orange"}
    fig, axes = plt.subplots(2, len(problems), figsize=(5.2 * len(problems), 8.4), squeeze=False)
    for col, pb in enumerate(problems):
        top, bottom = axes[0][col], axes[1][col]
        starts, start_steps = refreshes.get(pb.name, ([], []))
        for start in starts:
            top.axvspan(start, start + 1, color="0.88", lw=0)
        for step in start_steps:  # an outer pass takes no inner step: a line, not a band
            bottom.axvline(step, color="0.75", lw=0.8)
        for method, (epochs, steps, lo, mid, hi) in curves[pb.name].items():
            c = colors.get(method)
            for ax, x in ((top, epochs), (bottom, steps)):
                ax.plot(x, mid, color=c, lw=1.4, label=L.LABELS[method])
                ax.fill_between(x, lo, hi, color=c, alpha=0.15, lw=0)
        for ax in (top, bottom):
            ax.axhline(L.TOL * pb.optimum, color="k", ls="--", lw=1,
                       label=f"{L.TOL:.0%} of optimum")
            ax.set_yscale("log")
            ax.grid(alpha=0.3, which="both", lw=0.5)
        top.set_xlabel("epochs (outer pass = 1, corrected step = 2B/N)")
        bottom.set_xlabel("inner (optimizer) steps")
        top.set_title(f"{pb.name} (N={pb.n}, d={pb.d}), L*={pb.optimum:.4f}", fontsize=10)
        tuned = (alphas or {}).get(pb.name, {})
        if tuned:
            top.text(0.98, 0.98, "tuned alpha: " + ", ".join(
                f"{L.LABELS[m]} {a:g}" for m, a in tuned.items()), transform=top.transAxes,
                ha="right", va="top", fontsize=8)
    axes[0][0].set_ylabel("training loss - optimum")
    axes[1][0].set_ylabel("training loss - optimum")
    fig.suptitle("L2 logistic regression, batch 5, constant learning rates; mean over seeds "
                 "(band: min-max)\ngray: outer full passes (top: 1 epoch each; bottom: taking no "
                 "inner step)", fontsize=10)
    handles = {}
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=len(handles), fontsize=9,
               frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, dpi=120, format="png")
    plt.close(fig)
    save_small_png(buf, path)


def save_small_png(src, path: str) -> None:
    """The PNG ``src`` (a path or file) saved to ``path`` with a 256-colour palette: a third of
    the size, no visible difference."""
    from PIL import Image

    with Image.open(src) as im:
        im.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(
            path, optimize=True)


def _grid_json(table: dict) -> dict:
    """``L.tune``'s table for the JSON."""
    return {f"{k:.6g}": {"epochs_to_tol": v[1], "final_loss": v[2], "inner_steps_to_tol": v[3]}
            for k, v in table.items()}


def _alpha_grid_json(per_alpha: dict) -> dict:
    """``L.tune_alpha``'s / ``L.alpha_results``' per-alpha results for the JSON."""
    out = {}
    for a, v in sorted(per_alpha.items()):
        out[f"{a:g}"] = {"lr": v["lr"], "epochs_to_tol": v["epochs_to_tol"],
                         "inner_steps_to_tol": v["inner_steps_to_tol"],
                         "final_loss": v["final_loss"] if math.isfinite(v["final_loss"]) else None,
                         "rank_key": list(v["score"])}
        if "lr_table" in v:
            out[f"{a:g}"]["lr_grid"] = _grid_json(v["lr_table"])
    return out


def _pow2(x: float) -> str:
    k = math.log2(x)
    return f"2**{int(k)}" if k == int(k) else repr(x)


def _table_literal(table: dict, pow2: bool = True) -> str:
    """A tuned table as a Python literal, learning rates (``pow2``) spelled 2**k (to paste)."""
    def fmt(v):
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k!r}: {fmt(x)}" for k, x in v.items()) + "}"
        return _pow2(v) if pow2 else repr(v)
    return "{\n" + "".join(f"    {p!r}: {fmt(d)},\n" for p, d in table.items()) + "}"


def main(argv=None) -> dict:
    args = parse_args(argv)
    with torch_threads(1):   # each run's CPU time is its cost
        return _main(args)


def _main(args) -> dict:
    seeds = list(range(args.seeds))
    methods = args.methods.split(",")
    run_kw = dict(batch=args.batch, micro=args.micro)
    table_valid = args.delta == L.DELTA and args.batch == 5 and args.micro == 5
    out: dict = {"problems": {}}
    problems, curves, refreshes, tuned, tuned_alpha, tuned_alpha_lr = [], {}, {}, {}, {}, {}
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
            has_alpha = method in L.ALPHA_METHODS
            lr, how = TUNED_LR.get(name, {}).get(method), "table"
            alpha = 1.0 if method in L.CORRECTED else None
            alpha_lrs, per_alpha = None, None
            if has_alpha:
                alpha = TUNED_ALPHA.get(name, {}).get(method)
                alpha_lrs = TUNED_ALPHA_LR.get(name, {}).get(method)
                if alpha is None or not alpha_lrs:
                    lr = None  # the learning rate of the table is only valid with its alpha
            if not table_valid:
                lr = None  # the table holds the learning rates of the default problem setup
            if args.tune or lr is None:
                vlog = log if args.verbose else None
                if has_alpha:
                    alpha, lr, per_alpha = L.tune_alpha(pb, method, args.tune_epochs,
                                                        args.tune_seed, log=vlog, **run_kw)
                    table = per_alpha[alpha]["lr_table"]
                    tuned_alpha.setdefault(name, {})[method] = alpha
                    tuned_alpha_lr.setdefault(name, {})[method] = {
                        a: v["lr"] for a, v in per_alpha.items()}
                else:
                    lr, table = L.tune(pb, method, args.tune_epochs, args.tune_seed, log=vlog,
                                       **run_kw)
                how = "tuned"
                tuned.setdefault(name, {})[method] = lr
            elif has_alpha and not args.quick:
                # the tuning seed's run at every alpha, at that alpha's tabulated learning rate
                per_alpha = L.alpha_results(pb, method, alpha_lrs, args.tune_epochs,
                                            args.tune_seed, **run_kw)
            traces = [L.run(pb, method, lr, args.epochs, s, alpha=alpha or 1.0, **run_kw)
                      for s in seeds]
            res = summarize(pb, traces, seeds, lr)
            res["lr_source"] = how
            if how == "tuned":
                res["lr_grid"] = _grid_json(table)
            res["alpha"] = alpha
            if has_alpha:
                res["alpha_source"] = how
                res["alpha_grid"] = None if per_alpha is None else _alpha_grid_json(per_alpha)
                if how == "table" and per_alpha is not None:
                    res["alpha_reproduced"] = L.pick_alpha(
                        {a: v["score"] for a, v in per_alpha.items()}) == alpha
                    if not res["alpha_reproduced"]:
                        log(f"[logreg] WARNING {name} {method}: the tuning seed's runs no longer "
                            f"select TUNED_ALPHA = {alpha:g}")
            elif alpha is not None:
                res["alpha_source"] = "fixed (alpha = 1 by definition)"
            entry["methods"][method] = res
            if method in L.CORRECTED:
                refreshes[name] = (traces[0].refreshes, traces[0].refresh_steps)
            # all seeds share the evaluation points until one of them stops (divergence)
            k = min(len(tr.epochs) for tr in traces)
            ex = [[max(l - pb.optimum, 1e-16) for l in tr.losses[:k]] for tr in traces]
            curves[name][method] = (traces[0].epochs[:k], traces[0].steps[:k],
                                    [min(c) for c in zip(*ex)], [_mean(c) for c in zip(*ex)],
                                    [max(c) for c in zip(*ex)])
            log(f"[logreg] {name} {method}: lr={lr:.6g} ({how})"
                + ("" if alpha is None else f" alpha={alpha:g}")
                + f" epochs_to_tol={res['epochs_to_tol']} per seed="
                f"{res['epochs_to_tol_per_seed']} inner_steps_to_tol="
                f"{res['inner_steps_to_tol']} final={res['final_loss']} "
                f"({time.perf_counter() - t0:.1f}s)")
        out["problems"][name] = entry
    if tuned:
        log("[logreg] tuned learning rates (paste into TUNED_LR to make them the default):")
        log(_table_literal(tuned))
        if tuned_alpha:
            log("[logreg] tuned alphas (TUNED_ALPHA) and each alpha's learning rate "
                "(TUNED_ALPHA_LR):")
            log(_table_literal(tuned_alpha, pow2=False))
            log(_table_literal(tuned_alpha_lr))
        if table_valid:
            diff = {f"{p}/{m}": (TUNED_LR.get(p, {}).get(m), lr)
                    for p, d in tuned.items() for m, lr in d.items()
                    if TUNED_LR.get(p, {}).get(m) != lr}
            diff.update({f"{p}/{m} alpha": (TUNED_ALPHA.get(p, {}).get(m), a)
                         for p, d in tuned_alpha.items() for m, a in d.items()
                         if TUNED_ALPHA.get(p, {}).get(m) != a})
            diff.update({f"{p}/{m} alpha lrs": (TUNED_ALPHA_LR.get(p, {}).get(m), lrs)
                         for p, d in tuned_alpha_lr.items() for m, lrs in d.items()
                         if TUNED_ALPHA_LR.get(p, {}).get(m) != lrs})
            log("[logreg] --tune reproduces the tables" if not diff else
                f"[logreg] --tune differs from the tables (table, tuned): {diff}")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    if not args.no_plot:
        alphas = {p: {m: r["alpha"] for m, r in e["methods"].items() if m in L.ALPHA_METHODS}
                  for p, e in out["problems"].items()}
        plot(args.png, problems, curves, refreshes, alphas)
    log(f"[logreg] wrote {args.json}" + ("" if args.no_plot else f" and {args.png}")
        + f" in {time.perf_counter() - t_all:.1f}s")
    return out


if __name__ == "__main__":
    main()
