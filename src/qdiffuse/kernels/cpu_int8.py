"""INT8 × INT8 → INT32 kernels for x86 CPUs (VNNI): oneDNN's quantized conv and linear, and ``torch._int_mm``.

Measured on the development CPU (``benchmarks/kernel_candidates.py``, one thread): oneDNN's prepacked INT8 3×3
conv runs 3.8–4.7× faster than FP32 and its linear 4.1–4.6×, both with the exact integer sum and a float32
epilogue (``acc · s_x · s_w + bias``), so they compute what the simulated layer computes up to float rounding.
oneDNN wants its weights prepacked (a blocked int8 blob; prepacking a 1280×1280×3×3 conv costs 92 ms), so an 8-bit
weight lives in memory in that layout, one byte per weight.

4-bit weights stay two per byte and are unpacked per call. Linears then run on ``torch._int_mm`` (the uint8 input
is shifted to int8 by −128 and the shift is taken back with the weight's column sums). Wide convolutions
(``IM2COL_MIN_REDUCTION``) run as im2col + ``_int_mm``, whose k²-fold copy of the input is cheap next to their
GEMM; narrow ones unpack and prepack their small weight for oneDNN on every call (0.38 ms for 64×64×3×3, against
17 ms for the conv itself at batch 64, 32×32), which would cost more than the conv for a wide weight.

Both need AVX-512 VNNI. Without it (an AVX2-only CPU), oneDNN multiplies uint8 by int8 with
``vpmaddubsw``, which adds each pair of products in 16 bits and saturates: with 8-bit weights (2 · 255 · 127 >
32767) its sums are wrong (outputs off by 25% of their range in ``tests/test_kernels.py``), while with weights of at
most 7 bits (2 · 255 · 63 ≤ 32767) they stay exact; and ``torch._int_mm`` becomes a reference loop, 22–63× slower
than FP32 at M ≥ 512, while oneDNN's INT8 linear still runs 1.1–2.6× faster than FP32 there
(``python benchmarks/kernel_candidates.py --only linear``, BENCHMARKS.md "CPUs without VNNI"). :func:`has_vnni`
tells the dispatch which case it is in. CPUs with AVX-VNNI but no AVX-512 (not measured) count as without, as in
torch's own probe: the conservative side, correct and only possibly slower.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import Tensor

from qdiffuse.kernels.base import ActCodes, IntegerKernel
from qdiffuse.kernels.packing import pack_int4, unpack_int4

IM2COL_MIN_REDUCTION = 1024
"""Smallest C_in·k_h·k_w at which a W4 conv is run by im2col + ``_int_mm`` from packed nibbles."""


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qconv2d_pointwise")


NO_VNNI_MAX_WEIGHT_BITS = 7
"""Widest symmetric weight whose uint8 × int8 pair sums fit 16 bits: exact on oneDNN without VNNI."""


@functools.cache
def has_vnni() -> bool:
    """Whether this CPU has AVX-512 VNNI: exact 8-bit oneDNN sums and a fast ``torch._int_mm`` (module notes).
    torch's probe where it has one, else the same flag in ``/proc/cpuinfo``; unknown counts as without."""
    probe = getattr(torch.cpu, "_is_vnni_supported", None)
    if probe is not None:
        return bool(probe())
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags.split()


def _shift_to_int8(codes: Tensor) -> Tensor:
    """uint8 u -> int8 u − 128 (flipping the top bit is that subtraction in two's complement)."""
    return (codes ^ 128).view(torch.int8)


@torch.library.custom_op("qdiffuse::onednn_linear", mutates_args=())
def onednn_linear(
    codes: Tensor, x_scale: float, x_zero_point: int, packed: Tensor, weight_scale: Tensor, bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    """oneDNN INT8 linear on a prepacked weight, ``out_dtype`` out (float32, bf16 or fp16, written by oneDNN's
    epilogue itself). An op of its own so that inductor keeps it whole (its own lowering of oneDNN's quantized
    linear expects the weight it prepacked itself)."""
    return torch.ops.onednn.qlinear_pointwise(
        codes, x_scale, x_zero_point, packed, weight_scale, torch.zeros(weight_scale.shape[0], dtype=torch.long),
        _onednn_bias(bias), 1.0, 0, out_dtype, "none", [], "",
    )


@onednn_linear.register_fake
def _onednn_linear_shape(
    codes: Tensor, x_scale: float, x_zero_point: int, packed: Tensor, weight_scale: Tensor, bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    return codes.new_empty((codes.shape[0], weight_scale.shape[0]), dtype=out_dtype)


CONV_OUT_DTYPES = (torch.float32, torch.bfloat16)
"""Output dtypes oneDNN's INT8 convolution writes itself (fp16 is refused: its output is float32, then cast)."""


def _onednn_bias(bias: Tensor | None) -> Tensor | None:
    """oneDNN's epilogue reads a float32 or bf16 bias; an fp16 one is widened."""
    return bias if bias is None or bias.dtype in CONV_OUT_DTYPES else bias.float()


def _conv_dtype(out_dtype: torch.dtype) -> torch.dtype:
    return out_dtype if out_dtype in CONV_OUT_DTYPES else torch.float32


@torch.library.custom_op("qdiffuse::onednn_conv2d", mutates_args=())
def onednn_conv2d(
    codes: Tensor,
    x_scale: float,
    x_zero_point: int,
    packed: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    out_dtype: torch.dtype,
) -> Tensor:
    """oneDNN INT8 conv on a prepacked weight, ``out_dtype`` out (float32 or bf16; fp16 through float32) in
    channels-last layout (an op of its own, as above)."""
    out = torch.ops.onednn.qconv2d_pointwise(
        codes.contiguous(memory_format=torch.channels_last), x_scale, x_zero_point, packed, weight_scale,
        torch.zeros(weight_scale.shape[0], dtype=torch.long), _onednn_bias(bias), stride, padding, dilation, groups,
        1.0, 0, _conv_dtype(out_dtype), "none", [], "",
    )
    return out if out.dtype == out_dtype else out.to(out_dtype)


@onednn_conv2d.register_fake
def _onednn_conv2d_shape(
    codes: Tensor,
    x_scale: float,
    x_zero_point: int,
    packed: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    out_dtype: torch.dtype,
) -> Tensor:
    return _conv_out(codes, weight_scale.shape[0], kernel_size, stride, padding, dilation, out_dtype)


def _conv_out(
    codes: Tensor, out_channels: int, kernel_size: list[int], stride: list[int], padding: list[int],
    dilation: list[int], out_dtype: torch.dtype,
) -> Tensor:
    n, _, h, w = codes.shape
    h_out = (h + 2 * padding[0] - dilation[0] * (kernel_size[0] - 1) - 1) // stride[0] + 1
    w_out = (w + 2 * padding[1] - dilation[1] * (kernel_size[1] - 1) - 1) // stride[1] + 1
    out = codes.new_empty((n, out_channels, h_out, w_out), dtype=out_dtype)
    return out.contiguous(memory_format=torch.channels_last)


class OnednnConv2d(IntegerKernel):
    """Prepacked INT8 conv (per-output-channel weight scales), float32 output in channels-last layout."""

    name = "onednn-int8-conv"

    def __init__(
        self,
        codes: Tensor,
        weight_scale: Tensor,
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
        groups: int,
    ) -> None:
        self.shape = tuple(codes.shape)
        self.weight_scale = weight_scale.float().reshape(-1).contiguous()
        self.stride, self.padding, self.dilation, self.groups = list(stride), list(padding), list(dilation), groups
        # The prepacked blob does not depend on the activation scale; 1.0 / 0 are placeholders.
        self.packed = torch.ops.onednn.qconv_prepack(
            codes.contiguous(), self.weight_scale, 1.0, 0, self.stride, self.padding, self.dilation, groups, None
        )

    def run_codes(self, x: ActCodes, bias: Tensor | None) -> Tensor:
        return onednn_conv2d(
            x.codes, x.scale, x.zero_point, self.packed, self.weight_scale, bias, list(self.shape[2:]), self.stride,
            self.padding, self.dilation, self.groups, x.out_dtype,
        )

    def signed_codes(self) -> Tensor:
        return self.packed.to_dense().reshape(self.shape)

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + self.weight_scale.numel() * 4

    def __deepcopy__(self, memo: dict) -> OnednnConv2d:
        return OnednnConv2d(
            self.signed_codes(), self.weight_scale.clone(), self.stride, self.padding, self.dilation, self.groups
        )


class OnednnLinear(IntegerKernel):
    """Prepacked INT8 linear (per-output-channel weight scales), float32 output."""

    name = "onednn-int8-linear"

    def __init__(self, codes: Tensor, weight_scale: Tensor) -> None:
        self.shape = tuple(codes.shape)
        self.weight_scale = weight_scale.float().reshape(-1).contiguous()
        self.packed = torch.ops.onednn.qlinear_prepack(codes.contiguous(), None)

    def run_codes(self, x: ActCodes, bias: Tensor | None) -> Tensor:
        lead = x.codes.shape[:-1]
        codes = x.codes.reshape(-1, self.shape[1]).contiguous()
        return onednn_linear(
            codes, x.scale, x.zero_point, self.packed, self.weight_scale, bias, x.out_dtype
        ).reshape(
            *lead, self.shape[0]
        )

    def signed_codes(self) -> Tensor:
        return self.packed.to_dense().t().contiguous()

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + self.weight_scale.numel() * 4

    def __deepcopy__(self, memo: dict) -> OnednnLinear:
        return OnednnLinear(self.signed_codes(), self.weight_scale.clone())


@torch.library.custom_op("qdiffuse::conv_from_int8_codes", mutates_args=())
def conv_from_int8_codes(
    codes: Tensor,
    x_scale: float,
    x_zero_point: int,
    weight: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    out_dtype: torch.dtype,
) -> Tensor:
    """oneDNN INT8 conv from a plain int8 weight (prepacked inside). An op of its own because oneDNN's prepack
    has no fake-tensor kernel: this one has, so ``torch.compile`` traces through it."""
    packed = torch.ops.onednn.qconv_prepack(weight, weight_scale, 1.0, 0, stride, padding, dilation, groups, None)
    out = torch.ops.onednn.qconv2d_pointwise(
        codes.contiguous(memory_format=torch.channels_last), x_scale, x_zero_point, packed, weight_scale,
        torch.zeros(weight.shape[0], dtype=torch.long), _onednn_bias(bias), stride, padding, dilation, groups, 1.0, 0,
        _conv_dtype(out_dtype), "none", [], "",
    )
    return out if out.dtype == out_dtype else out.to(out_dtype)


@conv_from_int8_codes.register_fake
def _conv_from_int8_codes_shape(
    codes: Tensor,
    x_scale: float,
    x_zero_point: int,
    weight: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    out_dtype: torch.dtype,
) -> Tensor:
    return _conv_out(codes, weight.shape[0], list(weight.shape[2:]), stride, padding, dilation, out_dtype)


class Int4PrepackConv2d(IntegerKernel):
    """Narrow W4 conv: nibbles in memory, unpacked and prepacked for oneDNN on every call."""

    name = "int4-packed-onednn-conv"

    def __init__(
        self,
        codes: Tensor,
        weight_scale: Tensor,
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
        groups: int,
    ) -> None:
        self.shape = tuple(codes.shape)
        self.nibbles = pack_int4(codes.contiguous())
        self.weight_scale = weight_scale.float().reshape(-1).contiguous()
        self.stride, self.padding, self.dilation, self.groups = list(stride), list(padding), list(dilation), groups

    def run_codes(self, x: ActCodes, bias: Tensor | None) -> Tensor:
        return conv_from_int8_codes(
            x.codes, x.scale, x.zero_point, self.signed_codes(), self.weight_scale, bias, self.stride, self.padding,
            self.dilation, self.groups, x.out_dtype,
        )

    def signed_codes(self) -> Tensor:
        return unpack_int4(self.nibbles, self.shape)

    @property
    def nbytes(self) -> int:
        return self.nibbles.numel() + self.weight_scale.numel() * 4


class _Int4Matmul(IntegerKernel):
    """Shared state of the W4 kernels: a [K, N] int8 matrix held as nibbles, with its column sums."""


    def __init__(self, matrix_kn: Tensor, weight_scale: Tensor) -> None:
        self.kn_shape = tuple(matrix_kn.shape)
        self.nibbles = pack_int4(matrix_kn.contiguous())
        self.column_sums = matrix_kn.sum(dim=0, dtype=torch.int32)
        self.weight_scale = weight_scale.float().reshape(-1).contiguous()

    def matmul(self, rows_u8: Tensor, x: ActCodes, bias: Tensor | None) -> Tensor:
        """[M, K] uint8 codes @ W (+ bias) -> [M, N] in ``x.out_dtype``: the integer sum, then one
        scale-and-shift pass in float32.

        The input's shift by 128 and its zero point enter as a per-column constant that is folded into the
        bias, so the epilogue reads the int32 sums once."""
        acc = torch._int_mm(_shift_to_int8(rows_u8), unpack_int4(self.nibbles, self.kn_shape))
        scale = self.weight_scale * x.scale
        shift = -(x.zero_point - 128) * self.column_sums * scale
        if bias is not None:
            shift = shift + bias.float()
        out = torch.addcmul(shift, acc, scale)
        return out if out.dtype == x.out_dtype else out.to(x.out_dtype)

    @property
    def nbytes(self) -> int:
        return self.nibbles.numel() + self.column_sums.numel() * 4 + self.weight_scale.numel() * 4


class Int4Linear(_Int4Matmul):
    """W4 linear from packed nibbles: unpack, ``torch._int_mm``."""

    name = "int4-packed-int-mm-linear"

    def __init__(self, codes: Tensor, weight_scale: Tensor) -> None:
        self.shape = tuple(codes.shape)
        super().__init__(codes.t(), weight_scale)

    def run_codes(self, x: ActCodes, bias: Tensor | None) -> Tensor:
        lead = x.codes.shape[:-1]
        return self.matmul(x.codes.reshape(-1, self.shape[1]), x, bias).reshape(*lead, self.shape[0])

    def signed_codes(self) -> Tensor:
        return unpack_int4(self.nibbles, self.kn_shape).t().contiguous()


class Int4Conv2d(_Int4Matmul):
    """W4 conv (groups 1) from packed nibbles: im2col of the uint8 input, then ``torch._int_mm``."""

    name = "int4-packed-im2col-conv"

    def __init__(
        self, codes: Tensor, weight_scale: Tensor, stride: tuple[int, int], padding: tuple[int, int],
        dilation: tuple[int, int],
    ) -> None:
        self.shape = tuple(codes.shape)
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)
        out_ch, in_ch, kh, kw = self.shape
        # Rows of the reduction ordered (kh, kw, C_in) to match the channels-last patches.
        super().__init__(codes.permute(2, 3, 1, 0).reshape(kh * kw * in_ch, out_ch), weight_scale)

    def run_codes(self, x: ActCodes, bias: Tensor | None) -> Tensor:
        out_ch, in_ch, kh, kw = self.shape
        n = x.codes.shape[0]
        nhwc = x.codes.permute(0, 2, 3, 1)
        ph, pw = self.padding
        if ph or pw:  # padding holds the zero point, the code of 0.0
            padded = torch.full(
                (n, nhwc.shape[1] + 2 * ph, nhwc.shape[2] + 2 * pw, in_ch), x.zero_point, dtype=torch.uint8
            )
            padded[:, ph : ph + nhwc.shape[1], pw : pw + nhwc.shape[2]] = nhwc
            nhwc = padded
        (sh, sw), (dh, dw) = self.stride, self.dilation
        patches = nhwc.unfold(1, dh * (kh - 1) + 1, sh).unfold(2, dw * (kw - 1) + 1, sw)
        patches = patches[..., ::dh, ::dw]  # [N, H_out, W_out, C, kh, kw]
        h_out, w_out = patches.shape[1], patches.shape[2]
        rows = patches.permute(0, 1, 2, 4, 5, 3).reshape(n * h_out * w_out, kh * kw * in_ch)
        return self.matmul(rows, x, bias).view(n, h_out, w_out, out_ch).permute(0, 3, 1, 2)

    def signed_codes(self) -> Tensor:
        out_ch, in_ch, kh, kw = self.shape
        kn = unpack_int4(self.nibbles, self.kn_shape)
        return kn.reshape(kh, kw, in_ch, out_ch).permute(3, 2, 0, 1).contiguous()


__all__ = [
    "OnednnConv2d",
    "OnednnLinear",
    "Int4Linear",
    "Int4Conv2d",
    "Int4PrepackConv2d",
    "onednn_available",
    "has_vnni",
    "NO_VNNI_MAX_WEIGHT_BITS",
    "IM2COL_MIN_REDUCTION",
]
