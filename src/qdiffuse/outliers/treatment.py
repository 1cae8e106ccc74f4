"""What a quantized layer does to its input before the quantizer sees it: smoothing and outlier channels.

Both are exact rewrites of the layer in floating point, chosen per layer from calibration data
(:mod:`qdiffuse.outliers.auto`):

- **Smoothing** (SmoothQuant): ``W x = (W · diag(s)) (x / s)``. Dividing input channel ``j`` by ``s_j`` and
  multiplying weight column ``j`` by it moves a channel's range from the activation grid, which is one range per
  tensor, to the weight grid, which has one range per output channel and copes better. The division is one
  elementwise pass over the input, the same in the simulated and the real runtime.
- **Outlier channels in floating point** (LLM.int8()'s decomposition): a few input channels whose range no grid
  shared with the others can hold are taken out of the quantized product (their input and weight columns are
  zero there) and computed in float32 by a narrow matmul/conv of their own, added to the output. It costs
  ``k / C`` of the layer's MACs in float.

Unset buffers mean "nothing to do", so layers and folders without a treatment behave and load as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class InputTreatment(nn.Module):
    """Per-layer smoothing vector and floating-point outlier channels (all buffers None until set)."""

    def __init__(self, channel_dim: int) -> None:
        super().__init__()
        self.channel_dim = channel_dim
        self.register_buffer("smooth", None)
        self.register_buffer("fp_index", None)
        self.register_buffer("fp_weight", None)

    @property
    def active(self) -> bool:
        return self.smooth is not None or self.fp_index is not None

    def _per_channel(self, values: Tensor, x: Tensor) -> Tensor:
        shape = [1] * x.dim()
        shape[self.channel_dim] = values.numel()
        return values.to(x.dtype).reshape(shape)

    def main_input(self, x: Tensor) -> Tensor:
        """The input the quantized product sees: divided by the smoothing vector, outlier channels zeroed."""
        if self.smooth is not None:
            x = x / self._per_channel(self.smooth, x)
        if self.fp_index is not None:
            x = x.index_fill(self.channel_dim, self.fp_index, 0.0)
        return x

    def fp_output(self, x: Tensor, layer: nn.Module) -> Tensor | None:
        """The outlier channels' share of the output, in float (None without outlier channels)."""
        if self.fp_index is None:
            return None
        part = x.index_select(self.channel_dim, self.fp_index)
        weight = self.fp_weight.to(part.dtype)
        if hasattr(layer, "kernel_size"):
            if getattr(layer, "padding_mode", "zeros") != "zeros":
                part = F.pad(part, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
                return F.conv2d(part, weight, None, layer.stride, 0, layer.dilation)
            return F.conv2d(part, weight, None, layer.stride, layer.padding, layer.dilation)
        return F.linear(part, weight)

    @torch.no_grad()
    def install(self, weight: Tensor, smooth: Tensor | None, fp_index: Tensor | None) -> Tensor:
        """Set the treatment on a layer whose float weight is ``weight``; returns the weight the quantizer must
        quantize from now on (columns multiplied by ``smooth``, outlier columns zeroed)."""
        new = weight.detach().clone()
        if fp_index is not None and fp_index.numel():
            self.fp_index = fp_index.to(torch.long)
            self.fp_weight = new.index_select(1, self.fp_index).float().clone()
            new.index_fill_(1, self.fp_index, 0.0)
        if smooth is not None:
            s = smooth.detach().float().clone()
            if self.fp_index is not None:
                s[self.fp_index] = 1.0
            self.smooth = s
            shape = [1] * new.dim()
            shape[1] = -1
            new.mul_(s.reshape(shape).to(new.dtype))
        return new

    def fp_macs_per_position(self, out_channels: int, kernel_elements: int) -> int:
        """Float MACs per output position of the outlier branch."""
        return 0 if self.fp_index is None else out_channels * int(self.fp_index.numel()) * kernel_elements

    def describe(self) -> str:
        parts = []
        if self.smooth is not None:
            parts.append(f"smoothed (max s {float(self.smooth.max()):.3g})")
        if self.fp_index is not None:
            parts.append(f"{int(self.fp_index.numel())} outlier channels in FP")
        return ", ".join(parts) or "none"


__all__ = ["InputTreatment"]
