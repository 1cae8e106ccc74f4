"""FP8 e4m3 linear on ``torch._scaled_mm``: row-wise weight scales, one static per-tensor activation scale.

Hopper and Ada GPUs run e4m3 GEMMs at twice the BF16 rate. The weight codes are the raw e4m3 values the
simulated path decodes; the activation is cast to e4m3 after dividing by its calibrated scale, exactly as the
simulated quantizer does, and ``_scaled_mm`` applies both scales in its float32 epilogue. The same call runs on a
CPU (slowly), which is how the tests check it against the simulated layer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qdiffuse.formats.fp8 import FP8_MAX
from qdiffuse.kernels.base import WeightKernel
from qdiffuse.nn.quantizer import ActivationQuantizer

E4M3 = torch.float8_e4m3fn


def fp8_gemm_capable(device: torch.device) -> bool:
    """A CUDA device with FP8 tensor cores (compute capability 8.9 or newer)."""
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 9)


class Fp8RowwiseLinear(WeightKernel):
    name = "fp8-rowwise-scaled-mm-linear"

    def __init__(self, codes: Tensor, weight_scale: Tensor) -> None:
        self.shape = tuple(codes.shape)
        self.weight_t = codes.view(E4M3).reshape(self.shape).t()  # [K, N], column-major as _scaled_mm wants
        self.weight_scale = weight_scale.float().reshape(1, -1).contiguous()

    def run(self, x: Tensor, quantizer: ActivationQuantizer | None, bias: Tensor | None) -> Tensor:
        if quantizer is None or quantizer.dynamic:
            raise RuntimeError(f"{self.name} needs a static FP8 input quantizer")
        lead = x.shape[:-1]
        scale = quantizer.scale.float().reshape(1, 1).to(x.device)
        rows = (x.reshape(-1, self.shape[1]).float() / scale).clamp(-FP8_MAX["fp8_e4m3"], FP8_MAX["fp8_e4m3"])
        out = torch._scaled_mm(
            rows.to(E4M3), self.weight_t, scale_a=scale.expand(rows.shape[0], 1).contiguous(),
            scale_b=self.weight_scale, out_dtype=torch.float32,
        )
        if bias is not None:
            out = out + bias
        return out.reshape(*lead, self.shape[0]).to(x.dtype)

    def signed_codes(self) -> Tensor:
        raise NotImplementedError("FP8 weights have no integer codes")

    def storage_codes(self, qmin: int) -> Tensor:
        return self.weight_t.t().contiguous().view(torch.uint8)

    @property
    def nbytes(self) -> int:
        return self.weight_t.numel() + self.weight_scale.numel() * 4


__all__ = ["Fp8RowwiseLinear", "fp8_gemm_capable"]
