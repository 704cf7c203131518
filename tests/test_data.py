"""Offline data: the real GPT-2 tokenizer, the corpora, deterministic memmaps and token windows."""

import hashlib
import json

import numpy as np
import pytest
import torch

from hf_ivonpc.data import (MissingDataError, TokenWindows, gpt2_tokenizer, load_corpus,
                            prepare_memmap)
from hf_ivonpc.data.memmap import split_documents


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
