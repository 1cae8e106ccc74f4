"""Keep freed large blocks in the process heap (glibc), so per-call tensors do not page-fault.

By default glibc serves every allocation above 128 KiB-32 MiB (adaptive) with a fresh ``mmap`` and returns it to
the kernel on free; a denoiser forward allocates and frees the same large activations on every call, and the
first touch of each fresh page then costs more than the arithmetic: measured on the development CPU
(``benchmarks/allocator_effect.py``, 8M elements, one thread), an int32 → float32 conversion took 21–24 ms with
fresh pages and 3.1–3.7 ms with reused ones, a float32 → uint8 conversion 9.5–10.6 ms against 4.4–4.7 ms.
The command line calls :func:`keep_freed_memory` once at start, before any model runs, so FP and quantized
models in one process run under the same allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def keep_freed_memory(mmap_threshold: int = 1 << 30, trim_threshold: int = 1 << 31) -> bool:
    """Raise glibc's mmap and trim thresholds; False where the C library is not glibc (nothing changes)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))


__all__ = ["keep_freed_memory"]
