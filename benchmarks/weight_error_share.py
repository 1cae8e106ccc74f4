"""How much of a quantized model's single-step ε error its weights alone cause.

Runs the FP model and a quantized folder on the same random inputs at a few timesteps, once as quantized and once
with activation quantization switched off (hardened weights stay quantized), and prints both relative errors.

    python benchmarks/weight_error_share.py runs/cpu-grid/models/fmnist-tiny__w4a8-mse
"""

from __future__ import annotations

import argparse

import torch

from qdiffuse.nn.rewrite import set_quantization_enabled
from qdiffuse.pipeline import load_any


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="A quantized model folder of the built-in model.")
    parser.add_argument("--model", default="fmnist-tiny")
    parser.add_argument("--num", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    fp = load_any(args.model).denoiser
    quantized = load_any(args.folder).denoiser
    gen = torch.Generator().manual_seed(3)
    x = 0.5 * torch.randn(args.num, 1, 32, 32, generator=gen)
    labels = torch.randint(0, 11, (args.num,), generator=gen)
    for step in (900, 500, 100, 20):
        t = torch.full((args.num,), step)
        with torch.no_grad():
            ref = fp.forward_raw(x, t, labels)
            set_quantization_enabled(quantized.model, True)
            full = quantized.forward_raw(x, t, labels)
            set_quantization_enabled(quantized.model, False)
            weights_only = quantized.forward_raw(x, t, labels)
        norm = ref.pow(2).mean()
        e_full = float((full - ref).pow(2).mean() / norm)
        e_w = float((weights_only - ref).pow(2).mean() / norm)
        print(f"t={step}: relative ε error {e_full:.2e}, weights only {e_w:.2e} ({e_w / e_full:.0%})")


if __name__ == "__main__":
    main()
