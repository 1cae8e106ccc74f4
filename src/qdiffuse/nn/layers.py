"""Quantized drop-ins for nn.Linear and nn.Conv2d.

Both keep the original parameters and call the same functional op, so a rewritten model computes exactly what
the original did when quantization is disabled. The input channels can be split into ranges with their own
quantizers (Q-Diffusion's shortcut splitting): a UNet up-block concatenates deep features and skip features whose
ranges differ by an order of magnitude, and one shared range would waste most of the grid on one of them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qdiffuse.formats.spec import FormatSpec
from qdiffuse.nn.quantizer import WeightQuantizer, make_activation_quantizer
from qdiffuse.outliers.treatment import InputTreatment


class QuantLayer(nn.Module):
    """Shared logic of the quantized Linear and Conv2d: per-split weight and input quantizers."""

    weight: nn.Parameter
    bias: nn.Parameter | None

    def __init__(
        self,
        weight_spec: FormatSpec,
        act_spec: FormatSpec | None,
        splits: tuple[int, ...],
        observer: str,
        dynamic: bool,
        channel_dim: int,
        act_variants: dict[str, FormatSpec] | None = None,
    ) -> None:
        super().__init__()
        self.weight_spec = weight_spec
        self.act_spec = act_spec
        self.splits = splits
        self.channel_dim = channel_dim
        self.weight_quantizers = nn.ModuleList(WeightQuantizer(weight_spec, observer) for _ in splits)
        self.input_quantizers = (
            nn.ModuleList(
                make_activation_quantizer(act_spec, observer, dynamic, channel_dim, act_variants) for _ in splits
            )
            if act_spec is not None
            else nn.ModuleList()
        )
        self.input_treatment = InputTreatment(channel_dim)
        self.weight_hardened = False
        self.quant_enabled = True

    def treat_input(
        self, smooth: Tensor | None, fp_index: Tensor | None, rotation: int = 0, rank: int = 0
    ) -> None:
        """Smooth the input and/or take outlier channels out of the quantized product (see
        :class:`InputTreatment`); call before the weight is calibrated, on the float weight."""
        if self.weight_hardened:
            raise RuntimeError("input treatment must be set before the weight is quantized")
        with torch.no_grad():
            self.weight.data = self.input_treatment.install(self.weight, smooth, fp_index, rotation, rank)

    def weight_parts(self, weight: Tensor) -> list[Tensor]:
        return list(torch.split(weight, self.splits, dim=1))

    def calibrate_weight(self) -> None:
        for quantizer, part in zip(self.weight_quantizers, self.weight_parts(self.weight), strict=True):
            quantizer.calibrate(part)

    def quantized_weight(self) -> Tensor:
        parts = [q(p) for q, p in zip(self.weight_quantizers, self.weight_parts(self.weight), strict=True)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def harden(self) -> None:
        """Replace the float weight by its quantized values, so inference skips the weight quantizer."""
        with torch.no_grad():
            self.weight.copy_(self.quantized_weight())
        self.weight_hardened = True

    def effective_weight(self) -> Tensor:
        if not self.quant_enabled or self.weight_hardened:
            return self.weight
        return self.quantized_weight()

    def quantize_input(self, x: Tensor) -> Tensor:
        if not self.quant_enabled or len(self.input_quantizers) == 0:
            return x
        if len(self.splits) == 1:
            return self.input_quantizers[0](x)
        parts = torch.split(x, self.splits, dim=self.channel_dim)
        return torch.cat([q(p) for q, p in zip(self.input_quantizers, parts, strict=True)], dim=self.channel_dim)

    def op(self, x: Tensor, weight: Tensor) -> Tensor:
        """The layer's operation with the given (already quantized or FP) input and weight."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        treatment = self.input_treatment
        if not treatment.active:
            return self.op(self.quantize_input(x), self.effective_weight())
        main = treatment.main_input(x)
        out = self.op(self.quantize_input(main), self.effective_weight())
        fp = treatment.fp_output(x, self, main)
        return out if fp is None else out + fp

    def add_to_bias(self, delta: Tensor) -> None:
        """Shift the bias by ``delta`` (one value per output channel), creating a bias if the layer had none."""
        with torch.no_grad():
            if self.bias is None:
                self.bias = nn.Parameter(torch.zeros_like(delta, dtype=self.weight.dtype))
            self.bias.add_(delta.to(self.bias.dtype))

    def bits_label(self) -> str:
        act = self.act_spec.describe() if self.act_spec else "fp"
        if self.input_quantizers and hasattr(self.input_quantizers[0], "variants"):
            act = "|".join(q.spec.describe() for q in self.input_quantizers[0].variants.values())
        split = f" split{list(self.splits)}" if len(self.splits) > 1 else ""
        return f"W:{self.weight_spec.describe()} A:{act}{split}"


class QuantLinear(QuantLayer):
    """nn.Linear with quantized weight and input; inputs may be [..., features]."""

    def __init__(
        self,
        linear: nn.Linear,
        weight_spec: FormatSpec,
        act_spec: FormatSpec | None,
        observer: str = "minmax",
        dynamic: bool = False,
        split_at: int | None = None,
        act_variants: dict[str, FormatSpec] | None = None,
    ) -> None:
        splits = _splits(linear.in_features, split_at)
        super().__init__(weight_spec, act_spec, splits, observer, dynamic, -1, act_variants)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias

    def op(self, x: Tensor, weight: Tensor) -> Tensor:
        return F.linear(x, weight, self.bias)


class QuantConv2d(QuantLayer):
    """nn.Conv2d with quantized weight and input ([N, C, H, W])."""

    def __init__(
        self,
        conv: nn.Conv2d,
        weight_spec: FormatSpec,
        act_spec: FormatSpec | None,
        observer: str = "minmax",
        dynamic: bool = False,
        split_at: int | None = None,
        act_variants: dict[str, FormatSpec] | None = None,
    ) -> None:
        if conv.groups != 1 and split_at:
            split_at = None
        splits = _splits(conv.in_channels // conv.groups, split_at)
        super().__init__(weight_spec, act_spec, splits, observer, dynamic, 1, act_variants)
        self.in_channels = conv.in_channels
        self.out_channels = conv.out_channels
        self.kernel_size = conv.kernel_size
        self.stride = conv.stride
        self.padding = conv.padding
        self.dilation = conv.dilation
        self.groups = conv.groups
        self.padding_mode = conv.padding_mode
        self._reversed_padding_repeated_twice = conv._reversed_padding_repeated_twice
        self.weight = conv.weight
        self.bias = conv.bias

    def op(self, x: Tensor, weight: Tensor) -> Tensor:
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def _splits(channels: int, split_at: int | None) -> tuple[int, ...]:
    if split_at is None or not 0 < split_at < channels:
        return (channels,)
    return (split_at, channels - split_at)


__all__ = ["QuantLayer", "QuantLinear", "QuantConv2d"]
