"""nanoGPT-style data: tokenize a corpus once into ``train.bin`` / ``val.bin`` (uint16 token ids,
each document followed by the end-of-text token) and train on windows of ``block_size`` tokens.

Preparation is deterministic: the same corpus and tokenizer give the same bytes. A corpus without
its own validation split is split by document, a document going to validation when the SHA-1 of
its text falls in the first ``val_fraction`` of the hash range (independent of document order).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from .corpora import iter_batches

SPLITS = {"train": "train.bin", "validation": "val.bin"}


def _is_val(doc: str, val_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha1(doc.encode("utf-8")).digest()[:8], "big")
    return h < val_fraction * 2.0 ** 64


def split_documents(splits: dict[str, list[str]], val_fraction: float) -> dict[str, list[str]]:
    """``splits`` with a "validation" split carved out of "train" by hash when it has none."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} is invalid: accepted range is (0, 1)")
    if "validation" in splits:  # empty documents (wikitext's blank lines) are dropped
        return {"train": [d for d in splits["train"] if d.strip()],
                "validation": [d for d in splits["validation"] if d.strip()]}
    train, val = [], []
    for d in splits["train"]:
        if d.strip():
            (val if _is_val(d, val_fraction) else train).append(d)
    if not train or not val:
        raise ValueError(f"the corpus has {len(splits['train'])} documents: too few to split off a "
                         f"validation set with val_fraction={val_fraction}")
    return {"train": train, "validation": val}


def _write_tokens(docs: list[str], tokenizer, path: Path, batch: int = 256) -> tuple[int, str]:
    eos = tokenizer.eos_token_id
    tmp = path.with_name(f".{path.name}.tmp")
    sha = hashlib.sha256()
    n = 0
    with open(tmp, "wb") as f:
        for chunk in iter_batches(docs, batch):
            enc = tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]
            ids = np.fromiter((t for doc in enc for t in (*doc, eos)), dtype=np.uint16)
            f.write(ids.tobytes())
            sha.update(ids.tobytes())
            n += len(ids)
    os.replace(tmp, path)  # never a half-written .bin under the final name
    return n, sha.hexdigest()


def prepare_memmap(splits: dict[str, list[str]], tokenizer, out_dir: str | os.PathLike,
                   val_fraction: float = 0.1, source: str = "") -> dict:
    """Tokenize ``splits`` (from :func:`~hf_ivonpc.data.load_corpus`) into ``out_dir/train.bin``,
    ``out_dir/val.bin`` and ``out_dir/meta.json``; returns the metadata."""
    if len(tokenizer) > 65536:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens: uint16 memmaps hold at most 65,536")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token: documents cannot be separated")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    docs = split_documents(splits, val_fraction)
    meta = {"source": source, "tokenizer": getattr(tokenizer, "name_or_path", ""),
            "vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id, "dtype": "uint16",
            "val_fraction": val_fraction, "documents": {}, "tokens": {}, "sha256": {}}
    for split, fname in SPLITS.items():
        n, digest = _write_tokens(docs[split], tokenizer, out / fname)
        meta["documents"][split] = len(docs[split])
        meta["tokens"][split] = n
        meta["sha256"][fname] = digest
    tmp = out / ".meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    os.replace(tmp, out / "meta.json")
    return meta


class TokenWindows(torch.utils.data.Dataset):
    """Windows of ``block_size`` tokens from a prepared ``.bin`` file, as ``input_ids``/``labels``
    (the model shifts the labels).

    ``random=True`` (training, as nanoGPT): item ``i`` starts at an offset drawn from a generator
    seeded with ``(seed, i)``, so an item is the same window in every process and after a resume,
    and Trainer's shuffling decides the order. ``num_windows`` defaults to ``tokens // block_size``
    (one pass over the data per epoch on average). ``random=False`` (evaluation): consecutive,
    non-overlapping windows, at most ``num_windows`` of them spread evenly over the file."""

    def __init__(self, data_dir: str | os.PathLike, split: str = "train", block_size: int = 128,
                 num_windows: int | None = None, random: bool | None = None, seed: int = 0):
        if split not in SPLITS:
            raise ValueError(f"split={split!r} is invalid: accepted values are {sorted(SPLITS)}")
        path = Path(data_dir) / SPLITS[split]
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: prepare the data first "
                                    "(python scripts/prepare_data.py --help)")
        if block_size < 2:
            raise ValueError(f"block_size={block_size} is invalid: accepted range is >= 2")
        self.tokens = np.memmap(path, dtype=np.uint16, mode="r")
        if len(self.tokens) <= block_size:
            raise ValueError(f"{path} holds {len(self.tokens)} tokens, fewer than block_size={block_size} + 1")
        self.block_size, self.seed = block_size, seed
        self.random = split == "train" if random is None else random
        self.starts_max = len(self.tokens) - block_size  # exclusive
        full = len(self.tokens) // block_size
        if num_windows is not None and num_windows < 1:
            raise ValueError(f"num_windows={num_windows} is invalid: accepted range is >= 1")
        self.num_windows = num_windows or full
        if not self.random:
            self.num_windows = min(self.num_windows, full)
            self._starts = (np.linspace(0, full - 1, self.num_windows).round().astype(np.int64) * block_size)

    def __len__(self) -> int:
        return self.num_windows

    def start(self, i: int) -> int:
        if self.random:
            return int(np.random.default_rng([self.seed, i]).integers(0, self.starts_max))
        return int(self._starts[i])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.num_windows:
            raise IndexError(i)
        s = self.start(i)
        ids = torch.from_numpy(self.tokens[s:s + self.block_size].astype(np.int64))
        return {"input_ids": ids, "labels": ids.clone()}
