"""Quantized text encoders on disk: a transformers model as a qdiffuse folder (safetensors + JSON, never pickle).

A pipeline's quantized text encoder cannot go through ``save_pretrained``: its Linear layers hold packed codes on
real kernels, and transformers would write (and later read) float weights that no longer exist. Each one is
written instead as a folder in its component's subfolder (``text_encoder/``, ``text_encoder_2/``, ...)::

    quantization.json       transformers class, QuantConfig, plan, per-layer code shapes, stored tensor layouts, ties
    quantized.safetensors   packed integer codes of the quantized layers, quantizer parameters, every other tensor
    config.json             the transformers config, read back by the class's own config class
    integrity.json          SHA-256 of every other file (qdiffuse.integrity), checked before anything is read

The codes, manifest fields and checks are those of a denoiser folder (:mod:`qdiffuse.io`, :mod:`qdiffuse.claims`),
so a damaged or edited folder fails with the same one-line errors. What differs is the model: the skeleton is
built from ``config.json`` by the transformers class the manifest names (only a ``PreTrainedModel`` subclass that
transformers itself exports, so a folder cannot make qdiffuse build or import anything else), and tied weights
(T5's ``shared`` and ``encoder.embed_tokens``) are stored once and tied again after loading.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qdiffuse.errors import ModelLoadError, QDiffuseError

KIND = "transformers-text-encoder"
"""The manifest's ``kind``: tells a text encoder folder from a denoiser folder (which has none)."""
CONFIG_FILE = "config.json"
ATTENTION = ("eager", "sdpa")
"""Attention implementations a folder may ask for; others (hub kernels) could fetch and run code."""
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
"""Parameter dtypes a folder's config may give the encoder it rebuilds (the dtype it was saved in)."""


def _tied_keys(model: nn.Module, skip: set[str]) -> dict[str, str]:
    """State-dict keys that are the same tensor as an earlier key (alias -> first key), quantized weights aside."""
    first: dict[int, str] = {}
    tied: dict[str, str] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if key in skip or value is None:
            continue
        if id(value) in first:
            tied[key] = first[id(value)]
        else:
            first[id(value)] = key
    return tied


def _transformers_class(name: Any, where: Path) -> type:
    """The transformers model class ``name``, or a one-line error: only ``PreTrainedModel`` subclasses that the
    ``transformers`` package exports by that name (no dotted paths, no other package)."""
    import transformers

    if not isinstance(name, str) or not re.fullmatch(r"[A-Z][A-Za-z0-9]*", name):
        raise ModelLoadError(f"{where} names class {str(name)[:60]!r}, not a transformers model class")
    try:
        cls = getattr(transformers, name)
    except (AttributeError, ImportError, RuntimeError):  # transformers imports its classes lazily
        cls = None
    if not isinstance(cls, type) or not issubclass(cls, transformers.PreTrainedModel):
        raise ModelLoadError(f"{where} names class {name!r}, which transformers does not have; upgrade transformers")
    return cls


def save_text_encoder(module: nn.Module, out: str | Path, overwrite: bool = False) -> Path:
    """Write the quantized transformers model ``module`` (real or simulated layers) to folder ``out``, atomically."""
    from safetensors.torch import save_file

    from qdiffuse import __version__
    from qdiffuse.claims import CODES, QUANT_JSON, QUANT_WEIGHTS, tensor_layout
    from qdiffuse.formats import pack_bits
    from qdiffuse.fsutil import QUANTIZED_FOLDER, atomic_dir
    from qdiffuse.integrity import write_integrity
    from qdiffuse.io import FORMAT_VERSION, _code_bits, _storage_codes, quantized_layers
    from qdiffuse.pipelines.text_encoders import text_encoder_state

    state = text_encoder_state(module)
    if state is None:
        raise ModelLoadError(f"this {type(module).__name__} is not a quantized text encoder; nothing to save")
    name = type(module).__name__
    import transformers

    if getattr(transformers, name, None) is not type(module):
        raise ModelLoadError(f"{name} is not a transformers model class; only transformers text encoders are saved")
    tensors: dict[str, torch.Tensor] = {}
    layers_meta: dict[str, Any] = {}
    skip: set[str] = set()
    for layer_name, layer in quantized_layers(module):
        skip.add(f"{layer_name}.weight")
        entry = {"splits": list(layer.splits), "shapes": [], "code_shapes": [], "bits": _code_bits(layer)}
        for k, (codes, shape) in enumerate(_storage_codes(layer)):
            entry["shapes"].append(list(shape))
            entry["code_shapes"].append(list(codes.shape))
            packed = pack_bits(codes, entry["bits"]) if entry["bits"] < 8 else codes.flatten()
            tensors[f"{layer_name}{CODES}{k}"] = packed
        entry["weight_hardened"] = layer.weight_hardened
        layers_meta[layer_name] = entry
    tied = _tied_keys(module, skip)
    for key, value in module.state_dict().items():
        if key not in skip and key not in tied:
            tensors[key] = value.detach().cpu()
    config = getattr(module, "config", None)
    manifest = {
        "format_version": FORMAT_VERSION,
        "qdiffuse_version": __version__,
        "kind": KIND,
        "library": "transformers",
        "class": name,
        "attn_implementation": getattr(config, "_attn_implementation", None),
        "config": state.config.to_dict(),
        "plan": [vars(p) for p in state.plan],
        "layers": layers_meta,
        "calibration": state.calibration,
        "tied": tied,
        "tensors": {key: tensor_layout(value) for key, value in sorted(tensors.items())},
    }
    with atomic_dir(Path(out), overwrite, QUANTIZED_FOLDER) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / QUANT_WEIGHTS))
        (tmp / QUANT_JSON).write_text(json.dumps(manifest, indent=2))
        (tmp / CONFIG_FILE).write_text(config.to_json_string())
        write_integrity(tmp)  # last: it hashes everything above
    return Path(out)


def load_text_encoder(folder: str | Path, device: str = "cpu", runtime: str = "real", verify: bool = True) -> nn.Module:
    """Rebuild a quantized text encoder from its folder; its outputs equal those of the encoder that was saved.

    ``runtime="real"`` builds each quantized layer from its stored codes on the kernel the dispatch picks (no
    float copy of a quantized weight is made); ``"simulated"`` decodes the codes into float weights. ``verify``
    checks the content hashes first. Every problem with the folder is a :class:`ModelLoadError` of one line."""
    from qdiffuse.claims import QUANT_JSON, QUANT_WEIGHTS, REQUANTIZE, one_line
    from qdiffuse.integrity import verify_folder
    from qdiffuse.kernels import check_runtime

    check_runtime(runtime)
    folder = Path(folder)
    if verify:
        verify_folder(folder, required=(QUANT_JSON, QUANT_WEIGHTS, CONFIG_FILE))
    reading = [folder / QUANT_JSON]
    try:
        return _load_text_encoder(folder, device, runtime, reading)
    except ModelLoadError as exc:
        if "\n" in str(exc):
            raise ModelLoadError(one_line(exc)) from None
        raise
    except QDiffuseError as exc:
        raise ModelLoadError(f"{reading[0]} is inconsistent ({one_line(exc)}); {REQUANTIZE}") from None
    except (torch.cuda.OutOfMemoryError, MemoryError):
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError, OverflowError) as exc:
        raise ModelLoadError(
            f"cannot load {reading[0]} ({type(exc).__name__}: {one_line(exc)}); the folder is damaged or "
            f"inconsistent: {REQUANTIZE}"
        ) from exc


def _load_text_encoder(folder: Path, device: str, runtime: str, reading: list[Path]) -> nn.Module:
    from qdiffuse.api import QuantState
    from qdiffuse.claims import (
        QUANT_JSON,
        QUANT_WEIGHTS,
        REQUANTIZE,
        check_entries,
        check_layout,
        check_scheme,
        parameter_budget,
        parameter_limit,
        parse_manifest,
        short_repr,
    )
    from qdiffuse.io import FORMAT_VERSION, _load_tensors, _read_tensors
    from qdiffuse.kernels.base import pin_static_params
    from qdiffuse.kernels.freeze import REPORT_ATTR, RuntimeReport
    from qdiffuse.models.loading import MODEL_SUBFOLDERS, parameters_on_meta, read_json
    from qdiffuse.nn.rewrite import quantize_model
    from qdiffuse.pipelines.text_encoders import SCHEME_ATTR, TEXT_STATE_ATTR

    path = folder / QUANT_JSON
    manifest = read_json(path, "quantization manifest")
    version = manifest.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise ModelLoadError(
            f"{folder} has quantized-format version {short_repr(version)}; this qdiffuse reads version "
            f"{FORMAT_VERSION}: {REQUANTIZE}"
        )
    if manifest.get("kind") != KIND or manifest.get("library") != "transformers":
        raise ModelLoadError(f"{path} does not describe a quantized transformers text encoder; {REQUANTIZE}")
    # parse_manifest checks every field a denoiser folder shares with this one; a text encoder folder has no
    # denoiser subfolder, so it is given a valid one to skip that single check
    shared = {**manifest, "model_subfolder": MODEL_SUBFOLDERS[0]}
    _, config, layers_meta, plan, calibration = parse_manifest(shared, path)
    check_scheme(config, path)
    cls = _transformers_class(manifest.get("class"), path)
    attention = manifest.get("attn_implementation")
    if attention is not None and attention not in ATTENTION:
        raise ModelLoadError(f"{path} names attention implementation {short_repr(attention)}; use one of {ATTENTION}")
    tied = manifest.get("tied", {})
    if not isinstance(tied, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tied.items()):
        raise ModelLoadError(f"{path} is malformed ('tied' is not a map of tensor names); {REQUANTIZE}")
    reading[0] = folder / QUANT_WEIGHTS
    tensors = _read_tensors(folder / QUANT_WEIGHTS, device)
    check_layout(manifest.get("tensors"), tensors, folder)
    check_entries(config, layers_meta, tensors)
    reading[0] = folder / CONFIG_FILE
    model_config = cls.config_class.from_dict(read_json(folder / CONFIG_FILE, "text encoder config"))
    dtype = getattr(model_config, "dtype", None) or torch.float32
    dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    if dtype not in DTYPES.values():  # transformers would look any string up on torch
        raise ModelLoadError(f"{folder / CONFIG_FILE} gives dtype {short_repr(dtype)}; use one of {', '.join(DTYPES)}")
    with parameter_budget(parameter_limit(layers_meta, tensors), folder / CONFIG_FILE), parameters_on_meta():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = cls._from_config(model_config, dtype=dtype, attn_implementation=attention)
    quantize_model(model, config)
    weight_keys = {f"{name}.weight" for name in layers_meta}
    if _tied_keys(model, weight_keys) != tied:
        raise ModelLoadError(f"{path}: the tied weights it records are not those of {cls.__name__}; {REQUANTIZE}")
    for alias, target in tied.items():  # stored once: every name of the tensor reads the same values
        if target in tensors:
            tensors[alias] = tensors[target]
    reading[0] = folder / QUANT_WEIGHTS
    report = RuntimeReport(runtime)
    _load_tensors(model, tensors, layers_meta, folder, report, torch.device(device), dtype)
    for alias, target in tied.items():
        owner, _, attr = alias.rpartition(".")
        model.get_submodule(owner)._parameters[attr] = model.get_parameter(target)
    if runtime == "real":
        pin_static_params(model)
    model.to(device).eval()
    setattr(model, REPORT_ATTR, report)
    setattr(model, TEXT_STATE_ATTR, QuantState(config, plan, calibration))
    setattr(model, SCHEME_ATTR, config.scheme)
    return model


def _marker_encoders(path: Path, marker: dict[str, Any]) -> dict[str, str]:
    """``qdiffuse_pipeline.json``'s quantized text encoders (component -> scheme), checked: each name must be a
    text encoder component, which also keeps every folder read inside the pipeline folder."""
    from qdiffuse.pipelines.store import PIPELINE_FILE
    from qdiffuse.pipelines.text_encoders import TEXT_COMPONENTS

    encoders = marker.get("text_encoders", {})
    if not isinstance(encoders, dict) or not all(
        name in TEXT_COMPONENTS and isinstance(scheme, str) for name, scheme in encoders.items()
    ):
        raise ModelLoadError(
            f"{path / PIPELINE_FILE} names quantized text encoders {str(encoders)[:60]}, not a map of "
            f"{', '.join(TEXT_COMPONENTS)} to schemes; re-save the pipeline"
        )
    return encoders


def save_text_encoders(pipe: Any, folder: Path) -> dict[str, str]:
    """Write every quantized text encoder of ``pipe`` into its subfolder of the pipeline folder being built;
    returns what ``qdiffuse_pipeline.json`` records of them (component -> scheme)."""
    from qdiffuse.pipelines.text_encoders import quantized_text_encoders, text_encoder_state

    saved = {}
    for name in quantized_text_encoders(pipe):
        module = getattr(pipe, name)
        state = text_encoder_state(module)
        if state is None:
            raise ModelLoadError(
                f"the pipeline's {name} holds quantized layers that quantize_text_encoders did not make; quantize "
                "the FP text encoders with qdiffuse.pipelines.text_encoders.quantize_text_encoders"
            )
        save_text_encoder(module, folder / name)
        saved[name] = state.config.scheme
    return saved


def load_text_encoders(
    path: str | Path, marker: dict[str, Any], device: str = "cpu", runtime: str = "real", verify: bool = True
) -> dict[str, nn.Module]:
    """The quantized text encoders ``marker`` names, rebuilt from their subfolders on ``runtime`` (component ->
    model, to pass to diffusers' ``from_pretrained`` in place of the ones it would load)."""
    from qdiffuse.pipelines.text_encoders import text_encoder_state

    path = Path(path)
    out = {}
    for name, scheme in _marker_encoders(path, marker).items():
        model = load_text_encoder(path / name, device, runtime, verify=verify)
        if text_encoder_state(model).config.scheme != scheme:
            raise ModelLoadError(f"{path / name} is not quantized to {scheme}, which the pipeline marker records")
        out[name] = model
    return out


def text_encoder_lines(path: str | Path, marker: dict[str, Any]) -> list[str]:
    """Per quantized text encoder, one line for ``qdiffuse info`` and the model card: class, scheme, method, the
    number of quantized layers and the size on disk (from the manifest alone)."""
    from qdiffuse.io import describe_folder

    path = Path(path)
    lines = []
    for name in _marker_encoders(path, marker):
        desc = describe_folder(path / name)
        manifest = read_manifest(path / name)
        lines.append(
            f"`{name}` ({manifest.get('class')}), scheme {desc['scheme']}, method {desc['method']}: "
            f"{len(desc['plan'])} Linear layers quantized, embeddings and norms FP; "
            f"{desc['bytes_on_disk'] / 2**20:.2f} MiB on disk (FP32 {desc['fp32_bytes'] / 2**20:.2f} MiB)"
        )
    return lines


def read_manifest(folder: Path) -> dict[str, Any]:
    from qdiffuse.claims import QUANT_JSON
    from qdiffuse.models.loading import read_json

    return read_json(Path(folder) / QUANT_JSON, "quantization manifest")


def quantized_encoder_names(path: str | Path, marker: dict[str, Any]) -> list[str]:
    """The components ``marker`` records as quantized text encoders."""
    return list(_marker_encoders(Path(path), marker))


__all__ = [
    "save_text_encoder",
    "load_text_encoder",
    "save_text_encoders",
    "load_text_encoders",
    "text_encoder_lines",
    "quantized_encoder_names",
]
