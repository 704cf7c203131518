"""Offline data: the real GPT-2 tokenizer, the corpora, deterministic memmaps (streamed, in one or
several processes, published atomically) and token windows."""

import hashlib
import json
import random
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from hf_ivonpc.data import (MissingDataError, TokenWindows, gpt2_tokenizer, load_corpus, open_corpus,
                            prepare_memmap)
from hf_ivonpc.data import memmap as memmap_mod
from hf_ivonpc.data.memmap import _is_val, split_documents
from hf_ivonpc.data.prepare import PrepareArguments
from hf_ivonpc.data.prepare import main as prepare_main


def test_tokenizer_is_gpt2s():
    tok = gpt2_tokenizer()
    assert len(tok) == 50257 and tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 50256
    # ids of GPT-2's own vocabulary (as published with the model)
    assert tok("Hello world")["input_ids"] == [15496, 995]
    assert tok(" the")["input_ids"] == [262]


def test_shakespeare_is_the_plays_cut_in_scenes():
    docs = load_corpus("shakespeare")["train"]
    text = "\n".join(docs)
    assert 700 < len(docs) < 900 and 4_900_000 < len(text) < 5_200_000
    assert "To be, or not to be" in text and "Gutenberg" not in text
    assert sum(d.lstrip().upper().startswith("SCENE") for d in docs) > 600


def test_split_is_by_document_hash_and_order_free():
    docs = [f"document number {i}" for i in range(2000)]
    a = split_documents({"train": docs}, 0.1)
    b = split_documents({"train": docs[::-1]}, 0.1)
    assert sorted(a["validation"]) == sorted(b["validation"])
    assert 150 < len(a["validation"]) < 250 and not set(a["validation"]) & set(a["train"])
    with pytest.raises(ValueError, match="val_fraction=1.5 is invalid"):
        split_documents({"train": docs}, 1.5)


def test_preparation_is_deterministic(tmp_path):
    tok = gpt2_tokenizer()
    corpus = {"train": load_corpus("shakespeare")["train"][:120]}
    m1 = prepare_memmap(corpus, tok, tmp_path / "a")
    m2 = prepare_memmap(corpus, tok, tmp_path / "b")
    for f in ("train.bin", "val.bin"):
        a, b = (tmp_path / "a" / f).read_bytes(), (tmp_path / "b" / f).read_bytes()
        assert a == b and len(a) > 1000
        assert hashlib.sha256(a).hexdigest() == m1["sha256"][f]
    assert m1 == m2 == json.loads((tmp_path / "a" / "meta.json").read_text())
    ids = np.fromfile(tmp_path / "a" / "train.bin", dtype=np.uint16)
    assert len(ids) == m1["tokens"]["train"]
    assert (ids == tok.eos_token_id).sum() == m1["documents"]["train"]   # one separator per document
    first = split_documents(corpus, 0.1)["train"][0]
    assert tok.decode(ids[: ids.tolist().index(tok.eos_token_id)]) == first


def test_token_windows(tmp_path):
    ids = np.arange(1000, dtype=np.uint16)
    ids.tofile(tmp_path / "train.bin")
    ids[:500].tofile(tmp_path / "val.bin")
    train = TokenWindows(tmp_path, "train", block_size=16, seed=3)
    assert len(train) == 1000 // 16
    a, b = train[5], TokenWindows(tmp_path, "train", block_size=16, seed=3)[5]
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["input_ids"], a["labels"])
    x = a["input_ids"]
    assert x.shape == (16,) and torch.equal(x, torch.arange(x[0], x[0] + 16))   # contiguous window
    starts = {train.start(i) for i in range(len(train))}
    assert len(starts) > len(train) // 2 and max(starts) <= 1000 - 16
    other = TokenWindows(tmp_path, "train", block_size=16, seed=4)
    assert [train.start(i) for i in range(10)] != [other.start(i) for i in range(10)]
    val = TokenWindows(tmp_path, "validation", block_size=16, num_windows=5)
    assert [val.start(i) for i in range(5)] == [0, 128, 240, 352, 480]   # 31 windows, 5 spread evenly
    with pytest.raises(IndexError):
        val[5]
    with pytest.raises(ValueError, match="block_size=1 is invalid"):
        TokenWindows(tmp_path, "train", block_size=1)
    with pytest.raises(FileNotFoundError, match="prepare_data"):
        TokenWindows(tmp_path / "nowhere", "train")


def test_unknown_corpus_says_how_to_provide_one():
    with pytest.raises(MissingDataError, match="local .txt file"):
        load_corpus("no-such-org/no-such-corpus")


# ---- streaming preparation ------------------------------------------------------------------------

WORDS = ("the of and to in a is that for it as was with be by on not he I this are or his from at which "
         "but have an they you were her she there been one all we their has would when if so no said "
         "naïve café Zürich “quoted” — 日本語 1999 3.14 e-mail don't").split()


def _docs(n=240, seed=0):
    """Documents of random words: blank ones, one-word ones, unicode, newlines, long ones."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        if i % 37 == 5:
            docs.append("" if i % 2 else "  \n ")
            continue
        k = rng.choice((1, 5, 40, 300))
        words = [rng.choice(WORDS) for _ in range(k)]
        for j in range(0, k, 17):
            words[j] += rng.choice(("\n", "\n\n", ".", ","))
        docs.append(" ".join(words))
    return docs


def _expected(docs, tok, val_fraction=0.1):
    """The rule, document by document: blank ones dropped, validation by hash, ids + end-of-text."""
    out = {"train": [], "validation": []}
    for d in docs:
        if d.strip():
            out["validation" if _is_val(d, val_fraction) else "train"] += tok(d)["input_ids"] + [tok.eos_token_id]
    return {s: np.array(ids, dtype=np.uint16).tobytes() for s, ids in out.items()}


def _files(folder):
    return {f: (folder / f).read_bytes() for f in ("train.bin", "val.bin", "meta.json")}


def _write_jsonl(path, docs):
    with open(path, "w") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, "text": d}) + "\n")
            if i % 50 == 0:
                f.write("\n")   # blank lines are skipped
    return path


def test_streaming_matches_the_rule_and_the_in_memory_path(tmp_path):
    tok = gpt2_tokenizer()
    docs = _docs()
    want = _expected(docs, tok)
    jsonl = _write_jsonl(tmp_path / "c.jsonl", docs)
    folder = tmp_path / "txt"
    folder.mkdir()
    for i, d in enumerate(docs):
        (folder / f"{i:04d}.txt").write_text(d)
    runs = {"list": {"train": docs}, "jsonl": open_corpus(str(jsonl)), "txt": open_corpus(str(folder))}
    for name, splits in runs.items():
        meta = prepare_memmap(splits, tok, tmp_path / name, batch_size=16)
        got = _files(tmp_path / name)
        assert got["train.bin"] == want["train"] and got["val.bin"] == want["validation"], name
        assert json.loads(got["meta.json"]) == meta and meta["dtype"] == "uint16"
    assert _files(tmp_path / "list") == _files(tmp_path / "jsonl") == _files(tmp_path / "txt")
    # one .txt file is one document
    (tmp_path / "one.txt").write_text(docs[3])
    assert open_corpus(str(tmp_path / "one.txt"))["train"].to_list() == [docs[3]]


def test_num_proc_2_writes_the_same_files(tmp_path):
    jsonl = _write_jsonl(tmp_path / "c.jsonl", _docs(seed=1))
    common = ["--dataset", str(jsonl), "--batch_size", "8", "--no_progress"]
    m1 = prepare_main(common + ["--out", str(tmp_path / "p1")])
    m2 = prepare_main(common + ["--out", str(tmp_path / "p2"), "--num_proc", "2"])
    assert m1 == m2 and m1["tokens"]["train"] > 5000 and m1["documents"]["validation"] > 5
    assert _files(tmp_path / "p1") == _files(tmp_path / "p2")


def test_batches_in_flight_are_bounded():
    """Memory is a few batches: the reader runs at most 2 * num_proc batches ahead of the writer."""
    tok = gpt2_tokenizer()
    pulled, lead = [0], []

    def jobs():
        for i in range(40):
            pulled[0] += 1
            yield [f"document {i}"], "train", 1

    for k, _ in enumerate(memmap_mod._encoded(jobs(), tok, 2, 0.1, "uint16")):
        lead.append(pulled[0] - k)
    assert len(lead) == 40 and max(lead) <= 4


def test_interrupted_preparation_leaves_no_partial_bin(tmp_path, monkeypatch):
    tok = gpt2_tokenizer()
    jsonl = _write_jsonl(tmp_path / "c.jsonl", _docs(seed=2))
    out = tmp_path / "data" / "owt"
    write, calls = memmap_mod._TokenFile.write, []

    def crash_on_third(self, ids, n_docs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt   # as a Ctrl-C in the middle of the corpus
        write(self, ids, n_docs)

    monkeypatch.setattr(memmap_mod._TokenFile, "write", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        prepare_memmap(open_corpus(str(jsonl)), tok, out, num_proc=2, batch_size=8)
    assert len(calls) == 3 and not out.exists()
    assert list((tmp_path / "data").iterdir()) == []   # its temporary folder is gone too
    # a run killed outright (no cleanup) leaves its temporary folder: the next run removes it
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = tmp_path / "data" / ".owt.killed"
    stale.mkdir()
    (stale / "train.bin").write_bytes(b"\0" * 100)
    (stale / ".owner").write_text(f"{socket.gethostname()} {dead}")
    monkeypatch.setattr(memmap_mod._TokenFile, "write", write)
    meta = prepare_memmap(open_corpus(str(jsonl)), tok, out, batch_size=8)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["owt"]
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    assert json.loads((out / "meta.json").read_text()) == meta
    assert (out / "train.bin").read_bytes() == _expected(_docs(seed=2), tok)["train"]
    # overwriting a prepared folder: interrupted, the previous files stay whole
    before = _files(out)
    calls.clear()
    monkeypatch.setattr(memmap_mod._TokenFile, "write", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        prepare_memmap(open_corpus(str(jsonl)), tok, out, val_fraction=0.3, batch_size=8)
    assert _files(out) == before and sorted(p.name for p in (tmp_path / "data").iterdir()) == ["owt"]


@pytest.mark.parametrize("argv, message", [
    (["--num_proc", "0"], r"num_proc=0 is invalid: accepted range is >= 1"),
    (["--val_fraction", "1.0"], r"val_fraction=1.0 is invalid: accepted range is \[0, 1\)"),
    (["--val_fraction", "-0.1"], r"val_fraction=-0.1 is invalid: accepted range is \[0, 1\)"),
    (["--batch_size", "0"], r"batch_size=0 is invalid: accepted range is >= 1"),
    (["--dataset", "./no/such/corpus.jsonl"],
     r"dataset='./no/such/corpus.jsonl' is invalid: no such file or folder; accepted: 'shakespeare'"),
])
def test_bad_arguments_fail_before_any_work(argv, message, monkeypatch):
    import hf_ivonpc.data.prepare as prepare

    def no_work(*a, **k):
        raise AssertionError("the tokenizer was loaded before the arguments were checked")

    monkeypatch.setattr(prepare, "load_tokenizer", no_work)
    with pytest.raises(ValueError, match=message):
        prepare_main(argv + ["--out", "unused"])


def test_val_fraction_zero_needs_a_validation_split(tmp_path):
    tok = gpt2_tokenizer()
    with pytest.raises(ValueError, match=r"val_fraction=0.0 is invalid: corpus 'mine' has no validation "
                                         r"split .* accepted range is \(0, 1\)"):
        prepare_memmap({"train": _docs(20)}, tok, tmp_path / "a", val_fraction=0.0, source="mine")
    meta = prepare_memmap({"train": ["a b c"], "validation": ["d e"]}, tok, tmp_path / "b", val_fraction=0.0)
    assert meta["documents"] == {"train": 1, "validation": 1}
    assert PrepareArguments(val_fraction=0.0).val_fraction == 0.0


def test_hub_data_sets_are_read_in_batches(tmp_path, monkeypatch):
    """A ``datasets`` source (memory-mapped Arrow, or streaming) gives the bytes of the list path."""
    import datasets

    tok = gpt2_tokenizer()
    train, val = _docs(120, seed=3), _docs(30, seed=4)
    ref = prepare_memmap({"train": train, "validation": val}, tok, tmp_path / "ref")
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": train, "n": list(range(120))}),
                               "valid": datasets.Dataset.from_dict({"text": val, "n": list(range(30))})})
    seen = []

    def fake_load_dataset(name, config=None, streaming=False):
        seen.append((name, config, streaming))
        if streaming:
            return datasets.IterableDatasetDict({k: v.to_iterable_dataset() for k, v in dd.items()})
        return dd

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    for streaming in (False, True):
        splits = open_corpus("org/corpus", config="c1", streaming=streaming)
        assert sorted(splits) == ["train", "validation"]
        out = tmp_path / f"s{int(streaming)}"
        assert prepare_memmap(splits, tok, out, batch_size=16, num_proc=1 + streaming) == ref
        assert _files(out) == _files(tmp_path / "ref")
    assert seen == [("org/corpus", "c1", False), ("org/corpus", "c1", True)]
    with pytest.raises(ValueError, match="has no 'body' column"):
        open_corpus("org/corpus", text_field="body")


def test_token_windows_read_uint32_memmaps(tmp_path):
    ids = np.arange(70_000, 71_000, dtype=np.uint32)
    ids.tofile(tmp_path / "train.bin")
    (tmp_path / "meta.json").write_text(json.dumps({"dtype": "uint32"}))
    x = TokenWindows(tmp_path, "train", block_size=16, random=False)[1]["input_ids"]
    assert x.tolist() == list(range(70_016, 70_032))
