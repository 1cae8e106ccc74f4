"""Peak-memory measurement used by the benchmark tables."""

from __future__ import annotations

import mmap

from qdiffuse.memory import PeakMemory, resident_bytes


def test_peak_resident_memory_sees_a_large_allocation() -> None:
    before = resident_bytes()
    assert before is not None and before > 0
    size = 64 * 2**20
    with PeakMemory(interval=0.01) as peak:
        # fresh pages from the kernel, touched: malloc may hold freed heap that would absorb a numpy array
        block = mmap.mmap(-1, size)
        block.write(b"\x01" * size)
    block.close()
    assert peak.bytes is not None
    assert peak.bytes >= before + 48 * 2**20
    assert peak.mib == peak.bytes / 2**20
