"""Time the quantized attention candidates against PyTorch's fused attention, one thread, same process.

    python benchmarks/attention_candidates.py [--repeats 5]

Rows: ``F.scaled_dot_product_attention`` on FP32 (the FP model's path), the simulated processor (fake-quantized
Q, K, V and softmax over the whole score matrix) and the real processor (codes, blocks of queries that stay in
cache). Shapes: the built-in UNet's 16×16 attention at batch 64, a DiT-XL/2 block at batch 8, SD-1.5's 32×32 and
64×64 attention at batch 2. Prints the largest difference of real against simulated beside the times.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from qdiffuse.allocator import keep_freed_memory
from qdiffuse.formats.spec import FormatSpec
from qdiffuse.kernels.attention import RealAttnProcessor
from qdiffuse.nn.attention import QuantAttnProcessor

SHAPES = [(64, 2, 256, 32), (8, 16, 256, 72), (2, 8, 1024, 40), (2, 8, 4096, 40)]


def median_ms(fn, repeats: int) -> float:  # noqa: ANN001
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    keep_freed_memory()
    torch.set_num_threads(1)
    act = FormatSpec(kind="int", bits=8, symmetric=False, granularity="tensor")
    softmax = FormatSpec(kind="int", bits=8, unsigned=True, symmetric=False)
    print("| batch×heads×tokens×d | SDPA FP32 (ms) | simulated (ms) | real (ms) | real vs simulated | max diff |")
    print("|---|---|---|---|---|---|")
    for batch, heads, tokens, dim in SHAPES:
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(batch, heads, tokens, dim, generator=gen) for _ in range(3))
        simulated = QuantAttnProcessor(act, softmax)
        for quantizer in simulated.quantizers().values():
            quantizer.start_calibration()
        simulated.attend(q[:1], k[:1], v[:1], None)
        for quantizer in simulated.quantizers().values():
            quantizer.finish_calibration()
        real = RealAttnProcessor(simulated)
        repeats = args.repeats if tokens <= 1024 else 2
        with torch.inference_mode():
            diff = (simulated.attend(q, k, v, None) - real.attend(q, k, v, None)).abs().max().item()
            t_sdpa = median_ms(lambda: F.scaled_dot_product_attention(q, k, v), repeats)  # noqa: B023
            t_sim = median_ms(lambda: simulated.attend(q, k, v, None), repeats)  # noqa: B023
            t_real = median_ms(lambda: real.attend(q, k, v, None), repeats)  # noqa: B023
        print(f"| {batch}×{heads}×{tokens}×{dim} | {t_sdpa:.1f} | {t_sim:.1f} | {t_real:.1f} | "
              f"{t_sim / t_real:.2f}× | {diff:.1e} |")


if __name__ == "__main__":
    main()
