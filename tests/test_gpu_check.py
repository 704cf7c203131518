"""scripts/gpu_check.py runs its whole code path on a CPU in dry-run mode."""

import json

import torch

from _scripts import ROOT, load_script


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


def test_memory_plan_is_the_readme_table():
    """Every figure of the README's memory table comes from benchmarks/memory_plan.py."""
    result = load_script("memory_plan", ROOT / "benchmarks").plan()
    assert result["state_bytes_per_param"] == {"adamw": 8, "ivon": 24, "ivon_pcm": 44, "alpha_svrg": 28}
    readme = (ROOT / "README.md").read_text()
    for name, r in result["runs"].items():
        row = next(line for line in readme.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == f"{r['trained_params'] / 1e6:.1f}M" and int(cells[2]) == r["gpus"]
        for cell, method in zip(cells[3:], ("adamw", "ivon", "ivon_pcm", "alpha_svrg")):
            numbers = [float(x) for x in cell.replace("GB", "").replace("FSDP2:", "").replace("(", " ")
                       .replace(")", " ").split()]
            assert numbers[0] == round(r["GB"][method]["ddp"], 1), (name, method)
            if r["gpus"] > 1:
                assert numbers[1] == round(r["GB"][method]["fsdp2"], 2), (name, method)
