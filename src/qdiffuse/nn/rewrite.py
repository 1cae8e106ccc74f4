"""The model-rewriting pass: swap layers of any torch module for quantized drop-ins, in place.

Works on any module tree; diffusers models get two extras found from their structure: the attention matmuls
(through a processor on every ``Attention``) and shortcut splitting for the concatenated skip inputs of UNet
up-blocks. The result is still the same module class, so a diffusers pipeline or a plain loop calls it unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from qdiffuse.config import QuantConfig
from qdiffuse.nn.attention import QuantAttnProcessor, is_plain_attention
from qdiffuse.nn.layers import QuantConv2d, QuantLayer, QuantLinear
from qdiffuse.nn.quantizer import ActivationQuantizer


@dataclass(frozen=True)
class LayerPlan:
    """What the rewrite did to one layer (shown by ``qdiffuse info`` and saved with the model)."""

    name: str
    kind: str
    label: str


def shortcut_splits(model: nn.Module) -> dict[str, int]:
    """Layers whose input is [deep features | skip features], mapped to the number of deep channels.

    In diffusers UNets each up-block resnet receives ``cat([hidden, skip])``; the hidden part has the channels of
    the previous resnet (or of the previous block / the mid block for the first resnet), the rest is the skip.
    Both the resnet's first conv and its 1x1 shortcut conv read that concatenation.
    """
    up_blocks = getattr(model, "up_blocks", None)
    mid_block = getattr(model, "mid_block", None)
    if up_blocks is None:
        return {}
    prev = _out_channels(mid_block) if mid_block is not None else None
    if prev is None:
        down = getattr(model, "down_blocks", None)
        prev = _out_channels(down[-1]) if down else None
    splits: dict[str, int] = {}
    for i, block in enumerate(up_blocks):
        for j, resnet in enumerate(getattr(block, "resnets", [])):
            hidden = prev if j == 0 else block.resnets[j - 1].out_channels
            total = getattr(resnet, "in_channels", None)
            if hidden is not None and total is not None and 0 < hidden < total:
                for conv in ("conv1", "conv_shortcut"):
                    if isinstance(getattr(resnet, conv, None), nn.Conv2d):
                        splits[f"up_blocks.{i}.resnets.{j}.{conv}"] = hidden
        prev = _out_channels(block) or prev
    return splits


def _out_channels(block: nn.Module | None) -> int | None:
    resnets = getattr(block, "resnets", None)
    if resnets:
        return resnets[-1].out_channels
    return None


def quantize_model(model: nn.Module, config: QuantConfig, observer: str | None = None) -> list[LayerPlan]:
    """Rewrite ``model`` in place per ``config``; returns the plan of every quantized layer.

    Weight and activation parameters are not computed here: calibration does that.
    """
    observer = observer or config.observer
    splits = shortcut_splits(model) if config.split_shortcuts else {}
    plan: list[LayerPlan] = []
    for name, module in list(model.named_modules()):
        if not name or isinstance(module, QuantLayer):
            continue
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            formats = config.formats_for(name)
            if formats is None:
                continue
            weight_spec, act_spec = formats
            cls = QuantLinear if isinstance(module, nn.Linear) else QuantConv2d
            new = cls(
                module,
                weight_spec,
                act_spec,
                observer=observer,
                dynamic=config.is_dynamic(name),
                split_at=splits.get(name),
                act_variants=config.activation_variants(name),
            )
            set_submodule(model, name, new)
            plan.append(LayerPlan(name, cls.__name__, new.bits_label()))
        elif config.quantize_attention and is_plain_attention(module):
            formats = config.formats_for(name)
            if formats is None or formats[1] is None:
                continue
            processor = QuantAttnProcessor(
                formats[1],
                config.softmax_spec(),
                observer=observer,
                dynamic=config.is_dynamic(name),
                act_variants=config.activation_variants(name),
            )
            module.set_processor(processor)
            label = f"QK/AV:{formats[1].describe()} softmax:{config.softmax_spec().describe()}"
            plan.append(LayerPlan(name, "QuantAttnProcessor", label))
    return plan


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace submodule ``name`` by ``new``, which takes over the forward hooks of the module it replaces."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, child, None)
    if isinstance(old, nn.Module):
        transfer_hooks(old, new)
    setattr(parent, child, new)


def transfer_hooks(old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` the forward hooks ``old`` had: whatever a user's (or a twin's) hooks do to a layer's input and
    output keeps happening around its quantized replacement."""
    for attr in (
        "_forward_pre_hooks",
        "_forward_pre_hooks_with_kwargs",
        "_forward_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_hooks_always_called",
    ):
        source = getattr(old, attr, None)
        if source:
            getattr(new, attr).update(source)


def quant_layers(model: nn.Module) -> Iterator[tuple[str, QuantLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, QuantLayer):
            yield name, module


def activation_quantizers(model: nn.Module) -> Iterator[tuple[str, ActivationQuantizer]]:
    for name, module in model.named_modules():
        if isinstance(module, ActivationQuantizer):
            yield name, module


def set_quantization_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every quantizer on or off. Off: activations and attention run in full precision; weights that were
    hardened (every calibrated layer) keep their quantized values, so this isolates the activation error."""
    for module in model.modules():
        if isinstance(module, (QuantLayer, QuantAttnProcessor)):
            module.quant_enabled = enabled


__all__ = [
    "LayerPlan",
    "quantize_model",
    "shortcut_splits",
    "quant_layers",
    "activation_quantizers",
    "set_quantization_enabled",
    "set_submodule",
    "transfer_hooks",
]
