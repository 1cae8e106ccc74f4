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
- **Rotation** (QuaRot): ``W x = (W H)(H x)`` for an orthonormal (block-)Hadamard ``H`` over the input channels
  spreads one channel's outlier over all channels of its block; a fast Walsh–Hadamard transform per call.
- **Low-rank branch** (SVDQuant): the (smoothed, rotated) weight is split as ``L1 L2 + R``; the top-``r``
  singular directions run in float on the unquantized input, only the residual ``R``, whose range the outliers
  no longer set, is quantized.

Unset buffers mean "nothing to do", so layers and folders without a treatment behave and load as before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qdiffuse.formats import broadcast_along
from qdiffuse.formats.hadamard import hadamard_transform
from qdiffuse.formats.lowrank import lowrank_apply_conv2d, lowrank_apply_linear, lowrank_macs, lowrank_split


class InputTreatment(nn.Module):
    """Per-layer smoothing vector and floating-point outlier channels (all buffers None until set)."""

    def __init__(self, channel_dim: int) -> None:
        super().__init__()
        self.channel_dim = channel_dim
        self.register_buffer("smooth", None)
        self.register_buffer("fp_index", None)
        self.register_buffer("fp_weight", None)
        self.register_buffer("rotation", None)
        self.register_buffer("lowrank_down", None)
        self.register_buffer("lowrank_up", None)

    @property
    def active(self) -> bool:
        return any(b is not None for b in (self.smooth, self.fp_index, self.rotation, self.lowrank_up))

    def main_input(self, x: Tensor) -> Tensor:
        """The input the quantized product sees: divided by the smoothing vector, outlier channels zeroed; in
        ``x``'s dtype (the float32 buffers are cast, so a bf16 model's input stays bf16)."""
        if self.smooth is not None:
            x = x / broadcast_along(self.smooth.to(x.dtype), x, self.channel_dim)
        if self.fp_index is not None:
            x = x.index_fill(self.channel_dim, self.fp_index, 0.0)
        if self.rotation is not None:
            x = hadamard_transform(x, int(self.rotation), self.channel_dim)
        return x

    def fp_output(self, x: Tensor, layer: nn.Module, main: Tensor | None = None) -> Tensor | None:
        """What the layer computes in float besides its quantized product: the outlier channels' share (from the
        raw input ``x``) and the low-rank branch (from ``main``, the treated input before quantization)."""
        out = None
        if self.fp_index is not None:
            out = layer_op(layer, x.index_select(self.channel_dim, self.fp_index), self.fp_weight.to(x.dtype))
        if self.lowrank_up is not None:
            main = self.main_input(x) if main is None else main
            up = self.lowrank_up.to(main.dtype)
            down = self.lowrank_down.to(main.dtype).reshape(up.shape[1], -1)
            if hasattr(layer, "kernel_size"):
                padding = layer.padding
                if getattr(layer, "padding_mode", "zeros") != "zeros":
                    main = F.pad(main, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
                    padding = 0
                branch = lowrank_apply_conv2d(main, up, down, layer.kernel_size, layer.stride, padding, layer.dilation)
            else:
                branch = lowrank_apply_linear(main, up, down)
            out = branch if out is None else out + branch
        return out

    @torch.no_grad()
    def install(
        self,
        weight: Tensor,
        smooth: Tensor | None,
        fp_index: Tensor | None,
        rotation: int = 0,
        rank: int = 0,
    ) -> Tensor:
        """Set the treatment on a layer whose float weight is ``weight``; returns the weight the quantizer must
        quantize from now on (columns multiplied by ``smooth``, outlier columns zeroed, rotated, less its
        low-rank part)."""
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
            new.mul_(broadcast_along(s, new, 1))
        if rotation:
            self.rotation = torch.tensor(rotation, dtype=torch.long)
            new = hadamard_transform(new, rotation, 1)
        if rank:
            l1, l2, residual = lowrank_split(new, rank)
            self.lowrank_up = l1.float().contiguous()
            self.lowrank_down = l2.reshape(l2.shape[0], *new.shape[1:]).float().contiguous()
            new = residual
        return new

    def fp_macs_per_position(self, out_channels: int, kernel_elements: int) -> int:
        """Float MACs per output position of the outlier channels and the low-rank branch."""
        macs = 0 if self.fp_index is None else out_channels * int(self.fp_index.numel()) * kernel_elements
        if self.lowrank_up is not None:
            macs += lowrank_macs(out_channels, self.lowrank_down[0].numel(), self.lowrank_up.shape[1], 1)
        return macs

    def describe(self) -> str:
        parts = []
        if self.smooth is not None:
            parts.append(f"smoothed (max s {float(self.smooth.max()):.3g})")
        if self.fp_index is not None:
            parts.append(f"{int(self.fp_index.numel())} outlier channels in FP")
        if self.rotation is not None:
            parts.append(f"Hadamard-rotated (block {int(self.rotation)})")
        if self.lowrank_up is not None:
            parts.append(f"rank-{self.lowrank_up.shape[1]} FP branch")
        return ", ".join(parts) or "none"


def layer_op(layer: nn.Module, x: Tensor, weight: Tensor) -> Tensor:
    """The layer's own linear op (its stride, padding, dilation for a conv) on ``x`` with ``weight``, no bias."""
    if hasattr(layer, "kernel_size"):
        if getattr(layer, "padding_mode", "zeros") != "zeros":
            x = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode)
            return F.conv2d(x, weight, None, layer.stride, 0, layer.dilation)
        return F.conv2d(x, weight, None, layer.stride, layer.padding, layer.dilation)
    return F.linear(x, weight)


__all__ = ["InputTreatment", "layer_op"]
