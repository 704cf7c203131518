"""Where offline data lives, and the error raised when some of it is missing."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


class MissingDataError(FileNotFoundError):
    """A data set, tokenizer or model is not available locally; the message says how to get it."""


def cache_dir() -> Path:
    """``$HF_IVONPC_CACHE`` or ``~/.cache/hf_ivonpc`` (created on first use)."""
    root = Path(os.environ.get("HF_IVONPC_CACHE", Path.home() / ".cache" / "hf_ivonpc"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def publish_dir(build, final: Path) -> Path:
    """Build a directory in a temporary sibling with ``build(tmp_path)`` and rename it into place,
    so that an interrupted build never leaves a half-written ``final``."""
    final = Path(final)
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build(tmp)
        try:
            os.replace(tmp, final)
        except OSError:  # another process published it first
            if not final.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
