"""Turn quantized layers into real ones, and say what runs where.

``freeze(model)`` replaces every calibrated :class:`QuantLayer` by a :class:`RealLayer` on the kernels the
dispatch table picks, drops the float weights, and returns a :class:`RuntimeReport`: per layer its kernels, the
bytes it holds, and for each fallback why no real kernel took it. The loader calls :func:`real_layer` directly on
codes read from disk, so a loaded model never holds a float32 copy of a quantized weight.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from qdiffuse.errors import ConfigError
from qdiffuse.kernels.base import pin_static_params
from qdiffuse.kernels.dispatch import FALLBACK, Part, select_kernel
from qdiffuse.kernels.modules import RealLayer, split_weight_shapes

RUNTIMES = ("real", "simulated")
"""real: packed weights on the best kernel per layer (fallbacks reported). simulated: float weights holding the
quantized values and fake-quantized activations, the research path every method calibrates on."""

REPORT_ATTR = "qdiffuse_runtime"


def check_runtime(runtime: str) -> str:
    if runtime not in RUNTIMES:
        raise ConfigError(f"unknown runtime {runtime!r}; use {' or '.join(RUNTIMES)}")
    return runtime


@dataclass
class LayerRuntime:
    name: str
    kernels: list[str]
    packed_bytes: int
    fallback: list[str] = field(default_factory=list)


@dataclass
class RuntimeReport:
    """What a quantized model executes on: the runtime, each layer's kernels and memory, every fallback."""

    runtime: str
    layers: list[LayerRuntime] = field(default_factory=list)
    attention: str | None = None

    @property
    def fallbacks(self) -> list[LayerRuntime]:
        return [layer for layer in self.layers if FALLBACK.name in " ".join(layer.kernels)]

    @property
    def packed_bytes(self) -> int:
        return sum(layer.packed_bytes for layer in self.layers)

    def kernel_counts(self) -> Counter:
        return Counter(k for layer in self.layers for k in set(layer.kernels))

    def summary(self) -> str:
        """One line: the runtime, how many layers each kernel runs, how many fell back."""
        if self.runtime == "simulated":
            return f"runtime: simulated ({len(self.layers)} layers with float weights and fake-quantized inputs)"
        counts = ", ".join(f"{n}× {k}" for k, n in sorted(self.kernel_counts().items(), key=lambda kv: -kv[1]))
        line = f"runtime: real, {len(self.layers)} layers ({counts}); weights {self.packed_bytes / 2**20:.2f} MiB"
        if self.fallbacks:
            line += f"; {len(self.fallbacks)} layers on simulated compute (see `qdiffuse info --runtime`)"
        if self.attention:
            line += f"; {self.attention}"
        return line

    def to_dict(self) -> dict[str, Any]:
        return {
            "runtime": self.runtime,
            "packed_bytes": self.packed_bytes,
            "attention": self.attention,
            "layers": [vars(layer) for layer in self.layers],
        }


def real_layer(layer: nn.Module, storage_codes: list[Tensor], device: torch.device) -> tuple[RealLayer, list[str]]:
    """A :class:`RealLayer` for ``layer`` (a QuantLayer skeleton whose weight quantizers are calibrated) from its
    per-split storage codes; also the fallback reasons of its parts."""
    shapes = split_weight_shapes(layer)
    kernels, reasons = [], []
    for k, (wq, codes, shape) in enumerate(zip(layer.weight_quantizers, storage_codes, shapes, strict=True)):
        iq = layer.input_quantizers[k] if len(layer.input_quantizers) else None
        kernel, why = select_kernel(Part(layer, wq, iq, codes, shape, device))
        kernels.append(kernel)
        reasons += why
    return RealLayer(layer, kernels, device), reasons


def realize_attention(model: nn.Module, device: torch.device) -> str | None:
    """Put every quantized attention whose formats an integer kernel takes on :class:`RealAttnProcessor`;
    returns what ran where, in words (None: the model quantizes no attention)."""
    from qdiffuse.kernels.attention import RealAttnProcessor, integer_attention_problem
    from qdiffuse.nn.attention import QuantAttnProcessor

    real, simulated = 0, Counter()
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if not isinstance(processor, QuantAttnProcessor):
            continue
        if isinstance(processor, RealAttnProcessor):
            real += 1
            continue
        problem = integer_attention_problem(processor, device)
        if problem is None:
            module.set_processor(RealAttnProcessor(processor))
            real += 1
        else:
            simulated[problem] += 1
    parts = [f"{real} attention matmul pairs on {RealAttnProcessor.name}"] if real else []
    parts += [f"{n} attention matmul pairs simulated ({why})" for why, n in simulated.items()]
    return "; ".join(parts) or None


def freeze(model: nn.Module) -> RuntimeReport:
    """Replace every quantized layer of a calibrated model by a real layer, in place; a model that is already
    real (``quantize`` freezes by default, the loader builds real layers) keeps its layers and report."""
    from qdiffuse.nn.rewrite import quant_layers, set_submodule

    existing = getattr(model, REPORT_ATTR, None)
    if existing is not None and existing.runtime == "real" and not any(True for _ in quant_layers(model)):
        return existing
    device = _model_device(model)
    report = RuntimeReport("real", attention=realize_attention(model, device))
    for name, layer in list(quant_layers(model)):
        codes = [q.encode(p) for q, p in zip(layer.weight_quantizers, layer.weight_parts(layer.weight), strict=True)]
        real, reasons = real_layer(layer, codes, device)
        set_submodule(model, name, real)
        report.layers.append(LayerRuntime(name, real.kernel_names, real.packed_bytes(), reasons))
    pin_static_params(model)
    setattr(model, REPORT_ATTR, report)
    return report


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")


def runtime_report(model: nn.Module) -> RuntimeReport:
    """The model's report: set by :func:`freeze` or the loader; a model never frozen is simulated."""
    report = getattr(model, REPORT_ATTR, None)
    if report is not None:
        return report
    from qdiffuse.nn.rewrite import quant_layers

    return RuntimeReport("simulated", [LayerRuntime(n, ["simulated"], 0) for n, _ in quant_layers(model)])


def model_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes the model holds in memory: packed weights of real layers, float weights, other tensors."""
    packed = sum(m.packed_bytes() for m in model.modules() if isinstance(m, RealLayer))
    seen: set[int] = set()
    floats = other = 0
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if id(tensor) in seen or tensor.device.type == "meta":
            continue
        seen.add(id(tensor))
        size = tensor.numel() * tensor.element_size()
        if name.endswith(".weight") and tensor.dim() >= 2:
            floats += size
        else:
            other += size
    return {"packed_weights": packed, "float_weights": floats, "other": other, "total": packed + floats + other}


__all__ = [
    "RUNTIMES",
    "RuntimeReport",
    "LayerRuntime",
    "freeze",
    "real_layer",
    "runtime_report",
    "model_bytes",
    "check_runtime",
]
