"""scripts/uncertainty.py: the pre-stated criteria are computed from the runs (each can fail), the
k-curve from the draws, the report and plots from cached runs; the tuning rule's order."""

import json

import numpy as np
import pytest

from hf_ivonpc import uncertainty as U

from _scripts import load_script

S = load_script("uncertainty")
OOD_KEYS = ("ood_auroc", "ood_auroc_epistemic")


def _probs(rng, n=60, sharp=3.0, draws=0, spread=0.0):
    labels = rng.integers(0, 4, n)
    z = rng.normal(size=(n, 4))
    z[np.arange(n), labels] += 1.0
    mean = U.apply_temperature(z, 1 / sharp)
    if not draws:
        return mean, None, labels
    d = np.stack([U.apply_temperature(z + spread * rng.normal(size=z.shape), 1 / sharp) for _ in range(draws)])
    return mean, d, labels


def _run(method, seed, pred_better: bool):
    """A reported run's cached record, its metrics computed from synthetic probabilities."""
    rng = np.random.default_rng(seed)
    posterior = method != "adamw"
    mean, draws, labels = _probs(rng, draws=8 if posterior else 0, spread=1.5 if pred_better else 0.0)
    m = {f"eval_mean_{k}": v for k, v in U.summary(mean, labels).items()}
    m["eval_mean_temperature"] = 2.0
    m.update({f"eval_mean_ts_{k}": v for k, v in U.summary(U.apply_temperature(np.log(mean), 2.0), labels).items()})
    m["eval_mean_ood_auroc"] = 0.55
    rec = {"metrics": m, "probs": {"arc_easy/mean": mean.tolist(), "arc_easy/labels": labels.tolist()}}
    if posterior:
        m.update({f"eval_pred_{k}": v for k, v in U.predictive_summary(draws, labels).items()})
        m["eval_pred_ood_auroc"], m["eval_pred_ood_auroc_epistemic"] = 0.56, 0.7
        m["eval_pred_kl_to_mean"] = float(S.U.decompose(draws)["epistemic"].mean())
        rec["probs"]["arc_easy/draws"] = draws.tolist()
        rec["k_curve"] = S.k_curve(draws, labels)
    return rec


def _runs(pred_better=True):
    return {m: [_run(m, 10 * i + j, pred_better) for j in range(3)] for i, m in enumerate(S.METHODS)}


def test_k_curve_is_the_predictive_over_the_first_k_draws():
    rng = np.random.default_rng(0)
    _, draws, labels = _probs(rng, draws=8, spread=1.0)
    kc = S.k_curve(draws, labels)
    assert list(kc) == ["1", "2", "4", "8"]
    assert kc["1"]["nll"] == pytest.approx(U.nll(draws[0], labels))
    assert kc["4"]["ece"] == pytest.approx(U.ece(draws[:4].mean(0), labels))


def test_criteria_are_computed_from_the_runs_and_can_fail(tmp_path, monkeypatch):
    monkeypatch.setattr(S, "OUT", tmp_path)
    good = S.summarize({}, _runs(pred_better=True))
    flat = S.summarize({}, _runs(pred_better=False))
    # with draws that equal the mean the predictive cannot beat the mean: C1 fails
    assert flat["checks"]["C1"]["met"] is False
    assert all(abs(d) < 1e-12 for d in flat["checks"]["C1"]["nll_diff"])
    # each check carries the numbers it was decided on
    c1 = good["checks"]["C1"]
    assert c1["met"] == all(c1["per_seed"]) and len(c1["nll_diff"]) == 3
    assert c1["per_seed"] == [e <= -0.2 and d <= -0.01 for e, d in zip(c1["ece_rel"], c1["nll_diff"])]
    assert good["checks"]["C3"]["met"] is (0.7 > 0.55)
    ivon = good["table"]["IVON predictive"]["nll"]
    assert ivon["n"] == 3 and ivon["mean"] == pytest.approx(np.mean([r["metrics"]["eval_pred_nll"] for r in _runs()["ivon"]]))
    boot = good["bootstrap_pred_minus_mean_seed0"]["ivon"]["nll"]
    assert boot["lo"] <= boot["diff"] <= boot["hi"]
    md = S.markdown(good)
    assert "| IVON predictive |" in md and ("**C1 met**" in md) == c1["met"]
    json.dumps(good)   # the report is JSON


def test_plots_are_written(tmp_path, monkeypatch):
    monkeypatch.setattr(S, "OUT", tmp_path)
    runs = _runs()
    S.plot(S.summarize({}, runs), runs)
    assert (tmp_path / "reliability.png").stat().st_size > 5000
    assert (tmp_path / "risk_coverage.png").stat().st_size > 5000
    assert (tmp_path / "k_curve.png").stat().st_size > 5000


def test_tuning_order_and_report_only(tmp_path, monkeypatch):
    """Learning rates first (AdamW, IVON), then IVON's ess at its learning rate with h0 keeping
    sigma0; IVON-PCM inherits both (no tuning run of its own); --report_only never trains."""
    monkeypatch.setattr(S, "OUT", tmp_path)
    calls = []

    def fake_train(cfg, reported):
        calls.append((cfg["pc_method"], cfg["learning_rate"], cfg.get("ivon_ess")))
        lr = cfg["learning_rate"]
        best = {"none": 3e-4, "ivon": 1.0, "ivon_pcm": 3.0}[cfg["pc_method"]]
        loss = abs(np.log(lr / best)) + (abs(np.log10(cfg["ivon_ess"] / 1e3)) if "ivon_ess" in cfg else 0)
        return {"metrics": {"eval_mean_selection_nll": loss, "eval_pred_selection_nll": loss}, "wall_s": 0.0}

    monkeypatch.setattr(S, "_train", fake_train)
    tuned = S.tune()
    assert S.settings(tuned, "adamw") == {"learning_rate": 3e-4}
    assert tuned["ivon"]["learning_rate"] == 1.0 and tuned["ivon"]["ivon_ess"] == 1e3
    assert tuned["ivon"]["ivon_hess_init"] == pytest.approx(1 / (1e3 * S.SIGMA0 ** 2))
    assert S.settings(tuned, "ivon_pcm") == S.settings(tuned, "ivon")
    assert all(c[0] != "ivon_pcm" for c in calls)
    assert {c[2] for c in calls if c[0] == "ivon" and c[1] == 1.0} == {1e3, 1e4, 1e5}   # ess at IVON's lr
    n = len(calls)
    assert S.tune() == tuned and len(calls) == n        # cached: nothing retrained
    monkeypatch.setattr(S, "REPORT_ONLY", True)
    with pytest.raises(SystemExit, match="--report_only: the run adamw seed 0"):
        S.run("adamw", 0, {"learning_rate": 3e-4}, True)


def _views(ivon_mean, ivon_pred, pcm_pred, adamw, adamw_ts):
    """Per-seed rows (accuracy, nll, ece, ood AUROCs) of the five predictions the criteria read."""
    def rows(spec):
        return [dict(zip(("accuracy", "nll", "ece", "ood_auroc_maxprob", "ood_auroc_mi"), s)) for s in spec]
    return {"IVON mean": rows(ivon_mean), "IVON predictive": rows(ivon_pred), "IVON-PCM predictive": rows(pcm_pred),
            "AdamW": rows(adamw), "AdamW + TS": rows(adamw_ts)}


def test_each_criterion_decides_at_its_stated_threshold():
    base = (0.5, 1.00, 0.10, 0.6, None)
    adamw = [(0.5, 1.00, 0.10, 0.6, None)] * 3
    # C1: ECE -25% and NLL -0.02 on every seed is met; ECE -15% on one seed is not
    good = [(0.5, 0.98, 0.075, 0.6, 0.7)] * 3
    c = S.criteria(_views([base] * 3, good, good, adamw, adamw))
    assert c["C1"]["met"] and c["C3"]["met"] and c["C5"]["met"]
    one_short = good[:2] + [(0.5, 0.98, 0.085, 0.6, 0.7)]
    assert not S.criteria(_views([base] * 3, one_short, good, adamw, adamw))["C1"]["met"]
    nll_short = good[:2] + [(0.5, 0.995, 0.075, 0.6, 0.7)]
    assert not S.criteria(_views([base] * 3, nll_short, good, adamw, adamw))["C1"]["met"]
    # C2: worse than AdamW + TS on every seed by a constant: the interval excludes 0
    ts = [(0.5, 0.90, 0.05, 0.6, None), (0.5, 0.91, 0.05, 0.6, None), (0.5, 0.92, 0.05, 0.6, None)]
    assert not S.criteria(_views([base] * 3, good, good, adamw, ts))["C2"]["met"]
    assert S.criteria(_views([base] * 3, good, good, adamw, adamw))["C2"]["met"]
    # C3: MI AUROC not above AdamW's max-probability AUROC on one seed
    low = good[:2] + [(0.5, 0.98, 0.075, 0.6, 0.6)]
    assert not S.criteria(_views([base] * 3, low, good, adamw, adamw))["C3"]["met"]
    # C4: IVON-PCM's NLL must be below IVON's on every seed
    pcm = [(0.5, 0.97, 0.07, 0.6, 0.7)] * 2 + [(0.5, 0.98, 0.07, 0.6, 0.7)]
    assert not S.criteria(_views([base] * 3, good, pcm, adamw, adamw))["C4"]["met"]
    assert S.criteria(_views([base] * 3, good, [(0.5, 0.97, 0.07, 0.6, 0.7)] * 3, adamw, adamw))["C4"]["met"]
    # C5: 2 points of accuracy lost
    lost = [(0.48, 0.98, 0.075, 0.6, 0.7)] * 3
    assert not S.criteria(_views([base] * 3, lost, good, adamw, adamw))["C5"]["met"]


def test_sigma_scale_is_chosen_on_the_tuning_run_and_reported_apart(tmp_path, monkeypatch):
    monkeypatch.setattr(S, "OUT", tmp_path)
    record = {"key": {"method": "ivon", "cfg": {"seed": S.TUNE_SEED}}}
    monkeypatch.setattr(S, "run", lambda *a, **k: record)
    nll = {1.0: 2.2, 3.0: 2.1, 10.0: 3.4, 30.0: 8.0}
    seen = []

    def fake_evaluate(rec, scale, selection_only):
        seen.append((scale, selection_only))
        return {"pred": {"selection_nll": nll[scale]}}

    monkeypatch.setattr(S, "_evaluate", fake_evaluate)
    sigma = S.tune_sigma_scale({"ivon": {"learning_rate": 1.0}})
    assert sigma["scale"] == 3.0 and seen == [(s, True) for s in S.SIGMA_SCALES]
    runs = _runs()
    scaled_runs = {m: [{"pred": {k[len("eval_pred_"):]: v for k, v in r["metrics"].items() if k.startswith("eval_pred_")},
                        "seconds_per_draw": 1.0} for r in runs[m]] for m in ("ivon", "ivon_pcm")}
    report = S.summarize({}, runs, sigma, scaled_runs)
    row = report["sigma_scale"]["methods"]["ivon"]
    means = [r["metrics"]["eval_mean_nll"] for r in runs["ivon"]]
    preds = [r["metrics"]["eval_pred_nll"] for r in runs["ivon"]]
    assert row["nll_minus_mean"]["mean"] == pytest.approx(np.mean(np.subtract(preds, means)))
    assert report["checks"] == S.summarize({}, runs)["checks"]       # the criteria read sigma x1 only
    assert "| IVON predictive, sigma x3 |" in S.markdown(report)


def test_a_partial_report_leaves_criteria_missing_a_run_undecided(tmp_path, monkeypatch):
    monkeypatch.setattr(S, "OUT", tmp_path)
    runs = _runs()
    runs["ivon_pcm"] = runs["ivon_pcm"][:1]
    report = S.summarize({}, runs)
    assert report["checks"]["C4"]["met"] is None and report["checks"]["C5"]["met"] is None
    assert report["checks"]["C1"]["met"] in (True, False)
    assert "**C4 not decided**" in S.markdown(report) and "runs missing: IVON-PCM predictive" in S.markdown(report)
    S.plot(report, runs)
