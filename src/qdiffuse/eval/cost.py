"""Compute cost of one denoiser call: multiply-accumulates per layer and bit operations (BOPs).

BOPs = Σ MACs × weight bits × activation bits, the measure PTQD and Q-Diffusion report: it charges every
matmul and convolution by the widths of its two operands. Layers left in full precision count 32 × 32; the
attention matmuls count Q·Kᵀ at activation × activation bits and softmax·V at softmax × activation bits.
For a mixed-precision plan the cost is averaged over the plan's steps.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qdiffuse.kernels.modules import RealLayer
from qdiffuse.models.denoiser import Denoiser
from qdiffuse.nn.attention import QuantAttnProcessor, is_diffusers_attention
from qdiffuse.nn.layers import QuantLayer
from qdiffuse.nn.quantizer import activation_variants, set_activation_variant

FP_BITS = 32
QUANTIZED = (QuantLayer, RealLayer)
"""Simulated and real quantized layers: both carry their weight format and input quantizers."""


def _act_bits(quantizer: nn.Module | None) -> int:
    if quantizer is None:
        return FP_BITS
    spec = getattr(quantizer, "spec", None)
    return spec.value_bits if spec is not None else FP_BITS


@torch.no_grad()
def count_macs(denoiser: Denoiser, probe: tuple[Any, ...] | None = None) -> dict[str, dict[str, Any]]:
    """MACs of every Linear/Conv2d and attention matmul pair for one call on a single sample (``probe``: the
    ``forward_raw`` arguments of that call, needed for denoisers only their pipeline knows how to call)."""
    model = denoiser.model
    records: dict[str, dict[str, Any]] = {}
    handles = []

    def layer_hook(name: str, module: nn.Module):  # noqa: ANN202
        def hook(mod: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if isinstance(mod, nn.Conv2d) or (isinstance(mod, QUANTIZED) and hasattr(mod, "kernel_size")):
                kh, kw = mod.kernel_size
                per_out = (mod.in_channels // mod.groups) * kh * kw
            else:
                per_out = mod.in_features
            out_channels = output.shape[1] if output.ndim == 4 else output.shape[-1]
            records[name] = {
                "kind": "layer",
                "macs": output.numel() * per_out,
                "positions": output.numel() // out_channels,
                "module": mod,
            }

        return hook

    def attn_hook(name: str):  # noqa: ANN202
        def hook(mod: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            enc = kwargs.get("encoder_hidden_states")
            n = hidden.shape[2] * hidden.shape[3] if hidden.ndim == 4 else hidden.shape[1]
            m = n if enc is None else enc.shape[1]
            inner = mod.to_q.out_features
            records[f"{name}.matmuls"] = {"kind": "attention", "macs": hidden.shape[0] * n * m * inner, "module": mod}

        return hook

    for name, module in model.named_modules():
        if isinstance(module, (*QUANTIZED, nn.Linear, nn.Conv2d)):
            handles.append(module.register_forward_hook(layer_hook(name, module)))
        elif is_diffusers_attention(module):
            handles.append(module.register_forward_hook(attn_hook(name), with_kwargs=True))
    try:
        if probe is None:
            x = torch.zeros(1, *denoiser.sample_shape, device=denoiser.device)
            t = torch.full((1,), 500, device=denoiser.device, dtype=torch.long)
            labels = None if denoiser.num_classes is None else torch.zeros(1, dtype=torch.long, device=denoiser.device)
            probe = (x, t, labels, None)
        with torch.no_grad():
            denoiser.forward_raw(*probe)
    finally:
        for h in handles:
            h.remove()
    return records


def _treatment_fp_macs(layer: nn.Module, positions: int) -> int:
    """Float MACs a layer's input treatment adds (outlier channels and the low-rank branch), for one call."""
    treatment = getattr(layer, "input_treatment", None)
    if treatment is None or not treatment.active:
        return 0
    out = layer.out_channels if hasattr(layer, "kernel_size") else layer.out_features
    kernel = layer.kernel_size[0] * layer.kernel_size[1] if hasattr(layer, "kernel_size") else 1
    return positions * treatment.fp_macs_per_position(out, kernel)


def _bops_now(records: dict[str, dict[str, Any]]) -> int:
    total = 0
    for rec in records.values():
        mod, macs = rec["module"], rec["macs"]
        if rec["kind"] == "layer":
            if isinstance(mod, QUANTIZED):
                act = _act_bits(mod.input_quantizers[0]) if len(mod.input_quantizers) else FP_BITS
                total += macs * mod.weight_spec.value_bits * act
                total += _treatment_fp_macs(mod, rec["positions"]) * FP_BITS * FP_BITS
            else:
                total += macs * FP_BITS * FP_BITS
        else:
            proc = getattr(mod, "processor", None)
            if isinstance(proc, QuantAttnProcessor):
                a = _act_bits(proc.q_quantizer)
                total += macs * a * a + macs * proc.softmax_spec.value_bits * _act_bits(proc.v_quantizer)
            else:
                total += 2 * macs * FP_BITS * FP_BITS
    return total


def cost_summary(denoiser: Denoiser, plan: Any = None, probe: tuple[Any, ...] | None = None) -> dict[str, Any]:
    """MACs and BOPs per call, and the ratio to full precision; averaged over a mixed plan's steps."""
    records = count_macs(denoiser, probe)
    macs = sum(r["macs"] * (2 if r["kind"] == "attention" else 1) for r in records.values())
    fp_bops = macs * FP_BITS * FP_BITS
    variants = activation_variants(denoiser.model)
    per_variant: dict[str, int] = {}
    if variants:
        for key in variants:
            set_activation_variant(denoiser.model, key)
            per_variant[key] = _bops_now(records)
        active = plan.variants[-1] if plan is not None else max(variants, key=lambda k: int(k.lstrip("a")))
        set_activation_variant(denoiser.model, active)
        if plan is not None and plan.per_timestep:
            keys = list(plan.per_timestep.values())
            bops = sum(per_variant[k] for k in keys) / len(keys)
        else:
            bops = per_variant[active]
    else:
        bops = _bops_now(records)
    return {
        "macs_per_call": int(macs),
        "bops_per_call": float(bops),
        "fp32_bops_per_call": float(fp_bops),
        "bops_reduction": float(fp_bops / bops) if bops else float("inf"),
        "bops_per_variant": per_variant,
    }


__all__ = ["count_macs", "cost_summary"]
