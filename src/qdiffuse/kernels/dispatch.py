"""Which kernel runs each part of a quantized layer: an ordered table of backends, the first that accepts wins.

Each backend says in words why it does not apply (wrong device, format, shape...), so a layer that ends on the
fallback carries the reasons. Methods and calibration never see this table: they produce quantizer parameters
and codes; the table turns those into kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qdiffuse.formats import int_bounds
from qdiffuse.formats.spec import FormatSpec
from qdiffuse.kernels.base import WeightKernel, variant_quantizers
from qdiffuse.kernels.cpu_int8 import (
    IM2COL_MIN_REDUCTION,
    NO_VNNI_MAX_WEIGHT_BITS,
    Int4Conv2d,
    Int4Linear,
    Int4PrepackConv2d,
    OnednnConv2d,
    OnednnLinear,
    has_vnni,
    onednn_available,
)
from qdiffuse.kernels.cuda_fp8 import Fp8RowwiseLinear, fp8_gemm_capable
from qdiffuse.kernels.dequant import DequantKernel
from qdiffuse.nn.quantizer import WeightQuantizer


@dataclass
class Part:
    """One input split of a layer, with everything a backend needs to decide and to build."""

    layer: nn.Module
    weight_quantizer: WeightQuantizer
    input_quantizer: nn.Module | None
    storage_codes: Tensor
    weight_shape: tuple[int, ...]
    device: torch.device

    @property
    def is_conv(self) -> bool:
        return hasattr(self.layer, "kernel_size")

    @property
    def spec(self) -> FormatSpec:
        return self.weight_quantizer.spec

    def signed_codes(self) -> Tensor:
        spec = self.spec
        qmin = int_bounds(spec.bits, spec.symmetric, spec.unsigned)[0]
        # uint8 addition wraps modulo 256, so adding qmin mod 256 and reading the bytes as int8 is code + qmin
        # without a wider temporary (a large weight is loaded one byte per code).
        return (self.storage_codes + qmin % 256).view(torch.int8).reshape(self.weight_shape)

    def weight_scale(self) -> Tensor:
        return self.weight_quantizer.scale.reshape(-1)


def _int8_problem(part: Part, max_weight_bits: int = 8) -> str | None:
    """Why integer kernels cannot run this part (None: they can)."""
    spec = part.spec
    if part.device.type != "cpu":
        return f"no integer kernel for {part.device.type}"
    if not onednn_available():
        return "this torch build has no oneDNN quantized ops"
    if spec.kind != "int" or spec.granularity != "channel" or not spec.symmetric or spec.bits > max_weight_bits:
        return f"weights {spec.describe()} are not symmetric per-channel integers of <= {max_weight_bits} bits"
    if spec.bits > NO_VNNI_MAX_WEIGHT_BITS and not has_vnni():
        return (
            f"this CPU has no VNNI, and oneDNN's INT8 sums saturate at 16 bits for weights over "
            f"{NO_VNNI_MAX_WEIGHT_BITS} bits"
        )
    acts = variant_quantizers(part.input_quantizer)
    if not acts:
        return "the input stays in floating point (weight-only or an fp input)"
    for q in acts:
        a = q.spec
        if a.kind != "int" or a.granularity != "tensor" or a.bits > 8:
            return f"activations {a.describe()} are not per-tensor integers of <= 8 bits"
    if part.is_conv and getattr(part.layer, "padding_mode", "zeros") != "zeros":
        return f"padding mode {part.layer.padding_mode!r}"
    return None


def _conv_geometry(layer: nn.Module) -> tuple:
    return tuple(layer.stride), tuple(layer.padding), tuple(layer.dilation)


def _reduction(part: Part) -> int:
    return part.weight_shape[1] * (part.weight_shape[2] * part.weight_shape[3] if part.is_conv else 1)


def _int4_packed_problem(part: Part) -> str | None:
    problem = _int8_problem(part, max_weight_bits=4)
    if problem:
        return problem
    if part.is_conv and part.layer.groups != 1 and _reduction(part) >= IM2COL_MIN_REDUCTION:
        return "grouped wide convolution (im2col handles groups 1)"
    if (part.weight_shape[0] * _reduction(part)) % 2:
        return "odd number of weights"
    uses_int_mm = not part.is_conv or _reduction(part) >= IM2COL_MIN_REDUCTION
    if uses_int_mm and not has_vnni():
        return "this CPU has no VNNI, where torch._int_mm is slower than FP32 (oneDNN takes it, one byte per weight)"
    return None


def _fp8_problem(part: Part) -> str | None:
    if part.is_conv:
        return "no FP8 convolution kernel"
    if not fp8_gemm_capable(part.device):
        return "FP8 GEMMs need a CUDA GPU of compute capability >= 8.9"
    if part.spec.kind != "fp8_e4m3" or part.spec.granularity != "channel":
        return f"weights {part.spec.describe()} are not per-channel e4m3"
    acts = variant_quantizers(part.input_quantizer)
    if len(acts) != 1 or acts[0].spec.kind != "fp8_e4m3" or acts[0].dynamic:
        return "the input is not a static per-tensor e4m3 activation"
    if part.weight_shape[0] % 16 or part.weight_shape[1] % 16:
        return "_scaled_mm needs dimensions that are multiples of 16"
    return None


def _build_onednn(part: Part) -> WeightKernel:
    if part.is_conv:
        stride, padding, dilation = _conv_geometry(part.layer)
        return OnednnConv2d(part.signed_codes(), part.weight_scale(), stride, padding, dilation, part.layer.groups)
    return OnednnLinear(part.signed_codes(), part.weight_scale())


def _build_int4(part: Part) -> WeightKernel:
    if part.is_conv and _reduction(part) < IM2COL_MIN_REDUCTION:
        return Int4PrepackConv2d(
            part.signed_codes(), part.weight_scale(), *_conv_geometry(part.layer), part.layer.groups
        )
    if part.is_conv:
        return Int4Conv2d(part.signed_codes(), part.weight_scale(), *_conv_geometry(part.layer))
    return Int4Linear(part.signed_codes(), part.weight_scale())


def _build_fp8(part: Part) -> WeightKernel:
    return Fp8RowwiseLinear(part.storage_codes.reshape(part.weight_shape), part.weight_scale())


def float_op(layer: nn.Module) -> Callable[[Tensor, Tensor, Tensor | None], Tensor]:
    """The layer's float op with its geometry bound: (input, weight, bias) -> output."""
    if not hasattr(layer, "kernel_size"):
        return F.linear
    stride, padding, dilation, groups = layer.stride, layer.padding, layer.dilation, layer.groups
    if getattr(layer, "padding_mode", "zeros") != "zeros":
        mode, pad = layer.padding_mode, layer._reversed_padding_repeated_twice

        def padded_conv(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
            return F.conv2d(F.pad(x, pad, mode=mode), w, b, stride, 0, dilation, groups)

        return padded_conv

    def conv(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        return F.conv2d(x, w, b, stride, padding, dilation, groups)

    return conv


def _build_dequant(part: Part) -> WeightKernel:
    return DequantKernel(
        part.storage_codes, part.spec.value_bits, part.weight_quantizer, part.weight_shape, float_op(part.layer)
    )


@dataclass(frozen=True)
class Backend:
    name: str
    problem: Callable[[Part], str | None]
    build: Callable[[Part], WeightKernel]


BACKENDS: tuple[Backend, ...] = (
    Backend("fp8-rowwise", _fp8_problem, _build_fp8),
    Backend("int4-packed", _int4_packed_problem, _build_int4),
    Backend("onednn-int8", _int8_problem, _build_onednn),
)
"""Real kernels in order of preference; a part no backend accepts runs on :data:`FALLBACK`."""

FALLBACK = Backend("dequant-fallback", lambda part: None, _build_dequant)

KERNEL_WEIGHT_KINDS = ("int", "fp8_e4m3")
"""Weight formats some backend above can run (on some device); others (NVFP4, MXFP4, QuaRTZ) always fall back."""


def select_kernel(part: Part) -> tuple[WeightKernel, list[str]]:
    """The first backend that accepts ``part`` builds its kernel; the reasons of those that refused come back
    when the part ends on the fallback."""
    reasons: list[str] = []
    for backend in BACKENDS:
        problem = backend.problem(part)
        if problem is None:
            return backend.build(part), []
        reasons.append(f"{backend.name}: {problem}")
    if part.spec.kind not in KERNEL_WEIGHT_KINDS:
        return FALLBACK.build(part), [
            f"no real kernel takes {part.spec.describe()} weights yet; their packed codes are decoded on every call"
        ]
    # A backend made for another weight format says nothing useful about this part.
    relevant = [r for r in reasons if ": weights " not in r]
    return FALLBACK.build(part), relevant or reasons[-1:]


def available() -> dict[str, bool]:
    """Which real backends this machine can run at all."""
    cuda = torch.cuda.is_available()
    return {
        "onednn-int8 (CPU; 8-bit weights need VNNI)": onednn_available(),
        "int4-packed (CPU, torch._int_mm with VNNI)": hasattr(torch, "_int_mm") and has_vnni(),
        "fp8-rowwise (CUDA, sm >= 8.9)": cuda and fp8_gemm_capable(torch.device("cuda")),
    }


__all__ = ["Part", "Backend", "BACKENDS", "FALLBACK", "select_kernel", "available", "float_op"]
