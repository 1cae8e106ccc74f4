"""Progress bars for long steps (sampling, calibration, training), silenced in tests and pipes on request."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

_console = Console(stderr=True)
_enabled = True


def set_progress_enabled(enabled: bool) -> None:
    global _enabled
    _enabled = enabled


class _Bar:
    def __init__(self, progress: Progress | None, task: int | None) -> None:
        self._progress = progress
        self._task = task

    def advance(self, n: int = 1, **fields: object) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, advance=n, **fields)


@contextmanager
def progress_bar(description: str, total: int) -> Iterator[_Bar]:
    """A bar on stderr while the block runs (no output when progress is disabled)."""
    if not _enabled:
        yield _Bar(None, None)
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=_console, transient=False) as progress:
        task = progress.add_task(description, total=total)
        yield _Bar(progress, task)


__all__ = ["progress_bar", "set_progress_enabled"]
