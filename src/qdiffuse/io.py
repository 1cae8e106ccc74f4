"""Save and load quantized models as folders: safetensors + JSON, never pickle.

Layout of a quantized folder::

    quantization.json          scheme, method, full QuantConfig, per-layer plan, code shapes, provenance
    quantized.safetensors      packed integer weight codes, quantizer parameters, every other tensor
    unet/config.json           the original diffusers model config (or transformer/config.json)
    scheduler/scheduler_config.json
    qdiffuse.json              conditioning facts of the source model, if it had them
    integrity.json             SHA-256 of every other file (qdiffuse.integrity), checked before loading

Integer weights are stored as their codes, bit-packed (4-bit: two per byte), so a W4 folder is about a quarter
of the FP32 model. Loading rebuilds the model from its config, applies the same rewrite, and decodes the codes
into exactly the weights the quantized model computed with.

Loading trusts nothing it reads: the content hashes catch a damaged or edited file, and the manifest's claims
(formats, bit-widths, code sizes, the layout of every stored tensor) are checked against the config and the
tensors even when the hashes are skipped (:mod:`qdiffuse.claims`), so a damaged folder fails with one line instead
of sampling garbage.
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
from qdiffuse.claims import (
    CODES,
    QUANT_JSON,
    QUANT_WEIGHTS,
    REQUANTIZE,
    check_entries,
    check_layer_claims,
    check_layout,
    check_scheme,
    one_line,
    parameter_budget,
    parameter_limit,
    parse_manifest,
    short_repr,
    tensor_layout,
)
from qdiffuse.errors import ModelLoadError, QDiffuseError
from qdiffuse.formats import pack_bits, unpack_bits
from qdiffuse.fsutil import QUANTIZED_FOLDER, atomic_dir, folder_size
from qdiffuse.integrity import verify_folder, write_integrity
from qdiffuse.kernels.freeze import RuntimeReport
from qdiffuse.kernels.modules import RealLayer, split_weight_shapes
from qdiffuse.models.denoiser import Denoiser, model_dtype
from qdiffuse.models.dtypes import DTYPES, check_dtype_supported, dtype_name, parse_dtype
from qdiffuse.models.loading import META_FILE, LoadedModel, build_model, read_json
from qdiffuse.models.twins import TWIN_META_KEY, TwinSpec, apply_twin
from qdiffuse.nn.layers import QuantLayer
from qdiffuse.nn.quantizer import ActivationQuantizer, WeightQuantizer
from qdiffuse.nn.rewrite import quant_layers, quantize_model, set_submodule
from qdiffuse.outliers.treatment import InputTreatment

# QUANT_JSON, QUANT_WEIGHTS, CODES and REQUANTIZE come from qdiffuse.claims, whose messages name them too
COST_FILE = "cost.json"
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
FORMAT_VERSION = 1


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
    path -> text, e.g. noise statistics) inside it. The folder always holds ``cost.json`` (MACs and BOPs per call),
    so ``qdiffuse info`` shows the compute of a folder saved from Python too."""
    model = loaded.denoiser.model
    state = quant_state(model)
    if state is None:
        raise ModelLoadError("this model is not quantized; run qdiffuse.quantize first")
    extra_files = dict(extra_files or {})
    if COST_FILE not in extra_files:
        from qdiffuse.eval.cost import cost_summary

        extra_files[COST_FILE] = json.dumps(cost_summary(loaded.denoiser, None), indent=2)
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
        "dtype": dtype_name(model_dtype(model)),
        "config": state.config.to_dict(),
        "plan": [vars(p) for p in state.plan],
        "layers": layers_meta,
        "calibration": state.calibration,
        "tensors": {key: tensor_layout(value) for key, value in sorted(tensors.items())},
    }
    from safetensors.torch import save_file

    sources = [loaded.source] if loaded.source and Path(loaded.source).exists() else []
    with atomic_dir(out, overwrite, QUANTIZED_FOLDER, inputs=sources) as tmp:
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
        write_integrity(tmp)  # last: it hashes everything above
    return Path(out)


def load_quantized(
    folder: str | Path,
    device: str = "cpu",
    runtime: str = "real",
    verify: bool = True,
    dtype: str | torch.dtype | None = None,
) -> LoadedModel:
    """Rebuild a quantized model from its folder; its outputs equal those of the model that was saved.

    ``runtime="real"`` (the default) builds each quantized layer straight from its stored codes on the kernel the
    dispatch picks, so no float32 copy of a quantized weight is ever made: the skeleton's parameters live on the
    meta device until the folder's tensors fill them. ``"simulated"`` decodes the codes into float weights, the
    path calibration and research code use. ``qdiffuse.kernels.runtime_report(model)`` says what runs where.

    ``verify`` checks the folder's content hashes (``integrity.json``) before anything else is read; ``False``
    (the command line's ``--no-verify``) loads a folder whose files changed since it was saved, e.g. after a
    deliberate edit. The manifest's claims are checked against the config and the stored tensors either way.
    Every problem with the folder is a :class:`ModelLoadError` with a one-line message.

    ``dtype`` (fp32, bf16, fp16; None or ``auto``: the compute dtype the folder records, float32 for folders that
    record none) is what the model computes in: its float parameters, and what its quantized layers return.
    """
    from qdiffuse.kernels import check_runtime

    check_runtime(runtime)
    wanted = parse_dtype(dtype)
    folder = Path(folder)
    covered = verify_folder(folder, required=(QUANT_JSON, QUANT_WEIGHTS, SCHEDULER_CONFIG)) if verify else None
    reading = [folder / QUANT_JSON]  # the file being turned into the model, for the errors below
    try:
        return _load_quantized(folder, device, runtime, covered, reading, wanted)
    except ModelLoadError as exc:
        if "\n" in str(exc):
            raise ModelLoadError(one_line(exc)) from None
        raise
    except QDiffuseError as exc:  # a parser's ConfigError/DataError: still the folder's fault
        raise ModelLoadError(f"{reading[0]} is inconsistent ({one_line(exc)}); {REQUANTIZE}") from None
    except (torch.cuda.OutOfMemoryError, MemoryError):
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError, OverflowError) as exc:
        # The checks before the parsers name what is wrong where they can; whatever slips past them is still a
        # malformed folder, not a crash, and keeps its cause for a debugger. (RecursionError is a RuntimeError.)
        raise ModelLoadError(
            f"cannot load {reading[0]} ({type(exc).__name__}: {one_line(exc)}); the folder is damaged or "
            f"inconsistent: {REQUANTIZE}"
        ) from exc


def _load_quantized(
    folder: Path, device: str, runtime: str, covered: set[str] | None, reading: list[Path],
    dtype: torch.dtype | None,
) -> LoadedModel:
    from qdiffuse.kernels import RuntimeReport
    from qdiffuse.kernels.base import pin_static_params
    from qdiffuse.kernels.freeze import REPORT_ATTR, realize_attention

    manifest = read_json(folder / QUANT_JSON, "quantization manifest")
    version = manifest.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise ModelLoadError(
            f"{folder} has quantized-format version {short_repr(version)}; this qdiffuse reads version "
            f"{FORMAT_VERSION}: {REQUANTIZE}"
        )
    sub, config, layers_meta, plan, calibration = parse_manifest(manifest, folder / QUANT_JSON)
    check_scheme(config, folder / QUANT_JSON)
    if dtype is None:
        recorded = manifest.get("dtype", "fp32")
        if recorded not in DTYPES:
            raise ModelLoadError(f"{folder / QUANT_JSON} records dtype {short_repr(recorded)}: {REQUANTIZE}")
        dtype = DTYPES[recorded]
    check_dtype_supported(dtype, device)
    if covered is not None:  # files read below must be covered too, or deleting their entries would skip them
        from qdiffuse.integrity import INTEGRITY_FILE, NO_VERIFY_HINT

        for rel in (f"{sub}/config.json", *([META_FILE] if (folder / META_FILE).exists() else [])):
            if rel not in covered:
                raise ModelLoadError(f"{folder / INTEGRITY_FILE} does not cover {rel}; {NO_VERIFY_HINT}")
    reading[0] = folder / QUANT_WEIGHTS
    tensors = _read_tensors(folder / QUANT_WEIGHTS, device)
    check_layout(manifest.get("tensors"), tensors, folder)
    check_entries(config, layers_meta, tensors)
    reading[0] = folder / sub / "config.json"
    model_config = read_json(folder / sub / "config.json", "model config")
    with parameter_budget(parameter_limit(layers_meta, tensors), folder / sub / "config.json"):
        model = build_model(model_config, str(folder / sub), meta=True)
    quantize_model(model, config)
    reading[0] = folder / QUANT_WEIGHTS
    report = RuntimeReport(runtime)
    _load_tensors(model, tensors, layers_meta, folder, report, torch.device(device), dtype)
    cast_compute_dtype(model, dtype)
    if runtime == "real":
        report.attention = realize_attention(model, torch.device(device))
        pin_static_params(model)
    model.to(device).eval()
    setattr(model, REPORT_ATTR, report)
    reading[0] = folder / SCHEDULER_CONFIG
    scheduler_config = read_json(folder / SCHEDULER_CONFIG, "scheduler config")
    reading[0] = folder / META_FILE
    meta = read_json(folder / META_FILE, "qdiffuse.json") if (folder / META_FILE).is_file() else {}
    if TWIN_META_KEY in meta:
        apply_twin(model, TwinSpec.from_dict(meta[TWIN_META_KEY]), fold_weights=False)
    setattr(model, STATE_ATTR, QuantState(config, plan, calibration))
    reading[0] = folder / sub / "config.json"  # the conventions Denoiser reads off the model config
    return LoadedModel(Denoiser.from_model(model, meta), scheduler_config, str(folder), sub, meta)


def _read_tensors(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except FileNotFoundError:
        raise ModelLoadError(f"{path} is missing; the quantized folder is incomplete") from None
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, OverflowError) as exc:
        raise ModelLoadError(
            f"{path} is not a readable safetensors file ({one_line(exc)}); {REQUANTIZE}"
        ) from None


def _load_tensors(
    model: nn.Module,
    tensors: dict[str, torch.Tensor],
    layers_meta: dict[str, Any],
    folder: Path,
    report: RuntimeReport,
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    from qdiffuse.kernels import LayerRuntime, real_layer

    layers = dict(quant_layers(model))
    if set(layers) != set(layers_meta):
        raise ModelLoadError(f"{folder}: quantized layers do not match the manifest; the folder is inconsistent")
    used: set[str] = set()
    for name, layer in layers.items():
        entry = layers_meta[name]
        check_layer_claims(layer, entry, name)
        for k, quantizer in enumerate(layer.weight_quantizers):
            for buf in ("scale", "zero_point", "block_scale", "lzs_flags"):
                key = f"{name}.weight_quantizers.{k}.{buf}"
                if key in tensors:
                    setattr(quantizer, buf, _quantizer_buffer(tensors[key], key, buf == "lzs_flags"))
                    used.add(key)
        codes = []
        for k, code_shape in enumerate(entry["code_shapes"]):
            key = f"{name}{CODES}{k}"
            if key not in tensors:
                raise ModelLoadError(f"{folder / QUANT_WEIGHTS} lacks tensor {key!r}; the folder is incomplete")
            raw = tensors[key]
            unpacked = unpack_bits(raw, entry["bits"], math.prod(code_shape)) if entry["bits"] < 8 else raw
            codes.append(unpacked.reshape(code_shape))
            used.add(key)
        if report.runtime == "real":
            real, reasons = real_layer(layer, codes, device)
            set_submodule(model, name, real)
            report.layers.append(LayerRuntime(name, real.kernel_names, real.packed_bytes(), reasons))
            continue
        parts = [
            q.decode(c, torch.Size(shape))
            for q, c, shape in zip(layer.weight_quantizers, codes, entry["shapes"], strict=True)
        ]
        layer.weight = nn.Parameter((parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)).to(dtype))
        layer.weight_hardened = bool(entry.get("weight_hardened", True))
        report.layers.append(LayerRuntime(name, ["simulated"], 0))
    rest = {k: v for k, v in tensors.items() if k not in used}
    _assign_state(model, rest, folder, loaded=used, dtype=dtype)


def _quantizer_buffer(value: torch.Tensor, key: str, flags: bool) -> torch.Tensor:
    """A weight quantizer's stored parameter: QuaRTZ flags are packed uint8, every other one is a float."""
    if flags and value.dtype != torch.uint8:
        raise ModelLoadError(f"{key} is {tensor_layout(value)}, not packed uint8 flags; the folder is damaged")
    if not flags and not value.is_floating_point():
        raise ModelLoadError(f"{key} is {tensor_layout(value)}, not a float tensor; the folder is damaged")
    return value if flags else value.float()


QUANTIZER_MODULES = (WeightQuantizer, ActivationQuantizer, InputTreatment)
"""Modules whose float buffers (scales, zero points, smoothing vectors, FP branches) stay float32 whatever the
compute dtype: they are quantizer parameters, cast per call where a matmul needs them."""


def cast_compute_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """Put every float parameter of ``model`` in ``dtype``. Buffers keep the dtype they were saved in (or, for
    those the config builds, e.g. a DiT's position table, the one diffusers' own loading leaves them in), so the
    loaded model computes exactly what the saved one did."""
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None and param.is_floating_point() and param.dtype != dtype:
                module._parameters[name] = nn.Parameter(param.detach().to(dtype), requires_grad=param.requires_grad)


def _assign_state(
    model: nn.Module, tensors: dict[str, torch.Tensor], folder: Path, loaded: set[str], dtype: torch.dtype
) -> None:
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
            out = split_weight_shapes(module)[0][0]
            if tuple(value.shape) != (out,) or not value.is_floating_point():
                raise ModelLoadError(f"{key}: stored {tensor_layout(value)} is not the float bias of {out} outputs")
            module.bias = nn.Parameter(value.to(dtype))  # a bias that bias correction gave a layer that had none
        elif isinstance(current, nn.Parameter):
            if current.shape != value.shape:
                raise ModelLoadError(f"{key}: stored shape {tuple(value.shape)} != model {tuple(current.shape)}")
            target = dtype if value.is_floating_point() else current.dtype
            module._parameters[attr] = nn.Parameter(value.to(target), requires_grad=current.requires_grad)
        elif attr in module._buffers:
            if value.is_floating_point() and isinstance(module, QUANTIZER_MODULES):
                value = value.float()
            module._buffers[attr] = value
        else:
            raise ModelLoadError(f"{folder / QUANT_WEIGHTS} has unknown tensor {key}")
    ranged = [n for n, m in model.named_modules() if isinstance(m, ActivationQuantizer) and not m.needs_calibration
              and (m.scale is not None or m.zero_point is not None)]
    if ranged:  # calibration never sets them there: the config was changed to make the quantizer dynamic
        raise ModelLoadError(
            f"{folder / QUANT_WEIGHTS} holds calibrated ranges for {ranged[0]}, which the config makes dynamic "
            f"(ranges from each call); the manifest was edited or damaged: {REQUANTIZE}"
        )
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
            "dtype": manifest.get("dtype", "fp32"),
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
