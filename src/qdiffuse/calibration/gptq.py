"""GPTQ weight rounding (Frantar et al. 2022): a one-shot, gradient-free alternative to AdaRound reconstruction.

Round-to-nearest treats every weight on its own, but a layer's output error is ``ΔW X``, and when the inputs are
correlated the rounding error of one weight can be cancelled by nudging the weights that multiply correlated
inputs. GPTQ does this greedily with the layer's input Hessian ``H = 2/n · Σ x xᵀ``: it quantizes one input column
at a time and spreads that column's error over the columns not yet quantized, using the Cholesky factor of
``H⁻¹`` so each step is the optimal (OBS) update given the columns already fixed. It needs one pass over the
calibration inputs and a ``K × K`` factorisation per layer, versus thousands of Adam steps per block for AdaRound.

Everything here is a pure function of tensors: :class:`HessianAccumulator` turns a layer's float inputs into
``H``, and :func:`gptq_round` turns a float weight, ``H`` and the per-channel integer grid of the project's
weight quantizer into weights that lie exactly on that grid, so the existing encoder recovers the same codes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qdiffuse.formats.integer import quantize_int
from qdiffuse.nn.layers import QuantConv2d, QuantLinear

__all__ = ["HessianAccumulator", "gptq_round"]


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    if len(v) == 1:
        return (int(v[0]), int(v[0]))
    return (int(v[0]), int(v[1]))


def _accumulate_dtype(device: torch.device) -> torch.dtype:
    """float64 wherever it exists: a sum of many ``x xᵀ`` in float32 loses the small eigenvalues GPTQ relies on."""
    return torch.float32 if device.type == "mps" else torch.float64


class HessianAccumulator:
    """Running ``H = 2/n · Σ x xᵀ`` over the reduction dimension of one Linear or Conv2d layer.

    Only shapes and conv parameters are kept, not the layer, so a hook holding an accumulator does not keep the
    module (and its weights) alive. The columns of ``H`` follow ``weight.reshape(out, -1)``: for a conv each
    "input" is one ``C × kh × kw`` receptive field, extracted with the layer's own stride, padding and dilation,
    so ``H`` is exactly the Hessian of the conv's output error with respect to its flattened weight rows.
    """

    def __init__(self, layer: nn.Module) -> None:
        self._conv: dict[str, object] | None = None
        if isinstance(layer, (nn.Conv2d, QuantConv2d)):
            if layer.groups != 1:
                raise ValueError(
                    f"GPTQ needs a dense conv; this one has groups={layer.groups}, whose weight rows each see "
                    "only their own group of channels (quantize grouped/depthwise convs with round-to-nearest)"
                )
            kernel = _pair(layer.kernel_size)
            dilation = _pair(layer.dilation)
            pad_mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
            if isinstance(layer.padding, str):
                if layer.padding == "valid":
                    padding = (0, 0, 0, 0)
                else:  # "same", padded as conv2d pads it: an odd total puts the extra row/column last
                    th, tw = (d * (k - 1) for d, k in zip(dilation, kernel, strict=True))
                    padding = (tw // 2, tw - tw // 2, th // 2, th - th // 2)
            else:
                ph, pw = _pair(layer.padding)
                padding = (pw, pw, ph, ph)
            self._conv = {
                "kernel_size": kernel,
                "dilation": dilation,
                "stride": _pair(layer.stride),
                "pad": padding,
                "pad_mode": pad_mode,
            }
            self.in_channels: int = int(layer.in_channels)
            self.columns: int = self.in_channels * kernel[0] * kernel[1]
        elif isinstance(layer, (nn.Linear, QuantLinear)):
            self.in_channels = int(layer.in_features)
            self.columns = self.in_channels
        else:
            raise ValueError(
                f"GPTQ supports nn.Linear and nn.Conv2d layers (or their quantized drop-ins), not "
                f"{type(layer).__name__}"
            )
        self._sum: Tensor | None = None
        self._count = 0

    def _rows(self, x: Tensor) -> Tensor:
        """``x`` as ``[n, K]``: one row per output position, in the column order of the flattened weight."""
        if self._conv is None:
            if x.shape[-1] != self.in_channels:
                raise ValueError(
                    f"linear input has {x.shape[-1]} features, the layer expects {self.in_channels}; pass the "
                    "layer's input, not its output"
                )
            return x.reshape(-1, self.in_channels)
        if x.dim() == 3:
            x = x.unsqueeze(0)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"conv input of shape {tuple(x.shape)} is not [N, {self.in_channels}, H, W]; pass the layer's input"
            )
        conv = self._conv
        pad = conv["pad"]
        if any(pad):
            if conv["pad_mode"] == "constant":
                x = F.pad(x, pad)
            else:
                x = F.pad(x, pad, mode=conv["pad_mode"])
        cols = F.unfold(x, conv["kernel_size"], dilation=conv["dilation"], padding=0, stride=conv["stride"])
        return cols.transpose(1, 2).reshape(-1, self.columns)

    @torch.no_grad()
    def add(self, x: Tensor) -> None:
        """Fold a batch of the layer's float inputs into the running Hessian.

        The sum of ``x xᵀ`` over chunks is kept in float64 and only divided by the count when read, which is the
        same as a running mean but never rescales (and so never re-rounds) what was already accumulated: two
        halves give the same ``H`` as one batch.
        """
        rows = self._rows(x.detach())
        if rows.shape[0] == 0:
            return
        dtype = _accumulate_dtype(rows.device)
        if self._sum is None:
            self._sum = torch.zeros(self.columns, self.columns, dtype=dtype, device=rows.device)
        elif rows.device != self._sum.device:
            rows = rows.to(self._sum.device)
        # one chunk's product in float32 (2x faster than float64 on a CPU; a chunk is at most a few thousand
        # rows), the running sum over chunks in float64
        rows = rows.float()
        self._sum.add_(rows.T @ rows)
        self._count += rows.shape[0]

    @property
    def count(self) -> int:
        """Number of input vectors seen (tokens for a linear, output positions for a conv)."""
        return self._count

    @property
    def hessian(self) -> Tensor:
        """``2/n · Σ x xᵀ`` as float32 ``[K, K]``.

        All zeros before any input was seen: with no evidence about the inputs there is nothing to trade
        errors against, and :func:`gptq_round` then rounds to nearest.
        """
        if self._sum is None or self._count == 0:
            return torch.zeros(self.columns, self.columns, dtype=torch.float32)
        return (self._sum * (2.0 / self._count)).float()


def _per_column(t: Tensor | float | None, out: int, cols: int, like: Tensor, name: str) -> Tensor:
    """A scale/zero point as ``[out, 1]`` (per tensor or per channel) or ``[out, K]`` (one per weight element).

    The per-element form lets a caller with column-dependent grids (input splits, groups) expand them to the
    flattened weight and still get one GPTQ pass over all columns.
    """
    if t is None:
        return torch.zeros(1, 1, dtype=like.dtype, device=like.device)
    t = torch.as_tensor(t).detach().to(dtype=like.dtype, device=like.device)
    if t.numel() == 1:
        return t.reshape(1, 1)
    if t.numel() == out and t.shape[0] == out:
        return t.reshape(out, 1)
    if t.numel() == out * cols and t.shape[0] == out:
        return t.reshape(out, cols)
    raise ValueError(
        f"{name} of shape {tuple(t.shape)} is neither per tensor, per output channel ([{out}, 1, ...]) nor per "
        f"element ([{out}, {cols}]); expand group-wise parameters to the weight's shape first"
    )


def _cholesky_inverse_upper(hessian: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor of ``(H + λI)⁻¹``, whose rows are GPTQ's error-feedback coefficients.

    Factorised in float64 (where the device has it): ``H`` from low-rank calibration data is close to
    singular, and the dampening ``λ = damp · mean(diag H)`` is what keeps it positive definite.
    """
    h = hessian.clone()
    idx = torch.arange(h.shape[0], device=h.device)
    h[idx, idx] += damp * torch.mean(torch.diag(h))
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        raise ValueError(
            f"the dampened Hessian is not positive definite (damp={damp}); raise damp (e.g. 0.1) or collect more "
            "calibration inputs"
        )
    hinv = torch.cholesky_inverse(chol)
    upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
    if int(info) != 0:
        raise ValueError(f"the inverse Hessian is numerically singular (damp={damp}); raise damp (e.g. 0.1)")
    return upper


@torch.no_grad()
def gptq_round(
    weight: Tensor,
    hessian: Tensor,
    scale: Tensor,
    zero_point: Tensor | None,
    qmin: int,
    qmax: int,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
) -> Tensor:
    """Fake-quantized ``weight`` on the integer grid ``(q - zero_point) · scale``, rounded by GPTQ.

    ``weight`` is ``[out, ...]`` and is treated as ``weight.reshape(out, -1)``; ``hessian`` is the matching
    ``[K, K]`` (:class:`HessianAccumulator`). ``scale``/``zero_point`` are the weight quantizer's buffers (per
    tensor, per output channel ``[out, 1, ...]``, or per element); ``zero_point=None`` means 0. The grid is
    never changed: only the rounding direction of each weight is, and each code is produced by
    :func:`~qdiffuse.formats.integer.quantize_int`, so encoding the result yields exactly the codes chosen here.

    Columns are processed in blocks of ``block_size`` (the "lazy batch" update: the error of a block reaches
    the later columns as one matmul instead of one rank-1 update per column). ``act_order`` quantizes the
    columns with the largest ``H_ii`` first, while most columns are still free to absorb their error; the
    result is returned in the original column order.

    An input that is always zero (``H_ii = 0``) gets ``H_ii = 1``, which decouples it: its column is rounded to
    nearest and neither gives nor receives error. (The reference implementation sets such columns to 0; both
    give the same output on the calibration data, but rounding to nearest keeps the layer's response to inputs
    the calibration never exercised, and makes an all-zero Hessian reduce exactly to round-to-nearest.)
    """
    if qmin >= qmax:
        raise ValueError(f"empty integer grid [{qmin}, {qmax}]; pass qmin < qmax (see int_bounds)")
    if block_size < 1:
        raise ValueError(f"block_size {block_size} is not positive; use e.g. 128")
    if damp < 0:
        raise ValueError(f"damp {damp} is negative; use e.g. 0.01")
    if weight.dim() < 1:
        raise ValueError("weight has no output-channel dimension; pass a [out, ...] tensor")
    out = weight.shape[0]
    work = torch.promote_types(weight.dtype, torch.float32)
    w = weight.detach().reshape(out, -1).to(work).clone()
    cols = w.shape[1]
    if hessian.shape != (cols, cols):
        raise ValueError(
            f"Hessian of shape {tuple(hessian.shape)} does not match the weight's {cols} flattened input columns"
        )
    if not torch.isfinite(w).all() or not torch.isfinite(hessian).all():
        raise ValueError("weight or Hessian contains NaN/inf; check the calibration inputs")
    s = _per_column(scale, out, cols, w, "scale")
    if not (s > 0).all():
        raise ValueError("scale has non-positive entries; calibrate the weight quantizer first")
    zp = _per_column(zero_point, out, cols, w, "zero_point")

    fact = torch.float32 if w.device.type == "mps" else torch.float64
    h = hessian.detach().to(device=w.device, dtype=fact).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0

    perm: Tensor | None = None
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        w = w[:, perm]
        h = h[perm][:, perm]
        s = s[:, perm] if s.shape[1] > 1 else s
        zp = zp[:, perm] if zp.shape[1] > 1 else zp

    hinv = _cholesky_inverse_upper(h, damp).to(work)
    q_all = torch.empty_like(w)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.empty_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            sc = s[:, col : col + 1] if s.shape[1] > 1 else s
            zc = zp[:, col : col + 1] if zp.shape[1] > 1 else zp
            wc = w1[:, i : i + 1]
            qc = quantize_int(wc, sc, zc, qmin, qmax).sub_(zc).mul_(sc)
            q_all[:, col : col + 1] = qc
            e = (wc - qc) / hinv1[i, i]
            w1[:, i:] -= e @ hinv1[i : i + 1, i:]
            err1[:, i : i + 1] = e
        if i2 < cols:
            w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    if perm is not None:
        q_all = q_all[:, torch.argsort(perm)]
    return q_all.reshape(weight.shape).to(weight.dtype)
