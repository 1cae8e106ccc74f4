"""A diffusers attention processor that quantizes the two attention matmuls.

The projections (to_q, to_k, to_v, to_out) are ordinary Linear layers and are rewritten like any other; what
remains are the activation-activation products QKᵀ and softmax(·)V. Q, K and V are quantized at the activation
format; the softmax output is non-negative and concentrated near 0, so it gets its own unsigned quantizer with
zero point 0 at 8 bits or more (Q-Diffusion). The processor mirrors diffusers' ``AttnProcessor2_0`` step for
step, so with quantization disabled it computes the same attention.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from qdiffuse.formats.spec import FormatSpec
from qdiffuse.nn.quantizer import ActivationQuantizer, make_activation_quantizer


class QuantAttnProcessor(nn.Module):
    """Explicit attention with quantized Q, K, V and softmax output."""

    def __init__(
        self,
        act_spec: FormatSpec,
        softmax_spec: FormatSpec,
        observer: str = "minmax",
        dynamic: bool = False,
        act_variants: dict[str, FormatSpec] | None = None,
    ) -> None:
        super().__init__()
        self.act_spec = act_spec
        self.softmax_spec = softmax_spec
        self.q_quantizer = make_activation_quantizer(act_spec, observer, dynamic, -1, act_variants)
        self.k_quantizer = make_activation_quantizer(act_spec, observer, dynamic, -1, act_variants)
        self.v_quantizer = make_activation_quantizer(act_spec, observer, dynamic, -2, act_variants)
        self.softmax_quantizer = ActivationQuantizer(softmax_spec, observer, dynamic)
        self.quant_enabled = True

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        *args: object,
        **kwargs: object,
    ) -> Tensor:
        """Explicit signature: diffusers reads it to decide which keyword arguments to pass."""
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)

    def _q(self, quantizer: nn.Module, x: Tensor) -> Tensor:
        return quantizer(x) if self.quant_enabled else x

    def forward(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        *args: object,
        **kwargs: object,
    ) -> Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = self.attend(query, key, value, attention_mask)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def attend(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None) -> Tensor:
        """softmax(Q Kᵀ / √d + mask) V on [B, heads, tokens, d] with every operand quantized."""
        scores = self._q(self.q_quantizer, query) @ self._q(self.k_quantizer, key).transpose(-1, -2)
        scores = scores * (1.0 / math.sqrt(query.shape[-1]))
        if attention_mask is not None:
            scores = scores + attention_mask
        probs = scores.softmax(dim=-1)
        return self._q(self.softmax_quantizer, probs) @ self._q(self.v_quantizer, value)

    def quantizers(self) -> dict[str, nn.Module]:
        return {
            "q": self.q_quantizer,
            "k": self.k_quantizer,
            "v": self.v_quantizer,
            "softmax": self.softmax_quantizer,
        }


def is_diffusers_attention(module: nn.Module) -> bool:
    """True for diffusers' ``Attention`` (the class every UNet and DiT attention block uses)."""
    cls = type(module)
    return cls.__name__ == "Attention" and hasattr(module, "set_processor") and hasattr(module, "to_q")


PLAIN_PROCESSORS = frozenset({"AttnProcessor", "AttnProcessor2_0", "QuantAttnProcessor"})
"""Processors that compute softmax(QKᵀ/√d)V of one token stream, the computation :class:`QuantAttnProcessor`
replaces. SD3's joint attention (image and text streams, ``add_q_proj``) keeps its own processor: its
projections are quantized as layers, its matmuls stay in floating point."""


def is_plain_attention(module: nn.Module) -> bool:
    """A diffusers ``Attention`` whose matmuls :class:`QuantAttnProcessor` can take over."""
    if not is_diffusers_attention(module) or getattr(module, "add_q_proj", None) is not None:
        return False
    processor = getattr(module, "processor", None)
    return type(processor).__name__ in PLAIN_PROCESSORS


__all__ = ["QuantAttnProcessor", "is_diffusers_attention", "is_plain_attention"]
