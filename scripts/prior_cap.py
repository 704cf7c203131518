"""What do the coordinates whose sigma exceeds the prior's (h < 0) do to a predictive?

    python scripts/prior_cap.py results/pretrain [--n_samples 8] [--max_windows 200]

IVON's update keeps h + weight_decay > 0, not h >= 0: where the Hessian estimate went negative,
the saved sigma is wider than the prior's 1 / sqrt(ess x weight_decay). This scores a finished
language-model run (``hf-ivonpc pretrain``'s output folder: model.safetensors,
posterior.safetensors, workload_args.json) on its validation windows three ways, with the same
standard normal draws for both posteriors (paired):

- the mean;
- the predictive over k = 1, 2, 4, ... draws of the posterior as saved;
- the same with sigma capped at the prior's (``Posterior.capped_at_prior``: h -> max(h, 0)).

and, per posterior, the mean loss of single draws (how far one draw falls from the mean). Writes
``docs/results/prior_cap.json``. The loss is the per-token negative log-likelihood of the
predictive (exp of it is the predictive perplexity).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from hf_ivonpc.data import TokenWindows
from hf_ivonpc.data.models import load_tokenizer
from hf_ivonpc.data.prepare import prepared_data
from hf_ivonpc.posterior import Posterior


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="output folder of a finished hf-ivonpc pretrain run")
    p.add_argument("--n_samples", type=int, default=8, help="draws (default 8; k-curve at powers of 2)")
    p.add_argument("--max_windows", type=int, default=200, help="validation windows (default 200)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default="docs/results/prior_cap.json")
    a = p.parse_args(argv)
    if a.n_samples < 1:
        p.error(f"--n_samples={a.n_samples} is invalid: accepted range is an integer >= 1")
    run = Path(a.run)
    wargs_file = run / "workload_args.json"
    if not wargs_file.is_file():
        p.error(f"{run}: no workload_args.json: expected the output folder of hf-ivonpc pretrain")
    wargs = json.loads(wargs_file.read_text())
    from transformers import GPT2LMHeadModel

    post = Posterior.from_pretrained(run)
    capped = post.capped_at_prior()
    model = GPT2LMHeadModel.from_pretrained(run).eval()
    post.check(model)
    tok = load_tokenizer(wargs.get("tokenizer_name"))
    data_dir, _ = prepared_data(wargs["dataset"], wargs.get("data_dir"), tokenizer=tok,
                                tokenizer_name=wargs.get("tokenizer_name"),
                                val_fraction=wargs.get("val_fraction", 0.1))
    val = TokenWindows(data_dir, "validation", wargs["block_size"], num_windows=a.max_windows, random=False)
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= a.n_samples]
    variants = {"saved": post, "capped_at_prior": capped}
    nll = {"mean": 0.0, **{f"{v}_k{k}": 0.0 for v in variants for k in ks}}
    single = {v: 0.0 for v in variants}
    tokens, t0 = 0, time.time()
    with torch.no_grad():
        for start in range(0, len(val), a.batch_size):
            rows = [val[i] for i in range(start, min(start + a.batch_size, len(val)))]
            ids = torch.stack([torch.as_tensor(r["input_ids"]) for r in rows])
            target = ids[:, 1:].reshape(-1)
            n = target.numel()

            def token_nll(probs):   # per-token NLL (summed) of probabilities [B, T, V]
                p = probs[:, :-1].reshape(-1, probs.shape[-1]).gather(1, target[:, None])
                return -p.clamp_min(1e-30).log().sum().item()

            nll["mean"] += token_nll(model(input_ids=ids).logits.float().softmax(-1))
            for name, posterior in variants.items():
                gen = torch.Generator().manual_seed(a.seed + start)   # paired: the same eps for both
                total = None
                for d in range(1, a.n_samples + 1):
                    with posterior.sample(model, generator=gen):
                        probs = model(input_ids=ids).logits.float().softmax(-1)
                    single[name] += token_nll(probs)
                    total = probs if total is None else total.add_(probs)
                    if d in ks:
                        nll[f"{name}_k{d}"] += token_nll(total / d)
            tokens += n
            print(f"\r{start + len(rows)}/{len(val)} windows ({time.time() - t0:.0f} s)", end="", file=sys.stderr)
    print(file=sys.stderr)
    summary = {n: r for n, r in ((r["layer_type"], r) for r in post.summary())}
    out = {
        "run": str(run), "method": post.method, "step": post.step, "windows": len(val),
        "tokens": tokens, "n_samples": a.n_samples, "seed": a.seed,
        "above_prior_share": {k: v["above_prior_share"] for k, v in summary.items()},
        "sigma_max": {"saved": {k: v["std_max"] for k, v in summary.items()},
                      "capped_at_prior": {r["layer_type"]: r["std_max"] for r in capped.summary()}},
        "loss": {k: v / tokens for k, v in nll.items()},
        "single_draw_loss": {k: v / (tokens * a.n_samples) for k, v in single.items()},
    }
    out["perplexity"] = {k: math.exp(v) for k, v in out["loss"].items()}
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    Path(a.output).write_text(json.dumps(out, indent=1) + "\n")
    for k, v in out["loss"].items():
        print(f"{k:>22}: loss {v:.4f}  perplexity {math.exp(v):.1f}")
    for k, v in out["single_draw_loss"].items():
        print(f"{'one draw, ' + k:>22}: loss {v:.4f}")
    print(f"wrote {a.output}")
    return out


if __name__ == "__main__":
    main()
