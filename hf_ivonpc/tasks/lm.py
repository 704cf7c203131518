"""Causal language modelling shared by the pretraining and continual-pretraining workloads: a
GPT-2 from a config, the attention kernel to use, and token-window data sets over prepared memmaps."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from ..data import TokenWindows


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


def window_datasets(data_dir: Path, block_size: int, num_train_windows: int | None,
                    max_eval_windows: int | None, seed: int) -> tuple[TokenWindows, TokenWindows]:
    train = TokenWindows(data_dir, "train", block_size, num_windows=num_train_windows, seed=seed)
    val = TokenWindows(data_dir, "validation", block_size, num_windows=max_eval_windows, random=False)
    return train, val
