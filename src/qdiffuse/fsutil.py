"""Atomic outputs: a command either leaves its complete output or nothing, and never clobbers by accident.

Everything is written to a temporary sibling first and renamed into place at the end; an existing target is
refused unless the caller allows overwriting, and then only replaced once the new output is complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qdiffuse.errors import OutputError


def check_output_path(path: Path, overwrite: bool) -> None:
    """Fail early (before hours of work) if ``path`` cannot be written."""
    if path.exists() and not overwrite:
        raise OutputError(f"{path} already exists; choose another path or pass --overwrite")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"cannot write {path}: folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write {path}: folder {parent} is not writable; choose another output path")


def _umask_mode(base: int) -> int:
    """``base`` permissions as a plain mkdir/open would give them (mkdtemp/mkstemp make them private)."""
    mask = os.umask(0)
    os.umask(mask)
    return base & ~mask


def _replace(tmp: Path, path: Path) -> None:
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    else:
        os.replace(tmp, path)


@contextmanager
def atomic_dir(path: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; it becomes ``path`` only if the block finishes."""
    path = Path(path)
    check_output_path(path, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, _umask_mode(0o777))
    try:
        yield tmp
        _replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(path: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary file path (same suffix); it becomes ``path`` only if the block finishes."""
    path = Path(path)
    check_output_path(path, overwrite)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, _umask_mode(0o666))
    try:
        yield tmp
        _replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


__all__ = ["atomic_dir", "atomic_file", "check_output_path", "folder_size"]
