"""scripts/gpu_check.py runs its whole code path on a CPU in dry-run mode."""

import json

import torch

from _scripts import load_script


def test_dry_run_reports_every_method(tmp_path):
    summary = load_script("gpu_check").main(["--dry-run", "--out", str(tmp_path / "o"),
                                             "--json", str(tmp_path / "s.json")])
    assert json.loads((tmp_path / "s.json").read_text()) == summary
    assert [r["method"] for r in summary["methods"]] == ["none", "ivon", "ivon_pcm"]
    for r in summary["methods"]:
        assert r["tokens_per_s"] > 0 and r["param_dtypes"] == ["float32"]
    assert summary["all_checks_pass"] and summary["checks"]["optimizer_state_fp32"]
    if not torch.cuda.is_available():
        assert summary["device"] == "cpu (dry run)" and "two_pass_memory" not in summary["checks"]
