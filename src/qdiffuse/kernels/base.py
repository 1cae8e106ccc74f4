"""What every weight kernel offers a real layer, and how an activation becomes the kernels' uint8 codes.

A kernel owns one part of a layer's weight (a layer with shortcut splitting has two parts) in its execution
layout and computes that part's output. Integer kernels take the input as uint8 codes with one scale and zero
point; the codes come from :func:`activation_codes`, which rounds exactly like the simulated quantizer, so the
integer accumulation sees the same integers the simulated path multiplies in float.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from qdiffuse.formats import int_bounds, quantize_int
from qdiffuse.nn.quantizer import ActivationQuantizer, SwitchableActivationQuantizer, dynamic_qparams


@dataclass(frozen=True)
class ActCodes:
    """uint8 codes ``u`` of an activation with ``x ≈ (u - zero_point) * scale``; ``out_dtype`` is the float dtype
    the activation had, which the layer's output takes (a bf16 model gets bf16 back from an integer kernel)."""

    codes: Tensor
    scale: float
    zero_point: int
    out_dtype: torch.dtype = torch.float32


class WeightKernel:
    """One weight part in execution layout and the op that consumes it.

    ``run`` takes the part's float input and its activation quantizer (None: the input stays in floating
    point); ``signed_codes``/``storage_codes`` give the weight's codes back, so a real model saves the same
    folder a simulated one does.
    """

    name: str = "kernel"

    def run(self, x: Tensor, quantizer: ActivationQuantizer | None, bias: Tensor | None) -> Tensor:
        raise NotImplementedError

    def signed_codes(self) -> Tensor:
        raise NotImplementedError

    def storage_codes(self, qmin: int) -> Tensor:
        """The codes as :meth:`WeightQuantizer.encode` writes them (uint8, offset to start at 0)."""
        return (self.signed_codes().to(torch.int16) - qmin).to(torch.uint8)

    @property
    def nbytes(self) -> int:
        raise NotImplementedError


class IntegerKernel(WeightKernel):
    """A kernel whose op multiplies uint8 activation codes by integer weight codes."""

    def run(self, x: Tensor, quantizer: ActivationQuantizer | None, bias: Tensor | None) -> Tensor:
        if quantizer is None:
            raise RuntimeError(f"{self.name} needs a quantized input")
        return self.run_codes(activation_codes(quantizer, x), bias)

    def run_codes(self, x: ActCodes, bias: Tensor | None) -> Tensor:
        raise NotImplementedError


def active_quantizer(quantizer: nn.Module) -> ActivationQuantizer:
    """The quantizer that applies now (a switchable one's active variant)."""
    if isinstance(quantizer, SwitchableActivationQuantizer):
        return quantizer.variants[quantizer.active]
    if not isinstance(quantizer, ActivationQuantizer):
        raise TypeError(f"not an activation quantizer: {type(quantizer).__name__}")
    return quantizer


def variant_quantizers(quantizer: nn.Module | None) -> list[ActivationQuantizer]:
    """Every grid an input may be quantized on: a switchable quantizer's variants, else the one quantizer."""
    if quantizer is None:
        return []
    if isinstance(quantizer, SwitchableActivationQuantizer):
        return list(quantizer.variants.values())
    return [quantizer]


@dataclass(frozen=True)
class IntParams:
    """An integer activation grid as plain numbers: ``u = clamp(round(x / scale) + zero_point, qmin, qmax) +
    offset`` lies in uint8 and ``x ≈ (u − zero_point − offset) · scale``."""

    scale: float
    zero_point: int
    qmin: int
    qmax: int
    offset: int


STATIC_PARAMS = "_qdiffuse_int_params"
"""Attribute under which :func:`pin_static_params` keeps a static quantizer's :class:`IntParams`."""


def int_params(quantizer: ActivationQuantizer, x: Tensor) -> IntParams:
    """The grid ``x`` is quantized on: a static quantizer's pinned numbers, or a dynamic one's from ``x``."""
    pinned = quantizer.__dict__.get(STATIC_PARAMS)
    if pinned is not None:
        return pinned
    spec = quantizer.spec
    qmin, qmax = int_bounds(spec.bits, spec.symmetric, spec.unsigned)
    scale_t, zp_t = dynamic_qparams(x.detach(), spec) if quantizer.dynamic else (quantizer.scale, quantizer.zero_point)
    zero_point = 0 if zp_t is None else int(zp_t)
    return IntParams(float(scale_t), zero_point, qmin, qmax, 128 if qmin < 0 else 0)


def pin_static_params(model: nn.Module) -> None:
    """Read every static integer activation grid once into plain numbers.

    Reading a tensor scale into a Python number on every call is a device sync and, under ``torch.compile``, a
    graph break; the numbers of a calibrated static grid never change, so real layers read them from here.
    Call it again after changing a quantizer's parameters.
    """
    for module in model.modules():
        if isinstance(module, ActivationQuantizer) and not module.dynamic and module.spec.kind == "int":
            module.__dict__.pop(STATIC_PARAMS, None)
            if module.scale is not None:
                module.__dict__[STATIC_PARAMS] = int_params(module, module.scale)


def activation_codes(quantizer: ActivationQuantizer, x: Tensor) -> ActCodes:
    """uint8 codes of ``x`` for an integer per-tensor quantizer of at most 8 bits.

    Signed grids are shifted by 128 (zero point with them), so every integer grid of up to 8 bits maps onto
    uint8 without changing ``u - zero_point``.
    """
    p = int_params(quantizer, x)
    q = quantize_int(x, p.scale, p.zero_point, p.qmin, p.qmax)
    if p.offset:
        q.add_(p.offset)
    return ActCodes(q.to(torch.uint8), p.scale, p.zero_point + p.offset, x.dtype)


__all__ = [
    "ActCodes",
    "IntParams",
    "WeightKernel",
    "IntegerKernel",
    "active_quantizer",
    "activation_codes",
    "variant_quantizers",
    "int_params",
    "pin_static_params",
]
