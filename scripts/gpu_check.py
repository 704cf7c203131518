"""One prepared GPU check: bf16 autocast, flash-attention, two-pass memory and tokens/s of AdamW,
IVON and IVON-PCM through PCTrainer on GPT-2 125M, printed as one JSON summary.

    python scripts/gpu_check.py --json results/gpu_check.json        # one H100/H200: ~5 minutes
    python scripts/gpu_check.py --dry-run                             # the same code path on a CPU, tiny

Data are random token windows (the check measures speed and memory, not learning), so nothing is
downloaded. Per method: ``--steps`` optimizer steps of ``--batch`` sequences x ``--block`` tokens
(IVON-PCM corrects from step 0 with refresh 10 and a 10x mega-batch, so its time is amortised over
refreshes), after ``--warmup`` steps that are not timed. Reported: tokens/s (timed steps only),
peak GPU memory, final loss, and checks that must all be true: parameters and optimizer state stay
fp32 under bf16 autocast, the forward runs in bf16, the attention kernel is the one asked for,
IVON-PCM's peak memory stays within activations + state of IVON's (its two passes run one after
the other, so activations are not doubled), and every loss is finite.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from hf_ivonpc import PCTrainer, PCTrainingArguments
from hf_ivonpc.tasks.lm import attn_implementation, gpt2_model


class RandomWindows(torch.utils.data.Dataset):
    def __init__(self, n: int, block: int, vocab: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, block), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class StepTimer(TrainerCallback):
    """Wall time of the optimizer steps after the first ``warmup`` (synchronised on GPU)."""

    def __init__(self, warmup: int):
        self.warmup, self.t0, self.t1, self.steps = warmup, None, None, 0

    def _sync(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.warmup:
            self._sync()
            self.t0 = time.perf_counter()
        elif state.global_step > self.warmup:
            self._sync()
            self.t1, self.steps = time.perf_counter(), state.global_step - self.warmup


def run_method(method: str, a, out: Path) -> dict:
    cuda = torch.cuda.is_available()
    model = gpt2_model(50257, a.block, a.n_layer, a.n_head, a.n_embd, attn=a.attn, seed=0)
    if cuda:
        model = model.cuda()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    total = a.warmup + a.steps
    data = RandomWindows(max(a.batch * 40, a.batch * total), a.block, 50257)
    lr = {"none": 6e-4}.get(method, 0.3)
    args = PCTrainingArguments(
        output_dir=str(out / method), pc_method=method, max_steps=total, learning_rate=lr,
        per_device_train_batch_size=a.batch, bf16=a.bf16, use_cpu=not cuda, report_to=[],
        save_strategy="no", logging_steps=max(1, total // 4), disable_tqdm=True, seed=0,
        ivon_ess=1e10, ivon_clip_radius=1e-3, weight_decay=1e-6, warmup_steps=0,
        pc_start_step=0, pc_refresh_steps=10, pc_megabatch_factor=10, dataloader_num_workers=2 if cuda else 0)
    timer = StepTimer(a.warmup)
    trainer = PCTrainer(model=model, args=args, train_dataset=data, callbacks=[timer])
    seen = {}

    def probe(module, inputs, output):   # the dtype the forward actually computes in
        seen["logits_dtype"] = str(output.logits.dtype).replace("torch.", "")
    handle = model.register_forward_hook(probe)
    result = trainer.train()
    handle.remove()
    opt = trainer.pc_optimizer
    state_dtypes = sorted({str(t.dtype).replace("torch.", "") for f in (opt._flat if opt else [])
                           for t in f.values()})
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    elapsed = (timer.t1 - timer.t0) if timer.t0 is not None and timer.t1 is not None else float("nan")
    rec = {
        "method": method,
        "tokens_per_s": timer.steps * a.batch * a.block / elapsed if timer.steps else None,
        "ms_per_step": 1000 * elapsed / timer.steps if timer.steps else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "final_loss": losses[-1] if losses else result.training_loss,
        "param_dtypes": sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()}),
        "state_dtypes": state_dtypes,
        "forward_dtype": seen.get("logits_dtype"),
        "attn_implementation": model.config._attn_implementation,
    }
    del trainer, model, opt
    if cuda:
        torch.cuda.empty_cache()
    return rec


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="a tiny model for a few steps on the CPU")
    ap.add_argument("--steps", type=int, default=200, help="timed optimizer steps per method")
    ap.add_argument("--warmup", type=int, default=20, help="untimed steps first (compilation, caches)")
    ap.add_argument("--batch", type=int, default=16, help="sequences per step")
    ap.add_argument("--block", type=int, default=1024, help="tokens per sequence")
    ap.add_argument("--methods", default="none,ivon,ivon_pcm")
    ap.add_argument("--attn", default="auto", help="auto: flash_attention_2 where installed, else sdpa")
    ap.add_argument("--out", default="results/gpu_check", help="scratch folder for the trainers")
    ap.add_argument("--json", default=None, help="also write the summary here")
    a = ap.parse_args(argv)
    a.n_layer, a.n_head, a.n_embd = 12, 12, 768
    cuda = torch.cuda.is_available()
    if not cuda and not a.dry_run:
        ap.error("no GPU is visible: run with --dry-run to check the code path on the CPU")
    if a.dry_run:
        a.n_layer, a.n_head, a.n_embd = 1, 2, 32
        a.steps, a.warmup, a.batch, a.block = min(a.steps, 3), min(a.warmup, 1), min(a.batch, 4), min(a.block, 32)
    a.bf16 = cuda and torch.cuda.is_bf16_supported()
    summary = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu (dry run)",
        "torch": torch.__version__, "bf16": a.bf16,
        "flash_attn_installed": attn_implementation("auto") == "flash_attention_2",
        "model": f"GPT-2 {a.n_layer}x{a.n_embd}, context {a.block}, batch {a.batch}",
        "steps": a.steps, "methods": [],
    }
    for method in a.methods.split(","):
        summary["methods"].append(run_method(method, a, Path(a.out)))
        print(json.dumps(summary["methods"][-1]), file=sys.stderr)
    by = {r["method"]: r for r in summary["methods"]}
    checks = {
        "losses_finite": all(math.isfinite(r["final_loss"]) for r in by.values()),
        "params_fp32": all(r["param_dtypes"] == ["float32"] for r in by.values()),
        "optimizer_state_fp32": all(r["state_dtypes"] in ([], ["float32"]) for r in by.values()),
    }
    if a.bf16:
        checks["forward_bf16"] = all(r["forward_dtype"] == "bfloat16" for r in by.values())
    if summary["flash_attn_installed"]:
        checks["flash_attention_used"] = all(r["attn_implementation"] == "flash_attention_2" for r in by.values())
    if cuda and "ivon" in by and "ivon_pcm" in by:
        # IVON-PCM adds 5 fp32 buffers (20 B/param) to IVON's; activations are not doubled
        n = 12 * 12 * 768 * 768 + 50257 * 768 + a.block * 768
        extra = 5 * 4 * n / 2**30
        checks["two_pass_memory"] = by["ivon_pcm"]["peak_memory_gib"] <= by["ivon"]["peak_memory_gib"] + 1.5 * extra
    if "none" in by:
        for m in ("ivon", "ivon_pcm"):
            if m in by and by[m]["tokens_per_s"] and by["none"]["tokens_per_s"]:
                summary[f"{m}_tokens_per_s_vs_adamw"] = by[m]["tokens_per_s"] / by["none"]["tokens_per_s"]
    summary["checks"] = checks
    summary["all_checks_pass"] = all(checks.values())
    text = json.dumps(summary, indent=1)
    print(text)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(text)
    return summary


if __name__ == "__main__":
    sys.exit(0 if main()["all_checks_pass"] else 1)
