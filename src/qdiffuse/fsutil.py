"""Atomic outputs: a command either leaves its complete output or nothing, and never clobbers by accident.

Everything is written to a temporary sibling first and renamed into place at the end; an existing target is
refused unless the caller allows overwriting, and then only replaced once the new output is complete. A user
command names the :class:`OutputKind` it writes: ``--overwrite`` then replaces only an existing output of that
same kind (a folder this package wrote carries a small marker file naming its kind), never a folder of someone
else's files, never a file of another kind, and never the command's own input. A full disk ends in one line,
with the temporary output removed.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import signal
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from qdiffuse.errors import OutputError
from qdiffuse.interrupts import raise_pending

MARKER = ".qdiffuse-output"
"""File inside every output folder this package writes: the folder's :attr:`OutputKind.name`."""


@dataclass(frozen=True)
class OutputKind:
    """One kind of output a command writes: what ``--overwrite`` may replace with it.

    folder: a folder (recognised by its :data:`MARKER`, or by ``recognizes`` for folders written before the
    marker existed); otherwise a file with ``suffix`` whose content ``recognizes`` accepts.
    """

    name: str
    folder: bool = False
    suffix: str = ""
    recognizes: Callable[[Path], bool] = lambda path: False

    def is_own(self, path: Path) -> bool:
        """Whether the existing ``path`` is an output of this kind (an empty folder counts: nothing to lose)."""
        if self.folder:
            if not path.is_dir():
                return False
            if not any(path.iterdir()):
                return True
            marker = path / MARKER
            if marker.is_file():
                try:
                    return marker.read_text().strip() == self.name
                except OSError:
                    return False
            return self.recognizes(path)
        return path.is_file() and self.recognizes(path)


def _is_samples_npz(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False
    return "arr_0.npy" in names and names <= {"arr_0.npy", "labels.npy"}


def _is_png(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(8) == b"\x89PNG\r\n\x1a\n"
    except OSError:
        return False


def _is_json(path: Path) -> bool:
    try:
        return isinstance(json.loads(path.read_text()), dict)
    except (OSError, ValueError, UnicodeDecodeError):
        return False


def _has(*names: str) -> Callable[[Path], bool]:
    return lambda path: all((path / n).exists() for n in names)


QUANTIZED_FOLDER = OutputKind("quantized model folder", folder=True, recognizes=_has("quantization.json"))
MODEL_FOLDER = OutputKind("trained model folder", folder=True, recognizes=_has("qdiffuse.json", "train_log.json"))
CLASSIFIER_FOLDER = OutputKind("classifier folder", folder=True)
REPORT_FOLDER = OutputKind("report folder", folder=True, recognizes=_has("noise_stats.json"))
DEMO_FOLDER = OutputKind("demo folder", folder=True, recognizes=_has("report.md", "report.json"))
SAMPLES = OutputKind("samples .npz", suffix=".npz", recognizes=_is_samples_npz)
PNG = OutputKind("PNG image", suffix=".png", recognizes=_is_png)
JSON = OutputKind("JSON report", suffix=".json", recognizes=_is_json)


def _overlaps(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def check_output_path(
    path: Path, overwrite: bool, kind: OutputKind | None = None, inputs: Iterable[str | Path] = ()
) -> None:
    """Fail early (before hours of work) if ``path`` cannot or must not be written.

    With ``kind`` (every user-facing output): the path must have the kind's suffix, must not be, contain or lie
    inside any of ``inputs``, and ``overwrite`` replaces only an existing output of that kind.
    """
    path = Path(path)
    if kind is not None and kind.suffix and path.suffix.lower() != kind.suffix:
        raise OutputError(f"{path} does not end in {kind.suffix}; name the {kind.name} e.g. {path.stem}{kind.suffix}")
    for source in inputs:
        if Path(source).exists() and _overlaps(path, Path(source)):
            raise OutputError(
                f"{path} is the input {source} or overlaps it; write the output to a path outside the input"
            )
    if path.exists() and not overwrite:
        raise OutputError(f"{path} already exists; choose another path or pass --overwrite")
    if path.exists() and kind is not None and not kind.is_own(path):
        what = "a folder" if path.is_dir() else "a file"
        raise OutputError(
            f"{path} is {what} that is not a {kind.name} qdiffuse wrote; --overwrite only replaces a {kind.name}: "
            "choose another path"
        )
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


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM back while an output is put in place: an interrupt between two renames would leave
    neither the old output nor the new one at the path. They are delivered right after."""
    signals = {signal.SIGINT, signal.SIGTERM}
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the OS or
    file system cannot, so the caller falls back to two renames."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _replace(tmp: Path, path: Path) -> None:
    """Put ``tmp`` at ``path``. A file replaces a file atomically; a folder is swapped with the old one in one
    step where the OS can, so even a SIGKILL leaves either the old output or the new one at ``path``."""
    raise_pending()
    with _signals_deferred():
        if not path.is_dir() or path.is_symlink():
            os.replace(tmp, path)
            return
        if _exchange(tmp, path):
            shutil.rmtree(tmp, ignore_errors=True)  # the old folder, now under the temporary name
            return
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)


def _disk_full(exc: BaseException, path: Path) -> OutputError | None:
    """The one-line error for a write that ran out of space (None for any other failure)."""
    full = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
    # safetensors and numpy report a full disk in their own exception types; the OS message survives in the text
    if full or "No space left on device" in str(exc) or "StorageFull" in str(exc):
        return OutputError(f"no space left on the device while writing {path}; free some space or choose another path")
    return None


@contextmanager
def atomic_dir(
    path: Path, overwrite: bool = False, kind: OutputKind | None = None, inputs: Iterable[str | Path] = ()
) -> Iterator[Path]:
    """Yield a temporary folder; it becomes ``path`` only if the block finishes (see :func:`check_output_path`
    for ``kind`` and ``inputs``; the finished folder carries the kind's marker)."""
    path = Path(path)
    check_output_path(path, overwrite, kind, inputs)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as exc:
        raise _disk_full(exc, path) or exc from None
    os.chmod(tmp, _umask_mode(0o777))
    try:
        yield tmp
        if kind is not None:
            (tmp / MARKER).write_text(kind.name + "\n")
        _replace(tmp, path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        full = _disk_full(exc, path)
        if full is not None:
            raise full from None
        raise


@contextmanager
def atomic_file(
    path: Path, overwrite: bool = False, kind: OutputKind | None = None, inputs: Iterable[str | Path] = ()
) -> Iterator[Path]:
    """Yield a temporary file path (same suffix); it becomes ``path`` only if the block finishes."""
    path = Path(path)
    check_output_path(path, overwrite, kind, inputs)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    except OSError as exc:
        raise _disk_full(exc, path) or exc from None
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, _umask_mode(0o666))
    try:
        yield tmp
        _replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        full = _disk_full(exc, path)
        if full is not None:
            raise full from None
        raise


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


__all__ = [
    "MARKER",
    "OutputKind",
    "QUANTIZED_FOLDER",
    "MODEL_FOLDER",
    "CLASSIFIER_FOLDER",
    "REPORT_FOLDER",
    "DEMO_FOLDER",
    "SAMPLES",
    "PNG",
    "JSON",
    "atomic_dir",
    "atomic_file",
    "check_output_path",
    "folder_size",
]
