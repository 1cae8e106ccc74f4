"""Time the candidate CPU kernels for real quantized layers, per shape, one thread, median of repeats.

Why: the dispatch table in ``qdiffuse.kernels`` picks one kernel per layer; this script is the evidence for those
picks. Every candidate computes the same product, from the same integer codes: the float baselines run on the
dequantized input and weight, so their FP32 result is the reference each candidate's error is measured against
(integer kernels should be within float rounding of it; BF16 paths show BF16 rounding).

Convolutions (N, C, H=W, O, k, padding k//2): FP32 / BF16 ``F.conv2d``; oneDNN ``qconv2d_pointwise`` on a weight
prepacked once with ``qconv_prepack`` (float32 output, uint8 channels-last input); im2col + ``torch._int_mm``; and
what ``qconv_prepack`` itself costs (a layer that cannot keep the prepacked blob pays it every call).
Linears (M, K, N): FP32 / BF16 ``F.linear``; oneDNN ``qlinear_pointwise`` (prepacked with ``qlinear_prepack``;
an unpacked weight segfaults it, so it is never given one); ``torch._int_mm``; the weight-only kernels
``torch._weight_int8pack_mm`` and ``torch._weight_int4pack_mm_for_cpu`` on a BF16 input.
"Quantize x" is the cost of turning the float input into uint8 codes, which every W8A8/W4A8 layer pays on top.

    python benchmarks/kernel_candidates.py                 # all shapes, 10 repeats
    python benchmarks/kernel_candidates.py --only linear --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

CONV_SHAPES: list[tuple[int, int, int, int, int]] = [
    (64, 64, 32, 64, 3),
    (2, 320, 64, 320, 3),
    (2, 640, 32, 640, 3),
    (2, 1280, 16, 1280, 3),
    (2, 320, 64, 320, 1),
]
"""(N, C_in, H = W, C_out, k): the built-in UNet's widest conv at batch 64, SD-1.5's convs at batch 2, a 1×1."""

LINEAR_SHAPES: list[tuple[int, int, int]] = [
    (4096, 512, 512),
    (8192, 320, 320),
    (512, 1152, 1152),
    (512, 1152, 4608),
    (1, 1152, 4608),
]
"""(M rows, K in, N out): attention projections of the UNets, DiT-XL/2 projections and MLP at 256 tokens × 2, and
one row (the adaLN modulation / time embedding)."""


@dataclass
class Timing:
    shape: str
    candidate: str
    ms: float | None
    rel_err: float | None
    note: str = ""


def median_ms(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def rel_err(out: Tensor, ref: Tensor) -> float:
    return float((out.float().reshape(ref.shape) - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


def candidate(
    rows: list[Timing], shape: str, name: str, fn: Callable[[], Tensor], ref: Tensor | None, repeats: int,
    warmup: int, to_ref: Callable[[Tensor], Tensor] | None = None, note: str = "",
) -> None:
    """Time ``fn`` and compare its output with ``ref``; a candidate that raises is a row with its error."""
    try:
        out = fn()
        err = None if ref is None else rel_err(to_ref(out) if to_ref else out, ref)
        rows.append(Timing(shape, name, median_ms(fn, repeats, warmup), err, note))
    except (RuntimeError, NotImplementedError) as exc:
        rows.append(Timing(shape, name, None, None, f"error: {' '.join(str(exc).split())[:160]}"))


def quantize_input(x: Tensor) -> tuple[Tensor, float, int]:
    """Asymmetric per-tensor uint8 codes, scale, zero point (what a W8A8 layer's activation quantizer gives)."""
    lo, hi = float(x.min().clamp_max(0)), float(x.max().clamp_min(0))
    scale = max(hi - lo, 1e-8) / 255.0
    zero_point = int(round(-lo / scale))
    return torch.clamp(torch.round(x / scale) + zero_point, 0, 255).to(torch.uint8), scale, zero_point


def quantize_weight(w: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8 codes and scales."""
    scale = w.reshape(w.shape[0], -1).abs().amax(dim=1).clamp_min(1e-8) / 127.0
    codes = torch.clamp(torch.round(w / scale.reshape(-1, *[1] * (w.dim() - 1))), -127, 127).to(torch.int8)
    return codes, scale.float()


def to_int8(codes_u8: Tensor) -> Tensor:
    """uint8 u -> int8 u − 128 (flipping the top bit)."""
    return (codes_u8 ^ 128).view(torch.int8)


def conv_rows(n: int, c: int, h: int, o: int, k: int, repeats: int, warmup: int) -> list[Timing]:
    shape = f"conv N{n} C{c} H{h} O{o} k{k}"
    pad = k // 2
    stride, padding, dilation = [1, 1], [pad, pad], [1, 1]
    xq, xs, xz = quantize_input(torch.randn(n, c, h, h))
    wq, ws = quantize_weight(torch.randn(o, c, k, k) * 0.05)
    bias = torch.randn(o) * 0.1
    x = (xq.float() - xz) * xs
    w = wq.float() * ws.reshape(-1, 1, 1, 1)
    ref = F.conv2d(x, w, bias, 1, pad)
    rows: list[Timing] = []
    candidate(rows, shape, "fp32 F.conv2d", lambda: F.conv2d(x, w, bias, 1, pad), ref, repeats, warmup)
    xb, wb, bb = x.bfloat16(), w.bfloat16(), bias.bfloat16()
    candidate(rows, shape, "bf16 F.conv2d", lambda: F.conv2d(xb, wb, bb, 1, pad), ref, repeats, warmup)

    x_cl = x.contiguous(memory_format=torch.channels_last)
    candidate(rows, shape, "quantize x (uint8, NHWC)", lambda: quantize_codes(x_cl, xs, xz), None, repeats, warmup)

    w_zp = torch.zeros(o, dtype=torch.long)

    def prepack() -> Tensor:
        return torch.ops.onednn.qconv_prepack(wq, ws, xs, xz, stride, padding, dilation, 1, None)

    candidate(rows, shape, "onednn qconv_prepack (one-off)", prepack, None, max(1, repeats // 2), 1)
    packed = prepack()
    xq_cl = xq.contiguous(memory_format=torch.channels_last)

    def onednn() -> Tensor:
        return torch.ops.onednn.qconv2d_pointwise(
            xq_cl, xs, xz, packed, ws, w_zp, bias, stride, padding, dilation, 1, 1.0, 0, torch.float32, "none", [],
            "",
        )

    candidate(rows, shape, "onednn qconv2d_pointwise (prepacked)", onednn, ref, repeats, warmup)

    w_kn = wq.permute(2, 3, 1, 0).reshape(k * k * c, o).contiguous()  # rows (kh, kw, C_in)
    col_sums = w_kn.to(torch.int32).sum(dim=0)
    epilogue_scale = ws * xs
    x_nhwc = to_int8(xq.permute(0, 2, 3, 1).contiguous())

    def im2col() -> Tensor:
        if k == 1:
            cols = x_nhwc.reshape(n * h * h, c)
        else:
            padded = torch.full((n, h + 2 * pad, h + 2 * pad, c), xz - 128, dtype=torch.int8)
            padded[:, pad : pad + h, pad : pad + h] = x_nhwc
            patches = padded.unfold(1, k, 1).unfold(2, k, 1)  # [N, H, W, C, kh, kw]
            cols = patches.permute(0, 1, 2, 4, 5, 3).reshape(n * h * h, k * k * c)
        acc = torch._int_mm(cols, w_kn) - (xz - 128) * col_sums
        return (acc.float() * epilogue_scale + bias).view(n, h, h, o).permute(0, 3, 1, 2)

    candidate(rows, shape, "im2col + torch._int_mm", im2col, ref, repeats, warmup)
    return rows


def quantize_codes(x: Tensor, scale: float, zero_point: int) -> Tensor:
    return torch.clamp(torch.round(x / scale) + zero_point, 0, 255).to(torch.uint8)


def int4_group_size(k: int) -> int | None:
    return next((g for g in (256, 128, 64, 32) if k % g == 0), None)


def linear_rows(m: int, k: int, n: int, repeats: int, warmup: int) -> list[Timing]:
    shape = f"linear M{m} K{k} N{n}"
    xq, xs, xz = quantize_input(torch.randn(m, k))
    wq, ws = quantize_weight(torch.randn(n, k) * 0.05)
    bias = torch.randn(n) * 0.1
    x = (xq.float() - xz) * xs
    w = wq.float() * ws.reshape(-1, 1)
    ref = F.linear(x, w, bias)
    rows: list[Timing] = []
    candidate(rows, shape, "fp32 F.linear", lambda: F.linear(x, w, bias), ref, repeats, warmup)
    xb, wb, bb = x.bfloat16(), w.bfloat16(), bias.bfloat16()
    candidate(rows, shape, "bf16 F.linear", lambda: F.linear(xb, wb, bb), ref, repeats, warmup)
    candidate(rows, shape, "quantize x (uint8)", lambda: quantize_codes(x, xs, xz), None, repeats, warmup)

    candidate(rows, shape, "onednn qlinear_prepack (one-off)", lambda: torch.ops.onednn.qlinear_prepack(wq, None),
              None, max(1, repeats // 2), 1)
    packed = torch.ops.onednn.qlinear_prepack(wq, None)  # never hand qlinear_pointwise an unpacked weight
    w_zp = torch.zeros(n, dtype=torch.long)

    def onednn() -> Tensor:
        return torch.ops.onednn.qlinear_pointwise(
            xq, xs, xz, packed, ws, w_zp, bias, 1.0, 0, torch.float32, "none", [], ""
        )

    candidate(rows, shape, "onednn qlinear_pointwise (prepacked)", onednn, ref, repeats, warmup)

    w_kn = wq.t().contiguous()
    col_sums = w_kn.to(torch.int32).sum(dim=0)
    x8 = to_int8(xq)
    epilogue_scale = ws * xs

    def int_mm() -> Tensor:
        acc = torch._int_mm(x8, w_kn) - (xz - 128) * col_sums
        return acc.float() * epilogue_scale + bias

    candidate(rows, shape, "torch._int_mm", int_mm, ref, repeats, warmup)

    ws_b = ws.bfloat16()
    candidate(rows, shape, "torch._weight_int8pack_mm (bf16 x)", lambda: torch._weight_int8pack_mm(xb, wq, ws_b) + bb,
              ref, repeats, warmup)

    group = int4_group_size(k)
    if group is None:
        rows.append(Timing(shape, "torch._weight_int4pack_mm_for_cpu (bf16 x)", None, None, f"K={k} has no group"))
        return rows
    # 4-bit weights of their own (groups of ``group`` along K): w = (q - 8) · scale + zero, q in [0, 15].
    w_groups = (torch.randn(n, k) * 0.05).reshape(n, k // group, group)
    lo, hi = w_groups.amin(dim=2), w_groups.amax(dim=2)
    scale4 = ((hi - lo) / 15).clamp_min(1e-8)
    q4 = torch.clamp(torch.round((w_groups - lo.unsqueeze(2)) / scale4.unsqueeze(2)), 0, 15)
    zero4 = lo + 8 * scale4
    w4 = ((q4 - 8) * scale4.unsqueeze(2) + zero4.unsqueeze(2)).reshape(n, k).bfloat16().float()
    ref4 = F.linear(x, w4, bias)
    packed4 = torch._convert_weight_to_int4pack_for_cpu(q4.reshape(n, k).to(torch.int32), 2)
    scale_zeros = torch.stack([scale4.t(), zero4.t()], dim=2).bfloat16().contiguous()  # [K / group, N, 2]

    def int4pack() -> Tensor:
        return torch._weight_int4pack_mm_for_cpu(xb, packed4, group, scale_zeros) + bb

    candidate(rows, shape, "torch._weight_int4pack_mm_for_cpu (bf16 x)", int4pack, ref4, repeats, warmup,
              note=f"own 4-bit weights, group {group}")
    return rows


def format_table(rows: list[Timing]) -> str:
    lines = ["| shape | candidate | median ms | × FP32 | max rel err | note |", "|---|---|---:|---:|---:|---|"]
    fp32 = {r.shape: r.ms for r in rows if r.candidate.startswith("fp32")}
    for r in rows:
        base = fp32.get(r.shape)
        not_a_product = "one-off" in r.candidate or r.candidate.startswith("quantize")
        speedup = "" if r.ms is None or base is None or not_a_product else f"{base / r.ms:.2f}"
        ms = "—" if r.ms is None else f"{r.ms:.3f}"
        err = "" if r.rel_err is None else f"{r.rel_err:.1e}"
        lines.append(f"| {r.shape} | {r.candidate} | {ms} | {speedup} | {err} | {r.note} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per candidate (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--only", choices=("conv", "linear"), help="one kind of shape only")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1, --warmup >= 0")
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qconv2d_pointwise")):
        parser.error("this torch build has no oneDNN quantized ops")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows: list[Timing] = []
    with torch.inference_mode():
        if args.only in (None, "conv"):
            for shape in CONV_SHAPES:
                rows += conv_rows(*shape, args.repeats, args.warmup)
                print(f"done {rows[-1].shape}", flush=True)
        if args.only in (None, "linear"):
            for shape in LINEAR_SHAPES:
                rows += linear_rows(*shape, args.repeats, args.warmup)
                print(f"done {rows[-1].shape}", flush=True)
    print(f"\ntorch {torch.__version__}, {args.threads} thread(s), median of {args.repeats} after {args.warmup} "
          "warm-up calls\n")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=2)


if __name__ == "__main__":
    main()
