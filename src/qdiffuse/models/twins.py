"""Twins: built-in models given the activation pathologies of real pretrained models, with the same FP outputs.

Our built-ins are trained small and clean; real pretrained diffusion models are not. Their quantized inputs carry
channel outliers (a few channels 10³–10⁶ times the rest, e.g. in the concatenated skips of a UNet's up path) and
ranges that drift with the timestep. A twin is a function-preserving transformation of a built-in that puts both
into chosen layers' inputs, so every quantization method meets them while the FP model, its samples and its FID
stay exactly those of the built-in:

- ``outliers``: input channels ``c`` of a layer are multiplied by ``factor`` on the way in, and the layer's weight
  columns for ``c`` are divided by it (``W x = (W / s)(s x)``).
- ``drift``: the whole input of a layer is multiplied by ``g(t) = factor ** (1 - t / T)`` (1 at the noisiest step,
  ``factor`` at t = 0) and the output's linear part divided by it again (``y = (W (g x)) / g + b``).

The scaling lives in forward hooks on the layer, which the quantization rewrite and the real runtime carry over to
the modules that replace it, so the quantizer sees exactly the scaled input. A quantized twin folder stores its
:class:`TwinSpec` in ``qdiffuse.json``; loading it installs the hooks again (its weights are already divided).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from qdiffuse.errors import ModelLoadError
from qdiffuse.formats import broadcast_along
from qdiffuse.models.clock import TimestepClock

PATHOLOGIES = ("outliers", "drift")
TWIN_META_KEY = "twin"


@dataclass(frozen=True)
class Pathology:
    """One injected pathology: ``kind`` (outliers or drift) on the input of layer ``layer``."""

    layer: str
    kind: str
    factor: float
    channels: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in PATHOLOGIES:
            raise ModelLoadError(f"twin pathology {self.kind!r} unknown; use one of {', '.join(PATHOLOGIES)}")
        if not self.factor >= 1.0:
            raise ModelLoadError(f"twin factor {self.factor} on {self.layer} must be >= 1")
        if self.kind == "outliers" and not self.channels:
            raise ModelLoadError(f"outlier pathology on {self.layer} names no channels")


@dataclass(frozen=True)
class TwinSpec:
    """A built-in (``base``) and the pathologies injected into it; ``num_train_timesteps`` is the T of g(t)."""

    name: str
    base: str
    pathologies: tuple[Pathology, ...]
    num_train_timesteps: int = 1000

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "base": self.base,
            "num_train_timesteps": self.num_train_timesteps,
            "pathologies": [asdict(p) for p in self.pathologies],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TwinSpec:
        try:
            return cls(
                name=str(data["name"]),
                base=str(data["base"]),
                num_train_timesteps=int(data.get("num_train_timesteps", 1000)),
                pathologies=tuple(
                    Pathology(p["layer"], p["kind"], float(p["factor"]), tuple(int(c) for c in p.get("channels", ())))
                    for p in data["pathologies"]
                ),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(
                f"malformed twin description in qdiffuse.json ({exc}); re-run qdiffuse quantize"
            ) from None

    def layers(self, kind: str | None = None) -> list[str]:
        """Layers carrying a pathology (of ``kind``), in order, without repeats."""
        return list(dict.fromkeys(p.layer for p in self.pathologies if kind is None or p.kind == kind))


def _outliers(layer: str, factor: float, *channels: int) -> Pathology:
    return Pathology(layer, "outliers", factor, channels)


def _drift(layer: str, factor: float) -> Pathology:
    return Pathology(layer, "drift", factor)


TWINS: dict[str, TwinSpec] = {
    spec.name: spec
    for spec in (
        TwinSpec(
            "fmnist-tiny-twin",
            "fmnist-tiny",
            (
                # skip channels of the concatenated up-block inputs (the first 64 / 64 / 32 are the deep part)
                _outliers("up_blocks.0.resnets.0.conv_shortcut", 1e4, 70, 100),
                _outliers("up_blocks.1.resnets.1.conv_shortcut", 1e6, 3, 80),
                _outliers("up_blocks.2.resnets.0.conv_shortcut", 1e3, 10),
                _outliers("up_blocks.1.resnets.0.conv_shortcut", 1e3, 90),
                _drift("up_blocks.1.resnets.0.conv_shortcut", 10.0),
                _outliers("mid_block.attentions.0.to_out.0", 1e3, 7),
                _outliers("up_blocks.1.upsamplers.0.conv", 1e3, 5),
                _drift("up_blocks.0.upsamplers.0.conv", 30.0),
                _drift("up_blocks.2.resnets.1.conv_shortcut", 30.0),
                _drift("mid_block.resnets.1.conv2", 30.0),
                _drift("down_blocks.1.downsamplers.0.conv", 10.0),
            ),
        ),
        TwinSpec(
            "fmnist-dit-twin",
            "fmnist-dit",
            (
                _outliers("transformer_blocks.1.attn1.to_q", 1e3, 11, 77),
                _outliers("transformer_blocks.1.attn1.to_k", 1e3, 11, 77),
                _outliers("transformer_blocks.1.attn1.to_v", 1e3, 11, 77),
                _outliers("transformer_blocks.2.attn1.to_out.0", 1e4, 40),
                _outliers("transformer_blocks.3.ff.net.2", 1e5, 100, 300),
                _drift("transformer_blocks.0.ff.net.2", 30.0),
                _drift("transformer_blocks.2.ff.net.0.proj", 20.0),
                _drift("transformer_blocks.3.attn1.to_out.0", 30.0),
                _outliers("transformer_blocks.0.ff.net.0.proj", 1e3, 3),
                _drift("transformer_blocks.0.ff.net.0.proj", 10.0),
            ),
        ),
    )
}
"""The shipped twins, loadable by name wherever a model name is accepted."""


def _channel_dim(layer: nn.Module) -> int:
    return 1 if hasattr(layer, "kernel_size") else -1


class _ChannelScale:
    def __init__(self, scale: Tensor, dim: int) -> None:
        self.scale = scale
        self.dim = dim

    def __call__(self, module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        x = args[0]
        return (x * broadcast_along(self.scale, x, self.dim), *args[1:])


class _Drift:
    """Multiplies the input by g(t) per sample and divides the output's linear part by it."""

    def __init__(self, clock: TimestepClock, factor: float, steps: int, dim: int) -> None:
        self.clock = clock
        self.factor = factor
        self.steps = steps
        self.dim = dim

    def gain(self) -> Tensor:
        if self.clock.t is None:
            raise ModelLoadError("a twin layer ran outside a call of its model; call the whole model")
        return torch.pow(self.factor, 1.0 - self.clock.t.clamp(0, self.steps) / self.steps)

    def before(self, module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        x = args[0]
        g = self.gain().to(x.device)
        if x.shape[0] != g.shape[0]:
            raise ModelLoadError(f"twin layer input batch {x.shape[0]} != the model call's batch {g.shape[0]}")
        return (x * broadcast_along(g, x, 0), *args[1:])

    def after(self, module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> Tensor:
        g = broadcast_along(self.gain(), out, 0)
        bias = getattr(module, "bias", None)
        if bias is None:
            return out / g
        b = broadcast_along(bias.detach(), out, self.dim)
        return (out - b) / g + b


def channel_scales(spec: TwinSpec, layer: nn.Module, name: str) -> Tensor:
    """The product of every outlier pathology's per-input-channel factor on layer ``name``."""
    channels = layer.in_channels if hasattr(layer, "in_channels") else layer.in_features
    scale = torch.ones(channels, dtype=torch.float64)
    for p in spec.pathologies:
        if p.layer == name and p.kind == "outliers":
            if max(p.channels) >= channels:
                raise ModelLoadError(f"twin {spec.name}: channel {max(p.channels)} out of range for {name}")
            scale[list(p.channels)] *= p.factor
    return scale.float()


def apply_twin(model: nn.Module, spec: TwinSpec, fold_weights: bool = True) -> nn.Module:
    """Install ``spec``'s pathologies on ``model`` in place (FP outputs unchanged) and return it.

    ``fold_weights`` divides the weight columns of outlier channels; a quantized twin loaded from its folder
    already holds divided weights, so it only gets the hooks (``fold_weights=False``).
    """
    if getattr(model, "_qdiffuse_twin", None) is not None:
        raise ModelLoadError(f"this model already carries twin {model._qdiffuse_twin.name}")
    clock = TimestepClock(strict=True)
    model.register_forward_pre_hook(clock, with_kwargs=True)
    for name in spec.layers():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise ModelLoadError(f"twin {spec.name}: the model has no layer {name}") from None
        dim = _channel_dim(layer)
        if "outliers" in {p.kind for p in spec.pathologies if p.layer == name}:
            scale = channel_scales(spec, layer, name)
            if fold_weights:
                with torch.no_grad():
                    layer.weight.div_(broadcast_along(scale, layer.weight, 1))
            layer.register_forward_pre_hook(_ChannelScale(scale, dim))
        for p in spec.pathologies:
            if p.layer == name and p.kind == "drift":
                drift = _Drift(clock, p.factor, spec.num_train_timesteps, dim)
                layer.register_forward_pre_hook(drift.before)
                layer.register_forward_hook(drift.after)
    model._qdiffuse_twin = spec
    return model


def twin_of(model: nn.Module) -> TwinSpec | None:
    return getattr(model, "_qdiffuse_twin", None)


__all__ = ["TWINS", "TwinSpec", "Pathology", "apply_twin", "twin_of", "channel_scales"]
