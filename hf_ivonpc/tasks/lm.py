"""Causal language modelling shared by the pretraining and continual-pretraining scripts: a
GPT-2 from a config, the attention kernel to use, and prepared token-window data sets."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import torch

from ..data import TokenWindows, cache_dir, gpt2_tokenizer, load_corpus, prepare_memmap


def attn_implementation(requested: str = "auto") -> str:
    """``requested`` unless it is "auto": flash-attention 2 on a GPU where ``flash_attn`` is
    installed, else PyTorch's ``sdpa`` (which uses flash/memory-efficient kernels where it can)."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def gpt2_model(vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int,
               dropout: float = 0.0, attn: str = "auto", seed: int = 0):
    """A freshly initialised ``GPT2LMHeadModel`` (nanoGPT's shapes: tied embeddings, GELU MLP x4)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if n_embd % n_head:
        raise ValueError(f"n_embd={n_embd} must be a multiple of n_head={n_head}")
    cfg = GPT2Config(vocab_size=vocab_size, n_positions=block_size, n_embd=n_embd, n_layer=n_layer,
                     n_head=n_head, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    torch.manual_seed(seed)
    return GPT2LMHeadModel._from_config(cfg, attn_implementation=attn_implementation(attn))


def default_data_dir(dataset: str, tokenizer_name: str | None) -> Path:
    """Where ``dataset`` tokenized by ``tokenizer_name`` is prepared: a folder of the cache."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{dataset}__{tokenizer_name or 'gpt2'}").strip("_")
    return cache_dir() / "memmap" / slug


def load_tokenizer(name: str | None):
    """The offline GPT-2 tokenizer when ``name`` is None, else ``AutoTokenizer.from_pretrained``."""
    if name is None:
        return gpt2_tokenizer()
    from .cli import load_pretrained
    from transformers import AutoTokenizer

    return load_pretrained(AutoTokenizer, name, what="tokenizer")


def prepared_data(dataset: str, data_dir: str | None = None, tokenizer=None, tokenizer_name=None,
                  val_fraction: float = 0.1, text_field: str = "text", dataset_config: str | None = None,
                  ) -> tuple[Path, dict]:
    """``(data_dir, meta)`` of ``dataset`` prepared as memmaps, preparing it on first use.

    A folder that already holds ``meta.json`` is used as is, after checking that it was made with
    a tokenizer of the same vocabulary size."""
    out = Path(data_dir) if data_dir else default_data_dir(dataset, tokenizer_name)
    meta_path = out / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if tokenizer is not None and meta["vocab_size"] != len(tokenizer):
            raise ValueError(f"{out} was prepared with a {meta['vocab_size']}-token tokenizer, "
                             f"this run uses {len(tokenizer)} tokens: pass another data_dir")
        return out, meta
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(tokenizer_name)
    splits = load_corpus(dataset, text_field=text_field, config=dataset_config)
    return out, prepare_memmap(splits, tokenizer, out, val_fraction=val_fraction, source=dataset)


def window_datasets(data_dir: Path, block_size: int, num_train_windows: int | None,
                    max_eval_windows: int | None, seed: int) -> tuple[TokenWindows, TokenWindows]:
    train = TokenWindows(data_dir, "train", block_size, num_windows=num_train_windows, seed=seed)
    val = TokenWindows(data_dir, "validation", block_size, num_windows=max_eval_windows, random=False)
    return train, val
