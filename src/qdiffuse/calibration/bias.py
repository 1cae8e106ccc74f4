"""Empirical bias correction: the cheap baseline between round-to-nearest PTQ and reconstruction.

Rounding 4-bit weights leaves each output channel with an error whose mean over real inputs is not zero
(Nagel et al. 2019, "Data-Free Quantization"; Finkelstein et al. 2019). In a diffusion model that mean error
reaches the predicted noise as a bias, and a deterministic sampler adds it up over every step. Measuring
E[F(x; W) - F(Q(x); Ŵ)] per output channel on the time-step-aware calibration set, with x the input the
quantized layer actually receives, and adding it to the layer's bias removes the mean of both the weight and the
input quantization error at the cost of one forward pass. The correction is one number per channel shared by all
timesteps; what varies with t is left to PTQD's per-step correction or to reconstruction.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qdiffuse.calibration.collect import CalibrationSet
from qdiffuse.models.denoiser import Denoiser
from qdiffuse.nn.layers import QuantLayer
from qdiffuse.nn.rewrite import quant_layers


def fp_weights(model: nn.Module) -> dict[str, Tensor]:
    """Copies of the FP weights of every quantized layer, taken before PTQ hardens them."""
    return {name: layer.weight.detach().clone() for name, layer in quant_layers(model)}


def _channel_sum(diff: Tensor, layer: QuantLayer) -> tuple[Tensor, int]:
    """Sum over every dimension but the output channel, and how many values went into each channel's sum."""
    moved = diff.movedim(layer.channel_dim, -1)
    moved = moved.reshape(-1, moved.shape[-1])
    return moved.double().sum(0), moved.shape[0]


@torch.no_grad()
def correct_bias(
    denoiser: Denoiser, calib: CalibrationSet, weights: dict[str, Tensor], batch_size: int = 64
) -> dict[str, float]:
    """Add each quantized layer's mean output error (FP weight on the FP input minus the quantized layer) to its
    bias. All layers are measured in one pass, each on the inputs it receives in the quantized model, and corrected
    together. Returns the largest absolute correction per layer (what the manifest records)."""
    layers = dict(quant_layers(denoiser.model))
    missing = sorted(set(layers) - set(weights))
    if missing:
        raise ValueError(f"no FP weights for quantized layers {missing[:3]}")
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str, layer: QuantLayer):
        weight = weights[name].to(layer.weight.device)

        def measure(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            diff = layer.op(args[0], weight) - output
            total, count = _channel_sum(diff, layer)
            sums[name] = sums[name] + total if name in sums else total
            counts[name] = counts.get(name, 0) + count

        return measure

    handles = [layer.register_forward_hook(hook(name, layer)) for name, layer in layers.items()]
    try:
        calib.run_through(denoiser, batch_size, "bias correction")
    finally:
        for handle in handles:
            handle.remove()
    corrections: dict[str, float] = {}
    for name, layer in layers.items():
        if name not in sums:  # a layer the calibration inputs never reach
            continue
        delta = sums[name] / counts[name]
        layer.add_to_bias(delta)
        corrections[name] = float(delta.abs().max())
    return corrections


__all__ = ["correct_bias", "fp_weights"]
