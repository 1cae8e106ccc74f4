"""Which activation quantizers of a quantized folder cause its single-step ε error.

Collects denoiser inputs from the FP model's own DDIM sampler (the inputs the model meets when sampling, not random
noise), then compares the FP model with the quantized one in which the weights are put back to FP and exactly one
activation quantizer is switched on at a time. Prints the relative ε error of all activation quantizers together
and of the worst single ones.

    python benchmarks/activation_sensitivity.py runs/cpu-grid/models/fmnist-tiny__w8a8-minmax
"""

from __future__ import annotations

import argparse

import torch

from qdiffuse.calibration.collect import collect_calibration
from qdiffuse.nn.attention import QuantAttnProcessor
from qdiffuse.nn.layers import QuantLayer
from qdiffuse.pipeline import load_any


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="A quantized model folder of the built-in model.")
    parser.add_argument("--model", default="fmnist-tiny")
    parser.add_argument("--num", type=int, default=256, help="Denoiser inputs to score on.")
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    fp = load_any(args.model)
    quantized = load_any(args.folder).denoiser
    inputs = collect_calibration(fp.denoiser, fp.scheduler_config, n_steps=20, n_per_step=16, guidance=args.guidance)
    pick = torch.randperm(len(inputs), generator=torch.Generator().manual_seed(1))[: args.num]
    x, t = inputs.x[pick], inputs.t[pick]
    labels = inputs.labels[pick] if inputs.labels is not None else None

    fp_modules = dict(fp.denoiser.model.named_modules())
    quantizers: dict[str, torch.nn.Module] = {}
    for name, module in quantized.model.named_modules():
        if isinstance(module, QuantLayer):
            with torch.no_grad():
                module.weight.copy_(fp_modules[name].weight)
            for i, q in enumerate(module.input_quantizers):
                quantizers[f"{name} input {i}"] = q
        processor = getattr(module, "processor", None)
        if isinstance(processor, QuantAttnProcessor):
            for key, q in processor.quantizers().items():
                quantizers[f"{name} {key}"] = q

    def error() -> float:
        with torch.no_grad():
            out = quantized.forward_raw(x, t, labels)
        return float((out - ref).pow(2).mean() / ref.pow(2).mean())

    with torch.no_grad():
        ref = fp.denoiser.forward_raw(x, t, labels)
    total = error()
    for q in quantizers.values():
        q.enabled = False
    singles = []
    for name, q in quantizers.items():
        q.enabled = True
        singles.append((error(), name))
        q.enabled = False
    singles.sort(reverse=True)
    print(f"{len(quantizers)} activation quantizers, FP weights: relative ε error {total:.3e}")
    for value, name in singles[: args.top]:
        print(f"{value:.3e}  {value / total:6.1%}  {name}")


if __name__ == "__main__":
    main()
