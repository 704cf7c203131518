"""scripts/evidence.py and the campaign helpers: the tuning rule, caching, intervals, the
gradient-evaluation count, and the whole code path on a tiny regime."""

import json
import math

import pytest

from research import campaign as C

from _scripts import ROOT, load_script


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


def test_quick_campaign_reports_every_method_and_diagnostic(tmp_path):
    evidence = load_script("evidence")
    report = evidence.main(["--regime", "digits", "--quick", "--seeds", "2", "--out", str(tmp_path), "--sweeps"])
    assert {p.name for p in tmp_path.iterdir()} >= {"digits.json", "digits.md", "digits.png", "digits"}
    s = report["summary"]
    assert set(s["methods"]) == {"adamw", "alpha_svrg", "ivon", "ivon_pc", "ivon_pcm", evidence.CONTROL}
    for name in ("ivon_pc", "ivon_pcm"):
        m = s["methods"][name]
        assert m["final_eval_loss"]["n"] == 2 and m["pc/grad_var_ratio"]["mean"] > 0
        assert "h_moved_median" in m and "predictive_nll" in m
    # equal examples is the cheapest method's budget: AdamW is read at its own end
    adamw = s["methods"]["adamw"]
    assert adamw["eval_loss_at_equal_examples"]["mean"] == adamw["final_eval_loss"]["mean"]
    assert set(s["paired"]) >= {"ivon_pc - ivon", "ivon_pcm - ivon", "alpha_svrg - adamw"}
    tuned = report["tuning"]
    assert set(tuned["best"]) == {"alpha_svrg", "ivon_pc", "ivon_pcm"}
    assert tuned["best"]["ivon_pc"]["alpha"] in (0.25, 1.0)
    # the reported runs use the tuned values and never the tuning seed
    for r in report["runs"]:
        assert r["cfg"]["seed"] != C.TUNE_SEED
        if r["cfg"]["method"] == "ivon_pcm":
            assert r["cfg"]["alpha"] == tuned["best"]["ivon_pcm"]["alpha"]
    # Fig. 6's sweeps around IVON-PCM's tuned settings, the reported runs as the base values
    sw = report["sweeps"]
    assert list(sw["refresh"]) == ["5", "10", "20", "40"] and list(sw["start_ratio"]) == ["0.2", "0.25", "0.75"]
    assert sw["refresh"]["10"]["final_eval_loss"] == s["methods"]["ivon_pcm"]["final_eval_loss"]
    assert sw["start_ratio"]["0.75"]["ivon_drop_there"]["n"] == 2
    assert (tmp_path / "digits_sweeps.png").stat().st_size > 10_000   # the Fig. 6 analogue, plotted
    saved = json.loads((tmp_path / "digits.json").read_text())
    assert saved["summary"]["equal_examples"] == s["equal_examples"]
    # a second call trains nothing: every run comes from the cache, and --report_only agrees
    again = evidence.main(["--regime", "digits", "--quick", "--seeds", "2", "--out", str(tmp_path), "--report_only",
                           "--sweeps"])
    assert again["summary"]["methods"]["ivon_pcm"] == json.loads(json.dumps(s["methods"]["ivon_pcm"]))
    table = evidence.main(["--regime", "digits", "--out", str(tmp_path), "--status"])["status"]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    # + the tuning runs: 3 + 3 learning rates, 3 methods x 2 alphas
    assert len(rows) == len({json.dumps(r["cfg"], sort_keys=True) for r in report["runs"]}) + 6 + 6
    assert (tmp_path / "digits_status.md").read_text() == table


def test_report_only_refuses_to_train(tmp_path):
    evidence = load_script("evidence")
    with pytest.raises(SystemExit, match="has not finished"):
        evidence.main(["--regime", "digits", "--quick", "--out", str(tmp_path), "--report_only"])


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

    evidence = load_script("evidence")
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
