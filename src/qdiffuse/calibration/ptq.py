"""Round-to-nearest PTQ: compute weight parameters, harden the weights, calibrate static activation ranges.

Weights are quantized first, so each activation range is measured on inputs that already carry the upstream
weight error, as they will at inference. The ``gptq`` methods round the integer weights with GPTQ instead of to
nearest (same grids, from the same observer): one float pass over the calibration set collects every layer's
input Hessian, then each weight is rounded against it (see :mod:`qdiffuse.calibration.gptq`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qdiffuse.calibration.collect import CalibrationSet
from qdiffuse.calibration.gptq import HessianAccumulator, gptq_round
from qdiffuse.formats import int_bounds
from qdiffuse.formats.spec import FormatSpec
from qdiffuse.models.denoiser import Denoiser
from qdiffuse.nn.layers import QuantConv2d, QuantLayer
from qdiffuse.nn.rewrite import activation_quantizers, quant_layers, set_quantization_enabled
from qdiffuse.progress import progress_bar

GPTQ_CHUNK_ELEMENTS = 2**22
"""Most elements of one unfolded input chunk fed to a Hessian (float64: 32 MiB), so a conv's ``[positions, C·kh·kw]``
view of a whole calibration batch is never materialised at once."""

GPTQ_DAMPS = (0.01, 0.1, 1.0)
"""Dampening tried in turn when a Hessian is too close to singular to factorise."""
HESSIAN_BUDGET = 4 * 2**30
"""Bytes of float64 Hessians one calibration pass accumulates at most (see :func:`calibrate_weights_gptq`)."""


def calibrate_weights(model: nn.Module) -> None:
    layers = list(quant_layers(model))
    with progress_bar("weights", len(layers)) as bar:
        for _, layer in layers:
            layer.calibrate_weight()
            layer.harden()
            bar.advance()


def gptq_supported(spec: FormatSpec) -> bool:
    """Weight formats GPTQ rounds: integer grids with one scale per output channel (others round to nearest)."""
    return spec.kind == "int" and spec.granularity == "channel"


def _split_geometry(layer: QuantLayer, channels: int) -> nn.Module:
    """A weightless (meta) Linear/Conv2d with ``layer``'s geometry and ``channels`` inputs: what
    :class:`HessianAccumulator` reads to build the Hessian of one input split."""
    if isinstance(layer, QuantConv2d):
        return nn.Conv2d(
            channels,
            layer.out_channels,
            layer.kernel_size,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=layer.groups,
            bias=False,
            padding_mode=layer.padding_mode,
            device="meta",
        )
    return nn.Linear(channels, layer.out_features, bias=False, device="meta")


def _accumulators(layer: QuantLayer) -> list[HessianAccumulator | None]:
    """One accumulator per input split whose weight GPTQ can round (None: that split rounds to nearest)."""
    if getattr(layer, "groups", 1) != 1:
        return [None] * len(layer.splits)
    return [
        HessianAccumulator(_split_geometry(layer, channels)) if gptq_supported(q.spec) else None
        for q, channels in zip(layer.weight_quantizers, layer.splits, strict=True)
    ]


def _add_chunked(acc: HessianAccumulator, x: Tensor, conv: bool) -> None:
    """``acc.add(x)`` in pieces of at most :data:`GPTQ_CHUNK_ELEMENTS` unfolded elements."""
    if conv:
        if x.dim() == 3:
            x = x.unsqueeze(0)
        per_sample = max(1, x.shape[2] * x.shape[3] * acc.columns)
        pieces = torch.split(x, max(1, GPTQ_CHUNK_ELEMENTS // per_sample), dim=0)
    else:
        rows = x.reshape(-1, x.shape[-1])
        pieces = torch.split(rows, max(1, GPTQ_CHUNK_ELEMENTS // acc.columns), dim=0)
    for piece in pieces:
        acc.add(piece)


def _hessian_hook(accs: list[HessianAccumulator | None]):
    def hook(layer: QuantLayer, args: tuple) -> None:
        if not args:
            return
        x = args[0].detach()
        if layer.input_treatment.active:
            x = layer.input_treatment.main_input(x)
        parts = (x,) if len(layer.splits) == 1 else torch.split(x, layer.splits, dim=layer.channel_dim)
        conv = isinstance(layer, QuantConv2d)
        for acc, part in zip(accs, parts, strict=True):
            if acc is not None:
                _add_chunked(acc, part, conv)

    return hook


def _round_gptq(part: Tensor, hessian: Tensor, quantizer: nn.Module) -> Tensor:
    spec = quantizer.spec
    qmin, qmax = int_bounds(spec.bits, spec.symmetric, spec.unsigned)
    hessian = hessian.to(part.device)
    for damp in GPTQ_DAMPS[:-1]:
        try:
            return gptq_round(part, hessian, quantizer.scale, quantizer.zero_point, qmin, qmax, damp=damp)
        except ValueError:
            continue
    return gptq_round(part, hessian, quantizer.scale, quantizer.zero_point, qmin, qmax, damp=GPTQ_DAMPS[-1])


@torch.no_grad()
def calibrate_weights_gptq(
    denoiser: Denoiser, calib: CalibrationSet, batch_size: int = 64, budget: int = HESSIAN_BUDGET
) -> None:
    """Observer grids for every weight, then GPTQ rounding onto them against float-model input Hessians.

    The Hessians come from passes over ``calib`` with every activation quantizer off. Splits whose format GPTQ
    does not support (and grouped convs) are rounded to nearest; layers the calibration never reaches get an
    all-zero Hessian, which GPTQ also rounds to nearest. Every weight ends up on its quantizer's grid and
    hardened, so saving encodes exactly the chosen codes.

    A Hessian is ``K × K`` float64 (K = C_in·k_h·k_w: 4.2 GB for one 2560-channel 3×3 conv of an SD-size UNet), so
    the layers are taken in module order in groups whose Hessians fit ``budget`` bytes, one calibration pass per
    group; each group is rounded before the next group's pass, so a later layer's Hessian sees the earlier
    layers' rounded weights (GPTQ's own sequential order). A model whose Hessians fit together takes one pass and
    every Hessian sees the float weights.
    """
    model = denoiser.model
    layers = list(quant_layers(model))
    with progress_bar("weight ranges", len(layers)) as bar:
        for _, layer in layers:
            layer.calibrate_weight()
            bar.advance()
    groups = _hessian_groups(layers, budget)
    with progress_bar("gptq", len(layers)) as bar:
        for group in groups:
            hessians = {n: accs for n, _, accs in group if accs is not None}
            if hessians:
                handles = [layer.register_forward_pre_hook(_hessian_hook(hessians[n])) for n, layer, _ in group
                           if n in hessians]
                set_quantization_enabled(model, False)
                try:
                    calib.run_through(denoiser, batch_size, "hessians")
                finally:
                    for handle in handles:
                        handle.remove()
                    set_quantization_enabled(model, True)
            for name, layer, _ in group:
                accs = hessians.pop(name, None)
                if accs is None:
                    layer.harden()
                    bar.advance()
                    continue
                parts = layer.weight_parts(layer.weight.detach())
                rounded = [
                    q(part) if acc is None else _round_gptq(part, acc.hessian, q)
                    for q, part, acc in zip(layer.weight_quantizers, parts, accs, strict=True)
                ]
                del accs
                layer.weight.copy_(rounded[0] if len(rounded) == 1 else torch.cat(rounded, dim=1))
                layer.weight_hardened = True
                bar.advance()


def _hessian_groups(
    layers: list[tuple[str, QuantLayer]], budget: int
) -> list[list[tuple[str, QuantLayer, list[HessianAccumulator | None] | None]]]:
    """Consecutive layers whose float64 Hessians together stay within ``budget`` bytes (a layer larger than the
    budget alone is a group of its own); each with its accumulators (None: no split GPTQ supports)."""
    groups: list[list] = [[]]
    used = 0
    for name, layer in layers:
        accs = _accumulators(layer)
        if not any(a is not None for a in accs):
            groups[-1].append((name, layer, None))
            continue
        size = sum(8 * a.columns**2 for a in accs if a is not None)
        if used and used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append((name, layer, accs))
        used += size
    return [g for g in groups if g]


@torch.no_grad()
def calibrate_activations(denoiser: Denoiser, calib: CalibrationSet, batch_size: int = 64) -> None:
    quantizers = [q for _, q in activation_quantizers(denoiser.model) if q.needs_calibration]
    for q in quantizers:
        q.start_calibration()
    calib.run_through(denoiser, batch_size, "activation ranges")
    with progress_bar("range search", len(quantizers)) as bar:
        for q in quantizers:
            q.finish_calibration()
            bar.advance()


def calibrate_ptq(denoiser: Denoiser, calib: CalibrationSet, batch_size: int = 64, gptq: bool = False) -> None:
    """Weights (round to nearest, or GPTQ with ``gptq``), then static activation ranges."""
    if gptq:
        calibrate_weights_gptq(denoiser, calib, batch_size)
    else:
        calibrate_weights(denoiser.model)
    calibrate_activations(denoiser, calib, batch_size)


__all__ = ["calibrate_ptq", "calibrate_weights", "calibrate_weights_gptq", "calibrate_activations", "gptq_supported"]
