"""What a quantized folder claims about its stored tensors, and the checks that hold it to those claims.

The manifest (``quantization.json``) is the folder's account of itself, and the loader rebuilds the model from it:

* ``model_subfolder``, ``config`` and ``plan``: which model config to build and the :class:`QuantConfig` (scheme
  label, weight and activation formats, per-layer rules) that rewrites it, checked by :func:`parse_manifest` for
  the types the loader uses them as, and by :func:`check_scheme` for a label that names the formats it holds;
* ``tensors``: the name, dtype and shape of every tensor in ``quantized.safetensors``, checked by
  :func:`check_layout` against the file's header;
* ``layers``: per quantized layer its splits, the weight shape of each split, the shape of its integer codes and
  their bit-width, checked by :func:`check_entries` against the config and the packed code tensors before the
  model is built, and by :func:`check_layer_claims` against each layer the config rebuilds;
* the model config itself may describe only about as many parameters as the folder stores
  (:func:`parameter_limit`, enforced while building by :func:`parameter_budget`).

Every claim is checked on every load, with or without the content hashes of :mod:`qdiffuse.integrity`. The hashes
say only that the files are the ones that were recorded: ``--no-verify`` loads a deliberately edited folder, a
folder written before ``integrity.json`` existed has no record, and a record rewritten after an edit vouches for
the edit. A false claim does not fail by itself: codes read at the wrong bit-width or in the wrong shape decode
into different weights, a short code tensor unpacks past its end, an int32 tensor read as float32 parses fine,
and a config edited to ``2**40`` channels builds for hours. Each check turns such a folder into one
:class:`ModelLoadError` line naming the field, instead of a crash deep in the rebuild or a model sampling garbage.

This module must not import :mod:`qdiffuse.io`, which calls it; the folder's file names live here so that both
can name them in their messages.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qdiffuse.config import MIXED_SCHEMES, SCHEMES, QuantConfig
from qdiffuse.errors import ModelLoadError, QDiffuseError
from qdiffuse.formats.spec import FormatSpec
from qdiffuse.kernels.modules import split_weight_shapes
from qdiffuse.models.loading import MODEL_SUBFOLDERS, register_parameter_hook
from qdiffuse.nn.layers import QuantLayer
from qdiffuse.nn.quantizer import WeightQuantizer
from qdiffuse.nn.rewrite import LayerPlan

QUANT_JSON = "quantization.json"
QUANT_WEIGHTS = "quantized.safetensors"
CODES = ".weight_codes."
REQUANTIZE = "re-run qdiffuse quantize"


def one_line(exc: BaseException) -> str:
    """``exc`` as one line: every load error is one line, even when a parser's message spans several."""
    return " ".join(str(exc).split()) or type(exc).__name__


def short_repr(value: Any) -> str:
    """``repr`` cut to a readable length: a damaged field may hold a whole subtree."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def tensor_layout(tensor: torch.Tensor) -> str:
    """``float32[16, 1, 1, 1]``: what the manifest records of each stored tensor. The loader compares it with the
    file's header, which catches a header whose dtypes, shapes or names were changed while its byte counts still
    add up (an int32 read as float32 parses fine and gives a different model)."""
    return f"{str(tensor.dtype).removeprefix('torch.')}{list(tensor.shape)}"


def _is_int(value: Any, low: int = 0) -> bool:
    """A JSON integer >= ``low`` (``True`` and ``4.0`` are not: the loader would compute with them)."""
    return type(value) is int and value >= low


def _is_shape(value: Any) -> bool:
    return isinstance(value, list) and all(_is_int(d) for d in value)


def parse_manifest(
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
        raise malformed(f"model_subfolder {short_repr(sub)} is not one of {', '.join(MODEL_SUBFOLDERS)}")
    if not isinstance(manifest["config"], dict):
        raise malformed("'config' is not an object")
    try:
        config = QuantConfig.from_dict(manifest["config"])
    except QDiffuseError as exc:
        raise malformed(f"config: {one_line(exc)}") from None
    if not isinstance(config.scheme, str):
        raise malformed(f"config.scheme {short_repr(config.scheme)} is not a string")
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
        return f"splits {short_repr(splits)} is not a list of positive integers"
    for key in ("shapes", "code_shapes"):
        value = entry[key]
        if not isinstance(value, list) or len(value) != len(splits) or not all(_is_shape(s) for s in value):
            return f"{key} {short_repr(value)} is not one shape per split"
    if not _is_int(entry["bits"], 2) or entry["bits"] > 8:
        return f"bits {short_repr(entry['bits'])} is not an integer from 2 to 8"
    if not isinstance(entry.get("weight_hardened", True), bool):
        return f"weight_hardened {short_repr(entry['weight_hardened'])} is not true or false"
    return None


def _same_format(actual: FormatSpec | None, named: FormatSpec | None, quartz_variant: bool) -> bool:
    """``actual`` is the format the scheme name stands for; a quartz-* scheme may pick its QuaRTZ variant."""
    if actual is None or named is None:
        return actual is named
    if quartz_variant and actual.kind == named.kind == "quartz":
        return replace(actual, lzs_group=named.lzs_group, rounding=named.rounding, fit_lzs=named.fit_lzs) == named
    return actual == named


def check_scheme(config: QuantConfig, path: Path) -> None:
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


def check_layout(catalog: Any, tensors: dict[str, torch.Tensor], folder: Path) -> None:
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
        stored = tensor_layout(tensors[key])
        if stored != catalog[key]:
            raise ModelLoadError(
                f"{path}: tensor {key!r} is {stored} but {QUANT_JSON} records {catalog[key]}; the folder is damaged"
            )


def _code_bytes(code_shape: list[int], bits: int) -> int:
    """Elements of a layer's stored code tensor: packed bytes below 8 bits, one byte per code at 8."""
    n = math.prod(code_shape)
    return -(-n * bits // 8) if bits < 8 else n


def check_entries(config: QuantConfig, layers_meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
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
                    f"{name}: weight codes {key} are {tensor_layout(raw)}, not a 1-D uint8 stream; the folder is "
                    "damaged"
                )
            need = _code_bytes(code_shape, bits)
            if raw.numel() != need:
                raise ModelLoadError(
                    f"{name}: weight codes {key} hold {raw.numel()} bytes, but {math.prod(code_shape)} {bits}-bit "
                    f"codes of shape {code_shape} take {need}; the manifest or {QUANT_WEIGHTS} is damaged"
                )


def _bits_mismatch(name: str, bits: int, spec: FormatSpec) -> ModelLoadError:
    return ModelLoadError(
        f"{name}: the manifest says {bits}-bit weight codes, but the config gives this layer {spec.describe()} "
        f"({spec.value_bits}-bit codes); the manifest was edited or damaged: {REQUANTIZE}"
    )


def check_layer_claims(layer: QuantLayer, entry: dict[str, Any], name: str) -> None:
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


def parameter_limit(layers_meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> int:
    """Most parameter elements the model config may build: twice what the folder stores (every stored tensor plus
    the quantized weights the manifest describes), and a MiB of slack. A real folder's model has at most what it
    stores; a config edited to 2**40 blocks or channels would otherwise build for hours before any shape check."""
    stored = sum(t.numel() for t in tensors.values())
    weights = sum(math.prod(shape) for entry in layers_meta.values() for shape in entry["shapes"])
    return 2 * (stored + weights) + (1 << 20)


@contextmanager
def parameter_budget(limit: int, where: Path) -> Iterator[None]:
    """Stop building a model whose parameters outgrow ``limit`` elements (see :func:`parameter_limit`), counted as
    each parameter is registered (in this thread only)."""
    total = 0

    def count(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        nonlocal total
        if param is not None:
            total += param.numel()
            if total > limit:
                raise ModelLoadError(
                    f"{where} describes a model with more than {limit} parameter values, far more than the folder "
                    f"stores; the model config is damaged: {REQUANTIZE}"
                )

    with register_parameter_hook(count):
        yield


__all__ = [
    "CODES",
    "QUANT_JSON",
    "QUANT_WEIGHTS",
    "REQUANTIZE",
    "check_entries",
    "check_layer_claims",
    "check_layout",
    "check_scheme",
    "one_line",
    "parameter_budget",
    "parameter_limit",
    "parse_manifest",
    "short_repr",
    "tensor_layout",
]
