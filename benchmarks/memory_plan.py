"""Memory per GPU of the paper's full-scale runs, before activations: weights, gradients and
optimizer state for each method, under DDP (every rank holds everything) and FSDP2 (1/N each).

Parameter counts come from the models built on the meta device from their architectures (the
published configs' sizes, written out below: nothing is downloaded); state bytes per trained
parameter from our optimizers' own buffers (and torch AdamW's two moments). Activations depend on
batch, context, checkpointing and attention kernel: ``scripts/gpu_check.py`` measures the peak on
a real card. Usage::

    python benchmarks/memory_plan.py [--json PATH]
"""

from __future__ import annotations

import argparse
import json

import torch

GB = 1e9


def _in_use(opt, p: torch.Tensor):
    """``opt`` after a refresh (where it corrects) and a step: every buffer a step needs exists
    (one in-sample per step, as in PCTrainer without gradient accumulation)."""
    def backward():
        p.grad = torch.ones_like(p)
    if getattr(opt, "needs_refresh", False):
        with opt.refreshing():
            with opt.sampled_params(train=True, at="mega"):
                backward()
    with opt.sampled_params(train=True):
        backward()
    if getattr(opt, "correction_active", False):
        with opt.sampled_params(train=True, at="out"):
            backward()
    opt.step()
    return opt


def state_bytes_per_param() -> dict[str, float]:
    """Optimizer state per trained parameter, from the buffers each method keeps while training
    (fp32, or bf16 momentum and h with ``state_dtype="bfloat16"``), as on a GPU: a parameter
    group of millions of elements regenerates its noise there (``regenerate_noise=None``), so
    the IVON variants are measured with ``regenerate_noise=True`` on a group made to draw its
    noise by the counter (the bytes per parameter do not depend on the group's size)."""
    from hf_ivonpc.optim import IVON, IVONPC, AlphaSVRG, _random
    p = torch.nn.Parameter(torch.zeros(1 << 12))
    out = {"adamw": 8.0}   # torch AdamW: exp_avg, exp_avg_sq
    ivon = dict(lr=0.1, ess=1e6, regenerate_noise=True, fused=False)   # buffers, not speed
    counter_min, _random.COUNTER_MIN = _random.COUNTER_MIN, 0
    try:
        for name, make in (("ivon", lambda: IVON([p], **ivon)),
                           ("ivon_pcm", lambda: IVONPC([p], **ivon)),
                           ("alpha_svrg", lambda: AlphaSVRG([p], lr=1e-3, alpha=0.5, base="adamw",
                                                            fused=False)),
                           ("ivon_bf16", lambda: IVON([p], **ivon, state_dtype="bfloat16")),
                           ("ivon_pcm_bf16", lambda: IVONPC([p], **ivon, state_dtype="bfloat16"))):
            out[name] = _in_use(make(), p).state_nbytes() / p.numel()
    finally:
        _random.COUNTER_MIN = counter_min
    return out


def models() -> dict[str, dict]:
    """name -> trained parameters, frozen parameters and their bytes each, GPUs in the paper."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, GPT2Config, GPT2LMHeadModel
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    def count(m):
        return sum(p.numel() for p in m.parameters() if p.requires_grad)

    with torch.device("meta"):
        gpt2 = GPT2LMHeadModel(GPT2Config(n_positions=1024, n_embd=768, n_layer=12, n_head=12))
        gpt2_33m = GPT2LMHeadModel(GPT2Config(n_positions=128, n_embd=512, n_layer=4, n_head=4))
        qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                            num_hidden_layers=24, num_attention_heads=14,
                                            num_key_value_heads=2, tie_word_embeddings=True))
        clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                num_attention_heads=12, patch_size=32, image_size=224))
        llama = LlamaForCausalLM(LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                             num_hidden_layers=32, num_attention_heads=32,
                                             num_key_value_heads=8))
    # LoRA r = 16 on every linear layer of the decoder (peft's "all-linear" leaves lm_head out)
    base = count(llama)
    lora = 0
    for name, mod in llama.named_modules():
        if isinstance(mod, torch.nn.Linear) and name != "lm_head":
            lora += 16 * (mod.in_features + mod.out_features)
    return {
        "GPT-2 125M, OpenWebText (Fig. 1b)": dict(trained=count(gpt2), frozen=0, gpus=8),
        "GPT-2 33M, wikitext-103 (Fig. 6)": dict(trained=count(gpt2_33m), frozen=0, gpus=1),
        "GPT-2 125M, continual on Fineweb-edu": dict(trained=count(gpt2), frozen=0, gpus=1),
        "Qwen2.5-0.5B, XSUM (Table 1)": dict(trained=count(qwen), frozen=0, gpus=1),
        "ViT-B/32 encoder (Table 1)": dict(trained=count(clip), frozen=0, gpus=1),
        "Llama-3.1-8B LoRA r=16, GSM8k (Table 1)": dict(trained=lora, frozen=base, frozen_bytes=2, gpus=1),
    }


def plan() -> dict:
    per = state_bytes_per_param()
    rows = {}
    for name, m in models().items():
        fixed = m["frozen"] * m.get("frozen_bytes", 4)
        row = {"trained_params": m["trained"], "frozen_params": m["frozen"], "gpus": m["gpus"], "GB": {}}
        for method, b in per.items():
            total = fixed + m["trained"] * (4 + 4 + b)   # fp32 weights + gradients + state
            row["GB"][method] = {"ddp": total / GB, "fsdp2": total / m["gpus"] / GB}
        rows[name] = row
    return {"state_bytes_per_param": per, "runs": rows}


def markdown(result: dict) -> str:
    methods = list(result["state_bytes_per_param"])
    lines = ["| run | trained params | GPUs | " + " | ".join(methods) + " |",
             "|---|---:|---:|" + "---:|" * len(methods)]
    for name, r in result["runs"].items():
        cells = [f"{r['GB'][m]['ddp']:.1f}" + (f" ({r['GB'][m]['fsdp2']:.2f})" if r["gpus"] > 1 else "")
                 for m in methods]
        lines.append(f"| {name} | {r['trained_params'] / 1e6:.1f}M | {r['gpus']} | " + " | ".join(cells) + " |")
    per = ", ".join(f"{m} {b:.0f}" for m, b in result["state_bytes_per_param"].items())
    lines += ["", f"GB per GPU before activations (FSDP2 over the GPUs in brackets); state bytes per "
                  f"trained parameter: {per}."]
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    a = ap.parse_args()
    result = plan()
    print(markdown(result))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
