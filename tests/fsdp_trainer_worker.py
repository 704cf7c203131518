"""Run by tests/test_fsdp.py: PCTrainer under Accelerate's FSDP2 on two CPU processes (torchrun,
gloo), and the same run in one process without FSDP.

Accelerate turns FSDP on only for GPU process groups; ``_allow_fsdp_on_cpu`` lifts that one gate
(the rest of Accelerate's and Trainer's FSDP2 path runs unchanged: ``fully_shard`` per block, the
swap of the optimizer's parameters, DCP checkpoints of model and optimizer).

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp_trainer_worker.py OUT fsdp
    python tests/fsdp_trainer_worker.py OUT single
"""

import sys
from pathlib import Path

import torch

from _tiny_lm import first_windows, tiny_gpt2   # this folder is on the path: the worker runs as a file

from hf_ivonpc import PCTrainer, PCTrainingArguments
from hf_ivonpc.optim._base import FlatStateOptimizer, is_sharded


def _allow_fsdp_on_cpu():
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType
    init = AcceleratorState.__init__

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        plugin = fsdp_plugin or getattr(self, "fsdp_plugin", None)
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin

    AcceleratorState.__init__ = patched


#: for each pass the optimizer collected, the share of parameters that had a gradient
COLLECTED: list[float] = []


def _count_collected_gradients():
    collect = FlatStateOptimizer._collect_role

    def counting(self, at):
        ps = [p for g in self.param_groups for p in g["params"]]
        COLLECTED.append(sum(p.grad is not None for p in ps) / len(ps))
        return collect(self, at)

    FlatStateOptimizer._collect_role = counting


def shipped_fsdp_config() -> dict:
    """The FSDP settings of the shipped ``configs/accelerate/fsdp2.yaml``, as TrainingArguments'
    ``fsdp_config`` (its keys without the ``fsdp_`` prefix)."""
    import yaml

    from hf_ivonpc.tasks.cli import CONFIGS

    cfg = yaml.safe_load((CONFIGS / "accelerate" / "fsdp2.yaml").read_text())["fsdp_config"]
    out = {k.removeprefix("fsdp_"): v for k, v in cfg.items() if k != "fsdp_auto_wrap_policy"}
    out["transformer_layer_cls_to_wrap"] = [out["transformer_layer_cls_to_wrap"]]
    assert cfg["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP" and out["version"] == 2
    return out


def trainer(out: Path, method: str, fsdp: bool, per_device: int, steps: int, ess: float, **kw):
    extra = dict(fsdp=True, fsdp_config=shipped_fsdp_config()) if fsdp else {}
    args = PCTrainingArguments(
        output_dir=str(out), pc_method=method, max_steps=steps, learning_rate=0.05,
        per_device_train_batch_size=per_device, gradient_accumulation_steps=2,
        ivon_hess_init=0.1, ivon_ess=ess, ivon_clip_radius=float("inf"), pc_start_step=1,
        pc_refresh_steps=2, pc_megabatch_factor=1, max_grad_norm=1.0, report_to=[],
        logging_steps=1, disable_tqdm=True, use_cpu=True, seed=0, lr_scheduler_type="constant",
        dataloader_drop_last=True, **extra, **kw)
    return PCTrainer(model=tiny_gpt2(dropout=0.0), args=args, train_dataset=first_windows(16))


def _full(t):
    return (t.full_tensor() if is_sharded(t) else t).detach()


def summary(t: PCTrainer, posterior: bool = True) -> dict:
    """What every rank must agree on, gathered from the shards (a collective)."""
    opt = t.pc_optimizer
    out = {"params": [_full(p) for p in t.model.parameters()], "pc": opt.counters, "sharded": opt.sharded,
           "momentum": [_full(opt.state[p]["momentum"]) for g in opt.param_groups for p in g["params"]],
           "logs": [e for e in t.state.log_history if "pc/sigma_mean" in e]}
    if posterior:   # gathered by PCTrainer.posterior
        out["std"] = t.posterior().std
    return out


def main(out: Path, mode: str):
    if mode == "fsdp":
        _allow_fsdp_on_cpu()
        _count_collected_gradients()
        # ivon_pcm with real noise, checkpoints at step 3, then resumed from there
        full = trainer(out / "pcm", "ivon_pcm", True, 2, 6, 1e3, save_strategy="steps", save_steps=3)
        assert full.is_fsdp_enabled and full.is_fsdp2
        full.train()
        a = summary(full)
        a["collected"] = list(COLLECTED)
        resumed = trainer(out / "pcm", "ivon_pcm", True, 2, 6, 1e3, save_strategy="no")
        resumed.train(resume_from_checkpoint=str(out / "pcm" / "checkpoint-3"))
        b = summary(resumed)
        # ivon, one step with negligible noise: against one process on the same global batch
        c = trainer(out / "ivon", "ivon", True, 2, 1, 1e28, save_strategy="no")
        c.train()
        c = summary(c, posterior=False)   # ess = 1e28 overflows h: only the mean and momentum
        rank = full.args.process_index
        torch.save({"full": a, "resumed": b, "ivon": c, "world": full.args.world_size},
                   out / f"fsdp-rank{rank}.pt")
    else:
        c = trainer(out / "single", "ivon", False, 4, 1, 1e28, save_strategy="no")
        c.train()
        torch.save({"ivon": summary(c, posterior=False)}, out / "single.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
