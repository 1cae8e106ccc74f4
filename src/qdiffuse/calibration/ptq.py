"""Round-to-nearest PTQ: compute weight parameters, harden the weights, calibrate static activation ranges.

Weights are quantized first, so each activation range is measured on inputs that already carry the upstream
weight error, as they will at inference.
"""

from __future__ import annotations

import torch
from torch import nn

from qdiffuse.calibration.collect import CalibrationSet
from qdiffuse.models.denoiser import Denoiser
from qdiffuse.nn.rewrite import activation_quantizers, quant_layers
from qdiffuse.progress import progress_bar


def calibrate_weights(model: nn.Module) -> None:
    layers = list(quant_layers(model))
    with progress_bar("weights", len(layers)) as bar:
        for _, layer in layers:
            layer.calibrate_weight()
            layer.harden()
            bar.advance()


@torch.no_grad()
def calibrate_activations(denoiser: Denoiser, calib: CalibrationSet, batch_size: int = 64) -> None:
    quantizers = [q for _, q in activation_quantizers(denoiser.model) if q.needs_calibration]
    for q in quantizers:
        q.start_calibration()
    n_batches = (len(calib) + batch_size - 1) // batch_size
    with progress_bar("activation ranges", n_batches) as bar:
        for x, t, labels, cond in calib.batches(batch_size, denoiser.device):
            denoiser.forward_raw(x, t, labels, cond)
            bar.advance()
    with progress_bar("range search", len(quantizers)) as bar:
        for q in quantizers:
            q.finish_calibration()
            bar.advance()


def calibrate_ptq(denoiser: Denoiser, calib: CalibrationSet, batch_size: int = 64) -> None:
    calibrate_weights(denoiser.model)
    calibrate_activations(denoiser, calib, batch_size)


__all__ = ["calibrate_ptq", "calibrate_weights", "calibrate_activations"]
