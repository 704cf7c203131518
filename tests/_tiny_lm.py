"""A tiny GPT-2 on a small real text, character level (``_tiny_corpus.txt``: a frozen copy of an
earlier version of this repository's README, so that editing the README changes no test)."""

from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

TEXT = (Path(__file__).resolve().parent / "_tiny_corpus.txt").read_text()
VOCAB = sorted(set(TEXT))


class CharWindows(torch.utils.data.Dataset):
    def __init__(self, split="train", block=32):
        ids = torch.tensor([VOCAB.index(c) for c in TEXT])
        cut = int(0.9 * len(ids))
        ids = ids[:cut] if split == "train" else ids[cut:]
        n = (len(ids) - 1) // block
        self.windows = ids[: n * block].view(n, block)

    def __len__(self):
        return len(self.windows)

    def __getitem__(self, i):
        return {"input_ids": self.windows[i], "labels": self.windows[i]}


def tiny_gpt2(seed=0, dropout=0.1):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(VOCAB), n_positions=32, n_embd=32, n_layer=2, n_head=2,
                     resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    return GPT2LMHeadModel(cfg)


def first_windows(n: int) -> torch.utils.data.Dataset:
    """The first ``n`` training windows."""
    return torch.utils.data.Subset(CharWindows(), range(n))


def save_tiny_llama(path, max_positions: int = 256, num_layers: int = 1) -> str:
    """A Llama of ``num_layers`` layers with SmolLM2's tokenizer, saved as a local model folder at ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_ivonpc.tasks.sft import load_tokenizer

    tok = load_tokenizer("smollm2")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=num_layers,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=max_positions,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)
