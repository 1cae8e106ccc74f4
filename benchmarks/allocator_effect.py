"""What fresh pages cost: the same tensor operations with glibc's defaults and with freed blocks kept.

    python benchmarks/allocator_effect.py            # runs both settings, each in a fresh process

Times (one thread, median of 5) a copy, an int32 → float32 conversion and a float → uint8 conversion of an
8M-element tensor, each allocating its output, the way a denoiser forward allocates its activations.
"""

from __future__ import annotations

import subprocess
import sys

CHILD = r"""
import statistics, sys, time
import torch
if sys.argv[1] == "kept":
    from qdiffuse.allocator import keep_freed_memory
    assert keep_freed_memory()
torch.set_num_threads(1)
x = torch.rand(128, 256, 256) * 255
acc = torch.randint(-1000, 1000, (128, 256, 256), dtype=torch.int32)
def median_ms(fn):
    fn()
    times = []
    for _ in range(5):
        start = time.perf_counter(); fn(); times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3
print(f"{median_ms(lambda: x.clone()):.1f} {median_ms(lambda: acc.to(torch.float32)):.1f} "
      f"{median_ms(lambda: x.to(torch.uint8)):.1f}")
"""


def main() -> None:
    print("| allocator | copy (ms) | int32 → float32 (ms) | float32 → uint8 (ms) |")
    print("|---|---|---|---|")
    for setting, label in (("default", "glibc defaults"), ("kept", "freed blocks kept (qdiffuse.allocator)")):
        out = subprocess.run([sys.executable, "-c", CHILD, setting], check=True, capture_output=True, text=True)
        copy, to_float, to_u8 = out.stdout.split()
        print(f"| {label} | {copy} | {to_float} | {to_u8} |")


if __name__ == "__main__":
    main()
