"""A benchmark grid on a text-to-image pipeline: FP against quantized denoisers, sampled through diffusers.

Each quantized setting is calibrated once (the pipeline run on the calibration prompts with its own scheduler) and
saved under ``models/``; every sampler setting then draws ``num`` images cycling through the evaluation prompts,
with the seeds of the FP draw, into ``samples/``. Metrics: FID in the shipped Fashion-MNIST classifier's space,
text alignment (the classifier's accuracy at the class each prompt names), PSNR to the FP images. A rerun reuses
every finished folder and npz, so an interrupted grid resumes.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qdiffuse.errors import ConfigError


@dataclass(frozen=True)
class PipelineBenchConfig:
    model: str
    quant: tuple[tuple[Any, ...], ...]
    """(scheme, method) or (scheme, method, {QuantConfig overrides, "label": row suffix, "keep_8bit_extra":
    patterns kept at 8 bits besides the defaults})."""
    samplers: tuple[tuple[str | None, int], ...] = ((None, 50),)
    num: int = 200
    guidance: float = 4.0
    seed: int = 0
    batch_size: int = 100
    calib_prompts: int = 64
    calib_inference_steps: int = 25
    calib_steps: int = 10
    extra: dict[str, Any] = field(default_factory=dict)
    """QuantConfig overrides for every quantized setting (e.g. ``recon_iters``)."""

    @classmethod
    def from_json(cls, path: Path) -> PipelineBenchConfig:
        try:
            data = json.loads(Path(path).read_text())
            data["quant"] = tuple(tuple(q) for q in data["quant"])
            data["samplers"] = tuple(tuple(s) for s in data.get("samplers", [[None, 50]]))
            config = cls(**data)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"{path} is not a pipeline grid config ({type(exc).__name__}: {exc}); see benchmarks/cpu-t2i-grid.json"
            ) from None
        check_config(config)
        return config


def evaluation_prompts() -> list[str]:
    from qdiffuse.models.captions import evaluation_captions

    return [text for text, _ in evaluation_captions()]


def calibration_prompts(n: int) -> list[str]:
    """``n`` training captions spread over every class, noun and template."""
    from qdiffuse.models.captions import training_captions

    texts = [text for text, _ in training_captions()]
    step = max(1, len(texts) // n)
    return texts[::step][:n]


def _sampler_key(sampler: str | None, steps: int) -> str:
    return f"{sampler or 'own'}{steps}"


def _metrics(images: np.ndarray, which: np.ndarray, prompts: list[str], fp: np.ndarray | None) -> dict[str, Any]:
    from qdiffuse.eval.evaluate import compare_to_fp, evaluate_samples
    from qdiffuse.models.captions import class_named

    classes = np.asarray([class_named(p) for p in prompts])[which]
    result = evaluate_samples(images, "fmnist", labels=classes)
    row = {"fid": result.get("fid"), "text_alignment": result.get("label_accuracy")}
    if fp is not None:
        fidelity = compare_to_fp(fp, images)
        row["psnr_to_fp"] = fidelity["psnr"]["mean"]
        row["fid_to_fp"] = fidelity.get("fid_to_fp")
    return row


def run_pipeline_bench(config: PipelineBenchConfig, out: Path, device: str = "cpu", log: Any = print) -> list[dict]:
    """Every (setting, sampler) cell of ``config`` into ``out`` (resuming); returns the rows."""
    from qdiffuse.config import QuantConfig
    from qdiffuse.fsutil import folder_size
    from qdiffuse.pipelines.commands import _use_sampler, generate, load_fp_pipeline, quiet_libraries
    from qdiffuse.pipelines.quantize import quantize_pipeline
    from qdiffuse.pipelines.store import load_pipeline, save_pipeline

    quiet_libraries()
    check_config(config)
    out = Path(out)
    recorded = out / "config.json"
    settings = json.loads(json.dumps(asdict(config)))
    if recorded.is_file():
        if json.loads(recorded.read_text()) != settings:
            raise ConfigError(f"{out} holds a pipeline grid run with other settings; use another --out folder")
    elif out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} is not empty and holds no pipeline grid; use a new --out folder")
    (out / "models").mkdir(parents=True, exist_ok=True)
    (out / "samples").mkdir(exist_ok=True)
    recorded.write_text(json.dumps(settings, indent=2))
    prompts = evaluation_prompts()
    rows: list[dict[str, Any]] = []

    def draw(pipe: Any, sampler: str | None, steps: int, path: Path) -> tuple[np.ndarray, np.ndarray, float]:
        if path.is_file():
            with np.load(path) as data:
                return data["arr_0"], data["labels"], float(data["seconds"])
        original = pipe.scheduler
        _use_sampler(pipe, sampler)
        pipe.set_progress_bar_config(disable=True)
        start = time.perf_counter()
        images, which = generate(
            pipe, prompts, num=config.num, steps=steps, guidance=config.guidance, seed=config.seed,
            batch_size=config.batch_size, height=None, width=None,
        )
        seconds = time.perf_counter() - start
        pipe.scheduler = original
        tmp = path.with_name(path.name + ".partial.npz")
        np.savez(tmp, arr_0=images, labels=which, seconds=seconds)
        tmp.rename(path)
        return images, which, seconds

    fp_pipe = load_fp_pipeline(config.model, device)
    fp_images: dict[str, np.ndarray] = {}
    for sampler, steps in config.samplers:
        key = _sampler_key(sampler, steps)
        images, which, seconds = draw(fp_pipe, sampler, steps, out / "samples" / f"fp__{key}.npz")
        fp_images[key] = images
        metrics = _metrics(images, which, prompts, None)
        rows.append({"quant": "FP", "sampler": key, "sample_seconds": seconds, **metrics})
        log(_row_line(rows[-1]))
    for entry in config.quant:
        scheme, method, options = entry[0], entry[1], dict(entry[2]) if len(entry) > 2 else {}
        label = options.pop("label", None)
        name = re.sub(r"[^A-Za-z0-9.-]+", "_", f"{scheme}-{method}{'-' + label if label else ''}")
        folder = out / "models" / name
        if not folder.is_dir():
            pipe = load_fp_pipeline(config.model, device)
            if "keep_8bit_extra" in options:
                from qdiffuse.config import DEFAULT_KEEP_8BIT

                options["keep_8bit"] = DEFAULT_KEEP_8BIT + tuple(options.pop("keep_8bit_extra"))
            quant_config = QuantConfig.from_scheme(
                scheme, method=method, calib_steps=config.calib_steps, seed=config.seed, **{**config.extra, **options}
            )
            start = time.perf_counter()
            quantize_pipeline(
                pipe, quant_config, calibration_prompts(config.calib_prompts),
                num_inference_steps=config.calib_inference_steps, guidance_scale=config.guidance,
            )
            calib_seconds = time.perf_counter() - start
            save_pipeline(pipe, folder, source=str(config.model))
            (folder / "bench_calibration.json").write_text(json.dumps({"seconds": calib_seconds}))
        calib_seconds = json.loads((folder / "bench_calibration.json").read_text())["seconds"]
        pipe = load_pipeline(folder, device)
        component = json.loads((folder / "qdiffuse_pipeline.json").read_text())["denoiser"]
        for sampler, steps in config.samplers:
            key = _sampler_key(sampler, steps)
            images, which, seconds = draw(pipe, sampler, steps, out / "samples" / f"{name}__{key}.npz")
            title = f"{scheme} {method}" + (f" ({label})" if label else "")
            rows.append({
                "quant": title, "sampler": key, "sample_seconds": seconds,
                "calibration_seconds": calib_seconds, "size_bytes": folder_size(folder / component),
                **_metrics(images, which, prompts, fp_images[key]),
            })
            log(_row_line(rows[-1]))
    (out / "rows.json").write_text(json.dumps(rows, indent=2, default=float))
    (out / "report.md").write_text(render_rows(config, rows))
    return rows


def _f(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _row_line(r: dict[str, Any]) -> str:
    return (f"{r['quant']:<22} {r['sampler']:<10} FID {_f(r['fid'], '.2f')}  text alignment "
            f"{_f(r['text_alignment'], '.3f')}  PSNR to FP {_f(r.get('psnr_to_fp'), '.2f')}")


def render_rows(config: PipelineBenchConfig, rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{config.num} images per cell cycling through {len(evaluation_prompts())} held-apart captions, guidance "
        f"{config.guidance}, seed {config.seed}; calibration: {config.calib_prompts} training captions, "
        f"{config.calib_inference_steps} steps of the pipeline's scheduler.",
        "",
        "| denoiser | sampler | FID | text alignment | PSNR to FP (dB) | FID to FP | denoiser size | calib. (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        size = "-" if "size_bytes" not in r else f"{r['size_bytes'] / 1024:.0f} KiB"
        lines.append(
            f"| {r['quant']} | {r['sampler']} | {_f(r['fid'], '.2f')} | {_f(r['text_alignment'], '.3f')} | "
            f"{_f(r.get('psnr_to_fp'), '.2f')} | {_f(r.get('fid_to_fp'), '.2f')} | {size} | "
            f"{_f(r.get('calibration_seconds'), '.0f')} |"
        )
    return "\n".join(lines) + "\n"


def check_config(config: PipelineBenchConfig) -> None:
    if config.num < 1 or config.batch_size < 1 or config.calib_prompts < 1 or config.calib_inference_steps < 1:
        raise ConfigError("num, batch_size, calib_prompts and calib_inference_steps must be at least 1")
    for entry in config.quant:
        if len(entry) not in (2, 3) or not all(isinstance(v, str) for v in entry[:2]) or (
            len(entry) == 3 and not isinstance(entry[2], dict)
        ):
            raise ConfigError(f"quant entry {entry!r} must be [scheme, method] or [scheme, method, {{overrides}}]")
    for entry in config.samplers:
        if len(entry) != 2 or not isinstance(entry[1], int) or entry[1] < 1:
            raise ConfigError(f"sampler entry {entry!r} must be [sampler or null, steps >= 1]")


__all__ = ["PipelineBenchConfig", "run_pipeline_bench", "render_rows", "evaluation_prompts", "calibration_prompts"]
