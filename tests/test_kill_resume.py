"""Killed anywhere, nothing lost: PCTrainer runs SIGKILLed at several points resume with
``resume_from_checkpoint=True`` to the uninterrupted run's result, bit for bit, skipping a
checkpoint folder the kill left half-written (``hf_ivonpc.checkpoints``); and every moment of a
posterior save leaves a loadable posterior, the previous one or the new one.

Bit equality is the right test here: the reference and every resumed run are processes of one
kind (forked from one parent by tests/kill_resume_worker.py), on the same CPU, running the same
operations on the same layouts; resume is exact by design (the optimizer's state, its noise
generator and the mega-batch sampler are all in the checkpoint)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hf_ivonpc.posterior as posterior_module
from hf_ivonpc import PCTrainer, PCTrainingArguments, Posterior
from hf_ivonpc.checkpoints import checkpoint_problems, newest_complete_checkpoint
from hf_ivonpc.posterior import POSTERIOR_INDEX_NAME, POSTERIOR_NAME

from _tiny_lm import first_windows, tiny_gpt2

HERE = Path(__file__).resolve().parent

_MISSING_AFTER_WEIGHTS = ["optimizer.pt is missing", "scheduler.pt is missing",
                          "rng_state.pth is missing", "trainer_state.json is missing"]
#: point -> (the checkpoint the resumed run starts from, what the warning must name as missing
#: from checkpoint-6; empty: no warning, the newest checkpoint was complete)
EXPECTED = {
    "between_steps": ("checkpoint-3", []),
    "theta_out": ("checkpoint-3", []),
    "after_save": ("checkpoint-6", []),
    "checkpoint_folder": ("checkpoint-3", _MISSING_AFTER_WEIGHTS),
    "trainer_state": ("checkpoint-3", ["trainer_state.json is truncated or not JSON"]),
    "posterior_file": ("checkpoint-3", [f"{POSTERIOR_NAME} is missing", *_MISSING_AFTER_WEIGHTS]),
    "posterior_shards": ("checkpoint-3", [f"{POSTERIOR_NAME} is missing", *_MISSING_AFTER_WEIGHTS]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The worker's runs: the reference, then per point a killed run and its resumption."""
    if not hasattr(os, "fork"):
        pytest.skip("the worker forks its runs (POSIX)")
    out = tmp_path_factory.mktemp("kill_resume")
    done = subprocess.run([sys.executable, str(HERE / "kill_resume_worker.py"), str(out), *EXPECTED],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reference"].get("exit") == 0, summary["reference"]
    return out, summary


def _assert_identical(a, b, where="") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_identical(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_identical(x, y, f"{where}/{i}")
    else:
        assert a == b, (where, a, b)


def _assert_same_posterior(a: Posterior, b: Posterior) -> None:
    assert a.names == b.names and a.step == b.step
    for kind in ("hess", "momentum", "std"):
        for n in a.names:
            assert torch.equal(getattr(a, kind)[n], getattr(b, kind)[n]), (kind, n)


@pytest.mark.parametrize("point", list(EXPECTED))
def test_a_killed_run_resumes_to_the_uninterrupted_result(runs, point):
    out, summary = runs
    killed, resumed = summary[point]["killed"], summary[point]["resumed"]
    assert killed.get("signal") == signal.SIGKILL and killed.get("point") == point, killed
    assert resumed.get("exit") == 0, resumed.get("error", resumed)
    start, missing = EXPECTED[point]
    assert resumed["resumed_from"] == [start]
    if missing:
        # refused with a message naming the folder and what it lacks, resumed from the one before
        (warning,) = resumed["warnings"]
        assert "skipping the incomplete checkpoint" in warning and warning.endswith(start), warning
        assert os.sep + "checkpoint-6 (" in warning, warning
        for what in missing:
            assert what in warning, (what, warning)
        assert checkpoint_problems(out / f"{point}-as-killed" / "checkpoint-6")
    else:
        assert resumed["warnings"] == []
    # weights, the optimizer's whole state (mean, h, momentum, outer statistics, noise generator,
    # counters), the scheduler and the step: bit for bit the uninterrupted run's
    ref = torch.load(out / "reference" / "final.pt", weights_only=True)
    got = torch.load(out / point / "final.pt", weights_only=True)
    assert ref["global_step"] == 9
    _assert_identical(ref, got)
    # the checkpoints written again after the resume are complete and hold the same posterior
    for step in (6, 9):
        folder = out / point / f"checkpoint-{step}"
        assert checkpoint_problems(folder) == [], step
        _assert_same_posterior(Posterior.from_pretrained(out / "reference" / f"checkpoint-{step}"),
                               Posterior.from_pretrained(folder))
    if point == "posterior_shards":
        assert (out / point / "checkpoint-6" / POSTERIOR_INDEX_NAME).is_file()


def _args(out, **over):
    return PCTrainingArguments(output_dir=str(out), pc_method="ivon_pcm", max_steps=9,
                               per_device_train_batch_size=4, ivon_ess=1e4, pc_megabatch_factor=2,
                               pc_refresh_steps=2, pc_start_step=2, save_strategy="steps",
                               save_steps=3, report_to=[], disable_tqdm=True, use_cpu=True, **over)


def test_an_incomplete_checkpoint_is_refused_by_name_and_when_none_is_complete(runs, tmp_path):
    import shutil
    out, _ = runs
    left = out / "checkpoint_folder-as-killed"
    found, skipped = newest_complete_checkpoint(left)
    assert found == str(left / "checkpoint-3")
    assert [(Path(f).name, p) for f, p in skipped] == [("checkpoint-6", _MISSING_AFTER_WEIGHTS)]
    trainer = PCTrainer(model=tiny_gpt2(), args=_args(left), train_dataset=first_windows(64))
    with pytest.raises(ValueError, match=r"checkpoint-6'? is an incomplete checkpoint: optimizer.pt "
                                         r"is missing.*the newest complete checkpoint beside it is "
                                         r".*checkpoint-3"):
        trainer.train(resume_from_checkpoint=str(left / "checkpoint-6"))
    # only the half-written folder: nothing to resume from, said with what it lacks
    shutil.copytree(left / "checkpoint-6", tmp_path / "checkpoint-6")
    trainer = PCTrainer(model=tiny_gpt2(), args=_args(tmp_path), train_dataset=first_windows(64))
    with pytest.raises(ValueError, match="no complete checkpoint in .*checkpoint-6: optimizer.pt is missing"):
        trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 0


# ---------------------------------------------------------------------------- posterior saves
def _toy_posterior(model, seed):
    g = torch.Generator().manual_seed(seed)
    named = list(model.named_parameters())
    hess = {n: torch.rand(p.shape, generator=g) + 0.1 for n, p in named}
    mom = {n: torch.randn(p.shape, generator=g) for n, p in named}
    std = {n: h.add(1e-3).mul(100.0).rsqrt() for n, h in hess.items()}
    return Posterior(std, hess, [{"params": [n for n, _ in named], "ess": 100.0, "weight_decay": 1e-3}],
                     momentum=mom, method="ivon", step=seed)


#: (the folder's previous posterior: None, "single" or max_shard_size, saved once or twice; the
#: new save's max_shard_size, None for the single file). The model's h and momentum are 236 kB:
#: "100KB" gives 3 shards, "40KB" 7.
SAVES = {
    "none -> shards": (None, 1, "100KB"),
    "single -> shards": ("single", 1, "100KB"),
    "shards -> as many shards": ("100KB", 1, "100KB"),
    "alternate names -> as many shards": ("100KB", 2, "100KB"),
    "shards -> other shards": ("40KB", 1, "100KB"),
    "shards -> single": ("40KB", 1, None),
}


@pytest.mark.parametrize("case", list(SAVES))
def test_every_moment_of_a_posterior_save_leaves_a_loadable_posterior(tmp_path, monkeypatch, case):
    """The folder is copied after every file operation of a save, and once more with a file
    being written cut to half its length: what a kill at that moment would leave (no cleanup).
    Each copy must load the previous posterior until one moment, and the new one from then on."""
    import safetensors.torch
    previous, times, new_size = SAVES[case]
    model = tiny_gpt2()
    folder = tmp_path / "posterior"
    folder.mkdir()
    old, new = _toy_posterior(model, 1), _toy_posterior(model, 2)
    for i in range(times if previous else 0):
        (old if i == times - 1 else _toy_posterior(model, 3)).save(
            folder, max_shard_size="5GB" if previous == "single" else previous)
    moments = []

    def moment(cut=None):
        files = {f.name: f.read_bytes() for f in folder.iterdir()}
        if cut is not None and cut.name in files:
            files[cut.name] = files[cut.name][: len(files[cut.name]) // 2]
        moments.append(files)

    def inside(path):
        return Path(os.fspath(path)).resolve().parent == folder.resolve()

    def after(real, target, writes=False):
        """``real``, then a copy of the folder if it acted there (``target``: its path argument)."""
        def call(*args, **kw):
            result = real(*args, **kw)
            if inside(args[target]):
                if writes:
                    moment(cut=Path(os.fspath(args[target])))
                moment()
            return result
        return call
    monkeypatch.setattr(os, "replace", after(os.replace, 1))
    monkeypatch.setattr(os, "remove", after(os.remove, 0))
    monkeypatch.setattr(safetensors.torch, "save_file", after(safetensors.torch.save_file, 1, writes=True))
    monkeypatch.setattr(posterior_module, "_write_text", after(posterior_module._write_text, 0, writes=True))
    moment()
    new.save(folder, max_shard_size="5GB" if new_size is None else new_size)
    monkeypatch.undo()
    assert len(moments) > 10

    seen = []
    for i, files in enumerate(moments):
        view = tmp_path / f"moment-{i}"
        view.mkdir()
        for name, data in files.items():
            (view / name).write_bytes(data)
        try:
            loaded = Posterior.from_pretrained(view, model=model)
        except FileNotFoundError:
            if previous is not None or "new" in seen:
                pytest.fail(f"a kill at moment {i} of the save leaves no posterior: {sorted(files)}")
            seen.append("none")
            continue
        which = "old" if loaded.step == old.step else "new"
        _assert_same_posterior(loaded, old if which == "old" else new)
        seen.append(which)
    assert seen[-1] == "new" and seen[0] == ("none" if previous is None else "old")
    switch = seen.index("new")
    assert set(seen[switch:]) == {"new"}, seen       # once switched, never back
    # what is left: the new posterior's files only
    left = sorted(os.listdir(folder))
    if new_size is None:
        assert left == [POSTERIOR_NAME]
    else:
        index = json.loads((folder / POSTERIOR_INDEX_NAME).read_text())
        assert left == sorted([POSTERIOR_INDEX_NAME, *set(index["weight_map"].values())])
        n = len(set(index["weight_map"].values()))
        tag = "-b" if case == "shards -> as many shards" else ""
        assert sorted(set(index["weight_map"].values())) == [
            f"posterior-{i:05d}-of-{n:05d}{tag}.safetensors" for i in range(1, n + 1)]


def test_what_a_checkpoint_lacks_is_named_in_every_layout(runs, tmp_path):
    """The layouts a kill does not reach in the worker: a truncated optimizer.pt or shard of the
    posterior, an unreadable RNG state, and FSDP's (per-rank RNG states, torch.distributed.checkpoint
    folders, finished once their .metadata is written)."""
    import shutil
    out, _ = runs
    ckpt = tmp_path / "checkpoint-3"
    shutil.copytree(out / "reference" / "checkpoint-3", ckpt)
    assert checkpoint_problems(ckpt) == []
    for name in ("optimizer.pt", "rng_state.pth"):
        data = (ckpt / name).read_bytes()
        (ckpt / name).write_bytes(data[: len(data) - 100])
        (problem,) = checkpoint_problems(ckpt)
        assert problem.startswith(f"{name} is truncated"), problem
        (ckpt / name).write_bytes(data)
    Posterior.from_pretrained(ckpt).save(ckpt, max_shard_size="100KB")
    shard = sorted(ckpt.glob("posterior-00002-of-*"))[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    (problem,) = checkpoint_problems(ckpt)
    assert problem.startswith(f"{shard.name} is unreadable"), problem
    assert checkpoint_problems(ckpt, posterior=False) == []
    # FSDP's sharded layout on two processes
    (ckpt / "model.safetensors").unlink()
    (ckpt / "optimizer.pt").unlink()
    for i in range(2):
        shutil.copyfile(ckpt / "rng_state.pth", ckpt / f"rng_state_{i}.pth")
    for name in ("pytorch_model_fsdp_0", "optimizer_0"):
        (ckpt / name).mkdir()
        (ckpt / name / "__0_0.distcp").write_bytes(b"data")
    assert checkpoint_problems(ckpt, posterior=False, world_size=2) == [
        "pytorch_model_fsdp_0/.metadata is missing (a torch.distributed.checkpoint folder not finished)",
        "optimizer_0/.metadata is missing (a torch.distributed.checkpoint folder not finished)"]
    for name in ("pytorch_model_fsdp_0", "optimizer_0"):
        (ckpt / name / ".metadata").write_bytes(b"metadata")
    assert checkpoint_problems(ckpt, posterior=False, world_size=2) == []
    (ckpt / "rng_state_1.pth").unlink()
    assert checkpoint_problems(ckpt, posterior=False, world_size=2) == ["rng_state_1.pth is missing"]
