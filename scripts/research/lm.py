"""The ``lm`` regime: a character-level GPT-2 (4 layers x 128, 0.8M parameters) on Shakespeare's
plays, context 64, batch 16: the paper's GPT-2 pretraining (App. D.2, Fig. 6) at CPU scale,
trained far past unigram statistics (the character unigram loss is 3.3 nats)."""

from __future__ import annotations

from functools import lru_cache

import torch

#: ``steps`` x ``batch`` is the base budget (gradient evaluations) the campaign's budgets multiply
SPEC = dict(steps=1000, batch=16, evals=10, block=64, start_ratio=0.5, refresh=10,
            factor=10, scheduler="cosine", warmup_ratio=0.05, ivon=dict(weight_decay=1e-6),
            adamw=dict(weight_decay=0.1, adam_beta2=0.95),
            grids={"adamw": [1e-3, 3e-3, 1e-2], "ivon": [0.1, 0.3, 1.0]})


@lru_cache(maxsize=1)
def shakespeare_chars() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(train ids, validation ids, vocabulary): the plays' characters, the last 10% of each play
    held out."""
    from hf_ivonpc.data.corpora import shakespeare_plays
    plays = shakespeare_plays()
    vocab = sorted(set("".join(plays.values())))
    index = {c: i for i, c in enumerate(vocab)}
    train, val = [], []
    for text in plays.values():
        ids = torch.tensor([index[c] for c in text], dtype=torch.int64)
        cut = int(0.9 * len(ids))
        train.append(ids[:cut])
        val.append(ids[cut:])
    return torch.cat(train), torch.cat(val), vocab


class CharWindows(torch.utils.data.Dataset):
    """Non-overlapping windows of ``block`` characters (at most ``limit``, evenly spread)."""

    def __init__(self, ids: torch.Tensor, block: int, limit: int | None = None):
        n = len(ids) // block
        windows = ids[: n * block].view(n, block)
        if limit is not None and limit < n:
            windows = windows[torch.linspace(0, n - 1, limit).long()]
        self.windows = windows

    def __len__(self):
        return len(self.windows)

    def __getitem__(self, i):
        return {"input_ids": self.windows[i], "labels": self.windows[i]}



def model_and_data(seed: int, spec: dict = SPEC):
    """A fresh GPT-2 (seeded), every training window, and 512 validation windows (evenly spread
    over the held-out tail of each play) split alternately into a selection half, which
    hyperparameters are chosen by, and a report half, which results are read on."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    train, val, vocab = shakespeare_chars()
    block = spec["block"]
    cfg = GPT2Config(vocab_size=len(vocab), n_positions=block, n_embd=128, n_layer=4, n_head=4,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    held_out = CharWindows(val, block, 512)
    select, report = (torch.utils.data.Subset(held_out, range(i, len(held_out), 2)) for i in (0, 1))
    return GPT2LMHeadModel(cfg), CharWindows(train, block), select, report
