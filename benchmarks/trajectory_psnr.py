"""Trajectory PSNR of quantization recipes against the FP model.

The same 32 samples (DDIM 50, η = 0, guidance 2, seed 5) are drawn by the FP model and by each recipe, and the
PSNR is taken over the FP samples' range. It measures what single-step numbers cannot: whether a recipe's
per-call gain survives 50 steps of a deterministic sampler.

    OMP_NUM_THREADS=1 python benchmarks/trajectory_psnr.py fmnist-tiny "w8a8,outliers=off,guard_db=0" \\
        "w8a8,guard_db=0" "w8a8"

Each recipe is ``scheme[,QuantConfig field=value...]``; calibration takes 20 steps × 16 trajectories.
"""

from __future__ import annotations

import sys

import torch

from qdiffuse.api import quantize
from qdiffuse.config import QuantConfig
from qdiffuse.models.loading import load_model_folder
from qdiffuse.sampling.loop import SampleRequest, sample

NUMERIC = {"guard_db": float, "lowrank_rank": int}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return (10 * torch.log10((b.max() - b.min()) ** 2 / (a - b).pow(2).mean())).item()


def main(name: str, recipes: list[str]) -> None:
    torch.set_num_threads(1)
    request = SampleRequest(num=32, steps=50, sampler="ddim", seed=5, guidance=2.0, batch_size=32)
    fp = load_model_folder(name)
    reference, _ = sample(fp.denoiser, fp.scheduler_config, request)
    for recipe in recipes:
        scheme, *fields = recipe.split(",")
        overrides = {k: NUMERIC.get(k, str)(v) for k, v in (f.split("=") for f in fields)}
        model = load_model_folder(name)
        config = QuantConfig.from_scheme(scheme, calib_per_step=16, **overrides)
        quantize(model.denoiser, model.scheduler_config, config, guidance=2.0)
        images, _ = sample(model.denoiser, model.scheduler_config, request)
        print(f"{name} {recipe}: trajectory PSNR {psnr(images.float(), reference.float()):.2f} dB")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
