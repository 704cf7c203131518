"""Run by tests/test_trainer_ddp.py under `accelerate launch` with the shipped DDP config on two CPU
processes (gloo), and alone: trains on 8 windows and saves what each rank holds."""

import sys
from pathlib import Path

import torch

from _tiny_lm import first_windows, tiny_gpt2   # this folder is on the path: the worker runs as a file

from hf_ivonpc import PCTrainer, PCTrainingArguments


def run(out: Path, method: str, steps: int, per_device: int, ess: float, accumulation: int = 1):
    args = PCTrainingArguments(
        output_dir=str(out / method), pc_method=method, max_steps=steps,
        learning_rate=0.05 if method.startswith("ivon") else 3e-3,
        per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation,
        ivon_hess_init=0.1, ivon_ess=ess,
        ivon_clip_radius=float("inf"), pc_mean_term_weight=0.01, pc_start_step=1,
        pc_refresh_steps=1, pc_megabatch_factor=1, max_grad_norm=0.0, report_to=[],
        # no use_cpu: two processes on a machine without GPUs set it themselves
        save_strategy="no", disable_tqdm=True, seed=0, lr_scheduler_type="constant",
        ddp_find_unused_parameters=False, dataloader_drop_last=True)
    trainer = PCTrainer(model=tiny_gpt2(dropout=0.0), args=args, train_dataset=first_windows(8))
    trainer.train()
    opt = trainer.pc_optimizer
    state = {"params": [p.detach().clone() for p in trainer.model.parameters()],
             "flat": [{k: v.clone() for k, v in f.items()} for f in opt.flat_state(transient=True)],
             "persistent": list(opt.persistent_buffers),
             "pc": opt.counters, "world": args.world_size}
    torch.save(state, out / f"{method}-rank{args.process_index}-of{args.world_size}.pt")


if __name__ == "__main__":
    out = Path(sys.argv[1])
    per_device = int(sys.argv[2])
    run(out, "ivon", 1, per_device, ess=1e28)        # one step: the averaged gradient
    run(out, "ivon_pcm", 4, per_device, ess=1e3)     # corrected steps with real noise
    run(out, "alpha_svrg", 4, per_device // 2, ess=1e3, accumulation=2)
