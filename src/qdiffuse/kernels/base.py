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
    """uint8 codes ``u`` of an activation with ``x ≈ (u - zero_point) * scale``."""

    codes: Tensor
    scale: float
    zero_point: int


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


def activation_codes(quantizer: ActivationQuantizer, x: Tensor) -> ActCodes:
    """uint8 codes of ``x`` for an integer per-tensor quantizer of at most 8 bits.

    Signed grids are shifted by 128 (zero point with them), so every integer grid of up to 8 bits maps onto
    uint8 without changing ``u - zero_point``.
    """
    spec = quantizer.spec
    qmin, qmax = int_bounds(spec.bits, spec.symmetric, spec.unsigned)
    if quantizer.dynamic:
        scale_t, zp_t = dynamic_qparams(x.detach(), spec)
    else:
        scale_t, zp_t = quantizer.scale, quantizer.zero_point
    scale = float(scale_t)
    zero_point = 0 if zp_t is None else int(zp_t)
    offset = 128 if qmin < 0 else 0
    q = quantize_int(x, scale_t.to(x.dtype), zero_point, qmin, qmax)
    if offset:
        q.add_(offset)
    return ActCodes(q.to(torch.uint8), scale, zero_point + offset)


__all__ = ["ActCodes", "WeightKernel", "IntegerKernel", "active_quantizer", "activation_codes"]
