"""Attention on integer codes, one cache-sized block of queries at a time.

The simulated processor fake-quantizes Q, K, V and the softmax output over the whole tokens × tokens matrix and
multiplies dequantized floats; every elementwise pass over that matrix goes through memory, which is what makes
it 2–4× slower than PyTorch's fused attention. This processor quantizes Q, K and V once to their codes (minus
the zero point), then, per head and per block of query rows whose scores fit in the cache, computes
QKᵀ, the softmax and its 8-bit codes, and multiplies those codes by V's. The scales are applied once to the
result. Products of integer codes are exact in float32 while a dot product stays below 2²⁴ (Q·Kᵀ: any head
dimension up to 258), so Q·Kᵀ equals the integer product exactly and softmax·V up to float accumulation. Measured
single-threaded (``benchmarks/attention_candidates.py``, BENCHMARKS.md): 1.35–2× faster than the simulated
processor from 256 to 4096 tokens, and still 1.3–1.8× slower than FP32 ``scaled_dot_product_attention``, which
never materialises the scores and has no softmax quantizer.

``torch._int_mm`` per head was measured as well and is not faster at these head dimensions (32–80): the GEMMs
are a small part of attention, the passes over the score matrix are the rest.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from qdiffuse.formats import quantize_int
from qdiffuse.kernels.base import active_quantizer, int_params, variant_quantizers
from qdiffuse.nn.attention import QuantAttnProcessor
from qdiffuse.nn.quantizer import ActivationQuantizer

BLOCK_ELEMENTS = 1 << 18
"""Score elements per block (1 MiB of float32): measured best of 2^15..2^21 at 4096 tokens (L2/L3 resident)."""


def centred_codes(quantizer: ActivationQuantizer, x: Tensor) -> tuple[Tensor, float]:
    """``q − zero_point`` as integer-valued floats, and the scale: ``x ≈ codes · scale``."""
    p = int_params(quantizer, x)
    codes = quantize_int(x, p.scale, p.zero_point, p.qmin, p.qmax)
    return (codes.sub_(p.zero_point) if p.zero_point else codes), p.scale


class RealAttnProcessor(QuantAttnProcessor):
    """The simulated processor's quantizers (same state-dict keys), blockwise attention on codes."""

    name = "int8-codes-blocked-attention"

    def __init__(self, simulated: QuantAttnProcessor) -> None:
        torch.nn.Module.__init__(self)
        self.act_spec = simulated.act_spec
        self.softmax_spec = simulated.softmax_spec
        self.quant_enabled = simulated.quant_enabled
        self.q_quantizer = simulated.q_quantizer
        self.k_quantizer = simulated.k_quantizer
        self.v_quantizer = simulated.v_quantizer
        self.softmax_quantizer = simulated.softmax_quantizer

    @torch.compiler.disable(recursive=True)
    def attend(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None) -> Tensor:
        """Python loops over heads and blocks: ``torch.compile`` would unroll them, so it leaves this to eager."""
        if not self.quant_enabled:
            return super().attend(query, key, value, attention_mask)
        batch, heads, n, d = query.shape
        m = key.shape[2]
        q, sq = centred_codes(active_quantizer(self.q_quantizer), query.reshape(batch * heads, n, d))
        k, sk = centred_codes(active_quantizer(self.k_quantizer), key.reshape(batch * heads, m, d))
        v, sv = centred_codes(active_quantizer(self.v_quantizer), value.reshape(batch * heads, m, d))
        softmax = int_params(self.softmax_quantizer, query)
        s_p, p_min, p_max = softmax.scale, softmax.qmin, softmax.qmax
        mask = None if attention_mask is None else attention_mask.expand(batch, heads, n, m).reshape(-1, n, m)
        kt = k.transpose(1, 2)
        alpha = sq * sk / math.sqrt(d)
        out = torch.empty(batch * heads, n, d, dtype=q.dtype, device=q.device)
        rows = max(1, BLOCK_ELEMENTS // m)
        for i in range(batch * heads):
            for j in range(0, n, rows):
                scores = torch.matmul(q[i, j : j + rows], kt[i]).mul_(alpha)
                if mask is not None:
                    scores.add_(mask[i, j : j + rows])
                probs = torch.softmax(scores, dim=-1).div_(s_p).round_().clamp_(p_min, p_max)
                torch.matmul(probs, v[i], out=out[i, j : j + rows])
        return out.mul_(s_p * sv).reshape(batch, heads, n, d).to(query.dtype)


def integer_attention_problem(processor: QuantAttnProcessor, device: torch.device) -> str | None:
    """Why the integer processor cannot replace ``processor`` (None: it can)."""
    if device.type != "cpu":
        return f"no integer attention kernel for {device.type}"
    for q in [v for quantizer in processor.quantizers().values() for v in variant_quantizers(quantizer)]:
        if not isinstance(q, ActivationQuantizer) or q.spec.kind != "int" or q.spec.bits > 8:
            return f"attention activations {q.spec.describe()} are not integers of <= 8 bits"
        if q.spec.granularity != "tensor":
            return f"attention activations {q.spec.describe()} are not per tensor"
    softmax = processor.softmax_quantizer
    if softmax.dynamic or not softmax.spec.unsigned:
        return "the softmax quantizer is not a static unsigned grid (zero point 0)"
    return None


__all__ = ["RealAttnProcessor", "centred_codes", "integer_attention_problem"]
