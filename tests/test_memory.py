"""Peak-memory measurement used by the benchmark tables."""

from __future__ import annotations

import numpy as np

from qdiffuse.memory import PeakMemory, resident_bytes


def test_peak_resident_memory_sees_a_large_allocation() -> None:
    before = resident_bytes()
    assert before is not None and before > 0
    with PeakMemory(interval=0.01) as peak:
        block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
        block.sum()
    del block
    assert peak.bytes is not None
    assert peak.bytes >= before + 48 * 2**20
    assert peak.mib == peak.bytes / 2**20
