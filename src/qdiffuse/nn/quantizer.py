"""Quantizer modules: the stateful wrappers around the pure format functions.

A weight is seen once, so its quantizer computes every parameter (scales, zero points, block scales) from the
weight and can then encode it to integer codes and decode it back exactly: that is what a saved model stores.
An activation stream is seen many times, so its quantizer accumulates statistics while calibrating and then
applies fixed parameters (static), or recomputes them on every call (dynamic). Blockwise formats (NVFP4, MXFP4)
always take their block scales from the data, along the dimension the matmul reduces over.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from qdiffuse.errors import ConfigError, DataError
from qdiffuse.formats import (
    FP8_DTYPES,
    check_finite,
    dequantize_fp8,
    e2m1_decode,
    e2m1_encode,
    fake_quant_int,
    fake_quantize,
    group_view,
    int_bounds,
    int_qparams,
    nvfp4_global_scale,
    pack_bits,
    round_e2m1,
    ungroup_view,
    unpack_bits,
)
from qdiffuse.formats.fp8 import FP8_MAX
from qdiffuse.formats.quartz import (
    FLAG_BITS,
    fake_quant_quartz,
    quartz_decode,
    quartz_encode,
    quartz_scale,
    search_quartz_scale,
)
from qdiffuse.formats.spec import FormatSpec
from qdiffuse.observers import make_observer

E4M3 = torch.float8_e4m3fn
HALF_DTYPES = (torch.bfloat16, torch.float16)
"""Compute dtypes whose quantizer arithmetic is done in float32 (scales, divisions, rounding)."""


class WeightQuantizer(nn.Module):
    """Quantizes one weight tensor with parameters computed once from it.

    Buffers after :meth:`calibrate`: ``scale`` and ``zero_point`` (int: per tensor/channel/group; fp8: scale),
    ``block_scale`` (nvfp4: e4m3-valued per 16-block scale, with ``scale`` the fp32 tensor scale; mxfp4: the
    power-of-two block scale; quartz: ``scale`` the stage-1 scales ``[C, n_groups, 1]`` and, once the weight is
    encoded, ``lzs_flags``, the LZS flags packed three bits each: they are part of the stored code, since 4-bit
    codes alone cannot say how far to shift).
    """

    def __init__(self, spec: FormatSpec, observer: str = "minmax") -> None:
        super().__init__()
        self.spec = spec
        self.observer = observer
        self.register_buffer("scale", None)
        self.register_buffer("zero_point", None)
        self.register_buffer("block_scale", None)
        self.register_buffer("lzs_flags", None)

    @property
    def calibrated(self) -> bool:
        return self.scale is not None or self.block_scale is not None

    def calibrate(self, weight: Tensor) -> None:
        """Find this weight's quantization parameters (the observer decides the clipping range)."""
        w = weight.detach().float()
        check_finite(w, "weight")
        spec = self.spec
        if spec.kind == "mxfp4":
            blocks = _blocks(w, spec.block_size)
            amax = blocks.abs().amax(dim=-1, keepdim=True)
            exponent = torch.floor(torch.log2(amax.clamp_min(2.0**-127))) - 2
            self.block_scale = torch.exp2(exponent.clamp(-127, 127))
            return
        if spec.kind == "quartz":
            rows = w.reshape(w.shape[0], -1)
            args = (spec.group_size, spec.lzs_group, spec.rounding, spec.unsigned, spec.fit_lzs)
            self.scale = search_quartz_scale(rows, *args) if self.observer == "mse" else quartz_scale(
                rows, spec.group_size, spec.unsigned, spec.fit_lzs
            )
            self.lzs_flags = None
            return
        obs = make_observer(self.observer, spec)
        obs.update(w)
        scale, zero_point = obs.compute_qparams()
        if spec.kind == "nvfp4":
            self.scale = scale.float().reshape(())
            blocks = _blocks(w, spec.block_size)
            amax = blocks.abs().amax(dim=-1, keepdim=True)
            self.block_scale = (amax / 6.0 / self.scale).clamp(max=448.0).to(E4M3).float()
            return
        self.scale = scale.float()
        self.zero_point = zero_point.float() if zero_point is not None else None

    def _require(self) -> None:
        if not self.calibrated:
            raise RuntimeError("weight quantizer used before calibrate()")

    def forward(self, weight: Tensor) -> Tensor:
        """Fake-quantize ``weight`` with the stored parameters (differentiable through the STE), computed in
        float32 and returned in ``weight``'s dtype: the values a bf16 model multiplies are the float32 grid's,
        rounded once to bf16, exactly what a real kernel's decoded weight is."""
        self._require()
        if weight.dtype in HALF_DTYPES:
            return self._fake_quant(weight.float()).to(weight.dtype)
        return self._fake_quant(weight)

    def _fake_quant(self, weight: Tensor) -> Tensor:
        spec = self.spec
        if spec.kind in ("nvfp4", "mxfp4"):
            blocks = _blocks(weight, spec.block_size)
            step = self._block_step().to(weight.dtype)
            safe = torch.where(step > 0, step, torch.ones_like(step))
            out = torch.where(step > 0, round_e2m1(blocks / safe) * step, torch.zeros_like(blocks))
            return _unblocks(out, weight.shape)
        if spec.kind == "quartz":
            rows = weight.reshape(weight.shape[0], -1)
            return fake_quantize(rows, spec, self.scale).reshape(weight.shape)
        if spec.granularity == "group":
            grouped = group_view(weight, spec.group_size)
            out = fake_quantize(grouped, _as_tensor_spec(spec), self.scale, self.zero_point)
            return ungroup_view(out, weight.shape)
        return fake_quantize(weight, spec, self.scale, self.zero_point)

    def _block_step(self) -> Tensor:
        if self.spec.kind == "nvfp4":
            return self.block_scale * self.scale
        return self.block_scale

    def encode(self, weight: Tensor) -> Tensor:
        """Integer codes of ``weight`` (uint8, offset to start at 0; fp8 as its raw bytes)."""
        self._require()
        spec = self.spec
        w = weight.detach().float()
        if spec.kind in ("nvfp4", "mxfp4"):
            blocks = _blocks(w, spec.block_size)
            step = self._block_step()
            safe = torch.where(step > 0, step, torch.ones_like(step))
            values = torch.where(step > 0, round_e2m1(blocks / safe), torch.zeros_like(blocks))
            return e2m1_encode(values)
        if spec.kind == "quartz":
            rows = w.reshape(w.shape[0], -1)
            args = (spec.group_size, spec.lzs_group, spec.rounding, spec.unsigned)
            codes, flags = quartz_encode(rows, self.scale, *args)
            self.lzs_flags = pack_bits(flags, FLAG_BITS)
            return codes
        if spec.kind.startswith("fp8"):
            view = group_view(w, spec.group_size) if spec.granularity == "group" else w
            scaled = (view / self.scale).clamp(-FP8_MAX[spec.kind], FP8_MAX[spec.kind])
            return scaled.to(FP8_DTYPES[spec.kind]).view(torch.uint8)
        qmin, qmax = int_bounds(spec.bits, spec.symmetric, spec.unsigned)
        view = group_view(w, spec.group_size) if spec.granularity == "group" else w
        zp = self.zero_point if self.zero_point is not None else torch.zeros_like(self.scale)
        codes = torch.clamp(torch.round(view / self.scale) + zp, qmin, qmax) - qmin
        return codes.to(torch.uint8)

    def decode(self, codes: Tensor, shape: torch.Size) -> Tensor:
        """Weights from :meth:`encode`'s codes, equal to ``forward(weight)`` bit for bit."""
        self._require()
        spec = self.spec
        if spec.kind in ("nvfp4", "mxfp4"):
            out = e2m1_decode(codes) * self._block_step()
            return _unblocks(out, shape)
        if spec.kind == "quartz":
            if self.lzs_flags is None:
                raise RuntimeError("QuaRTZ codes decoded before encode() recorded their flags")
            n_flags = codes.shape[-1] // spec.lzs_group
            flags = unpack_bits(self.lzs_flags, FLAG_BITS, codes.shape[0] * n_flags).reshape(codes.shape[0], n_flags)
            numel_row = math.prod(shape[1:])
            args = (spec.group_size, spec.lzs_group, spec.unsigned)
            return quartz_decode(codes, flags, self.scale, numel_row, *args).reshape(shape)
        if spec.kind.startswith("fp8"):
            values = dequantize_fp8(codes.view(FP8_DTYPES[spec.kind]), self.scale)
            return ungroup_view(values, shape) if spec.granularity == "group" else values.reshape(shape)
        qmin, _ = int_bounds(spec.bits, spec.symmetric, spec.unsigned)
        zp = self.zero_point if self.zero_point is not None else torch.zeros_like(self.scale)
        values = (codes.float() + qmin - zp) * self.scale
        return ungroup_view(values, shape) if spec.granularity == "group" else values.reshape(shape)

    def code_shape(self, shape: torch.Size) -> tuple[int, ...]:
        """Shape of :meth:`encode`'s output for a weight of ``shape``."""
        if self.spec.kind in ("nvfp4", "mxfp4"):
            return tuple(_blocks(torch.empty(shape, device="meta"), self.spec.block_size).shape)
        if self.spec.kind == "quartz":
            g = self.spec.group_size
            return (shape[0], -(-math.prod(shape[1:]) // g) * g)
        if self.spec.granularity == "group":
            return tuple(group_view(torch.empty(shape, device="meta"), self.spec.group_size).shape)
        return tuple(shape)


class ActivationQuantizer(nn.Module):
    """Quantizes an activation stream; static (calibrated ranges) or dynamic (range per call).

    ``block_dim`` is the dimension a following matmul reduces over (channels of a conv input, features of a
    linear input); blockwise formats put their blocks along it.
    """

    def __init__(
        self, spec: FormatSpec, observer: str = "minmax", dynamic: bool = False, block_dim: int = -1
    ) -> None:
        super().__init__()
        if spec.granularity != "tensor" and spec.kind in ("fp8_e4m3", "fp8_e5m2"):
            raise ConfigError(
                f"activation format {spec.describe()} is not per tensor; FP8 activations use granularity 'tensor'"
            )
        if spec.kind == "quartz" and spec.unsigned:
            raise ConfigError(
                "unsigned QuaRTZ activations would clip every negative input to 0; use the signed variant"
            )
        if spec.kind == "int" and spec.granularity not in ("tensor", "group"):
            raise ConfigError(
                f"activation format {spec.describe()} is per channel; integer activations are per tensor or per "
                "group (e.g. group_size=32: one range per token and 32 consecutive channels, found per call)"
            )
        self.spec = spec
        self.observer = observer
        self.dynamic = dynamic
        self.block_dim = block_dim
        self.enabled = True
        self._observer = None
        self.register_buffer("scale", None)
        self.register_buffer("zero_point", None)

    @property
    def grouped(self) -> bool:
        """Integer ranges per token and group of channels, always from the data (nothing to calibrate)."""
        return self.spec.kind == "int" and self.spec.granularity == "group"

    @property
    def needs_calibration(self) -> bool:
        return not self.dynamic and self.spec.kind != "mxfp4" and not self.grouped

    @property
    def calibrated(self) -> bool:
        return self.scale is not None or not self.needs_calibration

    def start_calibration(self) -> None:
        if not self.needs_calibration:
            self._observer = None
        elif self.spec.kind == "quartz":
            self._observer = ChannelAbsMax(self.block_dim)
        else:
            self._observer = make_observer(self.observer, self.spec)

    def finish_calibration(self) -> None:
        if self._observer is None:
            return
        if isinstance(self._observer, ChannelAbsMax):
            spec = self.spec
            self.scale = quartz_scale(self._observer.amax()[None], spec.group_size, fit_lzs=spec.fit_lzs)[0].float()
            self.zero_point = None
            self._observer = None
            return
        try:
            scale, zero_point = self._observer.compute_qparams()
        except DataError:
            raise DataError(
                "an activation quantizer saw no calibration data; the calibration set does not reach every "
                "quantized layer (check --labels/--guidance) or is empty"
            ) from None
        self.scale = scale.float()
        self.zero_point = zero_point.float() if zero_point is not None else None
        self._observer = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        if self._observer is not None:
            self._observer.update(x.detach())
            return x
        if x.dtype in HALF_DTYPES:  # the grid in float32 (see quantize_int), the result in the model's dtype
            return self._fake_quant(x.float()).to(x.dtype)
        return self._fake_quant(x)

    def _fake_quant(self, x: Tensor) -> Tensor:
        spec = self.spec
        if spec.kind in ("nvfp4", "mxfp4"):
            moved = x.movedim(self.block_dim, -1)
            scale = self.scale
            if spec.kind == "nvfp4" and (self.dynamic or scale is None):
                scale = nvfp4_global_scale(x.detach().abs().amax())
            return fake_quantize(moved, spec, scale).movedim(-1, self.block_dim)
        if self.grouped:
            return grouped_fake_quant(x, spec, self.block_dim)
        if spec.kind == "quartz":
            dim = self.block_dim % x.dim()
            scale = None
            if not self.dynamic:
                if self.scale is None:
                    raise RuntimeError("static activation quantizer used before calibration")
                scale = self.scale.reshape(-1, 1, *([1] * (x.dim() - 1 - dim)))
            return fake_quant_quartz(
                x, scale, spec.group_size, spec.lzs_group, spec.rounding, dim=dim, fit_lzs=spec.fit_lzs
            )
        if self.dynamic:
            scale, zero_point = dynamic_qparams(x.detach(), spec)
        else:
            if self.scale is None:
                raise RuntimeError("static activation quantizer used before calibration")
            scale, zero_point = self.scale, self.zero_point
        return fake_quantize(x, spec, scale.to(x.dtype), None if zero_point is None else zero_point.to(x.dtype))


class ChannelAbsMax:
    """Running largest |x| per channel along ``dim``: the static QuaRTZ activation range, one stage-1 scale per
    group of channels shared by every token."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._amax: Tensor | None = None

    def update(self, x: Tensor) -> None:
        check_finite(x, "calibration data")
        amax = x.detach().float().abs().movedim(self.dim, -1).reshape(-1, x.shape[self.dim]).amax(dim=0)
        self._amax = amax if self._amax is None else torch.maximum(self._amax, amax)

    def amax(self) -> Tensor:
        if self._amax is None:
            raise DataError(
                "an activation quantizer saw no calibration data; the calibration set does not reach every "
                "quantized layer (check --labels/--guidance) or is empty"
            )
        return self._amax


class SwitchableActivationQuantizer(nn.Module):
    """Several calibrated activation formats for one stream, one active at a time (step-aware precision).

    PTQD's mixed precision shares the weights across steps and changes only the activation bit-width per
    step, so every variant is calibrated on the same data and the sampler switches between them.
    """

    def __init__(
        self, variants: dict[str, FormatSpec], active: str, observer: str, dynamic: bool, block_dim: int = -1
    ) -> None:
        super().__init__()
        self.variants = nn.ModuleDict(
            {k: ActivationQuantizer(v, observer, dynamic, block_dim) for k, v in variants.items()}
        )
        self.active = active

    @property
    def spec(self) -> FormatSpec:
        return self.variants[self.active].spec

    def forward(self, x: Tensor) -> Tensor:
        if any(q._observer is not None for q in self.variants.values()):
            for q in self.variants.values():
                q(x)
            return x
        return self.variants[self.active](x)


def make_activation_quantizer(
    spec: FormatSpec,
    observer: str,
    dynamic: bool,
    block_dim: int = -1,
    variants: dict[str, FormatSpec] | None = None,
) -> nn.Module:
    """A plain activation quantizer, or a switchable one when ``variants`` are given."""
    if variants:
        active = max(variants, key=lambda k: variants[k].value_bits)
        return SwitchableActivationQuantizer(variants, active, observer, dynamic, block_dim)
    return ActivationQuantizer(spec, observer, dynamic, block_dim)


def set_activation_variant(model: nn.Module, key: str) -> None:
    """Make variant ``key`` (e.g. ``"a4"``) active in every switchable quantizer of ``model``."""
    for module in model.modules():
        if isinstance(module, SwitchableActivationQuantizer):
            if key not in module.variants:
                raise ConfigError(f"activation variant {key!r} unknown; this model has {list(module.variants)}")
            module.active = key


def activation_variants(model: nn.Module) -> list[str]:
    for module in model.modules():
        if isinstance(module, SwitchableActivationQuantizer):
            return list(module.variants)
    return []


def grouped_fake_quant(x: Tensor, spec: FormatSpec, dim: int) -> Tensor:
    """Quantize ``x`` with one integer range per ``spec.group_size`` consecutive values along ``dim`` (the
    reduction dimension of the next matmul), ranges taken from the values themselves.

    At 4 bits one range per tensor leaves a token a handful of codes once any other token or channel is large;
    a range per token and group (SVDQuant's INT4 activations use groups of 64) keeps every group's own scale,
    for one scale per group in memory traffic.
    """
    moved = x.movedim(dim, -1)
    n = moved.shape[-1]
    g = spec.group_size
    pad = (-n) % g
    flat = torch.nn.functional.pad(moved, (0, pad)) if pad else moved
    groups = flat.reshape(*flat.shape[:-1], -1, g)
    detached = groups.detach()
    scale, zero_point = int_qparams(
        detached.amin(-1, keepdim=True), detached.amax(-1, keepdim=True), spec.bits, spec.symmetric, spec.unsigned
    )
    qmin, qmax = int_bounds(spec.bits, spec.symmetric, spec.unsigned)
    out = fake_quant_int(groups, scale.to(x.dtype), zero_point.to(x.dtype), qmin, qmax)
    out = out.reshape(flat.shape)[..., :n]
    return out.movedim(-1, dim)


def dynamic_qparams(x: Tensor, spec: FormatSpec) -> tuple[Tensor, Tensor | None]:
    if spec.kind == "int":
        return int_qparams(x.amin(), x.amax(), spec.bits, spec.symmetric, spec.unsigned)
    amax = x.abs().amax().clamp_min(torch.finfo(torch.float32).tiny)
    return amax / FP8_MAX[spec.kind], None


def _as_tensor_spec(spec: FormatSpec) -> FormatSpec:
    """The grouped view already carries the group axis; quantize it elementwise with its own scales."""
    return FormatSpec(kind=spec.kind, bits=spec.bits, symmetric=spec.symmetric, unsigned=spec.unsigned)


def _blocks(w: Tensor, block: int) -> Tensor:
    """[out, ...] -> [out, n_blocks, block] along the flattened input dims, zero-padded."""
    flat = w.reshape(w.shape[0], -1)
    pad = (-flat.shape[1]) % block
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.reshape(flat.shape[0], -1, block)


def _unblocks(blocks: Tensor, shape: torch.Size) -> Tensor:
    numel_row = 1
    for d in shape[1:]:
        numel_row *= d
    return blocks.reshape(blocks.shape[0], -1)[:, :numel_row].reshape(shape)


__all__ = [
    "WeightQuantizer",
    "ActivationQuantizer",
    "SwitchableActivationQuantizer",
    "make_activation_quantizer",
    "set_activation_variant",
    "activation_variants",
    "dynamic_qparams",
]
