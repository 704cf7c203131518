"""Seconds per posterior draw on multiple-choice questions: what the cloze scorer and the frozen
trunk save, in one process.

One draw scores every question of a batch (each of its C choices' answer tokens) at one sample
of the LoRA weights. Variants, on the same questions and adapters (SmolLM2-135M-Instruct, LoRA
r = 8 on every linear module of the top ``--top_layers`` layers), interleaved round-robin after a
warm-up, medians reported:

- ``full model, every position's logits``: the model's forward with logits at every position and
  a log-softmax over the vocabulary there (what a predictive over full logits costs);
- ``full model, head on answer positions``: the decoder's forward, the LM head only where an answer
  token is predicted (:class:`~hf_ivonpc.tasks.mcqa.AnswerScorer` without trunk states);
- ``trunk once, top layers per draw``: the same from the trunk's cached states (the trunk's own
  one-off cost is reported apart, per question).

    PYTHONPATH=. python benchmarks/mcqa_draws.py [--questions 32] [--top_layers 2] [--reps 5] [--json FILE]

Needs the data cache (``python -m hf_ivonpc.data fetch``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--questions", type=int, default=32)
    p.add_argument("--top_layers", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)

    from hf_ivonpc.data.mcqa import mc_questions
    from hf_ivonpc.tasks import mcqa as M
    from hf_ivonpc.tasks.sft import load_causal_lm, load_tokenizer
    from hf_ivonpc.trunk import TrunkSplit, decoder_of, positions

    tok = load_tokenizer("smollm2")
    torch.manual_seed(0)
    model = load_causal_lm("smollm2", lora={"r": 8, "lora_alpha": 16, "target_modules": "all-linear",
                                            "top_layers": a.top_layers, "init_lora_weights": False}).eval()
    questions = mc_questions("arc_easy", "validation", num_choices=4)[:a.questions]
    collate = M.MCCollator(tok.pad_token_id)
    split = TrunkSplit(model, len(decoder_of(model).layers) - a.top_layers)
    plain, cached = (M.MCQADataset(tok, questions) for _ in range(2))
    t = time.perf_counter()
    cached.attach_trunk(model, split, collate, batch_size=64)
    trunk_s = time.perf_counter() - t
    batch_plain = collate([plain[i] for i in range(len(plain))])
    batch_cached = collate([cached[i] for i in range(len(cached))])
    scorer = M.AnswerScorer(4, split=split)

    def every_position():
        mask = batch_plain["attention_mask"]
        logits = model(input_ids=batch_plain["input_ids"], attention_mask=mask, position_ids=positions(mask),
                       use_cache=False).logits
        k = batch_plain["target_ids"].shape[1]
        logp = logits.float().log_softmax(-1)[:, -k - 1:-1]
        return (logp.gather(-1, batch_plain["target_ids"][..., None])[..., 0] * batch_plain["cont_mask"]).sum(-1)

    variants = {"full model, every position's logits": every_position,
                "full model, head on answer positions": lambda: scorer(model, batch_plain),
                "trunk once, top layers per draw": lambda: scorer(model, batch_cached)}
    times = {name: [] for name in variants}
    with torch.no_grad():
        ref = every_position().view(-1, 4)
        for name, fn in variants.items():   # warm-up, and the three give the same scores
            torch.testing.assert_close(fn().view(-1, 4), ref, rtol=1e-4, atol=1e-3)
        for _ in range(a.reps):
            for name, fn in variants.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    base = statistics.median(times["full model, every position's logits"])
    rows = {name: {"median_s": statistics.median(v), "x_full": statistics.median(v) / base} for name, v in times.items()}
    result = {"questions": len(questions), "choices": 4, "top_layers": a.top_layers,
              "layers": split.num_layers, "trunk_once_s": trunk_s, "trunk_once_s_per_question": trunk_s / len(questions),
              "variants": rows, "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
              "cpu": platform.processor() or platform.machine()}
    for name, r in rows.items():
        print(f"{name:40s} {r['median_s']:8.3f} s per draw ({1000 * r['median_s'] / len(questions):.0f} ms per "
              f"question)  x{r['x_full']:.3f}")
    print(f"trunk, once: {trunk_s:.2f} s ({1000 * trunk_s / len(questions):.0f} ms per question)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
