"""The fallback kernel: weights held packed at their storage bit-width, decoded to float for each call.

Formats without an integer kernel on the device (FP8 on a CPU, NVFP4, MXFP4, per-group integers), weight-only
schemes and layers whose input stays in floating point compute exactly what the simulated path computes, but
keep the compact codes in memory instead of a float32 copy of the weight. The activation is fake-quantized as in
the simulated path. Every layer that lands here is reported as a fallback to simulated compute.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from qdiffuse.formats import pack_bits, unpack_bits
from qdiffuse.kernels.base import WeightKernel
from qdiffuse.nn.quantizer import ActivationQuantizer, WeightQuantizer


class DequantKernel(WeightKernel):
    name = "dequant-fallback"

    def __init__(
        self,
        storage_codes: Tensor,
        bits: int,
        quantizer: WeightQuantizer,
        weight_shape: tuple[int, ...],
        op: Callable[[Tensor, Tensor, Tensor | None], Tensor],
    ) -> None:
        self.code_shape = tuple(storage_codes.shape)
        self.bits = bits
        self.packed = pack_bits(storage_codes.contiguous(), bits) if bits < 8 else storage_codes.reshape(-1)
        self.quantizer = quantizer
        self.weight_shape = weight_shape
        self.op = op

    def _codes(self) -> Tensor:
        numel = math.prod(self.code_shape)
        raw = unpack_bits(self.packed, self.bits, numel) if self.bits < 8 else self.packed
        return raw.reshape(self.code_shape)

    def weight(self) -> Tensor:
        return self.quantizer.decode(self._codes(), torch.Size(self.weight_shape))

    def run(self, x: Tensor, quantizer: ActivationQuantizer | None, bias: Tensor | None) -> Tensor:
        if quantizer is not None:
            x = quantizer(x)
        return self.op(x, self.weight().to(x.dtype), bias)

    def storage_codes(self, qmin: int) -> Tensor:
        return self._codes()

    def signed_codes(self) -> Tensor:
        raise NotImplementedError("a fallback kernel keeps storage codes, not signed integers")

    @property
    def nbytes(self) -> int:
        buffers = [b for b in self.quantizer.buffers() if b is not None]
        return self.packed.numel() + sum(b.numel() * b.element_size() for b in buffers)


__all__ = ["DequantKernel"]
