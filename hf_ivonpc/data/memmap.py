"""nanoGPT-style data: tokenize a corpus once into ``train.bin`` / ``val.bin`` (token ids, uint16
when the vocabulary fits, else uint32; each document followed by the end-of-text token) and train
on windows of ``block_size`` tokens.

Preparation is deterministic: the same corpus and tokenizer give the same bytes, whatever the
number of processes. A corpus without its own validation split is split by document, a document
going to validation when the SHA-1 of its text falls in the first ``val_fraction`` of the hash
range (independent of document order). Empty documents are dropped.

It streams: documents are read in batches (:class:`~hf_ivonpc.data.corpora.Documents`), tokenized
in the main process or in ``num_proc`` worker processes (a bounded window of batches in flight,
results taken in order), and appended to the ``.bin`` files, so memory is bounded by a few batches
and not by the corpus. Everything is written in a temporary sibling folder that is renamed into
place at the end (:func:`~hf_ivonpc.data.cache.publish_dir`): an interrupted preparation never
leaves a partial ``.bin`` under its final name, and a rerun starts over.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .cache import publish_dir
from .corpora import Documents

SPLITS = {"train": "train.bin", "validation": "val.bin"}
META = "meta.json"


def _is_val(doc: str, val_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha1(doc.encode("utf-8")).digest()[:8], "big")
    return h < val_fraction * 2.0 ** 64


def check_val_fraction(val_fraction: float) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} is invalid: accepted range is [0, 1) "
                         "(0 only for a corpus with its own validation split)")


def _check_split_fraction(val_fraction: float, source: str = "") -> None:
    check_val_fraction(val_fraction)
    if val_fraction == 0.0:
        name = f"corpus {source!r}" if source else "the corpus"
        raise ValueError(f"val_fraction=0.0 is invalid: {name} has no validation split of its own, so "
                         "validation documents are held out of train; accepted range is (0, 1)")


def _too_few(n_docs: int, val_fraction: float) -> ValueError:
    return ValueError(f"the corpus has {n_docs} documents: too few to split off a validation set with "
                      f"val_fraction={val_fraction}")


def split_documents(splits: dict[str, list[str]], val_fraction: float) -> dict[str, list[str]]:
    """``splits`` with a "validation" split carved out of "train" by hash when it has none (the
    rule :func:`prepare_memmap` applies document by document)."""
    check_val_fraction(val_fraction)
    if "validation" in splits:  # empty documents (wikitext's blank lines) are dropped
        return {"train": [d for d in splits["train"] if d.strip()],
                "validation": [d for d in splits["validation"] if d.strip()]}
    _check_split_fraction(val_fraction)
    train, val = [], []
    for d in splits["train"]:
        if d.strip():
            (val if _is_val(d, val_fraction) else train).append(d)
    if not train or not val:
        raise _too_few(len(splits["train"]), val_fraction)
    return {"train": train, "validation": val}


def token_dtype(tokenizer) -> np.dtype:
    """uint16 when every id fits (GPT-2's 50,257), else uint32."""
    return np.dtype(np.uint16 if len(tokenizer) <= 2 ** 16 else np.uint32)


# ---- tokenizing a batch (in the main process or in a worker) -------------------------------------

_WORKER_TOKENIZER = None


def _exit_with_parent(parent: int, every: float = 1.0) -> None:
    while True:
        time.sleep(every)
        if os.getppid() != parent:   # the main process was killed (SIGKILL, OOM): do not linger
            os._exit(1)


def _init_worker(tokenizer, parent: int) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C: the main process stops the pool
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the main process's handler, if any
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    # every worker is one process: no Rust thread pool per worker on top (unless asked for)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _flat(enc: list[list[int]], eos: int, dtype: np.dtype) -> np.ndarray:
    ids = []
    for doc in enc:
        ids.extend(doc)
        ids.append(eos)
    arr = np.array(ids, dtype=np.int64)
    if len(arr) and (arr.min() < 0 or arr.max() >= 2 ** (8 * dtype.itemsize)):
        raise ValueError(f"token id {int(arr.max())} does not fit in {dtype.name}")
    return arr.astype(dtype)


def encode_batch(tokenizer, docs: list[str], mode: str, val_fraction: float, dtype: str):
    """One batch of documents -> ``{split: (ids, n_docs)}``: empty documents dropped, each
    document's ids followed by end-of-text; ``mode`` "hash" splits by :func:`_is_val`, "train" or
    "validation" sends every document there."""
    keep = [d for d in docs if d.strip()]
    if mode == "hash":
        flags = [_is_val(d, val_fraction) for d in keep]
    else:
        flags = [mode == "validation"] * len(keep)
    enc = (tokenizer(keep, add_special_tokens=False, verbose=False,
                     return_attention_mask=False)["input_ids"] if keep else [])
    eos, dt = tokenizer.eos_token_id, np.dtype(dtype)
    out = {}
    for split, want in (("train", False), ("validation", True)):
        part = [e for e, f in zip(enc, flags) if f == want]
        out[split] = (_flat(part, eos, dt), len(part))
    return out


def _encode_in_worker(docs, mode, val_fraction, dtype):
    return encode_batch(_WORKER_TOKENIZER, docs, mode, val_fraction, dtype)


def _start_method() -> str:
    # fork: the workers inherit the tokenizer and start at once (what datasets.map does on Linux)
    return "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Terminate the workers at once (an error or an interruption: their batches are not needed)."""
    stop = getattr(pool, "terminate_workers", None)   # Python >= 3.14
    if stop is not None:
        stop()
        return
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        if proc.is_alive():
            proc.terminate()


def _encoded(jobs, tokenizer, num_proc: int, val_fraction: float, dtype: str):
    """``(result, done)`` of every ``(docs, mode, done)`` job of ``jobs``, in order. With
    ``num_proc`` > 1, at most ``2 * num_proc`` batches are in flight in the worker processes."""
    if num_proc == 1:
        for docs, mode, done in jobs:
            yield encode_batch(tokenizer, docs, mode, val_fraction, dtype), done
        return
    ctx = multiprocessing.get_context(_start_method())
    pool = ProcessPoolExecutor(num_proc, mp_context=ctx, initializer=_init_worker,
                               initargs=(tokenizer, os.getpid()))
    pending, finished = collections.deque(), False
    try:
        for docs, mode, done in jobs:
            pending.append((pool.submit(_encode_in_worker, docs, mode, val_fraction, dtype), done))
            if len(pending) >= 2 * num_proc:
                fut, d = pending.popleft()
                yield fut.result(), d
        while pending:
            fut, d = pending.popleft()
            yield fut.result(), d
        finished = True
    finally:
        if not finished:
            _stop_workers(pool)
        pool.shutdown(wait=True, cancel_futures=True)


# ---- writing ----------------------------------------------------------------------------------------

class _TokenFile:
    """A ``.bin`` being written: ids appended batch by batch, their count and SHA-256."""

    def __init__(self, path: Path):
        self.path, self.n, self.docs = path, 0, 0
        self.sha = hashlib.sha256()
        self.f = open(path, "wb")

    def write(self, ids: np.ndarray, n_docs: int) -> None:
        data = ids.tobytes()
        self.f.write(data)
        self.sha.update(data)
        self.n += len(ids)
        self.docs += n_docs

    def close(self) -> None:
        self.f.close()


class _Progress:
    """Documents and tokens done, and tokens/s, on the main process: a tqdm bar on a terminal, a
    line every ``every`` seconds otherwise (logs)."""

    def __init__(self, enabled: bool, total: int | None, unit: str, desc: str, every: float = 30.0):
        self.enabled, self.t0, self.docs, self.tokens = enabled, time.perf_counter(), 0, 0
        self.bar, self.every, self.last, self.desc = None, every, self.t0, desc
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit=unit, unit_scale=unit == "B", desc=desc, dynamic_ncols=True)

    def update(self, done: int, docs: int, tokens: int) -> None:
        self.docs += docs
        self.tokens += tokens
        if not self.enabled:
            return
        now = time.perf_counter()
        rate = self.tokens / max(now - self.t0, 1e-9)
        if self.bar is not None:
            self.bar.update(done)
            self.bar.set_postfix_str(f"{self.docs:,} docs, {self.tokens:,} tokens, {rate:,.0f} tok/s",
                                     refresh=False)
        elif now - self.last >= self.every:
            self.last = now
            print(f"{self.desc}: {self.docs:,} documents, {self.tokens:,} tokens, {rate:,.0f} tokens/s",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.enabled:
            secs = time.perf_counter() - self.t0
            print(f"{self.desc}: {self.docs:,} documents, {self.tokens:,} tokens in {secs:,.1f} s "
                  f"({self.tokens / max(secs, 1e-9):,.0f} tokens/s)", file=sys.stderr, flush=True)


def _as_documents(docs, split: str) -> Documents:
    return docs if isinstance(docs, Documents) else Documents.from_list(docs, split)


def prepare_memmap(splits: dict, tokenizer, out_dir: str | os.PathLike, val_fraction: float = 0.1,
                   source: str = "", num_proc: int = 1, batch_size: int = 1024,
                   progress: bool = False) -> dict:
    """Tokenize ``splits`` into ``out_dir/train.bin``, ``out_dir/val.bin`` and ``out_dir/meta.json``;
    returns the metadata.

    ``splits``: ``{"train": docs}`` (validation held out by hash) or ``{"train": docs, "validation":
    docs}``, each a list of strings (:func:`~hf_ivonpc.data.load_corpus`) or a
    :class:`~hf_ivonpc.data.corpora.Documents` (:func:`~hf_ivonpc.data.corpora.open_corpus`, read in
    batches). ``num_proc``: tokenizing processes (1: in this process); the bytes do not depend on
    it nor on ``batch_size`` (documents per batch). ``progress``: documents, tokens and tokens/s
    on stderr. The files appear under ``out_dir`` only once complete (``meta.json`` last)."""
    if num_proc < 1:
        raise ValueError(f"num_proc={num_proc} is invalid: accepted range is >= 1")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is invalid: accepted range is >= 1")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token: documents cannot be separated")
    if "train" not in splits:
        raise ValueError(f"the corpus has no 'train' split (it has {sorted(splits)})")
    check_val_fraction(val_fraction)
    if "validation" in splits:
        plan = [("train", "train"), ("validation", "validation")]
    else:
        _check_split_fraction(val_fraction, source)
        plan = [("train", "hash")]
    sources = {split: _as_documents(splits[split], split) for split, _ in plan}
    dtype = token_dtype(tokenizer)
    meta = {"source": source, "tokenizer": getattr(tokenizer, "name_or_path", ""),
            "vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id, "dtype": dtype.name,
            "val_fraction": val_fraction, "documents": {}, "tokens": {}, "sha256": {}}

    def build(tmp: Path) -> None:
        files = {split: _TokenFile(tmp / fname) for split, fname in SPLITS.items()}
        n_in = 0   # documents read, empty ones included
        try:
            for split, mode in plan:
                docs = sources[split]
                bar = _Progress(progress, docs.total, docs.unit, f"{source or 'corpus'} [{split}]")
                jobs = ((batch, mode, (done, len(batch))) for batch, done in docs.batches(batch_size))
                with contextlib.closing(_encoded(jobs, tokenizer, num_proc, val_fraction, dtype.name)) as results:
                    for result, (done, n_batch) in results:
                        for s, (ids, n_docs) in result.items():
                            if n_docs:
                                files[s].write(ids, n_docs)
                        n_in += n_batch
                        bar.update(done, sum(n for _, n in result.values()),
                                   sum(len(ids) for ids, _ in result.values()))
                bar.close()
        finally:
            for f in files.values():
                f.close()
        if plan[0][1] == "hash" and not (files["train"].docs and files["validation"].docs):
            raise _too_few(n_in, val_fraction)
        for split, fname in SPLITS.items():
            meta["documents"][split] = files[split].docs
            meta["tokens"][split] = files[split].n
            meta["sha256"][fname] = files[split].sha.hexdigest()
        (tmp / META).write_text(json.dumps(meta, indent=2))

    publish_dir(build, Path(out_dir), overwrite=True, last=(META,))
    return meta


def read_meta(data_dir: str | os.PathLike) -> dict | None:
    """``data_dir/meta.json``, or None when there is none."""
    path = Path(data_dir) / META
    return json.loads(path.read_text()) if path.exists() else None


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
        meta = read_meta(data_dir)
        self.tokens = np.memmap(path, dtype=np.dtype((meta or {}).get("dtype", "uint16")), mode="r")
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
