"""scripts/ablate.py: its bookkeeping, and its whole code path in --quick mode."""

import json

import pytest

from _scripts import load_script

ablate = load_script("ablate")


def test_gradient_evaluations_count_both_passes_and_the_mega_batches():
    assert ablate.gradient_evaluations(10, {"method": "adamw", "batch": 8}) == 80
    # 8 steps, corrected from step 4: 4 second passes and refreshes at 4 and 6 of 2 x 8 examples
    cfg = {"method": "ivon_pcm", "batch": 8, "start": 4, "refresh": 2, "factor": 2}
    assert ablate.gradient_evaluations(8, cfg) == 64 + 4 * 8 + 2 * 2 * 8
    assert ablate.gradient_evaluations(4, cfg) == 32


def test_tuning_grid_steps():
    assert [ablate.next_grid_point(v, up=True) for v in (3.0, 1.0, 3e-3)] == [10.0, 3.0, 1e-2]
    assert [ablate.next_grid_point(v, up=False) for v in (0.1, 3e-4)] == [0.03, 1e-4]


def test_refuses_to_run_without_tuned_learning_rates(tmp_path):
    with pytest.raises(SystemExit, match="run with --tune once"):
        ablate.main(["--out", str(tmp_path), "--experiments", "methods"])


def test_quick_run_writes_tables_plots_and_summaries(tmp_path):
    report = ablate.main(["--quick", "--out", str(tmp_path), "--experiments", "methods,start"])
    assert {p.name for p in tmp_path.iterdir()} >= {"ablations.json", "ablations.md",
                                                    "ablation_methods.png", "ablation_sweeps.png"}
    saved = json.loads((tmp_path / "ablations.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(report["summary"]))
    methods = saved["summary"]["methods"]
    assert list(methods) == ["adamw", "alpha_svrg", "ivon", "ivon_pc", "ivon_pcm"]
    for s in methods.values():
        assert s["eval_loss_at_equal_time"]["n"] == 1 and s["final_eval_loss"]["mean"] > 0
    # equal examples is AdamW's budget: AdamW is read at its own end
    assert methods["adamw"]["eval_loss_at_equal_examples"]["mean"] == methods["adamw"]["final_eval_loss"]["mean"]
    starts = saved["summary"]["start"]
    assert list(starts) == ["start=0", "start=3", "start=6"]
    for name in ("start=3", "start=6"):   # the jump, beside IVON's fall over the same steps
        assert starts[name]["drop_after_start"]["n"] == starts[name]["ivon_drop_there"]["n"] == 1
