"""Run by tests/test_kill_resume.py: PCTrainer (IVON-PCM, a tiny GPT-2, CPU) killed with SIGKILL at
a named point, then resumed with ``resume_from_checkpoint=True``.

    python tests/kill_resume_worker.py OUT POINT [POINT ...]

The parent imports torch and transformers once, then forks one child per run (importing them
costs seconds, a run a second): first the uninterrupted reference, then, for every POINT, a run
that kills itself there and a run that resumes from what it left, each in OUT/<POINT>/. The kill
is deterministic: a hook installed in the child calls ``os.kill(os.getpid(), SIGKILL)`` at the
point, as a pre-empted machine would, with no cleanup. Every child runs the same operations in
the same kind of process, so the resumed runs can be compared bit for bit with the reference.
OUT/summary.json says, per run, how it ended, where it was killed, what it resumed from and
what was warned; OUT/<run>/final.pt holds the final weights and optimizer state, and
OUT/<POINT>-as-killed/ a copy of what the killed run left.

Points (checkpoints every 3 of 9 steps):
    between_steps      after step 5 ended (checkpoint-3 is the newest)
    theta_out          inside the theta_out pass of step 5, the weights at theta_out
    after_save         right after checkpoint-6 was written (it is the newest, complete)
    checkpoint_folder  checkpoint-6 half written: weights and posterior, no optimizer.pt and after
    trainer_state      checkpoint-6's trainer_state.json half written
    posterior_file     checkpoint-6's posterior.safetensors half written (its temp file)
    posterior_shards   checkpoint-6's posterior sharded, killed after its second shard's rename
"""

import gc
import json
import logging
import os
import shutil
import signal
import sys
import traceback
from pathlib import Path

import torch

from _tiny_lm import first_windows, tiny_gpt2   # this folder is on the path: the worker runs as a file

import hf_ivonpc.posterior
from hf_ivonpc import PCTrainer, PCTrainingArguments
from hf_ivonpc.optim import IVONPC

STEPS, SAVE_STEPS, KILL_STEP = 9, 3, 6     # KILL_STEP: the checkpoint the write points hit
POINTS = ("between_steps", "theta_out", "after_save", "checkpoint_folder", "trainer_state",
          "posterior_file", "posterior_shards")


def _kill(where: Path, **record) -> None:
    """Record where the kill happened, then SIGKILL this process (no cleanup, no atexit)."""
    (where / "killed.json").write_text(json.dumps(record))
    os.kill(os.getpid(), signal.SIGKILL)


def _truncate(path) -> None:
    """Cut a file to half its length: what a kill while writing it leaves."""
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _in_kill_checkpoint(path) -> bool:
    return f"checkpoint-{KILL_STEP}" in Path(os.fspath(path)).parts


def _install(point: str, out: Path, trainer_ref: list) -> None:
    """Patch the point's function (in this child only) so that it kills the process there."""
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_callback import TrainerState

    def step():
        return trainer_ref[0].state.global_step

    if point in ("between_steps", "after_save"):
        class Kill(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if point == "between_steps" and state.global_step == 5:
                    _kill(out, point=point, step=state.global_step)

            def on_save(self, args, state, control, **kw):
                if point == "after_save" and state.global_step == KILL_STEP:
                    _kill(out, point=point, step=state.global_step)
        trainer_ref[0].add_callback(Kill())
    elif point == "theta_out":
        real = IVONPC.sampled_params

        def sampled_params(self, *a, **kw):
            ctx = real(self, *a, **kw)
            if kw.get("at") != "out" or step() != 4:   # step 5 is being computed
                return ctx

            class Killing:
                def __enter__(s):
                    ctx.__enter__()            # the weights are at theta_out now
                    _kill(out, point=point, step=step() + 1)

                def __exit__(s, *exc):
                    return ctx.__exit__(*exc)
            return Killing()
        IVONPC.sampled_params = sampled_params
    elif point == "checkpoint_folder":
        real = Trainer._save_optimizer_and_scheduler

        def save_optimizer_and_scheduler(self, output_dir):
            if _in_kill_checkpoint(output_dir):
                _kill(out, point=point, step=step(), files=sorted(os.listdir(output_dir)))
            return real(self, output_dir)
        Trainer._save_optimizer_and_scheduler = save_optimizer_and_scheduler
    elif point == "trainer_state":
        real = TrainerState.save_to_json

        def save_to_json(self, json_path):
            real(self, json_path)
            if _in_kill_checkpoint(json_path):
                _truncate(json_path)
                _kill(out, point=point, step=step(), files=sorted(os.listdir(Path(json_path).parent)))
        TrainerState.save_to_json = save_to_json
    elif point == "posterior_file":
        import safetensors.torch
        real = safetensors.torch.save_file

        def save_file(tensors, filename, metadata=None):
            real(tensors, filename, metadata=metadata)
            if _in_kill_checkpoint(filename) and "posterior" in os.path.basename(filename):
                _truncate(filename)
                _kill(out, point=point, step=step(), files=sorted(os.listdir(Path(filename).parent)))
        safetensors.torch.save_file = save_file   # the posterior looks it up when it writes
    elif point == "posterior_shards":
        real, renamed = os.replace, []

        def replace(src, dst):
            real(src, dst)
            name = os.path.basename(os.fspath(dst))
            if _in_kill_checkpoint(dst) and name.startswith("posterior-"):
                renamed.append(name)
                if len(renamed) == 2:
                    _kill(out, point=point, step=step(), files=sorted(os.listdir(Path(dst).parent)))
        os.replace = replace
    elif point != "reference":
        raise ValueError(f"point={point!r} is invalid: accepted are {POINTS}")


def _run(out: Path, point: str, resume: bool) -> None:
    """One training run in this (forked) process."""
    torch.set_num_threads(1)
    if point == "posterior_shards":   # both runs of the point write sharded posteriors
        hf_ivonpc.posterior.DEFAULT_MAX_SHARD_SIZE = "40KB"
    warnings: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            warnings.append(record.getMessage())
    logging.getLogger("hf_ivonpc.checkpoints").addHandler(Collect(level=logging.WARNING))
    resumed_from = []

    class Trainer(PCTrainer):
        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            resumed_from.append(os.path.basename(resume_from_checkpoint))
            return super()._load_from_checkpoint(resume_from_checkpoint, model)

    args = PCTrainingArguments(
        output_dir=str(out), pc_method="ivon_pcm", max_steps=STEPS, learning_rate=0.05,
        per_device_train_batch_size=4, ivon_hess_init=0.1, ivon_ess=1e4, ivon_beta2=0.999,
        pc_megabatch_factor=2, pc_refresh_steps=2, pc_start_step=2, save_strategy="steps",
        save_steps=SAVE_STEPS, logging_steps=100, report_to=[], disable_tqdm=True, use_cpu=True,
        seed=0)
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=first_windows(64))
    if not resume:
        _install(point, out, [trainer])
    trainer.train(resume_from_checkpoint=True if resume else None)
    opt = trainer.optimizer
    torch.save({"model": {k: v.clone() for k, v in trainer.model.state_dict().items()},
                "optimizer": opt.state_dict(), "scheduler": trainer.lr_scheduler.state_dict(),
                "global_step": trainer.state.global_step}, out / "final.pt")
    (out / "resumed.json").write_text(json.dumps({"resumed_from": resumed_from, "warnings": warnings}))


def _fork(out: Path, point: str, resume: bool) -> dict:
    """Run ``_run`` in a child process; how it ended."""
    out.mkdir(parents=True, exist_ok=True)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            _run(out, point, resume)
        except BaseException:
            (out / "error.txt").write_text(traceback.format_exc())
            code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    ended = ({"signal": os.WTERMSIG(status)} if os.WIFSIGNALED(status)
             else {"exit": os.WEXITSTATUS(status)})
    for name in ("killed.json", "resumed.json"):
        if (out / name).exists():
            ended.update(json.loads((out / name).read_text()))
    if (out / "error.txt").exists():
        ended["error"] = (out / "error.txt").read_text()
    return ended


def main(out: Path, points: list[str]) -> None:
    # what is imported now is shared by every child and never garbage: out of the collector's
    # reach (Trainer.train ends with a full gc.collect, ~1 s over all of it), as in conftest.py
    gc.collect()
    gc.freeze()
    summary = {"reference": _fork(out / "reference", "reference", resume=False)}
    for point in points:
        killed = _fork(out / point, point, resume=False)
        (out / point / "killed.json").unlink(missing_ok=True)
        shutil.copytree(out / point, out / f"{point}-as-killed")   # for the test to inspect
        summary[point] = {"killed": killed, "resumed": _fork(out / point, point, resume=True)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
