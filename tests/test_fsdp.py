"""FSDP2 on two CPU processes (torchrun, gloo) against one process.

``fsdp_worker.py``: the optimizers in a plain loop over ``fully_shard``-ed parameters: flat buffers
over each rank's shards, the clipping norm over all shards, DTensor state, state_dict round trips.
``fsdp_trainer_worker.py``: PCTrainer under Accelerate's FSDP2 (Accelerate turns FSDP on only for
GPUs; the worker lifts that one gate): ranks agree, checkpoints resume exactly, and the posterior
is gathered from the shards."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).resolve().parent / "fsdp_worker.py"
TRAINER_WORKER = WORKER.parent / "fsdp_trainer_worker.py"
ROOT = WORKER.parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp") / "report.json"
    _run(_torchrun(WORKER, out))
    return json.loads(out.read_text())


def _torchrun(*args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(_free_port()), *map(str, args)]


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("method", ["ivon", "ivon_pcm", "alpha_svrg"])
def test_sharded_run_matches_one_process(report, method):
    """Same draws, same global batch: the same weights and state up to summation order (1e-5
    relative), after 6 steps with gradient clipping active and, for the corrected methods, two
    refreshes from a mega-batch split over the ranks."""
    r = report[method]
    assert r["moved"] > 1e-3                      # training did change the weights
    assert r["local_numel"] < r["numel"]          # rank 0 holds only its shards
    assert r["refreshes"] == r["sharded_refreshes"] == (2 if method != "ivon" else 0)
    assert r["rel_diff"]["params"] < 1e-5, r
    assert r["rel_diff"]["state"] < 1e-5, r
    if method != "alpha_svrg":   # Posterior.from_optimizer gathers sigma from the shards
        assert r["rel_diff"]["posterior_std"] < 1e-5, r


@pytest.mark.parametrize("method", ["ivon", "ivon_pcm", "alpha_svrg"])
def test_sharded_state_is_dtensor_and_reloads_exactly(report, method):
    """Per rank (``torch.save`` of ``state_dict``) and through torch.distributed.checkpoint, as
    Trainer's FSDP checkpoints save it: buffers, counters and each rank's generator."""
    assert report[method]["state_is_dtensor"]
    assert report[method]["reload_exact"]
    assert report[method]["dcp_exact"]


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_trainer")
    _run(_torchrun(TRAINER_WORKER, out, "fsdp"))
    _run([sys.executable, str(TRAINER_WORKER), str(out), "single"])
    load = lambda name: torch.load(out / name, weights_only=False)   # our own files
    return out, load("fsdp-rank0.pt"), load("fsdp-rank1.pt"), load("single.pt")


def _equal(a: dict, b: dict) -> None:
    assert a["pc"] == b["pc"]
    for x, y in zip(a["params"] + a["momentum"], b["params"] + b["momentum"]):
        assert torch.equal(x, y)
    for n in a.get("std", {}):
        assert torch.equal(a["std"][n], b["std"][n]), n


def test_trainer_ranks_agree_and_resume_exactly(trainer_runs):
    """ivon_pcm, 6 steps of 2 accumulated micro-batches, refreshes at steps 1, 3, 5; stopped at the
    checkpoint of step 3 and resumed: the same weights, posterior and momentum, bit for bit."""
    _, r0, r1, _ = trainer_runs
    assert r0["world"] == 2 and r0["full"]["sharded"]
    assert r0["full"]["pc"] == {"step": 6, "refreshes": 3, "last_refresh": 5, "skipped_steps": 0,
                                "skipped_refreshes": 0, "consecutive_skips": 0}
    _equal(r0["full"], r1["full"])         # both ranks gathered the same whole state
    _equal(r0["full"], r0["resumed"])
    assert len(r0["full"]["logs"]) == 6 and all(e["pc/sigma_mean"] > 0 for e in r0["full"]["logs"])
    assert r0["full"]["logs"] == r1["full"]["logs"]   # statistics reduced over the shards
    # every micro-batch's gradient was reduced at its own draw and consumed, also the first of
    # each accumulation window (Trainer runs it inside no_sync): 6 x 2 at theta_in, 5 x 2 at
    # theta_out, 3 refreshes x 2 mega-batch micro-batches per rank
    assert r0["full"]["collected"] == [1.0] * (12 + 10 + 6)


def test_trainer_fsdp_matches_one_process_on_the_same_global_batch(trainer_runs):
    """ivon, one step with negligible noise (ess = 1e28): two ranks of 2 x 2 accumulated
    micro-batches against one process of 4 x 2, to 1e-5 relative (summation order)."""
    _, r0, _, single = trainer_runs
    two, one = r0["ivon"]["momentum"], single["ivon"]["momentum"]
    assert max(m.abs().max() for m in one) > 1e-3
    for a, b in zip(two, one):
        assert a.shape == b.shape
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-9)


def test_trainer_fsdp_checkpoint_holds_the_whole_posterior(trainer_runs):
    from hf_ivonpc import Posterior
    out, r0, _, _ = trainer_runs
    post = Posterior.from_pretrained(out / "pcm" / "checkpoint-6" / "posterior.safetensors")
    assert post.method == "ivon_pcm" and post.step == 6
    from _tiny_lm import VOCAB
    assert post.std["transformer.wte.weight"].shape == (len(VOCAB), 32)   # whole, not a shard
    for n, s in r0["full"]["std"].items():
        assert torch.equal(post.std[n], s), n
