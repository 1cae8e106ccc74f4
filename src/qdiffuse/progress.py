"""Progress for long steps (sampling, calibration, training): a bar on a terminal, plain periodic lines in a log.

A rich bar redraws in place; when stderr is a file or a pipe it can only print once the step finishes, so a
``make demo > log`` stayed silent for minutes. There, each step prints ``description: done/total`` lines at most
every :data:`LOG_INTERVAL` seconds and one when it ends. Silenced in tests on request.
"""

from __future__ import annotations

import sys
import time
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

from qdiffuse.interrupts import raise_pending

_console = Console(stderr=True)
_enabled = True
LOG_INTERVAL = 30.0
"""Seconds between two progress lines of one step when stderr is not a terminal."""


def set_progress_enabled(enabled: bool) -> None:
    global _enabled
    _enabled = enabled


class _Bar:
    def __init__(self, progress: Progress | None, task: int | None) -> None:
        self._progress = progress
        self._task = task

    def advance(self, n: int = 1, **fields: object) -> None:
        raise_pending()
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, advance=n, **fields)


class _LogLines(_Bar):
    """Progress as plain lines for logs: at most one per :data:`LOG_INTERVAL` seconds, and one at the end."""

    def __init__(self, description: str, total: int, interval: float) -> None:
        super().__init__(None, None)
        self.description, self.total, self.interval = description, total, interval
        self.done = 0
        self.start = self.last = time.monotonic()

    def advance(self, n: int = 1, **fields: object) -> None:
        raise_pending()
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.interval and self.done < self.total:
            self.last = now
            self.line(now)

    def line(self, now: float) -> None:
        elapsed = now - self.start
        text = f"{self.description}: {self.done}/{self.total} ({elapsed:.0f} s"
        if 0 < self.done < self.total:
            text += f", about {elapsed * (self.total - self.done) / self.done:.0f} s left"
        print(text + ")", file=sys.stderr, flush=True)


@contextmanager
def progress_bar(description: str, total: int) -> Iterator[_Bar]:
    """A bar on stderr while the block runs; plain periodic lines when stderr is not a terminal; no output when
    progress is disabled."""
    if not _enabled:
        yield _Bar(None, None)
        return
    if not _console.is_terminal:
        bar = _LogLines(description, total, LOG_INTERVAL)
        yield bar
        bar.line(time.monotonic())
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
