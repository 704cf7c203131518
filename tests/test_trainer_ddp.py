"""Two CPU processes through `accelerate launch` with the shipped DDP config (``hf_ivonpc/configs/
accelerate/ddp.yaml``, its 8 processes and bf16 overridden on the command line; torchrun, gloo)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_ivonpc.tasks.cli import CONFIGS

WORKER = Path(__file__).resolve().parent / "ddp_worker.py"
ROOT = WORKER.parents[1]


def _launch(out: Path, processes: int, per_device: int):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    cmd = ([accelerate, "launch", "--config_file", str(CONFIGS / "accelerate" / "ddp.yaml"),
            "--num_processes", str(processes), "--mixed_precision", "no", "--main_process_port", "29617"]
           if processes > 1 else [sys.executable])
    cmd += [str(WORKER), str(out), str(per_device)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    _launch(out, 2, per_device=4)   # global batch 8 over two ranks
    _launch(out, 1, per_device=8)   # the same 8 examples in one process
    return out


@pytest.mark.parametrize("method", ["ivon_pcm", "alpha_svrg"])
def test_two_ranks_hold_identical_state(runs, method):
    a = torch.load(runs / f"{method}-rank0-of2.pt", weights_only=True)
    b = torch.load(runs / f"{method}-rank1-of2.pt", weights_only=True)
    assert a["world"] == 2 and a["pc"]["refreshes"] == 3
    for p, q in zip(a["params"], b["params"]):
        assert torch.equal(p, q)
    for fa, fb in zip(a["flat"], b["flat"]):
        for name in a["persistent"]:
            assert torch.equal(fa[name], fb[name]), name
    if method == "ivon_pcm":   # and the ranks did draw different noise (rank-offset seeds)
        assert not torch.equal(a["flat"][0]["noise"], b["flat"][0]["noise"])


def test_two_ranks_match_one_process_on_the_same_global_batch(runs):
    """With negligible noise (sigma ~ 1e-14) the averaged gradient of two ranks of 4 equals one
    process's gradient of the same 8 examples, to 1e-5 relative (summation order only)."""
    two = torch.load(runs / "ivon-rank0-of2.pt", weights_only=True)["flat"]
    one = torch.load(runs / "ivon-rank0-of1.pt", weights_only=True)["flat"]
    for f2, f1 in zip(two, one):
        assert f1["momentum"].abs().max() > 1e-4
        assert torch.allclose(f2["momentum"], f1["momentum"], rtol=1e-5, atol=1e-8)
