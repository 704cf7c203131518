"""Where offline data lives, the error raised when some of it is missing, and atomic publishing of
a built folder."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

OWNER = ".owner"   # "<host> <pid>" of the process building a temporary folder


class MissingDataError(FileNotFoundError):
    """A data set, tokenizer or model is not available locally; the message says how to get it."""


def cache_dir() -> Path:
    """``$HF_IVONPC_CACHE`` or ``~/.cache/hf_ivonpc`` (created on first use)."""
    root = Path(os.environ.get("HF_IVONPC_CACHE", Path.home() / ".cache" / "hf_ivonpc"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def sweep_stale(final: Path) -> list[Path]:
    """Remove the temporary siblings of ``final`` (``.<name>.*``) left by a build on this host
    whose process is gone (killed, crashed machine); returns them. Folders of live processes, of
    other hosts (a shared file system) and folders without an owner file are left alone."""
    final = Path(final)
    removed = []
    if not final.parent.is_dir():
        return removed
    host = socket.gethostname()
    for d in final.parent.glob(f".{final.name}.*"):
        try:
            who, pid = (d / OWNER).read_text().split()
            stale = d.is_dir() and who == host and not _pid_alive(int(pid))
        except (OSError, ValueError):
            continue
        if stale:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def _replace_entries(tmp: Path, final: Path, last: tuple[str, ...]) -> None:
    """Move every entry of ``tmp`` into the existing folder ``final`` with ``os.replace`` (each one
    atomic), the names in ``last`` deleted from ``final`` first and moved in last."""
    for name in last:
        (final / name).unlink(missing_ok=True)
    names = sorted(p.name for p in tmp.iterdir())
    for name in [n for n in names if n not in last] + [n for n in last if n in names]:
        dst = final / name
        if dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)
        os.replace(tmp / name, dst)


def publish_dir(build, final: Path, overwrite: bool = False, last: tuple[str, ...] = ()) -> Path:
    """Build a directory in a temporary sibling with ``build(tmp_path)`` and rename it into place,
    so that an interrupted build never leaves a half-written ``final``.

    ``final`` already there: returned as is, unless ``overwrite``; then it is rebuilt, and when it
    is a non-empty folder its entries are replaced one by one (each ``os.replace`` atomic), those
    named in ``last`` (a completion marker such as ``meta.json``) deleted first and moved in last.
    Temporary folders of earlier builds whose process died are removed first (:func:`sweep_stale`);
    an interrupted build removes its own."""
    final = Path(final)
    if final.exists() and not overwrite:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())   # mkdtemp's 0700 would stay on the published folder
        (tmp / OWNER).write_text(f"{socket.gethostname()} {os.getpid()}")
        build(tmp)
        (tmp / OWNER).unlink()
        if overwrite and final.is_dir() and any(final.iterdir()):
            _replace_entries(tmp, final, tuple(last))
        else:
            try:  # an empty folder is replaced too (rename(2))
                os.replace(tmp, final)
            except OSError:  # another process published it first
                if not final.exists():
                    raise
                if overwrite:
                    _replace_entries(tmp, final, tuple(last))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
