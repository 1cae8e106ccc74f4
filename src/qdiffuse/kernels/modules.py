"""The real layer: a quantized Linear or Conv2d that holds packed weights and runs them on a kernel.

It keeps the calibrated quantizer modules of the layer it replaces (``weight_quantizers`` hold the weight
scales, ``input_quantizers`` the activation ranges and, for step-aware precision, the active variant), so its
state-dict keys, the saved folder and ``set_activation_variant`` are the same as for the simulated layer; only
the float weight is gone, replaced by one :class:`WeightKernel` per input split.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qdiffuse.errors import ModelLoadError
from qdiffuse.kernels.base import WeightKernel, active_quantizer


def split_weight_shapes(layer: nn.Module) -> list[tuple[int, ...]]:
    """Weight shape of each input split of a quantized Linear/Conv2d, simulated or real."""
    if hasattr(layer, "kernel_size"):
        full = (layer.out_channels, layer.in_channels // layer.groups, *layer.kernel_size)
    else:
        full = (layer.out_features, layer.in_features)
    return [(full[0], s, *full[2:]) for s in layer.splits]


class RealLayer(nn.Module):
    """Sum over input splits of kernel(split input, split weight), plus the bias."""

    def __init__(self, layer: nn.Module, kernels: list[WeightKernel], device: torch.device) -> None:
        super().__init__()
        self.device_type = device.type
        self.op_kind = "conv2d" if hasattr(layer, "kernel_size") else "linear"
        for attr in (
            "weight_spec", "act_spec", "splits", "channel_dim", "in_features", "out_features", "in_channels",
            "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode",
            "_reversed_padding_repeated_twice",
        ):
            if hasattr(layer, attr):
                setattr(self, attr, getattr(layer, attr))
        self.weight_quantizers = layer.weight_quantizers
        self.input_quantizers = layer.input_quantizers
        self.bias = layer.bias
        self.input_treatment = layer.input_treatment
        self.kernels = kernels
        self.weight_hardened = True

    @property
    def kernel_names(self) -> list[str]:
        return [k.name for k in self.kernels]

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != self.device_type:
            raise ModelLoadError(
                f"this quantized layer's kernels hold their weights on {self.device_type}, the input is on "
                f"{x.device.type}: load the folder again with device={x.device.type!r} instead of moving the model"
            )
        treatment = self.input_treatment
        fp = None
        if treatment.active:
            main = treatment.main_input(x)
            fp = treatment.fp_output(x, self, main)
            x = main
        parts = [x] if len(self.splits) == 1 else list(torch.split(x, self.splits, dim=self.channel_dim))
        has_input_q = len(self.input_quantizers) > 0
        out: Tensor | None = None
        for k, (kernel, part) in enumerate(zip(self.kernels, parts, strict=True)):
            quantizer = active_quantizer(self.input_quantizers[k]) if has_input_q else None
            y = kernel.run(part, quantizer, self.bias if k == 0 else None)
            out = y if out is None else out + y
        assert out is not None
        return out if fp is None else out + fp

    def storage_codes(self, k: int) -> Tensor:
        """Split ``k``'s codes as the simulated layer's ``WeightQuantizer.encode`` gives them."""
        from qdiffuse.formats import int_bounds

        spec = self.weight_spec
        qmin = int_bounds(spec.bits, spec.symmetric, spec.unsigned)[0] if spec.kind == "int" else 0
        return self.kernels[k].storage_codes(qmin)

    def packed_bytes(self) -> int:
        """Bytes of the weights as held in memory (codes in execution layout plus their scales)."""
        return sum(k.nbytes for k in self.kernels)

    def extra_repr(self) -> str:
        return f"{self.op_kind}, kernels={self.kernel_names}"


__all__ = ["RealLayer", "split_weight_shapes"]
