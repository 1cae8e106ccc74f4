"""One place that checks every number a user gives, before any work starts.

A NaN guidance or an η of 5 used to run the whole sampling and then look like broken weights; a count of 10¹²
built a Python list for minutes before running out of memory. Each check here raises a one-line
:class:`ConfigError` that names the option, the value and the range it must lie in.
"""

from __future__ import annotations

import math
import os

from qdiffuse.errors import ConfigError

MAX_SEED = 2**32 - 1
"""Seeds are combined with batch indices into a 64-bit generator seed; larger ones would overflow it."""


def check_number(
    value: float,
    flag: str,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    integer: bool = False,
) -> float:
    """``value`` if it is a finite number in ``[low, high]`` (``(low, high]`` with ``low_open``), else a one-line
    error naming ``flag``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{flag} {value!r} is not a number")
    if not math.isfinite(value):
        raise ConfigError(f"{flag} {value} must be a finite number")
    if integer and int(value) != value:
        raise ConfigError(f"{flag} {value} must be a whole number")
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and value > high
    if below or above:
        lo = "" if low is None else (f"> {low:g}" if low_open else f">= {low:g}")
        hi = "" if high is None else f"<= {high:g}"
        raise ConfigError(f"{flag} {value:g} is out of range; use a value {' and '.join(p for p in (lo, hi) if p)}")
    return value


def physical_memory_bytes() -> int:
    """This machine's RAM (a generous 64 GiB when the OS does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 64 * 2**30


def check_fits_in_memory(nbytes: float, what: str, fix: str) -> None:
    """Fail fast when a result would need more than half of this machine's memory."""
    budget = physical_memory_bytes() // 2
    if nbytes > budget:
        raise ConfigError(
            f"{what} needs about {nbytes / 2**30:.1f} GiB, more than half of this machine's "
            f"{physical_memory_bytes() / 2**30:.0f} GiB; {fix}"
        )


__all__ = ["MAX_SEED", "check_number", "check_fits_in_memory", "physical_memory_bytes"]
