"""scripts/evidence.py and the campaign helpers: the tuning rule, caching, intervals, the
gradient-evaluation count, and the whole code path on a tiny regime."""

import json
import math

import pytest

from research import campaign as C

from _scripts import ROOT


def test_tuning_grows_past_a_best_end_and_stops_inside():
    calls = []

    def losses_of(values):
        calls.append(list(values))
        return {v: (math.log10(v) - math.log10(0.3)) ** 2 for v in values}   # best at 0.3

    best, losses, grid = C.tune_grid([1.0, 3.0, 10.0], losses_of)
    assert best == 0.3 and grid == [0.1, 0.3, 1.0, 3.0, 10.0]
    assert calls == [[1.0, 3.0, 10.0], [0.3], [0.1]]   # each value evaluated once
    assert C.tune_grid([1.0, 3.0], losses_of, grow=False)[0] == 1.0


def test_a_diverged_run_is_never_chosen():
    best, _, _ = C.tune_grid([0.1, 0.3, 1.0], lambda vs: {0.1: 2.0, 0.3: float("nan"), 1.0: 1.5}, grow=False)
    assert best == 1.0


def test_gradient_evaluations_count_both_passes_and_the_mega_batches():
    assert C.gradient_evaluations(10, 8, corrected=False) == 80
    # 8 steps, corrected from step 4: 4 second passes and refreshes at 4 and 6 of 2 x 8 examples
    assert C.gradient_evaluations(8, 8, True, start=4, refresh=2, factor=2) == 64 + 4 * 8 + 2 * 2 * 8
    assert C.gradient_evaluations(4, 8, True, start=4, refresh=2, factor=2) == 32


def test_interval_is_the_t_interval():
    ms = C.mean_ci([1.0, 2.0, 3.0])
    assert ms["mean"] == 2.0 and ms["ci95"] == pytest.approx(4.302653 * 1.0 / math.sqrt(3), rel=1e-6)
    assert math.isnan(C.mean_ci([1.0])["ci95"])


def test_cached_runs_once_and_writes_atomically(tmp_path):
    n = {"calls": 0}

    def fn():
        n["calls"] += 1
        return {"value": 1}

    a = C.cached(tmp_path, {"k": 1}, fn)
    b = C.cached(tmp_path, {"k": 1}, fn)
    assert a == b == {"value": 1, "key": {"k": 1}} and n["calls"] == 1
    assert [p.suffix for p in tmp_path.iterdir()] == [".json"]


def test_steps_for_budget_is_the_longest_run_that_fits():
    # plain: budget // batch; corrected (start at half, refresh 10, mega-batch 10): 32 examples a step
    assert C.steps_for_budget(16_000, 16, False) == 1000
    assert C.steps_for_budget(16_000, 16, True, 0.5, 10, 10) == 500
    for budget in (1000, 4321, 16_000):
        s = C.steps_for_budget(budget, 16, True, 0.5, 10, 10)
        cost = lambda n: C.gradient_evaluations(n, 16, True, math.ceil(0.5 * n), 10, 10)  # noqa: E731
        assert cost(s) <= budget < cost(s + 1)
    with pytest.raises(ValueError, match="budget=8 is invalid"):
        C.steps_for_budget(8, 16, False)


def test_quick_campaign_matches_budgets_and_tunes_every_method(tmp_path):
    from research import evidence as E
    from research.runner import METHODS

    report = E.main(["--regime", "digits", "--quick", "--seeds", "2", "--budgets", "1,2", "--out", str(tmp_path)])
    assert {p.name for p in tmp_path.iterdir()} >= {"digits.json", "digits.md", "digits.png", "digits"}
    budgets = report["budgets"]
    assert budgets == [1280, 2560]
    s = report["summary"]
    assert set(s["methods"]) == set(METHODS)
    for m in METHODS:
        for b in budgets:
            assert s["methods"][m][str(b)]["final_report_loss"]["n"] == 2
    for r in report["runs"]:   # each run is read at its schedule's end, within its budget
        assert r["final"]["step"] == r["shape"]["steps"] and r["final"]["examples"] <= r["cfg"]["budget"]
    assert s["methods"]["ivon"]["1280"]["steps"] == 40 and s["methods"]["ivon_3x"]["1280"]["steps"] == 13
    # corrected (start at 20%, refresh 10, mega-batch 10), in batches of 32: 13 steps cost 13 + 10 + 10 = 33
    # (1,056 examples), 14 would cost 45 (1,440 > 1,280); 28 cost 28 + 22 + 30 = 80 (2,560), 29 cost 82
    assert s["methods"]["ivon_pcm"]["1280"]["steps"] == 13 and s["methods"]["ivon_pcm"]["2560"]["steps"] == 28
    assert s["equal_steps"] == {}   # no corrected run here has as many steps as a plain one
    assert s["methods"]["ivon_pcm"]["1280"]["pc/grad_var_ratio"]["mean"] > 0
    assert "predictive_nll" in s["methods"]["ivon_pcm"]["1280"]
    assert set(s["paired"]) >= {"ivon_pcm - ivon", "ivon_pcm - ivon_3x", "alpha_svrg - adamw"}
    assert set(s["equal_time"]) == {"1280", "2560"}
    for t in report["tuning"]:
        assert set(t["lr"]) == set(METHODS) and set(t["best"]) == set(E.CORRECTED)
        assert all(len(curve) == 3 for curve in t["lr_curve"].values())   # quick: no growth
    # the reported runs use each budget's tuned values and never the tuning seed
    tuned = {t["budget"]: t for t in report["tuning"]}
    for r in report["runs"]:
        assert r["cfg"]["seed"] != C.TUNE_SEED
        assert r["cfg"]["lr"] == tuned[r["cfg"]["budget"]]["lr"][r["cfg"]["method"]]
        if r["cfg"]["method"] == "ivon_pcm":
            assert r["cfg"]["alpha"] == tuned[r["cfg"]["budget"]]["best"]["ivon_pcm"]["alpha"]
    # a second call trains nothing, and --report_only agrees
    again = E.main(["--regime", "digits", "--quick", "--seeds", "2", "--budgets", "1,2", "--out", str(tmp_path),
                    "--report_only"])
    assert again["summary"] == json.loads(json.dumps(s))
    table = E.main(["--regime", "digits", "--out", str(tmp_path), "--status"])["status"]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    # per budget: 6 methods x 3 learning rates, 3 corrected methods x alpha 1.0, and 6 x 2 reported
    assert len(rows) == 2 * (18 + 3 + 12)


def test_report_only_refuses_to_train(tmp_path):
    from research import evidence as E
    with pytest.raises(SystemExit, match="has not finished"):
        E.main(["--regime", "digits", "--quick", "--out", str(tmp_path), "--report_only"])


def test_bad_budgets_are_refused_before_any_run(tmp_path):
    from research import evidence as E
    for bad in ("0", "x", "1,-2"):
        with pytest.raises(SystemExit):
            E.main(["--regime", "digits", "--budgets", bad, "--out", str(tmp_path)])
    with pytest.raises(SystemExit):   # smaller than one corrected step's examples
        E.main(["--regime", "digits", "--budgets", "0.001", "--out", str(tmp_path)])
    assert not any(tmp_path.iterdir())


def test_the_code_version_follows_the_sources_a_run_depends_on(tmp_path, monkeypatch):
    """The hash changes when a listed source changes (and only then); a run cached by other code
    is not read back, and --report_only names it."""
    v = C.code_version()
    assert v == C.code_version() and len(v) == 16
    tree = tmp_path / "tree"
    for pattern in C.CODE_FILES:   # a copy of the listed sources, one of them then edited
        top = ROOT if pattern.startswith("hf_ivonpc") else ROOT / "scripts"
        for f in top.glob(pattern):
            dst = tree / f.relative_to(top)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(f.read_bytes())
    import hf_ivonpc
    monkeypatch.setattr(hf_ivonpc, "__file__", str(tree / "hf_ivonpc" / "__init__.py"))
    monkeypatch.setattr(C, "__file__", str(tree / "research" / "campaign.py"))
    assert C.code_version() == v
    (tree / "hf_ivonpc" / "trainer.py").write_text((tree / "hf_ivonpc" / "trainer.py").read_text() + "\n# edit\n")
    assert C.code_version() != v
    monkeypatch.undo()

    from research import evidence
    cfg = {"method": "ivon", "seed": 0, "lr": 0.3}
    key = evidence.run_key("digits", cfg)
    C.cached(tmp_path / "runs", dict(key, code="0" * 16), lambda: {"final": {"eval_loss": 1.0}})
    assert [p.name for p in C.stale_runs(tmp_path / "runs", key)]
    with pytest.raises(SystemExit, match=r"made by other code .*code 0{16}, this code " + key["code"]):
        evidence._refuse(("digits", cfg, str(tmp_path / "runs")))


def test_torch_threads_gives_the_caller_its_thread_count_back():
    import torch

    before = torch.get_num_threads()
    inside = 1 if before > 1 else 2
    with pytest.raises(RuntimeError):
        with C.torch_threads(inside):
            assert torch.get_num_threads() == inside
            raise RuntimeError("a run fails")
    assert torch.get_num_threads() == before


def test_continual_regime_continues_the_posterior_and_matches_cpu_seconds(tmp_path, monkeypatch):
    """The continual regime: one IVON pretraining (weights + posterior, reused), IVON and IVON-PCM
    continuing its posterior, AdamW fresh, each method's steps from its calibrated CPU time per
    step, so that every run's schedule ends at about the same CPU time."""
    from research import evidence as E
    from research import runner

    folder = tmp_path / "pretrained"
    monkeypatch.setattr(runner, "pretrained_folder", lambda regime: folder)
    monkeypatch.setattr(E, "pretrained_folder", lambda regime: folder)
    loaded = []
    from hf_ivonpc.tasks import continual as workload
    real = workload.init_optimizer_from_posterior
    monkeypatch.setattr(workload, "init_optimizer_from_posterior",
                        lambda trainer, name: loaded.append(name) or real(trainer, name))
    report = E.main(["--regime", "continual_tiny", "--quick", "--seeds", "2", "--budgets", "1", "--out", str(tmp_path)])
    assert (folder / "posterior.safetensors").is_file() and (folder / "model.safetensors").is_file()
    assert set(report["cost_per_step"]) == {"adamw", "ivon", "ivon_pcm"}
    # IVON-PCM's step costs more (two passes and the mega-batch), so it gets fewer steps
    assert report["cost_per_step"]["ivon_pcm"] > report["cost_per_step"]["ivon"]
    runs = report["runs"]
    steps = {r["cfg"]["method"]: r["shape"]["steps"] for r in runs}
    assert steps["ivon_pcm"] < steps["ivon"]
    for r in runs:   # the paper's continual settings, scaled down
        if r["cfg"]["method"] == "ivon_pcm":
            assert r["cfg"]["alpha"] == 0.7 and r["cfg"]["rho"] == [0.3, 0.05]
    # every IVON run started from the pretraining posterior; AdamW's did not
    ivon_runs = [r for r in runs if r["cfg"]["method"] != "adamw"]
    n_ivon = sum(1 for t in report["tuning"] for m in t["lr_curve"] if m != "adamw" for _ in t["lr_curve"][m])
    assert len(loaded) == len(ivon_runs) + n_ivon + 2 and set(loaded) == {str(folder)}   # + 2 calibrations
    assert set(report["summary"]["methods"]) == {"adamw", "ivon", "ivon_pcm"}
    # a second campaign reuses the pretrained model and every run
    stamp = (folder / "posterior.safetensors").stat().st_mtime_ns
    again = E.main(["--regime", "continual_tiny", "--quick", "--seeds", "2", "--budgets", "1", "--out", str(tmp_path),
                    "--report_only"])
    assert again["summary"] == json.loads(json.dumps(report["summary"]))
    assert (folder / "posterior.safetensors").stat().st_mtime_ns == stamp
