"""scripts/gpu_check.py runs its whole code path on a CPU in dry-run mode."""

import json

import torch

from _scripts import ROOT, load_script


def test_dry_run_reports_every_method(tmp_path, eager_kernels):
    # the script's code path, with the eager kernels: compiled for the CPU they would not be the
    # GPU's kernels either
    summary = load_script("gpu_check").main(["--dry-run", "--out", str(tmp_path / "o"),
                                             "--json", str(tmp_path / "s.json"),
                                             "--methods", "none,ivon,ivon_pcm,ivon_pcm_bf16"])
    assert json.loads((tmp_path / "s.json").read_text()) == summary
    assert [r["method"] for r in summary["methods"]] == ["none", "ivon", "ivon_pcm", "ivon_pcm_bf16"]
    assert summary["methods"][-1]["state_dtypes"] == ["bfloat16", "float32"]
    for r in summary["methods"]:
        assert r["tokens_per_s"] > 0 and r["param_dtypes"] == ["float32"]
    assert summary["all_checks_pass"] and summary["checks"]["optimizer_state_fp32"]
    if not torch.cuda.is_available():
        assert summary["device"] == "cpu (dry run)" and "two_pass_memory" not in summary["checks"]
        # on CPU the noise is kept (a GPU run reports 16 / 36 / 22: drawn again instead)
        assert [r["state_bytes_per_param"] for r in summary["methods"]] == [None, 20, 40, 26]


def test_memory_plan_is_the_runbook_table():
    """Every figure of the runbook's memory table (docs/RUNBOOK.md) comes from benchmarks/memory_plan.py."""
    result = load_script("memory_plan", ROOT / "benchmarks").plan()
    assert result["state_bytes_per_param"] == {"adamw": 8, "ivon": 16, "ivon_pcm": 36, "alpha_svrg": 28,
                                               "ivon_bf16": 10, "ivon_pcm_bf16": 22}
    runbook = (ROOT / "docs" / "RUNBOOK.md").read_text()
    for name, r in result["runs"].items():
        row = next(line for line in runbook.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == f"{r['trained_params'] / 1e6:.1f}M" and int(cells[2]) == r["gpus"]
        for cell, method in zip(cells[3:], ("adamw", "ivon", "ivon_pcm", "alpha_svrg", "ivon_bf16",
                                            "ivon_pcm_bf16"), strict=True):
            numbers = [float(x) for x in cell.replace("GB", "").replace("FSDP2:", "").replace("(", " ")
                       .replace(")", " ").split()]
            assert numbers[0] == round(r["GB"][method]["ddp"], 1), (name, method)
            if r["gpus"] > 1:
                assert numbers[1] == round(r["GB"][method]["fsdp2"], 2), (name, method)


def _evidence_in_subprocess(tmp_path, *extra):
    """``scripts/gpu_check.py --evidence --dry-run`` as the GPU machine runs it (the script as
    ``__main__``, the repository on PYTHONPATH, and scripts/ as ``python scripts/gpu_check.py``
    puts it there), with ``datasets`` made unimportable: that image
    does not have it."""
    import os
    import subprocess
    import sys

    out = tmp_path / "evidence.json"
    argv = ["gpu_check.py", "--evidence", "--dry-run", "--out", str(tmp_path / "o"), "--json", str(out),
            *extra]
    code = ("import runpy, sys; sys.modules['datasets'] = None; "
            f"sys.argv = {argv!r}; runpy.run_path('scripts/gpu_check.py', run_name='__main__')")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join((str(ROOT), str(ROOT / "scripts"))), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    return proc, out


def test_evidence_dry_run_branches_ivon_and_ivon_pcm_from_one_trunk(tmp_path):
    import math

    proc, out = _evidence_in_subprocess(tmp_path)
    assert out.exists(), proc.stderr[-3000:]
    s = json.loads(out.read_text())
    assert s["status"] == "done" and s["mode"] == "evidence"
    assert set(s["branches"]) == {"ivon", "ivon_pcm"}
    steps, branch = s["plan"]["steps"], s["plan"]["branch_step"]
    assert 0 < branch < steps and s["data"]["train_chars"] > 8 * s["data"]["val_chars"] > 0
    ivon, pcm = s["branches"]["ivon"], s["branches"]["ivon_pcm"]
    # one trunk: equal to the bit up to the branch step, apart after it
    curve = {r["step"]: r for r in s["equal_steps"]}
    assert branch in curve and curve[branch]["ivon"] == curve[branch]["ivon_pcm"]
    assert s["identity_at_branch"]["train_losses_equal_before"] is True
    assert all(r["ivon"] == r["ivon_pcm"] for r in s["equal_steps"] if r["step"] <= branch)
    assert any(r["ivon"] != r["ivon_pcm"] for r in s["equal_steps"] if r["step"] > branch)
    assert [r["step"] for r in ivon["curve"]] == [r["step"] for r in pcm["curve"]] and curve[steps]
    losses = [r["eval_loss"] for b in (ivon, pcm) for r in b["curve"]]
    assert losses and all(math.isfinite(x) for x in losses)
    # the correction's diagnostics, only after the branch, only in IVON-PCM
    for key in ("pc/grad_var_ratio", "pc/hess_var_ratio", "pc/clipped_share", "pc/h_out_negative_share"):
        assert any(key in d and math.isfinite(d[key]) for d in pcm["diagnostics"] if d["step"] > branch), key
    assert not any("pc/grad_var_ratio" in d for d in pcm["diagnostics"] if d["step"] <= branch)
    assert not any("pc/grad_var_ratio" in d for d in ivon["diagnostics"])
    for b in (ivon, pcm):
        assert b["steps_done"] == steps and b["tokens_per_s"] > 0 and b["wall_s"] > 0
    assert pcm["gradient_evaluations"] > ivon["gradient_evaluations"]
    assert 0 < s["time"]["used_s"] < s["time"]["budget_s"]
    assert proc.returncode == 0, proc.stderr[-3000:]   # every check of the script passed


def test_evidence_time_budget_stops_the_runs_and_keeps_the_json(tmp_path):
    """A budget spent before the runs start: each run stops after its first step, the JSON still
    holds both partial runs, and the checks say the runs are incomplete."""
    before = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    s = load_script("gpu_check").main(["--evidence", "--dry-run", "--time_budget_s", "0.01",
                                       "--steps", "64", "--out", str(tmp_path / "o"),
                                       "--json", str(tmp_path / "e.json")])
    assert json.loads((tmp_path / "e.json").read_text())["branches"].keys() == {"ivon", "ivon_pcm"}
    assert s["plan"]["shortened_by_budget"] and s["plan"]["steps"] == 16
    for b in s["branches"].values():
        assert b["stopped_by_budget_at"] == 1 and b["steps_done"] == 1
    assert not s["checks"]["both_runs_complete"] and not s["all_checks_pass"]
    assert (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()) == before


def test_evidence_plan_fits_the_budget():
    plan_steps, run_seconds = (getattr(load_script("gpu_check"), n) for n in ("plan_steps", "run_seconds"))
    assert plan_steps(1600, 0.025, 0.5, 1000.0) == 1600            # the cap
    n = plan_steps(1600, 0.1, 0.5, 200.0, pcm_cost=3.0)
    assert n % 16 == 0 and run_seconds(n, 0.1, 0.5, 3.0) <= 200.0 < run_seconds(n + 16, 0.1, 0.5, 3.0)
    assert plan_steps(1600, 0.1, 0.5, -5.0) == 16                  # at least one unit
