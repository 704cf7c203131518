"""The correction's variance measured, not assumed: per regime, at uniformly sampled positions of a
correction window, the variance of the corrected gradient including the mega-batch's own error
(from independent replicate mega-batches), against the plain mini-batch gradient's, and the
regime's gradient-noise scale.

The estimator IVON-PC and IVON-PCM step with (the gradient part of Alg. 4) is, at step t of a
window that started at the refresh step t0 (theta_out = theta at t0, mega-batch M drawn at t0)::

    g_corr = g_B(theta) - alpha (g_B(theta_out) - g_M(theta_out))

with the same mini-batch B in both passes. Its error about the full gradient G(theta) has two
parts: the mini-batch part d_B = (g_B(theta) - alpha g_B(theta_out)) - (G - alpha G_out), fresh at
every step, and the mega-batch part alpha (g_M(theta_out) - G_out), drawn once per window and
shared by its K steps. Over a window the average of the K corrected gradients therefore has
variance V_mini / K + V_mega (the shared error does not average out), against V_plain / K for K
plain steps. The window ratio (V_mini + K V_mega) / V_plain (averaged over the window's
positions) is what a corrected window buys per step; per gradient evaluation it must beat a
plain run with a mini-batch c = 2 + m / K times larger (a corrected step evaluates its mini-batch
twice, and a refresh m mini-batches every K steps), whose variance is V_plain / c. So the
correction can pay per example only where the window ratio is below 1 / c.

Measured at P positions of the campaign's own IVON run (``research.runner.train_run``, the
regime's IVON settings and base budget, IVON's tuned learning rate, seed 0): a refresh step t0
drawn uniformly among the corrected part's refreshes, an offset k uniform in 0..K-1; at the
posterior means theta_out (step t0) and theta (step t0 + k), dropout off:

- V_plain, V_mini (for each alpha) and the covariance between the two passes from N paired
  mini-batches (the same B at both points; unbiased sample variances about their mean);
- V_mega from R independent replicate mega-batches of m mini-batches at theta_out (the sample
  variance of their gradients about their mean: the mega-batch's error measured, not m-scaled);
- the gradient-noise scale B_noise = b tr(Sigma_B) / |G|^2 = b V_plain / |G|^2 (|G|^2 corrected
  for the error of the N-batch mean), the batch size above which larger batches stop paying.

Measured on IVON's trajectory at its means: the correction's own trajectory and the posterior's
noise (shared by both passes) are not part of it.
"""

from __future__ import annotations

import contextlib
import math
import random
import statistics

import torch

from .runner import REGIMES, run_shape, train_run

#: IVON's tuned learning rate at each regime's base budget (the campaigns' tuning seed: 1.0 for lm
#: and image in docs/results/evidence_previous, 1.0 for continual in docs/results/evidence)
IVON_LR = {"lm": 1.0, "image": 1.0, "continual": 1.0, "continual_tiny": 1.0, "digits": 1.0}
#: steps of the continual regimes' IVON run (their budgets are CPU seconds; about IVON's steps at
#: the base budget)
CONTINUAL_STEPS = {"continual": 1000, "continual_tiny": 20}
ALPHAS = (0.25, 0.5, 0.7, 1.0)


@contextlib.contextmanager
def _keeping_trainer(snapshot_steps: set[int], kept: dict):
    """While active, the trainer ``train_run`` builds keeps a copy of the model's parameters at
    the end of each step in ``snapshot_steps`` (the means: IVON's step has restored them) in
    ``kept["snapshots"]``, and itself in ``kept["trainer"]``."""
    import hf_ivonpc.trainer as T
    from transformers import TrainerCallback

    base = T.PCTrainer

    class Snapshots(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step in snapshot_steps:
                kept["snapshots"][state.global_step] = {n: p.detach().clone() for n, p in model.named_parameters()}

    class Keeping(base):
        def __init__(self, *a, callbacks=None, **kw):
            super().__init__(*a, callbacks=[*(callbacks or []), Snapshots()], **kw)
            kept["trainer"] = self

    kept["snapshots"] = {}
    T.PCTrainer = Keeping
    try:
        yield kept
    finally:
        T.PCTrainer = base


def positions(regime: str, steps: int, n: int, seed: int = 0) -> list[tuple[int, int]]:
    """``n`` (t0, k) pairs: t0 a refresh step of the corrected part of a run of ``steps`` steps
    (the regime's start ratio and refresh interval K), k uniform in 0..K-1, t0 + k < steps."""
    spec = REGIMES[regime]
    K, start = spec["refresh"], math.ceil(spec["start_ratio"] * steps)
    anchors = list(range(max(start, 1), steps - K + 1, K))
    if not anchors:
        raise ValueError(f"steps={steps} is invalid for regime {regime!r}: no full correction window after "
                         f"step {start} (refresh every {K})")
    rng = random.Random(seed)
    return [(rng.choice(anchors), rng.randrange(K)) for _ in range(n)]


def _flat_grad(trainer, batch) -> torch.Tensor:
    model = trainer.model
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, trainer._prepare_inputs(batch))
    loss.backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad]).double()


def _load(model, params: dict) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(params[n])


def measure_position(trainer, theta: dict, theta_out: dict, batch: int, factor: int, refresh: int,
                     n_pairs: int, n_mega: int, rng: random.Random) -> dict:
    """The variances at one position (see the module docstring), per alpha in :data:`ALPHAS`."""
    ds, collate = trainer.train_dataset, trainer.data_collator
    model = trainer.model
    model.eval()   # dropout off: the gradient noise measured is the data's

    def grad_at(params, idx):
        _load(model, params)
        return _flat_grad(trainer, collate([ds[i] for i in idx]))

    n = len(ds)
    a_sum = b_sum = None
    aa = bb = ab = 0.0
    pairs = []
    for _ in range(n_pairs):
        idx = rng.sample(range(n), batch)
        a, b = grad_at(theta, idx), grad_at(theta_out, idx)
        pairs.append((a, b))
        a_sum = a.clone() if a_sum is None else a_sum.add_(a)
        b_sum = b.clone() if b_sum is None else b_sum.add_(b)
    G, G_out = a_sum / n_pairs, b_sum / n_pairs
    for a, b in pairs:
        da, db = a - G, b - G_out
        aa += float(da @ da)
        bb += float(db @ db)
        ab += float(da @ db)
    del pairs
    v_plain, v_out, cov = aa / (n_pairs - 1), bb / (n_pairs - 1), ab / (n_pairs - 1)
    megas = []
    for _ in range(n_mega):
        idx = rng.sample(range(n), batch * factor)
        gs = [grad_at(theta_out, idx[j * batch:(j + 1) * batch]) for j in range(factor)]
        megas.append(torch.stack(gs).mean(0))
    M = torch.stack(megas)
    v_mega_1 = float(((M - M.mean(0)) ** 2).sum(1).sum() / (n_mega - 1))   # alpha = 1
    g2 = max(float(G @ G) - v_plain / n_pairs, 0.0)                         # |G|^2, unbiased
    out = {"v_plain": v_plain, "v_plain_out": v_out, "cov_in_out": cov, "v_mega_alpha1": v_mega_1,
           "v_mega_predicted_alpha1": v_out / factor, "grad_norm2": g2,
           "noise_scale": batch * v_plain / g2 if g2 > 0 else math.inf, "by_alpha": {}}
    for alpha in ALPHAS:
        v_mini = v_plain + alpha ** 2 * v_out - 2 * alpha * cov
        v_mega = alpha ** 2 * v_mega_1
        out["by_alpha"][str(alpha)] = {"v_mini": v_mini, "v_mega": v_mega,
                                       "step_ratio": (v_mini + v_mega) / v_plain,
                                       "window_ratio": (v_mini + refresh * v_mega) / v_plain}
    return out


def measure(regime: str, n_positions: int = 6, n_pairs: int = 32, n_mega: int = 8, seed: int = 0,
            steps: int | None = None) -> dict:
    """Train the regime's IVON run once, keeping the snapshots the positions need, then measure at
    each position; returns every position's figures and their summary."""
    spec = REGIMES[regime]
    cfg = {"method": "ivon", "seed": seed, "lr": IVON_LR[regime]}
    if spec.get("budget_unit") == "cpu_s":
        cfg["steps"] = steps or CONTINUAL_STEPS[regime]
    elif steps is not None:
        cfg["budget"] = steps * spec["batch"]
    shape = run_shape(regime, cfg)
    places = positions(regime, shape["steps"], n_positions, seed)
    with _keeping_trainer({s for t0, k in places for s in (t0, t0 + k)}, {}) as kept:
        run = train_run(regime, cfg)
    trainer, snaps = kept["trainer"], kept["snapshots"]
    batch, factor, K = spec["batch"], spec["factor"], spec["refresh"]
    rng = random.Random(seed + 1)
    out = []
    for t0, k in places:
        m = measure_position(trainer, snaps[t0 + k], snaps[t0], batch, factor, K, n_pairs, n_mega, rng)
        out.append({"t0": t0, "k": k, **m})
        print(f"[{regime}] t0 {t0} k {k}: noise scale {m['noise_scale']:.0f}, window ratio at alpha "
              f"{spec.get('alpha', 0.5)}: {m['by_alpha'][str(spec.get('alpha', 0.5))]['window_ratio']:.3f}", flush=True)
    cost = 2 + factor / K
    summary = {"cost_ratio": cost, "pays_below": 1 / cost,
               "noise_scale_median": statistics.median(p["noise_scale"] for p in out),
               "mega_measured_over_predicted": statistics.median(p["v_mega_alpha1"] / p["v_mega_predicted_alpha1"]
                                                                 for p in out),
               "by_alpha": {str(a): {key: statistics.fmean(p["by_alpha"][str(a)][key] for p in out)
                                     for key in ("step_ratio", "window_ratio")} for a in ALPHAS}}
    return {"regime": regime, "batch": batch, "refresh": K, "factor": factor, "steps": shape["steps"],
            "lr": cfg["lr"], "n_pairs": n_pairs, "n_mega": n_mega, "final_loss": run["final"],
            "positions": out, "summary": summary}


def markdown(reports: list[dict]) -> str:
    lines = ["# The correction's variance, measured", "",
             "Made by `python scripts/variance.py` (protocol: `scripts/research/variance.py`). Ratios are "
             "averaged over uniformly drawn window positions of the regime's IVON run; the correction can "
             "pay per gradient evaluation only where the window ratio is below 1 / c, c = 2 + m / K.", "",
             "| regime | batch b | K (steps per window) | m (mini-batches per mega-batch) | c | 1 / c | "
             "gradient-noise scale (median) | mega-batch variance, measured / m-scaled | alpha | step ratio | "
             "window ratio |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in reports:
        s = r["summary"]
        for a, v in s["by_alpha"].items():
            lines.append(f"| {r['regime']} | {r['batch']} | {r['refresh']} | {r['factor']} | {s['cost_ratio']:.2f} | "
                         f"{s['pays_below']:.3f} | {s['noise_scale_median']:.0f} | "
                         f"{s['mega_measured_over_predicted']:.2f} | {a} | {v['step_ratio']:.3f} | "
                         f"{v['window_ratio']:.3f} |")
    return "\n".join(lines) + "\n\n![window ratio against alpha](variance.png)\n"


def plot(reports: list[dict], path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for r in reports:
        s = r["summary"]
        line, = ax.plot([float(a) for a in s["by_alpha"]], [v["window_ratio"] for v in s["by_alpha"].values()],
                        "o-", label=f"{r['regime']}: window ratio")
        ax.axhline(s["pays_below"], color=line.get_color(), ls="--", lw=0.8, label=f"{r['regime']}: 1 / c")
    ax.set_yscale("log")
    ax.set_xlabel("alpha")
    ax.set_ylabel("variance ratio (corrected / plain)")
    ax.legend(fontsize=7)
    ax.set_title("window variance of the corrected gradient", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    import argparse
    import json
    from pathlib import Path

    from .campaign import cached, code_version

    ap = argparse.ArgumentParser(prog="scripts/variance.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--regimes", default="lm,image,continual", help="comma-separated regimes")
    ap.add_argument("--positions", type=int, default=6, help="window positions per regime")
    ap.add_argument("--pairs", type=int, default=32, help="paired mini-batches per position")
    ap.add_argument("--megas", type=int, default=8, help="replicate mega-batches per position")
    ap.add_argument("--out", default="docs/results/evidence")
    a = ap.parse_args(argv)
    regimes = [r.strip() for r in a.regimes.split(",") if r.strip()]
    for r in regimes:
        if r not in REGIMES:
            ap.error(f"--regimes: {r!r} is invalid: accepted are {sorted(REGIMES)}")
    out = Path(a.out)
    reports = []
    for r in regimes:
        key = {"variance": r, "positions": a.positions, "pairs": a.pairs, "megas": a.megas,
               "spec": REGIMES[r], "code": code_version(("research/variance.py",))}
        reports.append(cached(out / "variance_runs", key, lambda r=r: measure(r, a.positions, a.pairs, a.megas)))
    out.mkdir(parents=True, exist_ok=True)
    (out / "variance.json").write_text(json.dumps(reports, indent=1, default=str))
    (out / "variance.md").write_text(markdown(reports))
    plot(reports, out / "variance.png")
    print(markdown(reports))
    return reports
