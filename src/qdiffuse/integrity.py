"""Content hashes of a quantized folder: ``integrity.json`` records a SHA-256 digest of every file in it.

A quantized folder is copied between machines, synced, hand-edited and appended to (noise statistics); a flipped
byte in ``quantized.safetensors`` still parses and silently changes the model, and a hand-edited manifest can
claim a format its codes were not written in. The loader therefore checks every recorded digest before it
reads anything else, so such a folder fails with one line naming the file instead of sampling garbage.

Layout of ``integrity.json``::

    {"algorithm": "sha256", "files": {"quantization.json": "<hex>", "noise/ddim-50-eta0-g1.json": "<hex>", ...}}

Paths are relative to the folder, with ``/`` separators. Files the record does not list (a user's README) are
ignored; a folder without the record (written before it existed) loads with a warning. Writers that add or
rewrite a file inside an existing folder call :func:`record_files` so the record stays current.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from qdiffuse.errors import ModelLoadError
from qdiffuse.fsutil import atomic_file

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows has no flock; record updates are then unserialised
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

INTEGRITY_FILE = "integrity.json"
ALGORITHM = "sha256"
CHUNK_BYTES = 4 << 20
"""Files are hashed in 4 MiB reads: constant memory for multi-GiB weight files, and few enough syscalls that
hashing runs at the speed of SHA-256 itself (over 1 GB/s), far below the cost of building the model."""

NO_VERIFY_HINT = "re-run qdiffuse quantize, or pass --no-verify to load it anyway"

_warned: set[str] = set()


def file_digest(path: Path) -> str:
    """Hex SHA-256 of ``path``, streamed so a large file never sits in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def folder_files(folder: Path) -> list[str]:
    """Every regular file under ``folder`` but the record itself, as sorted relative ``/`` paths."""
    folder = Path(folder)
    names = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
    return sorted(n for n in names if n != INTEGRITY_FILE)


def write_integrity(folder: Path) -> dict[str, str]:
    """Hash every file in ``folder`` and write the record (last, so it covers everything written before it).

    Meant for a folder that is still being built inside :func:`qdiffuse.fsutil.atomic_dir`; returns the digests."""
    folder = Path(folder)
    files = {name: file_digest(folder / name) for name in folder_files(folder)}
    _write_record(folder, files)
    return files


def _write_record(folder: Path, files: dict[str, str]) -> None:
    record = {"algorithm": ALGORITHM, "files": dict(sorted(files.items()))}
    with atomic_file(folder / INTEGRITY_FILE, overwrite=True) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")


@contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """Serialise read-modify-write updates of one folder's record (two writers appending noise statistics at
    once would otherwise drop one of the digests). The lock is taken on the folder itself: no lock file is left
    inside the folder."""
    if fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def has_record(folder: Path) -> bool:
    return (Path(folder) / INTEGRITY_FILE).is_file()


def record_files(folder: Path, names: Iterable[str | Path]) -> None:
    """Bring the digests of ``names`` (paths relative to ``folder``) up to date after a writer added or rewrote
    them; a name whose file is gone is dropped from the record.

    A folder without a record (made by an older qdiffuse) is left without one: a record of the new files alone
    would make the folder look verified while its weights never were."""
    folder = Path(folder)
    with _folder_lock(folder):
        if not has_record(folder):
            return
        files = _read_record(folder)
        for name in names:
            rel = _relative(folder, name)
            path = folder / rel
            if path.is_file():
                files[rel] = file_digest(path)
            else:
                files.pop(rel, None)
        _write_record(folder, files)


def _relative(folder: Path, name: str | Path) -> str:
    """``name`` (relative, or absolute inside ``folder``) as the record's key."""
    path = Path(name)
    if path.is_absolute():
        path = path.resolve().relative_to(Path(folder).resolve())
    return path.as_posix()


def _read_record(folder: Path) -> dict[str, str]:
    """The record's ``files`` map, checked to be well formed (a bad record is itself a damaged folder)."""
    path = Path(folder) / INTEGRITY_FILE
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as exc:  # Unicode/JSONDecodeError are ValueErrors; [[[[...]]]]
        raise ModelLoadError(f"{path} is unreadable ({_one_line(exc)}); {NO_VERIFY_HINT}") from None
    if not isinstance(data, dict) or data.get("algorithm") != ALGORITHM or not isinstance(data.get("files"), dict):
        raise ModelLoadError(
            f"{path} is not a {ALGORITHM} integrity record ({{'algorithm': 'sha256', 'files': {{...}}}}); "
            f"{NO_VERIFY_HINT}"
        )
    files = data["files"]
    for name, digest in files.items():
        if not _safe_name(name) or not isinstance(digest, str):
            raise ModelLoadError(f"{path} lists an invalid entry {name!r}; {NO_VERIFY_HINT}")
    return files


def _safe_name(name: str) -> bool:
    """A relative path that stays inside the folder: the record must never make the loader read elsewhere."""
    if not isinstance(name, str) or "\\" in name or any(ord(c) < 32 for c in name) or PurePosixPath(name).is_absolute():
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


def verify_folder(folder: Path, required: Iterable[str] = ()) -> set[str] | None:
    """Check every digest in ``folder``'s record; returns the set of files it covers (None: the folder has no
    record, which is logged as a warning and otherwise allowed, so folders from older versions keep loading).

    ``required`` names files the caller is about to read: the record must cover them, or a record with their
    entries deleted would pass them unchecked."""
    folder = Path(folder)
    if not folder.is_dir():
        return None  # nothing to check: the caller's first read says what is missing
    if not has_record(folder):
        key = str(folder.resolve())
        if key not in _warned:  # once per folder: a benchmark loads the same folder for every cell
            _warned.add(key)
            logger.warning(
                "%s has no %s (it was written by an older qdiffuse), so its files cannot be checked for damage; "
                "re-run qdiffuse quantize to add one",
                folder,
                INTEGRITY_FILE,
            )
        return None
    files = _read_record(folder)
    for name in required:
        if name not in files:
            raise ModelLoadError(f"{folder / INTEGRITY_FILE} does not cover {name}; {NO_VERIFY_HINT}")
    for name, expected in sorted(files.items()):
        path = folder / name
        try:
            mode = os.stat(path).st_mode
        except OSError:
            raise ModelLoadError(f"{path} is missing (listed in {INTEGRITY_FILE}); {NO_VERIFY_HINT}") from None
        if not stat.S_ISREG(mode):  # a FIFO or device would block or never end
            raise ModelLoadError(f"{path} is not a regular file (listed in {INTEGRITY_FILE}); {NO_VERIFY_HINT}")
        try:
            actual = file_digest(path)
        except OSError as exc:
            raise ModelLoadError(f"{path} is unreadable ({_one_line(exc)}); {NO_VERIFY_HINT}") from None
        if actual != expected.lower():
            raise ModelLoadError(
                f"{path} does not match its {ALGORITHM} in {INTEGRITY_FILE} (the file changed or is damaged); "
                f"{NO_VERIFY_HINT}"
            )
    return set(files)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


__all__ = [
    "INTEGRITY_FILE",
    "ALGORITHM",
    "NO_VERIFY_HINT",
    "file_digest",
    "folder_files",
    "write_integrity",
    "record_files",
    "verify_folder",
    "has_record",
]
