"""``quantize`` and ``sample`` on pipeline folders (``model_index.json``): the command-line side of pipelines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from qdiffuse.errors import ConfigError, DataError, ModelLoadError

MAX_PROMPT_FILE = 16 * 2**20


def quiet_libraries() -> None:
    """The command line speaks in its own lines: diffusers' and transformers' notices and progress bars (loading
    components, missing optional packages) are turned down to errors for the commands on pipelines."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.set_verbosity_error()
        transformers_logging.disable_progress_bar()
    except ImportError:
        pass
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()


def resolve_pipeline(path: str | Path) -> Path:
    """A built-in pipeline's name (``fmnist-t2i``) -> its shipped folder; anything else is a path."""
    from qdiffuse.models.builtin import BUILTIN_MODELS, builtin_path

    model = BUILTIN_MODELS.get(str(path))
    if model is not None and model.pipeline:
        return builtin_path(str(path))
    return Path(path)


CALIBRATION_PROMPTS = "calibration_prompts.txt"
EVALUATION_PROMPTS = "evaluation_prompts.txt"


def folder_prompts(folder: str | Path, which: str) -> list[str] | None:
    """Prompts a pipeline folder ships for calibration or evaluation (``fmnist-t2i`` does), or None."""
    path = resolve_pipeline(folder) / which
    return read_prompts(path) if path.is_file() else None


def is_pipeline_folder(path: str | Path) -> bool:
    from qdiffuse.models.builtin import BUILTIN_MODELS

    model = BUILTIN_MODELS.get(str(path))
    if model is not None:
        return model.pipeline
    return (Path(path) / "model_index.json").is_file()


def read_prompts(path: Path | None, prompt: str | None = None) -> list[str] | None:
    """Prompts from ``--prompt`` or a ``--prompts`` file (UTF-8 text, one per line, blank lines skipped)."""
    if prompt is not None and path is not None:
        raise ConfigError("give --prompt or --prompts, not both")
    if prompt is not None:
        if not prompt.strip():
            raise DataError("--prompt is empty; give the text to generate from")
        return [prompt.strip()]
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--prompts {path} is not a file; pass a text file with one prompt per line")
    if path.stat().st_size > MAX_PROMPT_FILE:
        raise DataError(f"--prompts {path} is larger than 16 MiB; that is not a prompt list")
    raw = path.read_bytes()
    if b"\x00" in raw:
        raise DataError(f"--prompts {path} is not text (it holds NUL bytes); pass a UTF-8 file, one prompt per line")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"--prompts {path} is not UTF-8 text; save it as UTF-8, one prompt per line") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise DataError(f"--prompts {path} holds no prompts; write one prompt per line")
    return prompts


def load_fp_pipeline(folder: str | Path, device: str, dtype: Any = None) -> Any:
    """diffusers' own ``from_pretrained`` on a pipeline folder (a built-in name too), with one-line errors for
    what users get wrong; components the folder takes from packages are built from them. Every component is
    loaded in ``dtype`` (fp32/bf16/fp16; None or ``auto``: the dtype the denoiser's weights are stored in, fp16 on
    a CPU as float32), so a folder saved in fp16 runs as one pipeline rather than fp16 text encoders (transformers
    keeps their stored dtype) feeding a float32 denoiser."""
    import diffusers
    import torch

    from qdiffuse.models.dtypes import auto_dtype, check_dtype_supported, parse_dtype, stored_dtype
    from qdiffuse.models.loading import read_json
    from qdiffuse.pipelines.external import load_pipeline_folder
    from qdiffuse.pipelines.support import DENOISER_COMPONENTS, SUPPORTED, unsupported_message

    folder = resolve_pipeline(folder)
    index = read_json(folder / "model_index.json", "model_index.json")
    name = index.get("_class_name")
    if getattr(diffusers, str(name), None) is None:
        raise ModelLoadError(f"{folder / 'model_index.json'} names {name!r}, which this diffusers does not have")
    if name not in SUPPORTED:
        raise ConfigError(unsupported_message(name))
    dtype = parse_dtype(dtype)
    if dtype is None:
        component = next((c for c in sorted(DENOISER_COMPONENTS) if (folder / c).is_dir()), None)
        stored = stored_dtype(sorted((folder / component).glob("*.safetensors"))) if component else torch.float32
        dtype = auto_dtype(stored, device)
    check_dtype_supported(dtype, device)
    return load_pipeline_folder(folder, dtype).to(device)


def size_factor(pipe: Any) -> int:
    """What image sizes must be multiples of: the VAE's factor, times the transformer's patch for SD3 and the
    2×2 token packing of FLUX."""
    factor = int(getattr(pipe, "vae_scale_factor", 8))
    transformer = getattr(pipe, "transformer", None)
    name = type(transformer).__name__
    if name == "SD3Transformer2DModel":
        factor *= int(transformer.config.patch_size)
    elif name == "FluxTransformer2DModel":
        factor *= 2
    return factor


def check_size(pipe: Any, height: int | None, width: int | None) -> None:
    """The VAE halves the image size once per down block: sizes it cannot take fail before any work."""
    factor = size_factor(pipe)
    for flag, value in (("--height", height), ("--width", width)):
        if value is not None and (value <= 0 or value % factor):
            raise ConfigError(f"{flag} {value} is not a positive multiple of {factor} (the VAE's scale factor)")


def generate(
    pipe: Any,
    prompts: list[str],
    *,
    num: int,
    steps: int,
    guidance: float,
    seed: int,
    batch_size: int,
    height: int | None,
    width: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    """``num`` images cycling through ``prompts`` as uint8 NHWC and the prompt index of each; batch b draws from
    its own generator (seed, b), so FP and quantized pipelines share their noise image by image."""
    import torch

    from qdiffuse.pipelines.calibrate import refusals_as_one_line
    from qdiffuse.sampling.loop import batch_generator

    check_size(pipe, height, width)
    which = np.array([i % len(prompts) for i in range(num)], dtype=np.int64)
    out = []
    for b, lo in enumerate(range(0, num, batch_size)):
        batch = [prompts[i] for i in which[lo : lo + batch_size]]
        with torch.no_grad(), refusals_as_one_line(pipe):
            images = pipe(
                batch, num_inference_steps=steps, guidance_scale=guidance, height=height, width=width,
                generator=batch_generator(seed, b), output_type="np",
            ).images
        out.append(np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8))
    return np.concatenate(out), which




def _use_sampler(pipe: Any, sampler: str | None) -> None:
    """``--sampler`` swaps the pipeline's scheduler for one built from its own config (None keeps it)."""
    if sampler is None:
        return
    from qdiffuse.pipelines.ptqd import PTQDScheduler, flow_matching
    from qdiffuse.sampling.schedulers import make_scheduler

    current = pipe.scheduler
    inner = current.scheduler if isinstance(current, PTQDScheduler) else current
    if flow_matching(inner):
        raise ConfigError(
            f"{type(pipe).__name__} samples by flow matching ({type(inner).__name__}); qdiffuse's --sampler "
            "choices are DDPM-family samplers, so leave --sampler out to use the pipeline's own"
        )
    replacement = make_scheduler(sampler, dict(inner.config))
    # PTQD's statistics are keyed by timestep and stay with the pipeline whatever sampler walks them
    pipe.scheduler = PTQDScheduler(replacement, current.stats) if isinstance(current, PTQDScheduler) else replacement


def default_guidance(pipe_or_folder: Any) -> float:
    """The guidance scale the pipeline class itself defaults to (SD 7.5, SD3 7.0, PixArt 4.5, FLUX 3.5)."""
    import inspect

    quiet_libraries()  # resolving a pipeline class imports transformers, which has notices of its own
    import diffusers

    if isinstance(pipe_or_folder, (str, Path)):
        from qdiffuse.models.loading import read_json

        index = read_json(resolve_pipeline(pipe_or_folder) / "model_index.json", "model_index.json")
        cls = getattr(diffusers, str(index.get("_class_name")), None)
    else:
        cls = type(pipe_or_folder)
    parameter = inspect.signature(cls.__call__).parameters.get("guidance_scale") if cls is not None else None
    value = parameter.default if parameter is not None else None
    return float(value) if isinstance(value, (int, float)) else 7.5


def quantize_pipeline_folder(
    folder: str,
    out: Path,
    config: Any,
    prompts_file: Path | None,
    *,
    guidance: float,
    steps: int,
    sampler: str | None,
    overwrite: bool,
    device: str,
    dtype: Any = None,
) -> None:
    """``qdiffuse quantize PIPELINE_FOLDER``: calibrate by running the pipeline (in ``dtype``; None/``auto``: the
    dtype the denoiser's weights are stored in), save the pipeline folder."""
    quiet_libraries()
    import typer

    from qdiffuse.pipelines.ptqd import PTQDScheduler
    from qdiffuse.pipelines.quantize import quantize_pipeline
    from qdiffuse.pipelines.store import save_pipeline

    prompts = read_prompts(prompts_file) or folder_prompts(folder, CALIBRATION_PROMPTS)
    pipe = load_fp_pipeline(folder, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    original = pipe.scheduler
    _use_sampler(pipe, sampler)
    quantize_pipeline(pipe, config, prompts, num_inference_steps=steps, guidance_scale=guidance)
    if isinstance(pipe.scheduler, PTQDScheduler):  # statistics measured with the calibration sampler
        original = PTQDScheduler(original, pipe.scheduler.stats)
    pipe.scheduler = original
    save_pipeline(pipe, out, overwrite, source=str(resolve_pipeline(folder).resolve()))
    from qdiffuse.pipelines.support import denoiser_component

    typer.echo(
        f"wrote {out} ({type(pipe).__name__}, {denoiser_component(pipe)} {config.scheme} {config.method}; other "
        "components FP)"
    )


def sample_pipeline_folder(
    folder: str,
    out: Path,
    *,
    prompt: str | None,
    prompts: Path | None,
    num: int,
    steps: int,
    sampler: str | None,
    guidance: float,
    seed: int,
    batch_size: int,
    grid: Path | None,
    overwrite: bool,
    device: str,
    runtime: str,
    verify: bool,
    height: int | None = None,
    width: int | None = None,
    dtype: Any = None,
) -> None:
    """``qdiffuse sample PIPELINE_FOLDER --prompts FILE``: the real pipeline (text encoding, guidance, VAE
    decoding), written as the ADM-style npz (``labels`` holds each image's prompt index)."""
    quiet_libraries()
    import typer

    from qdiffuse.fsutil import PNG, SAMPLES, check_output_path
    from qdiffuse.imageio import save_grid, save_samples
    from qdiffuse.pipelines.store import is_quantized_pipeline, load_pipeline
    from qdiffuse.sampling.loop import SampleRequest

    texts = read_prompts(prompts, prompt) or folder_prompts(folder, EVALUATION_PROMPTS)
    if texts is None:
        raise ConfigError("a pipeline generates from text; pass --prompt TEXT or --prompts FILE")
    SampleRequest(num=num, steps=steps, guidance=guidance, seed=seed, batch_size=batch_size)  # the number checks
    inputs = [Path(folder), *([prompts] if prompts is not None else [])]
    check_output_path(out, overwrite, SAMPLES, inputs)
    if grid is not None:
        check_output_path(grid, overwrite, PNG, inputs)
    quantized = is_quantized_pipeline(folder)
    pipe = (
        load_pipeline(folder, device, runtime, verify, dtype=dtype) if quantized
        else load_fp_pipeline(folder, device, dtype)
    )
    _use_sampler(pipe, sampler)
    pipe.set_progress_bar_config(disable=True)
    images, which = generate(
        pipe, texts, num=num, steps=steps, guidance=guidance, seed=seed, batch_size=batch_size, height=height,
        width=width,
    )
    save_samples(out, images, which, overwrite, inputs)
    if grid is not None:
        save_grid(grid, images, overwrite, inputs=inputs)
    typer.echo(f"wrote {out} ({images.shape[0]} images from {len(texts)} prompt(s))")


def analyze_pipeline_folder(
    folder: Path,
    out: Path,
    *,
    prompts_file: Path | None,
    num: int,
    steps: int,
    sampler: str | None,
    guidance: float,
    seed: int,
    fp: str | None,
    batch_size: int,
    overwrite: bool,
    device: str,
    verify: bool,
) -> None:
    """``qdiffuse analyze QUANTIZED_PIPELINE``: PTQD statistics measured by running the pipeline (FP trajectories
    on ``num`` prompts cycled from the file, quantized outputs on the same inputs), a report, and the statistics
    stored in the folder, where ``load_pipeline`` installs them."""
    quiet_libraries()

    import torch
    import typer

    from qdiffuse.fsutil import REPORT_FOLDER, atomic_dir, check_output_path
    from qdiffuse.noise.report import write_analysis
    from qdiffuse.noise.store import save_stats, stats_relpath
    from qdiffuse.pipelines.calibrate import DEFAULT_PROMPTS, pipeline_call
    from qdiffuse.pipelines.ptqd import PTQDScheduler, measure_pipeline_noise
    from qdiffuse.pipelines.store import load_pipeline, read_marker, record_ptqd
    from qdiffuse.sampling.loop import SampleRequest

    marker = read_marker(folder)
    component = marker["denoiser"]
    texts = read_prompts(prompts_file) or list(DEFAULT_PROMPTS)
    SampleRequest(num=num, steps=steps, guidance=guidance, seed=seed, batch_size=batch_size)  # the number checks
    source = fp or marker.get("source")
    if not source:
        raise ModelLoadError(f"{folder} does not record its FP pipeline; pass --fp PIPELINE_FOLDER")
    if not is_pipeline_folder(source):
        raise ModelLoadError(
            f"the FP pipeline {source} this folder was made from is not a pipeline folder (any more); pass --fp "
            "PIPELINE_FOLDER"
        )
    inputs = [Path(folder), Path(source), *([prompts_file] if prompts_file is not None else [])]
    check_output_path(out, overwrite, REPORT_FOLDER, inputs)
    pipe = load_pipeline(folder, device, verify=verify, ptqd=False)
    try:
        fp_pipe = load_fp_pipeline(source, device)
    except (ModelLoadError, ConfigError) as exc:
        raise ModelLoadError(f"cannot load the FP pipeline for the analysis ({exc}); pass --fp FOLDER") from None
    _use_sampler(pipe, sampler)
    pipe.set_progress_bar_config(disable=True)
    cycled = [texts[i % len(texts)] for i in range(num)]
    stats = measure_pipeline_noise(
        pipe, getattr(fp_pipe, component), cycled, num_inference_steps=steps, guidance_scale=guidance, seed=seed,
        batch_size=batch_size,
    )
    del fp_pipe
    pipe.scheduler = PTQDScheduler(pipe.scheduler, stats)
    with torch.no_grad():  # one corrected generation fills in what variance calibration can absorb per step
        pipeline_call(pipe, cycled[:1], num_inference_steps=steps, guidance_scale=guidance, height=None, width=None,
                      seed=seed)
    summary = pipe.scheduler.report()
    with atomic_dir(out, overwrite, REPORT_FOLDER, inputs) as tmp:
        report = write_analysis(tmp, stats, summary)
    save_stats(Path(folder) / component, stats)
    record_ptqd(folder, stats_relpath(stats))
    typer.echo(f"wrote {out / report.name}; statistics stored in {folder} (load_pipeline applies PTQD with them)")


__all__ = [
    "analyze_pipeline_folder",
    "is_pipeline_folder",
    "read_prompts",
    "load_fp_pipeline",
    "check_size",
    "generate",
    "quantize_pipeline_folder",
    "sample_pipeline_folder",
]
