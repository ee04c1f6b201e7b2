"""Atomic writes with the user's umask: one file (:func:`atomic_write`, :func:`write_json`)
or one folder (:func:`atomic_folder`), so a killed writer never leaves a half-made
report, run file, cache entry, dataset or model folder behind."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def umask() -> int:
    """The process umask (read without changing it for good)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(root: str | Path) -> int:
    """Give every file and folder under ``root`` the user's umask; returns how many changed.

    Some writers ignore it: safetensors writes weights 0600, ``mkdtemp`` folders are 0700.
    In a mounted ``runs/`` that locks the host user out of their own adapter. Executable
    bits are kept where they are set.
    """
    root = Path(root)
    if not root.exists():
        return 0
    mask, changed = umask(), 0
    for p in [root, *root.rglob("*")]:
        if p.is_symlink():
            continue
        mode = p.stat().st_mode & 0o777
        want = (0o777 if p.is_dir() or mode & 0o111 else 0o666) & ~mask
        if mode != want:
            p.chmod(want)
            changed += 1
    return changed


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write a file atomically (temp file in the same folder, then rename).

    The file gets the user's umask like any ``open()``-created file (``mkstemp`` alone
    leaves 0600, which locks other users and the host out of mounted reports and runs).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_json(path: str | Path, obj: Any, *, indent: int = 2, ensure_ascii: bool = True) -> Path:
    """``obj`` as JSON (non-JSON values as ``str``) plus a newline, via :func:`atomic_write`."""
    text = json.dumps(obj, indent=indent, ensure_ascii=ensure_ascii, default=str) + "\n"
    return atomic_write(path, text)


def replace_folder(tmp: Path, out: Path) -> None:
    """Move the finished folder ``tmp`` to ``out``. An old ``out`` is moved aside first and
    put back if the move fails, so ``out`` is at every moment the old or the new folder."""
    trash = None
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, trash / out.name)
    try:
        os.replace(tmp, out)
    except OSError:
        if trash is not None and not out.exists():
            os.replace(trash / out.name, out)
        raise
    finally:
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)


@contextmanager
def atomic_folder(out: str | Path, *, keep: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """A temporary folder beside ``out`` (with the user's umask) to write into: it becomes
    ``out`` when the block succeeds (:func:`replace_folder`) and is removed when it fails.

    ``keep``: when it holds for the ``out`` found at the end (another process finished it
    first), that one stays and the new folder is dropped.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o777 & ~umask())  # mkdtemp makes 0700
    try:
        yield tmp
        if keep is not None and out.exists() and keep(out):
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
