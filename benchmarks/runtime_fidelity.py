"""Real against simulated runtime on the same quantized folders: PSNR of their samples, drawn from the same seeds.

    python benchmarks/runtime_fidelity.py FOLDER [FOLDER ...] [--num 100 --steps 50 --guidance 2]

Each folder is loaded twice (``runtime="real"`` and ``"simulated"``) and both sample the same noise with DDIM
(η = 0); the table gives the PSNR and SSIM of real against simulated samples (mean over images, uint8) and the
sampling time of each. The two runtimes use the same codes; what separates them is float rounding in the
integer kernels' epilogues, amplified by the sampler's 50 steps.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from qdiffuse.allocator import keep_freed_memory
from qdiffuse.eval.fidelity import psnr, ssim
from qdiffuse.io import load_quantized
from qdiffuse.progress import set_progress_enabled
from qdiffuse.sampling.loop import SampleRequest, sample, to_uint8


def draw(folder: Path, runtime: str, request: SampleRequest) -> tuple[np.ndarray, float]:
    loaded = load_quantized(folder, runtime=runtime)
    start = time.perf_counter()
    with torch.inference_mode():
        images, _ = sample(loaded.denoiser, loaded.scheduler_config, request)
    return to_uint8(images).numpy(), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--num", type=int, default=100)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    keep_freed_memory()
    set_progress_enabled(False)
    torch.set_num_threads(1)
    request = SampleRequest(num=args.num, steps=args.steps, seed=args.seed, guidance=args.guidance,
                            batch_size=min(args.num, 100))
    print("| folder | PSNR real vs simulated (dB) | SSIM | sampling real (s) | sampling simulated (s) |")
    print("|---|---|---|---|---|")
    for folder in args.folders:
        real, t_real = draw(folder, "real", request)
        simulated, t_sim = draw(folder, "simulated", request)
        p = psnr(real, simulated)
        p = float(np.mean(np.minimum(p, 100.0)))  # identical images count as 100 dB
        s = float(np.mean(ssim(real, simulated)))
        print(f"| {folder.name} | {p:.1f} | {s:.4f} | {t_real:.0f} | {t_sim:.0f} |")


if __name__ == "__main__":
    main()
