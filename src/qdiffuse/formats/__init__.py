"""Number formats: pure tensor functions (no modules, no state) for integer, FP8, FP4 and QuaRTZ quantization.

Everything here works on any float dtype and device and keeps autograd working through the
straight-through estimator, so the same functions serve calibration, reconstruction and export.
:func:`fake_quantize` is the one entry point that turns a :class:`FormatSpec` and its parameters into
quantize-dequantize.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from qdiffuse.errors import ConfigError, DataError
from qdiffuse.formats.checks import check_finite
from qdiffuse.formats.fp4 import (
    E2M1_MAX,
    E2M1_VALUES,
    MXFP4_BLOCK,
    NVFP4_BLOCK,
    e2m1_decode,
    e2m1_encode,
    fake_quant_mxfp4,
    fake_quant_nvfp4,
    mxfp4_dequantize,
    mxfp4_quantize,
    nvfp4_dequantize,
    nvfp4_global_scale,
    nvfp4_quantize,
    round_e2m1,
)
from qdiffuse.formats.fp8 import FP8_DTYPES, FP8_MAX, dequantize_fp8, fake_quant_fp8, fp8_scale, quantize_fp8
from qdiffuse.formats.integer import (
    SCALE_MIN,
    dequantize_int,
    fake_quant_int,
    int_bounds,
    int_qparams,
    quantize_int,
)
from qdiffuse.formats.pack import codes_to_unsigned, pack_bits, unpack_bits, unsigned_to_codes
from qdiffuse.formats.quartz import (
    effective_bits,
    fake_quant_quartz,
    lzs,
    lzs_decode,
    lzs_encode,
    quartz_decode,
    quartz_encode,
    quartz_scale,
    search_quartz_scale,
)
from qdiffuse.formats.spec import FormatSpec
from qdiffuse.formats.ste import round_ste

__all__ = [
    "E2M1_MAX",
    "E2M1_VALUES",
    "FP8_DTYPES",
    "FP8_MAX",
    "MXFP4_BLOCK",
    "NVFP4_BLOCK",
    "SCALE_MIN",
    "FormatSpec",
    "check_finite",
    "codes_to_unsigned",
    "dequantize_fp8",
    "dequantize_int",
    "e2m1_decode",
    "e2m1_encode",
    "fake_quant_fp8",
    "fake_quant_int",
    "broadcast_along",
    "fake_quant_mxfp4",
    "fake_quant_nvfp4",
    "fake_quant_quartz",
    "effective_bits",
    "lzs",
    "lzs_decode",
    "lzs_encode",
    "quartz_decode",
    "quartz_encode",
    "quartz_scale",
    "search_quartz_scale",
    "fake_quantize",
    "fp8_scale",
    "group_view",
    "int_bounds",
    "int_qparams",
    "mxfp4_dequantize",
    "mxfp4_quantize",
    "nvfp4_dequantize",
    "nvfp4_global_scale",
    "nvfp4_quantize",
    "pack_bits",
    "quantize_fp8",
    "quantize_int",
    "round_e2m1",
    "round_ste",
    "ungroup_view",
    "unpack_bits",
    "unsigned_to_codes",
]


def broadcast_along(values: Tensor, like: Tensor, dim: int) -> Tensor:
    """One value per index of ``like``'s dimension ``dim`` (a per-channel scale, a per-sample gain), shaped, typed
    and placed to multiply ``like``."""
    shape = [1] * like.dim()
    shape[dim] = values.numel()
    return values.to(dtype=like.dtype, device=like.device).reshape(shape)


def group_view(x: Tensor, group_size: int) -> Tensor:
    """``x`` of shape ``[C, ...]`` as ``[C, n_groups, group_size]`` over its flattened non-channel dimensions.

    Groups of consecutive input values share one range (per-group quantization); the last group is padded
    with zeros when the flattened length is not a multiple of ``group_size`` (zeros never widen a range that
    already contains 0, and every integer range does). :func:`ungroup_view` strips the padding again.
    """
    if group_size < 1:
        raise ConfigError(f"group size {group_size} is not positive; use e.g. group_size=64")
    if x.dim() == 0:
        raise DataError("per-group quantization needs a tensor with a channel axis; reshape scalars to [1]")
    flat = x.reshape(x.shape[0], -1)
    pad = (-flat.shape[1]) % group_size
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.reshape(x.shape[0], -1, group_size)


def ungroup_view(g: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """Inverse of :func:`group_view`: ``[C, n_groups, group_size]`` back to ``shape`` (padding stripped)."""
    shape = tuple(shape)
    numel = math.prod(shape[1:]) if shape else 1
    if g.dim() != 3 or g.shape[0] != (shape[0] if shape else 1) or g.shape[1] * g.shape[2] < numel:
        raise DataError(
            f"grouped tensor of shape {tuple(g.shape)} cannot hold shape {shape}; pass the original shape"
        )
    return g.reshape(g.shape[0], -1)[:, :numel].reshape(shape)


def fake_quantize(
    x: Tensor, spec: FormatSpec, scale: Tensor | None = None, zero_point: Tensor | None = None
) -> Tensor:
    """Quantize-dequantize ``x`` in the format ``spec`` with the given parameters (STE gradients).

    * ``int``: ``scale`` (and ``zero_point``, 0 when omitted) as produced by an observer for the spec's
      granularity: scalars, ``[C, 1, ...]`` per channel, or ``[C, n_groups, 1]`` against ``group_view(x)``
      for ``group`` (the grouping is done here).
    * ``fp8_e4m3``/``fp8_e5m2``: ``scale`` (same shapes; ``group`` also uses the grouped view).
    * ``nvfp4``: ``scale`` is the optional per-tensor global scale (computed from ``x`` when omitted).
    * ``mxfp4``: no parameters; block exponents come from the data.
    * ``quartz``: ``scale`` holds the stage-1 scales against ``[..., n_groups, group_size]`` (taken from the data
      when omitted).

    nvfp4/mxfp4/quartz blocks run along the last dimension of ``x``.
    """
    if spec.kind == "quartz":
        return fake_quant_quartz(
            x, scale, spec.group_size, spec.lzs_group, spec.rounding, spec.unsigned, fit_lzs=spec.fit_lzs
        )
    if spec.kind == "mxfp4":
        return fake_quant_mxfp4(x)
    if spec.kind == "nvfp4":
        return fake_quant_nvfp4(x, scale)
    if scale is None:
        raise ConfigError(
            f"format {spec.describe()} needs a scale; calibrate an observer and pass its "
            "compute_qparams() result"
        )
    grouped = spec.granularity == "group"
    view = group_view(x, spec.group_size) if grouped else x
    if spec.kind == "int":
        qmin, qmax = int_bounds(spec.bits, spec.symmetric, spec.unsigned)
        out = fake_quant_int(view, scale, 0.0 if zero_point is None else zero_point, qmin, qmax)
    else:
        out = fake_quant_fp8(view, scale, spec.kind)
    return ungroup_view(out, x.shape) if grouped else out
