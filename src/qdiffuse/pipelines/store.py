"""Quantized pipelines on disk: diffusers' ``save_pretrained`` layout with the denoiser as a qdiffuse folder.

The denoiser's subfolder holds a qdiffuse quantized folder (packed codes, manifest, integrity hashes, PTQD noise
statistics under ``noise/``) instead of diffusers weights; ``qdiffuse_pipeline.json`` names it, the FP pipeline
it came from and the statistics :func:`load_pipeline` installs as a :class:`~qdiffuse.pipelines.ptqd.
PTQDScheduler`. Quantized text encoders are qdiffuse folders in their own subfolders too
(:mod:`qdiffuse.pipelines.text_store`), listed with their schemes under ``text_encoders`` in the marker.
Everything else is written and read by diffusers itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qdiffuse.errors import ModelLoadError
from qdiffuse.pipelines.external import EXTERNAL_FILE, load_pipeline_folder
from qdiffuse.pipelines.support import DENOISER_COMPONENTS, denoiser_component

PIPELINE_FILE = "qdiffuse_pipeline.json"
COST_ATTR = "qdiffuse_cost"
"""Where quantization leaves the denoiser's cost per call (measured on a real pipeline call) for saving."""


def save_pipeline(pipe: Any, path: str | Path, overwrite: bool = False, source: str | None = None) -> Path:
    """Write ``pipe`` with its quantized denoiser (atomically, like every qdiffuse output). ``source``: the FP
    pipeline folder it was made from (``qdiffuse analyze`` measures against it)."""
    from qdiffuse.api import quant_state
    from qdiffuse.fsutil import QUANTIZED_FOLDER, atomic_dir
    from qdiffuse.io import COST_FILE, save_quantized
    from qdiffuse.models.denoiser import Denoiser
    from qdiffuse.models.loading import LoadedModel
    from qdiffuse.noise.store import stats_json, stats_relpath
    from qdiffuse.pipelines.ptqd import PTQDScheduler
    from qdiffuse.pipelines.text_encoders import quantized_text_encoders
    from qdiffuse.pipelines.text_store import save_text_encoders

    component = denoiser_component(pipe)
    model = getattr(pipe, component)
    if quant_state(model) is None:
        raise ModelLoadError("this pipeline's denoiser is not quantized; run qdiffuse.quantize(pipe, config) first")
    encoders = {name: getattr(pipe, name) for name in quantized_text_encoders(pipe)}
    scheduler = pipe.scheduler
    stats = scheduler.stats if isinstance(scheduler, PTQDScheduler) else None
    path = Path(path)
    # a quantized encoder taken from a package is written out like the others: the package holds only FP weights
    external = {k: v for k, v in getattr(pipe, "qdiffuse_external", {}).items() if k not in encoders}
    kept = {name: getattr(pipe, name) for name in external}
    with atomic_dir(path, overwrite, QUANTIZED_FOLDER) as tmp:
        pipe.register_modules(**{component: None}, **{name: None for name in [*external, *encoders]})
        if stats is not None:
            pipe.register_modules(scheduler=scheduler.scheduler)
        try:
            pipe.save_pretrained(tmp)
        finally:
            pipe.register_modules(**{component: model}, **kept, **encoders)
            if stats is not None:
                pipe.register_modules(scheduler=scheduler)
        index = json.loads((tmp / "model_index.json").read_text())
        index[component] = ["diffusers", type(model).__name__]
        for name, value in kept.items():  # named in the index, supplied by their package when loading
            index[name] = [type(value).__module__.split(".")[0], type(value).__name__]
        for name, value in encoders.items():  # named in the index, rebuilt by load_pipeline
            index[name] = ["transformers", type(value).__name__]
        if external:
            (tmp / EXTERNAL_FILE).write_text(json.dumps(external, indent=2))
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        loaded = LoadedModel(Denoiser.from_model(model), dict(scheduler.config), source or "", component, {})
        extra = {}
        cost = getattr(model, COST_ATTR, None)
        if cost is not None:
            extra[COST_FILE] = json.dumps(cost, indent=2)
        if stats is not None:
            extra[stats_relpath(stats)] = stats_json(stats)
        save_quantized(loaded, tmp / component, extra_files=extra)
        marker = {"denoiser": component, "pipeline": type(pipe).__name__, "source": source}
        if encoders:
            marker["text_encoders"] = save_text_encoders(pipe, tmp)
        if stats is not None:
            marker["ptqd"] = stats_relpath(stats)
        (tmp / PIPELINE_FILE).write_text(json.dumps(marker, indent=2))
        (tmp / CARD_FILE).write_text(model_card(tmp, marker))
    return path


CARD_FILE = "README.md"


def model_card(folder: Path, marker: dict[str, Any]) -> str:
    """What the folder holds, for a reader who opens it: which component is quantized and how, which are FP,
    what calibrated it and how to load it."""
    from qdiffuse.io import describe_folder
    from qdiffuse.pipelines.text_store import quantized_encoder_names, text_encoder_lines

    component = marker["denoiser"]
    desc = describe_folder(folder / component)
    index = json.loads((folder / "model_index.json").read_text())
    encoders = quantized_encoder_names(folder, marker)
    others = sorted(
        k for k, v in index.items()
        if not k.startswith("_") and k not in (component, *encoders) and isinstance(v, list) and v[0] is not None
    )
    info = desc["calibration"].get("pipeline", {})
    lines = [
        f"# {marker['pipeline']}, {' and '.join([component, *encoders])} quantized by qdiffuse",
        "",
        f"- Quantized: `{component}` ({index[component][1]}), scheme {desc['scheme']}, method {desc['method']}.",
        *(f"  - {line}" for line in desc["formats"]),
        *(f"- Quantized text encoder: {line}." for line in text_encoder_lines(folder, marker)),
        f"- Kept in full precision and untouched: {', '.join(f'`{o}`' for o in others)}.",
        f"- Size of `{component}/` on disk: {desc['bytes_on_disk'] / 2**20:.2f} MiB "
        f"(FP32 {desc['fp32_bytes'] / 2**20:.2f} MiB).",
    ]
    if info:
        lines.append(
            f"- Calibrated by running the pipeline on {info.get('prompts')} prompts, {info.get('steps')} steps of "
            f"{info.get('scheduler')}, guidance {info.get('guidance')}."
        )
    if marker.get("ptqd"):
        lines.append(f"- PTQD noise statistics: `{component}/{marker['ptqd']}`, applied by `qdiffuse.PTQDScheduler`.")
    if marker.get("source"):
        lines.append(f"- Made from: `{marker['source']}`.")
    lines += [
        "",
        "Load it with `pipe = qdiffuse.load_pipeline(path)` (diffusers' `from_pretrained` does not read the "
        f"quantized {', '.join(f'`{c}/`' for c in [component, *encoders])}), or sample with "
        "`qdiffuse sample PATH --prompts FILE`; `qdiffuse info PATH` lists every layer's format and kernel.",
        "",
    ]
    return "\n".join(lines)


def is_quantized_pipeline(path: str | Path) -> bool:
    return (Path(path) / PIPELINE_FILE).is_file()


def read_marker(path: str | Path) -> dict[str, Any]:
    from qdiffuse.models.loading import read_json

    path = Path(path)
    if not is_quantized_pipeline(path):
        raise ModelLoadError(
            f"{path} is not a quantized pipeline folder (no {PIPELINE_FILE}); save one with qdiffuse.save"
        )
    marker = read_json(path / PIPELINE_FILE, "pipeline marker")
    if marker.get("denoiser") not in DENOISER_COMPONENTS:
        raise ModelLoadError(f"{path / PIPELINE_FILE} names denoiser {marker.get('denoiser')!r}; re-save the pipeline")
    return marker


def record_ptqd(path: str | Path, relpath: str) -> None:
    """Make the statistics at ``relpath`` (inside the denoiser folder) the ones :func:`load_pipeline` installs."""
    from qdiffuse.fsutil import atomic_file

    path = Path(path)
    marker = read_marker(path)
    marker["ptqd"] = relpath
    with atomic_file(path / PIPELINE_FILE, overwrite=True) as tmp:
        tmp.write_text(json.dumps(marker, indent=2))


def load_pipeline(
    path: str | Path,
    device: str = "cpu",
    runtime: str = "real",
    verify: bool = True,
    ptqd: bool = True,
    dtype: Any = None,
) -> Any:
    """A quantized pipeline folder back as the diffusers pipeline it was, its denoiser (and quantized text
    encoders) on ``runtime`` and, when the folder holds PTQD statistics (and ``ptqd``), its scheduler wrapped in
    ``PTQDScheduler``. Every component computes in ``dtype`` (fp32/bf16/fp16; None or ``auto``: the dtype the
    denoiser's folder records), so the VAE and text encoders agree with the denoiser."""
    from qdiffuse.io import load_quantized
    from qdiffuse.noise.stats import NoiseStats
    from qdiffuse.pipelines.ptqd import PTQDScheduler
    from qdiffuse.pipelines.text_store import load_text_encoders

    path = Path(path)
    marker = read_marker(path)
    component = marker["denoiser"]
    denoiser = load_quantized(path / component, device, runtime, verify=verify, dtype=dtype).denoiser
    model = denoiser.model
    encoders = load_text_encoders(path, marker, device, runtime, verify)
    pipe = load_pipeline_folder(path, denoiser.dtype, **{component: model}, **encoders)
    stats_file = marker.get("ptqd")
    if ptqd and stats_file:
        full = (path / component / stats_file).resolve()
        if not full.is_relative_to((path / component).resolve()) or not full.is_file():
            raise ModelLoadError(f"{path / PIPELINE_FILE} names statistics {stats_file!r} that the folder lacks")
        pipe.scheduler = PTQDScheduler(pipe.scheduler, NoiseStats.load(full))
    return pipe.to(device)


__all__ = ["save_pipeline", "load_pipeline", "is_quantized_pipeline", "read_marker", "record_ptqd", "PIPELINE_FILE"]
