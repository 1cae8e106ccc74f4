"""Ctrl-C and SIGTERM that are never lost.

Python raises a signal's exception wherever the main thread happens to be. Raised inside a callback the
interpreter runs on its own (the weakref that cleans up an import lock, a finalizer), the exception cannot
propagate: Python prints "Exception ignored" with a traceback and the command went on to finish with exit 0.
The hook installed here records such a swallowed interrupt instead of printing it, and :func:`raise_pending`
raises it again at the next point that can unwind cleanly: a progress tick, an output about to be put in
place, or the command's return.
"""

from __future__ import annotations

import sys
from typing import Any


class Terminated(BaseException):
    """SIGTERM, raised where the process is so that every atomic output cleans up on the way out."""


_INTERRUPTS = (KeyboardInterrupt, Terminated)
_pending: BaseException | None = None
_installed = False


def install() -> None:
    """Route interrupts swallowed by interpreter callbacks to :func:`raise_pending`; other unraisable errors
    are shown as before."""
    global _installed
    if _installed:
        return
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        global _pending
        if isinstance(unraisable.exc_value, _INTERRUPTS):
            if _pending is None:
                _pending = unraisable.exc_value
            return
        previous(unraisable)

    sys.unraisablehook = hook
    _installed = True


def pending() -> BaseException | None:
    """The interrupt that was swallowed and not raised again yet, if any."""
    return _pending


def raise_pending() -> None:
    """Raise an interrupt that arrived where it could not be raised; nothing when there is none."""
    global _pending
    exc, _pending = _pending, None
    if exc is not None:
        raise type(exc)()
