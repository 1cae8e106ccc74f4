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
tensors even when the hashes are skipped, so a damaged folder fails with one line instead of sampling garbage.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qdiffuse import __version__
from qdiffuse.api import STATE_ATTR, QuantState, quant_state
from qdiffuse.config import MIXED_SCHEMES, SCHEMES, QuantConfig
from qdiffuse.errors import ModelLoadError, QDiffuseError
from qdiffuse.formats import pack_bits, unpack_bits
from qdiffuse.formats.spec import FormatSpec
from qdiffuse.fsutil import QUANTIZED_FOLDER, atomic_dir, folder_size
from qdiffuse.integrity import verify_folder, write_integrity
from qdiffuse.kernels.freeze import RuntimeReport
from qdiffuse.kernels.modules import RealLayer, split_weight_shapes
from qdiffuse.models.denoiser import Denoiser
from qdiffuse.models.loading import META_FILE, MODEL_SUBFOLDERS, LoadedModel, build_model, read_json
from qdiffuse.models.twins import TWIN_META_KEY, TwinSpec, apply_twin
from qdiffuse.nn.layers import QuantLayer
from qdiffuse.nn.quantizer import ActivationQuantizer, WeightQuantizer
from qdiffuse.nn.rewrite import LayerPlan, quant_layers, quantize_model, set_submodule

QUANT_JSON = "quantization.json"
QUANT_WEIGHTS = "quantized.safetensors"
COST_FILE = "cost.json"
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
FORMAT_VERSION = 1
CODES = ".weight_codes."
REQUANTIZE = "re-run qdiffuse quantize"


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
        "config": state.config.to_dict(),
        "plan": [vars(p) for p in state.plan],
        "layers": layers_meta,
        "calibration": state.calibration,
        "tensors": {key: _layout(value) for key, value in sorted(tensors.items())},
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


def _layout(tensor: torch.Tensor) -> str:
    """``float32[16, 1, 1, 1]``: what the manifest records of each stored tensor. The loader compares it with the
    file's header, which catches a header whose dtypes, shapes or names were changed while its byte counts still
    add up (an int32 read as float32 parses fine and gives a different model)."""
    return f"{str(tensor.dtype).removeprefix('torch.')}{list(tensor.shape)}"


def load_quantized(
    folder: str | Path, device: str = "cpu", runtime: str = "real", verify: bool = True
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
    """
    from qdiffuse.kernels import check_runtime

    check_runtime(runtime)
    folder = Path(folder)
    covered = verify_folder(folder, required=(QUANT_JSON, QUANT_WEIGHTS, SCHEDULER_CONFIG)) if verify else None
    reading = [folder / QUANT_JSON]  # the file being turned into the model, for the errors below
    try:
        return _load_quantized(folder, device, runtime, covered, reading)
    except ModelLoadError as exc:
        if "\n" in str(exc):
            raise ModelLoadError(_one_line(exc)) from None
        raise
    except QDiffuseError as exc:  # a parser's ConfigError/DataError: still the folder's fault
        raise ModelLoadError(f"{reading[0]} is inconsistent ({_one_line(exc)}); {REQUANTIZE}") from None
    except (torch.cuda.OutOfMemoryError, MemoryError):
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError, OverflowError) as exc:
        # The checks before the parsers name what is wrong where they can; whatever slips past them is still a
        # malformed folder, not a crash, and keeps its cause for a debugger. (RecursionError is a RuntimeError.)
        raise ModelLoadError(
            f"cannot load {reading[0]} ({type(exc).__name__}: {_one_line(exc)}); the folder is damaged or "
            f"inconsistent: {REQUANTIZE}"
        ) from exc


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _load_quantized(
    folder: Path, device: str, runtime: str, covered: set[str] | None, reading: list[Path]
) -> LoadedModel:
    from qdiffuse.kernels import RuntimeReport
    from qdiffuse.kernels.base import pin_static_params
    from qdiffuse.kernels.freeze import REPORT_ATTR, realize_attention

    manifest = read_json(folder / QUANT_JSON, "quantization manifest")
    version = manifest.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise ModelLoadError(
            f"{folder} has quantized-format version {_short(version)}; this qdiffuse reads version {FORMAT_VERSION}: "
            f"{REQUANTIZE}"
        )
    sub, config, layers_meta, plan, calibration = _parse_manifest(manifest, folder / QUANT_JSON)
    _check_scheme(config, folder / QUANT_JSON)
    if covered is not None:  # files read below must be covered too, or deleting their entries would skip them
        from qdiffuse.integrity import INTEGRITY_FILE, NO_VERIFY_HINT

        for rel in (f"{sub}/config.json", *([META_FILE] if (folder / META_FILE).exists() else [])):
            if rel not in covered:
                raise ModelLoadError(f"{folder / INTEGRITY_FILE} does not cover {rel}; {NO_VERIFY_HINT}")
    reading[0] = folder / QUANT_WEIGHTS
    tensors = _read_tensors(folder / QUANT_WEIGHTS, device)
    _check_layout(manifest.get("tensors"), tensors, folder)
    _check_entries(config, layers_meta, tensors)
    reading[0] = folder / sub / "config.json"
    model_config = read_json(folder / sub / "config.json", "model config")
    with _parameter_budget(_parameter_limit(layers_meta, tensors), folder / sub / "config.json"):
        model = build_model(model_config, str(folder / sub), meta=True)
    quantize_model(model, config)
    reading[0] = folder / QUANT_WEIGHTS
    report = RuntimeReport(runtime)
    _load_tensors(model, tensors, layers_meta, folder, report, torch.device(device))
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


def _is_int(value: Any, low: int = 0) -> bool:
    """A JSON integer >= ``low`` (``True`` and ``4.0`` are not: the loader would compute with them)."""
    return type(value) is int and value >= low


def _is_shape(value: Any) -> bool:
    return isinstance(value, list) and all(_is_int(d) for d in value)


def _parse_manifest(
    manifest: dict[str, Any], path: Path
) -> tuple[str, QuantConfig, dict[str, Any], list[LayerPlan], dict[str, Any]]:
    """The manifest's parts, each checked for the type the loader uses it as: a wrong type is a one-line error
    naming the field, never a crash deep inside the rebuild."""

    def malformed(what: str) -> ModelLoadError:
        return ModelLoadError(f"{path} is malformed ({what}); {REQUANTIZE}")

    for key in ("model_subfolder", "config", "layers", "plan"):
        if key not in manifest:
            raise malformed(f"no {key!r}")
    sub = manifest["model_subfolder"]
    if sub not in MODEL_SUBFOLDERS:  # also keeps the path inside the folder
        raise malformed(f"model_subfolder {_short(sub)} is not one of {', '.join(MODEL_SUBFOLDERS)}")
    if not isinstance(manifest["config"], dict):
        raise malformed("'config' is not an object")
    try:
        config = QuantConfig.from_dict(manifest["config"])
    except QDiffuseError as exc:
        raise malformed(f"config: {_one_line(exc)}") from None
    if not isinstance(config.scheme, str):
        raise malformed(f"config.scheme {_short(config.scheme)} is not a string")
    layers_meta = manifest["layers"]
    if not isinstance(layers_meta, dict):
        raise malformed("'layers' is not an object")
    for name, entry in layers_meta.items():
        problem = _entry_problem(entry)
        if problem:
            raise malformed(f"layer {name}: {problem}")
    plan_data = manifest["plan"]
    if not isinstance(plan_data, list) or not all(
        isinstance(p, dict) and set(p) == {"name", "kind", "label"} and all(isinstance(v, str) for v in p.values())
        for p in plan_data
    ):
        raise malformed("'plan' is not a list of {name, kind, label} strings")
    plan = [LayerPlan(**p) for p in plan_data]
    calibration = manifest.get("calibration", {})
    if not isinstance(calibration, dict):
        raise malformed("'calibration' is not an object")
    if not isinstance(manifest.get("source"), (str, type(None))):
        raise malformed("'source' is not a string")
    return sub, config, layers_meta, plan, calibration


def _entry_problem(entry: Any) -> str | None:
    """What is malformed in one layer entry of the manifest (None: nothing)."""
    if not isinstance(entry, dict):
        return "its entry is not an object"
    for key in ("splits", "shapes", "code_shapes", "bits"):
        if key not in entry:
            return f"no {key!r}"
    splits = entry["splits"]
    if not isinstance(splits, list) or not splits or not all(_is_int(s, 1) for s in splits):
        return f"splits {_short(splits)} is not a list of positive integers"
    for key in ("shapes", "code_shapes"):
        value = entry[key]
        if not isinstance(value, list) or len(value) != len(splits) or not all(_is_shape(s) for s in value):
            return f"{key} {_short(value)} is not one shape per split"
    if not _is_int(entry["bits"], 2) or entry["bits"] > 8:
        return f"bits {_short(entry['bits'])} is not an integer from 2 to 8"
    if not isinstance(entry.get("weight_hardened", True), bool):
        return f"weight_hardened {_short(entry['weight_hardened'])} is not true or false"
    return None


def _short(value: Any) -> str:
    """``repr`` cut to a readable length: a damaged field may hold a whole subtree."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _same_format(actual: FormatSpec | None, named: FormatSpec | None, quartz_variant: bool) -> bool:
    """``actual`` is the format the scheme name stands for; a quartz-* scheme may pick its QuaRTZ variant."""
    if actual is None or named is None:
        return actual is named
    if quartz_variant and actual.kind == named.kind == "quartz":
        return replace(actual, lzs_group=named.lzs_group, rounding=named.rounding) == named
    return actual == named


def _check_scheme(config: QuantConfig, path: Path) -> None:
    """The scheme label must name the formats the config holds, or ``info`` and the bench would report one
    scheme while the folder computes in another. A label that names no built-in scheme (a config written in
    Python, e.g. ``"custom"``) promises no formats and is not checked."""
    label = config.scheme
    if label in MIXED_SCHEMES:
        named = SCHEMES[MIXED_SCHEMES[label][0]]
    elif label in SCHEMES:
        named = SCHEMES[label]
    else:
        return
    for role, actual, expected in (("weight", config.weight, named[0]), ("activation", config.activation, named[1])):
        if not _same_format(actual, expected, label.startswith("quartz-")):
            described = actual.describe() if actual else "fp"
            raise ModelLoadError(
                f"{path}: scheme {label!r} means {role}s {expected.describe() if expected else 'fp'}, but "
                f"config.{role} is {described}; the manifest was edited or damaged: {REQUANTIZE}"
            )


def _read_tensors(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except FileNotFoundError:
        raise ModelLoadError(f"{path} is missing; the quantized folder is incomplete") from None
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, OverflowError) as exc:
        raise ModelLoadError(
            f"{path} is not a readable safetensors file ({_one_line(exc)}); {REQUANTIZE}"
        ) from None


def _check_layout(catalog: Any, tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """Every stored tensor must have the name, dtype and shape the manifest recorded at save time (folders from
    before the record have none and skip this)."""
    if catalog is None:
        return
    path = folder / QUANT_WEIGHTS
    if not isinstance(catalog, dict) or not all(isinstance(v, str) for v in catalog.values()):
        raise ModelLoadError(f"{folder / QUANT_JSON} is malformed ('tensors' is not a map of layouts); {REQUANTIZE}")
    missing, unlisted = sorted(set(catalog) - set(tensors)), sorted(set(tensors) - set(catalog))
    if missing:
        raise ModelLoadError(f"{path} lacks tensor {missing[0]!r}; the folder is incomplete")
    if unlisted:
        raise ModelLoadError(
            f"{path} holds tensor {unlisted[0]!r} that {QUANT_JSON} does not list; the folder is inconsistent"
        )
    for key in sorted(tensors):
        stored = _layout(tensors[key])
        if stored != catalog[key]:
            raise ModelLoadError(
                f"{path}: tensor {key!r} is {stored} but {QUANT_JSON} records {catalog[key]}; the folder is damaged"
            )


def _code_bytes(code_shape: list[int], bits: int) -> int:
    """Elements of a layer's stored code tensor: packed bytes below 8 bits, one byte per code at 8."""
    n = math.prod(code_shape)
    return -(-n * bits // 8) if bits < 8 else n


def _check_entries(config: QuantConfig, layers_meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """The layer entries' claims that the manifest and the tensors alone can check, before the model is built:
    ``bits`` is the value bits of the weight format the config gives the layer, each split's weight shape holds
    its input channels and encodes to the entry's code shape, and each packed code tensor is 1-D uint8 with
    exactly the bytes that code shape takes at those bits (a short one would unpack past its end, a long one
    means the entry lies about the shape or the bit-width)."""
    quantizers: dict[FormatSpec, WeightQuantizer] = {}
    for name, entry in layers_meta.items():
        if any(f"{name}{CODES}{k}" not in tensors for k in range(len(entry["code_shapes"]))):
            continue  # a layer the folder does not store: the rebuild below says which side is wrong
        formats = config.formats_for(name)
        if formats is not None:
            spec = formats[0]
            if entry["bits"] != spec.value_bits:
                raise _bits_mismatch(name, entry["bits"], spec)
            quantizer = quantizers.setdefault(spec, WeightQuantizer(spec))
            for k, (split, shape) in enumerate(zip(entry["splits"], entry["shapes"], strict=True)):
                if len(shape) < 2 or shape[1] != split:
                    raise ModelLoadError(
                        f"{name}: the manifest's weight shape {shape} of split {k} does not hold its {split} input "
                        "channels; the manifest is damaged"
                    )
                _check_code_shape(name, k, entry["code_shapes"][k], quantizer, shape, spec)
        for k, code_shape in enumerate(entry["code_shapes"]):
            key = f"{name}{CODES}{k}"
            raw, bits = tensors[key], entry["bits"]
            if raw.dtype != torch.uint8 or raw.dim() != 1:
                raise ModelLoadError(
                    f"{name}: weight codes {key} are {_layout(raw)}, not a 1-D uint8 stream; the folder is damaged"
                )
            need = _code_bytes(code_shape, bits)
            if raw.numel() != need:
                raise ModelLoadError(
                    f"{name}: weight codes {key} hold {raw.numel()} bytes, but {math.prod(code_shape)} {bits}-bit "
                    f"codes of shape {code_shape} take {need}; the manifest or {QUANT_WEIGHTS} is damaged"
                )


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
    for name, layer in layers.items():
        entry = layers_meta[name]
        _check_claims(layer, entry, name)
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
        layer.weight = nn.Parameter(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1))
        layer.weight_hardened = bool(entry.get("weight_hardened", True))
        report.layers.append(LayerRuntime(name, ["simulated"], 0))
    rest = {k: v for k, v in tensors.items() if k not in used}
    _assign_state(model, rest, folder, loaded=used)


def _quantizer_buffer(value: torch.Tensor, key: str, flags: bool) -> torch.Tensor:
    """A weight quantizer's stored parameter: QuaRTZ flags are packed uint8, every other one is a float."""
    if flags and value.dtype != torch.uint8:
        raise ModelLoadError(f"{key} is {_layout(value)}, not packed uint8 flags; the folder is damaged")
    if not flags and not value.is_floating_point():
        raise ModelLoadError(f"{key} is {_layout(value)}, not a float tensor; the folder is damaged")
    return value if flags else value.float()


def _bits_mismatch(name: str, bits: int, spec: FormatSpec) -> ModelLoadError:
    return ModelLoadError(
        f"{name}: the manifest says {bits}-bit weight codes, but the config gives this layer {spec.describe()} "
        f"({spec.value_bits}-bit codes); the manifest was edited or damaged: {REQUANTIZE}"
    )


def _check_claims(layer: QuantLayer, entry: dict[str, Any], name: str) -> None:
    """The manifest's entry must describe the layer the config rebuilds: its splits and weight shapes, the value
    bits of its weight format, and the code shape each split's quantizer encodes to."""
    if entry["splits"] != list(layer.splits):
        raise ModelLoadError(f"{name}: manifest splits {entry['splits']} != model {list(layer.splits)}")
    expected = [list(shape) for shape in split_weight_shapes(layer)]
    if entry["shapes"] != expected:
        raise ModelLoadError(f"{name}: stored weight shapes {entry['shapes']} != model {expected}")
    spec = layer.weight_spec
    if entry["bits"] != spec.value_bits:
        raise _bits_mismatch(name, entry["bits"], spec)
    for k, (quantizer, shape) in enumerate(zip(layer.weight_quantizers, entry["shapes"], strict=True)):
        _check_code_shape(name, k, entry["code_shapes"][k], quantizer, shape, spec)


def _check_code_shape(
    name: str, k: int, code_shape: list[int], quantizer: WeightQuantizer, shape: list[int], spec: FormatSpec
) -> None:
    want = list(quantizer.code_shape(torch.Size(shape)))
    if code_shape != want:
        raise ModelLoadError(
            f"{name}: the manifest's code shape {code_shape} of split {k} != {want}, the shape {spec.describe()} "
            f"codes of a {shape} weight take; the folder is damaged"
        )


def _parameter_limit(layers_meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> int:
    """Most parameter elements the model config may build: twice what the folder stores (every stored tensor plus
    the quantized weights the manifest describes), and a MiB of slack. A real folder's model has at most what it
    stores; a config edited to 2**40 blocks or channels would otherwise build for hours before any shape check."""
    stored = sum(t.numel() for t in tensors.values())
    weights = sum(math.prod(shape) for entry in layers_meta.values() for shape in entry["shapes"])
    return 2 * (stored + weights) + (1 << 20)


@contextmanager
def _parameter_budget(limit: int, where: Path) -> Iterator[None]:
    """Stop building a model whose parameters outgrow ``limit`` elements (see :func:`_parameter_limit`).

    Counts in ``nn.Module.register_parameter``, which every parameter of every module passes through (the
    loader's meta-device build hooks the same place)."""
    original = nn.Module.register_parameter
    total = 0

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        nonlocal total
        if param is not None:
            total += param.numel()
            if total > limit:
                raise ModelLoadError(
                    f"{where} describes a model with more than {limit} parameter values, far more than the folder "
                    f"stores; the model config is damaged: {REQUANTIZE}"
                )
        original(module, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


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
            out = split_weight_shapes(module)[0][0]
            if tuple(value.shape) != (out,) or not value.is_floating_point():
                raise ModelLoadError(f"{key}: stored {_layout(value)} is not the float bias of {out} outputs")
            module.bias = nn.Parameter(value.float())  # a bias that bias correction gave a layer that had none
        elif isinstance(current, nn.Parameter):
            if current.shape != value.shape:
                raise ModelLoadError(f"{key}: stored shape {tuple(value.shape)} != model {tuple(current.shape)}")
            module._parameters[attr] = nn.Parameter(value.to(current.dtype), requires_grad=current.requires_grad)
        elif attr in module._buffers:
            module._buffers[attr] = value.float() if value.is_floating_point() else value
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
