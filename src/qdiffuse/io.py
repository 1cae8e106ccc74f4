"""Save and load quantized models as folders: safetensors + JSON, never pickle.

Layout of a quantized folder::

    quantization.json          scheme, method, full QuantConfig, per-layer plan, code shapes, provenance
    quantized.safetensors      packed integer weight codes, quantizer parameters, every other tensor
    unet/config.json           the original diffusers model config (or transformer/config.json)
    scheduler/scheduler_config.json
    qdiffuse.json              conditioning facts of the source model, if it had them

Integer weights are stored as their codes, bit-packed (4-bit: two per byte), so a W4 folder is about a quarter
of the FP32 model. Loading rebuilds the model from its config, applies the same rewrite, and decodes the codes
into exactly the weights the quantized model computed with.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qdiffuse import __version__
from qdiffuse.api import STATE_ATTR, QuantState, quant_state
from qdiffuse.config import QuantConfig
from qdiffuse.errors import ModelLoadError
from qdiffuse.formats import pack_bits, unpack_bits
from qdiffuse.fsutil import atomic_dir, folder_size
from qdiffuse.kernels.freeze import RuntimeReport
from qdiffuse.kernels.modules import RealLayer, split_weight_shapes
from qdiffuse.models.denoiser import Denoiser
from qdiffuse.models.loading import META_FILE, LoadedModel, build_model, read_json
from qdiffuse.models.twins import TWIN_META_KEY, TwinSpec, apply_twin
from qdiffuse.nn.layers import QuantLayer
from qdiffuse.nn.rewrite import LayerPlan, quant_layers, quantize_model, set_submodule

QUANT_JSON = "quantization.json"
QUANT_WEIGHTS = "quantized.safetensors"
FORMAT_VERSION = 1
CODES = ".weight_codes."


def is_quantized_folder(path: str | Path) -> bool:
    return (Path(path) / QUANT_JSON).is_file()


def _code_bits(layer: QuantLayer) -> int:
    return layer.weight_spec.value_bits


def quantized_layers(model: nn.Module) -> list[tuple[str, QuantLayer | RealLayer]]:
    """Simulated and real quantized layers, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (QuantLayer, RealLayer))]


def _storage_codes(layer: QuantLayer | RealLayer) -> list[tuple[torch.Tensor, tuple[int, ...]]]:
    """Per split: the codes as stored on disk and the weight shape they decode to."""
    if isinstance(layer, RealLayer):
        return [(layer.storage_codes(k), shape) for k, shape in enumerate(split_weight_shapes(layer))]
    parts = layer.weight_parts(layer.weight)
    return [(q.encode(p), tuple(p.shape)) for q, p in zip(layer.weight_quantizers, parts, strict=True)]


def save_quantized(
    loaded: LoadedModel, out: Path, overwrite: bool = False, extra_files: dict[str, str] | None = None
) -> Path:
    """Write the quantized model of ``loaded`` to folder ``out`` (atomically), with ``extra_files`` (relative
    path -> text, e.g. noise statistics) inside it."""
    model = loaded.denoiser.model
    state = quant_state(model)
    if state is None:
        raise ModelLoadError("this model is not quantized; run qdiffuse.quantize first")
    tensors: dict[str, torch.Tensor] = {}
    layers_meta: dict[str, Any] = {}
    skip: set[str] = set()
    for name, layer in quantized_layers(model):
        skip.add(f"{name}.weight")
        entry = {"splits": list(layer.splits), "shapes": [], "code_shapes": [], "bits": _code_bits(layer)}
        for k, (codes, shape) in enumerate(_storage_codes(layer)):
            entry["shapes"].append(list(shape))
            entry["code_shapes"].append(list(codes.shape))
            tensors[f"{name}{CODES}{k}"] = pack_bits(codes, entry["bits"]) if entry["bits"] < 8 else codes.flatten()
        entry["weight_hardened"] = layer.weight_hardened
        layers_meta[name] = entry
    for key, value in model.state_dict().items():
        if key in skip:
            continue
        tensors[key] = value.detach().cpu()
    manifest = {
        "format_version": FORMAT_VERSION,
        "qdiffuse_version": __version__,
        "model_subfolder": loaded.subfolder,
        "source": loaded.source,
        "config": state.config.to_dict(),
        "plan": [vars(p) for p in state.plan],
        "layers": layers_meta,
        "calibration": state.calibration,
    }
    from safetensors.torch import save_file

    with atomic_dir(out, overwrite) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / QUANT_WEIGHTS))
        (tmp / QUANT_JSON).write_text(json.dumps(manifest, indent=2))
        (tmp / loaded.subfolder).mkdir()
        (tmp / loaded.subfolder / "config.json").write_text(model.to_json_string())
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(loaded.scheduler_config, indent=2))
        if loaded.meta:
            (tmp / META_FILE).write_text(json.dumps(loaded.meta, indent=2))
        for rel, text in (extra_files or {}).items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_text(text)
    return Path(out)


def load_quantized(folder: str | Path, device: str = "cpu", runtime: str = "real") -> LoadedModel:
    """Rebuild a quantized model from its folder; its outputs equal those of the model that was saved.

    ``runtime="real"`` (the default) builds each quantized layer straight from its stored codes on the kernel the
    dispatch picks, so no float32 copy of a quantized weight is ever made: the skeleton's parameters live on the
    meta device until the folder's tensors fill them. ``"simulated"`` decodes the codes into float weights, the
    path calibration and research code use. ``qdiffuse.kernels.runtime_report(model)`` says what runs where.
    """
    from qdiffuse.kernels import RuntimeReport, check_runtime
    from qdiffuse.kernels.base import pin_static_params
    from qdiffuse.kernels.freeze import REPORT_ATTR, realize_attention

    check_runtime(runtime)
    folder = Path(folder)
    manifest = read_json(folder / QUANT_JSON, "quantization manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ModelLoadError(
            f"{folder} has quantized-format version {manifest.get('format_version')}; this qdiffuse reads "
            f"version {FORMAT_VERSION}: re-run qdiffuse quantize"
        )
    try:
        sub = manifest["model_subfolder"]
        config = QuantConfig.from_dict(manifest["config"])
        layers_meta = manifest["layers"]
        plan = [LayerPlan(**p) for p in manifest["plan"]]
    except (KeyError, TypeError) as exc:
        raise ModelLoadError(f"{folder / QUANT_JSON} is malformed ({exc}); re-run qdiffuse quantize") from None
    model_config = read_json(folder / sub / "config.json", "model config")
    model = build_model(model_config, str(folder / sub), meta=True)
    quantize_model(model, config)
    tensors = _read_tensors(folder / QUANT_WEIGHTS, device)
    report = RuntimeReport(runtime)
    _load_tensors(model, tensors, layers_meta, folder, report, torch.device(device))
    if runtime == "real":
        report.attention = realize_attention(model, torch.device(device))
        pin_static_params(model)
    model.to(device).eval()
    setattr(model, REPORT_ATTR, report)
    scheduler_config = read_json(folder / "scheduler" / "scheduler_config.json", "scheduler config")
    meta = read_json(folder / META_FILE, "qdiffuse.json") if (folder / META_FILE).is_file() else {}
    if TWIN_META_KEY in meta:
        apply_twin(model, TwinSpec.from_dict(meta[TWIN_META_KEY]), fold_weights=False)
    setattr(model, STATE_ATTR, QuantState(config, plan, manifest.get("calibration", {})))
    return LoadedModel(Denoiser.from_model(model, meta), scheduler_config, str(folder), sub, meta)


def _read_tensors(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except FileNotFoundError:
        raise ModelLoadError(f"{path} is missing; the quantized folder is incomplete") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"{path} is not a readable safetensors file ({exc}); re-run qdiffuse quantize") from None


def _load_tensors(
    model: nn.Module,
    tensors: dict[str, torch.Tensor],
    layers_meta: dict[str, Any],
    folder: Path,
    report: RuntimeReport,
    device: torch.device,
) -> None:
    from qdiffuse.kernels import LayerRuntime, real_layer

    layers = dict(quant_layers(model))
    if set(layers) != set(layers_meta):
        raise ModelLoadError(f"{folder}: quantized layers do not match the manifest; the folder is inconsistent")
    used: set[str] = set()
    try:
        for name, layer in layers.items():
            entry = layers_meta[name]
            for k, quantizer in enumerate(layer.weight_quantizers):
                for buf in ("scale", "zero_point", "block_scale", "lzs_flags"):
                    key = f"{name}.weight_quantizers.{k}.{buf}"
                    if key in tensors:
                        value = tensors[key]
                        setattr(quantizer, buf, value.float() if value.is_floating_point() else value)
                        used.add(key)
            codes = []
            for k in range(len(layer.weight_quantizers)):
                key = f"{name}{CODES}{k}"
                code_shape = entry["code_shapes"][k]
                raw = tensors[key]
                unpacked = unpack_bits(raw, entry["bits"], math.prod(code_shape)) if entry["bits"] < 8 else raw
                codes.append(unpacked.reshape(code_shape))
                used.add(key)
            _check_shapes(layer, entry, name)
            if report.runtime == "real":
                real, reasons = real_layer(layer, codes, device)
                set_submodule(model, name, real)
                report.layers.append(LayerRuntime(name, real.kernel_names, real.packed_bytes(), reasons))
                continue
            parts = [
                q.decode(c, torch.Size(shape))
                for q, c, shape in zip(layer.weight_quantizers, codes, entry["shapes"], strict=True)
            ]
            layer.weight = nn.Parameter(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
            layer.weight_hardened = bool(entry.get("weight_hardened", True))
            report.layers.append(LayerRuntime(name, ["simulated"], 0))
    except KeyError as exc:
        raise ModelLoadError(f"{folder / QUANT_WEIGHTS} lacks tensor {exc}; the folder is incomplete") from None
    except RuntimeError as exc:
        raise ModelLoadError(f"{folder / QUANT_WEIGHTS} holds tensors of the wrong shape ({exc})") from None
    rest = {k: v for k, v in tensors.items() if k not in used}
    _assign_state(model, rest, folder, loaded=used)


def _check_shapes(layer: QuantLayer, entry: dict[str, Any], name: str) -> None:
    """The manifest's split shapes must be the ones the model config gives the layer."""
    expected = [list(shape) for shape in split_weight_shapes(layer)]
    if entry["shapes"] != expected:
        raise ModelLoadError(f"{name}: stored weight shapes {entry['shapes']} != model {expected}")


def _assign_state(model: nn.Module, tensors: dict[str, torch.Tensor], folder: Path, loaded: set[str]) -> None:
    """Load parameters and buffers, including quantizer buffers that are None until calibration sets them.

    Parameters are assigned, not copied, because the skeleton's parameters live on the meta device."""
    weight_keys = {f"{n}.weight" for n, _ in quant_layers(model)}
    missing = sorted(set(model.state_dict()) - weight_keys - loaded - set(tensors))
    if missing:
        raise ModelLoadError(f"{folder / QUANT_WEIGHTS} lacks {missing[:3]}; the folder is incomplete")
    for key, value in tensors.items():
        module_name, _, attr = key.rpartition(".")
        try:
            module = model.get_submodule(module_name) if module_name else model
        except AttributeError:
            raise ModelLoadError(f"{folder / QUANT_WEIGHTS} has unknown tensor {key}") from None
        current = getattr(module, attr, None)
        if current is None and attr == "bias" and isinstance(module, (QuantLayer, RealLayer)):
            module.bias = nn.Parameter(value.float())  # a bias that bias correction gave a layer that had none
        elif isinstance(current, nn.Parameter):
            if current.shape != value.shape:
                raise ModelLoadError(f"{key}: stored shape {tuple(value.shape)} != model {tuple(current.shape)}")
            module._parameters[attr] = nn.Parameter(value.to(current.dtype), requires_grad=current.requires_grad)
        elif attr in module._buffers:
            module._buffers[attr] = value.float() if value.is_floating_point() else value
        else:
            raise ModelLoadError(f"{folder / QUANT_WEIGHTS} has unknown tensor {key}")
    uncalibrated = [n for n, m in model.named_modules() if hasattr(m, "calibrated") and not m.calibrated]
    if uncalibrated:
        raise ModelLoadError(f"{folder / QUANT_WEIGHTS} lacks quantizer parameters of {uncalibrated[:3]}")
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise ModelLoadError(f"{folder / QUANT_WEIGHTS} lacks {left[:3]}; the folder is incomplete")


def describe_folder(folder: str | Path) -> dict[str, Any]:
    """What ``qdiffuse info`` prints: scheme, sizes and per-layer formats, read from the manifest alone."""
    folder = Path(folder)
    manifest = read_json(folder / QUANT_JSON, "quantization manifest")
    from safetensors import safe_open

    try:
        with safe_open(str(folder / QUANT_WEIGHTS), "pt") as f:
            keys = list(f.keys())
            fp32_bytes = 0
            for key in keys:
                if CODES in key or "quantizer" in key or ".input_treatment." in key:
                    continue
                sl = f.get_slice(key)
                fp32_bytes += math.prod(sl.get_shape()) * 4
    except Exception as exc:
        raise ModelLoadError(f"{folder / QUANT_WEIGHTS} is not readable ({exc})") from None
    try:
        for entry in manifest["layers"].values():
            fp32_bytes += sum(math.prod(s) for s in entry["shapes"]) * 4
        return {
            "path": str(folder),
            "scheme": manifest["config"]["scheme"],
            "method": manifest["config"]["method"],
            "formats": _format_lines(manifest["config"]),
            "source": manifest.get("source"),
            "bytes_on_disk": folder_size(folder),
            "fp32_bytes": fp32_bytes,
            "plan": [{"name": p["name"], "kind": p["kind"], "label": p["label"]} for p in manifest["plan"]],
            "calibration": manifest.get("calibration", {}),
        }
    except (KeyError, TypeError, AttributeError) as exc:
        raise ModelLoadError(f"{folder / QUANT_JSON} is malformed ({exc}); re-run qdiffuse quantize") from None


def _format_lines(config: dict[str, Any]) -> list[str]:
    """The main weight and activation formats with the bits each value takes as stored."""
    from qdiffuse.formats.spec import FormatSpec

    lines = []
    for role in ("weight", "activation"):
        data = config.get(role)
        if not data:
            lines.append(f"{role}s fp")
            continue
        spec = FormatSpec.from_dict(data)
        extra = f" = {spec.value_bits} + {spec.overhead_bits:.2f} for scales and flags" if spec.overhead_bits else ""
        lines.append(f"{role}s {spec.describe()} ({spec.effective_bits:.2f} bits per value{extra})")
    return lines


__all__ = ["save_quantized", "load_quantized", "quantized_layers", "is_quantized_folder", "describe_folder"]
