"""The main job on a built-in model: quantize at several schemes, sample with the FP model's seeds, report.

The demo is a small benchmark run (the same code as ``qdiffuse bench``) plus what a user wants to look at: sample
grids side by side, fidelity to the FP samples drawn from the same noise, FID against the shipped Fashion-MNIST
test statistics, and the size each quantized folder takes on disk.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from qdiffuse.bench import Bench, BenchConfig, QuantSetting, SamplerSetting
from qdiffuse.fsutil import DEMO_FOLDER, atomic_dir
from qdiffuse.imageio import save_grid

DEMO_RUNS = (("w8a8", "minmax"), ("w4a8", "mse"), ("w4a8", "ptqd"))


def run_demo(
    out: Path,
    model: str = "fmnist-tiny",
    num: int = 50,
    steps: int = 20,
    guidance: float = 2.0,
    seed: int = 0,
    runs: tuple[tuple[str, str], ...] = DEMO_RUNS,
    overwrite: bool = False,
    calib: dict[str, Any] | None = None,
    analysis_num: int = 32,
    device: str = "cpu",
    runtime: str = "real",
) -> Path:
    """Run the demo into folder ``out`` (written atomically); returns the report path.

    Calibration and the PTQD statistics use the demo's own sampler setting, so nothing is measured twice; the
    defaults took 4 min 19 s on one CPU core (BENCHMARKS.md, "Demo").
    """
    calib = {"calib_per_step": 12, "calib_num_inference_steps": steps, **(calib or {})}
    config = BenchConfig(
        name="demo",
        models=[model],
        samplers=[SamplerSetting("ddim", steps, 0.0)],
        quant=[QuantSetting(scheme, method) for scheme, method in runs],
        num=num,
        seed=seed,
        guidance=guidance,
        batch_size=min(num, 100),
        calib=calib,
        analysis_num=analysis_num,
        runtime=runtime,
    )
    with atomic_dir(out, overwrite, DEMO_FOLDER) as tmp:
        rows = Bench(config, tmp / "bench", device).run()
        for row in rows:
            name = "fp" if row["quant"] == "FP" else row["quant"]
            cells = sorted((tmp / "bench" / "samples").glob(f"*__{'fp' if name == 'fp' else name}.npz"))
            images = np.load(cells[0])["arr_0"]
            save_grid(tmp / f"{name}.png", images[:100], ncol=10)
        settings = {"model": model, "num": num, "sampler": "ddim", "steps": steps, "eta": 0.0, "guidance": guidance,
                    "seed": seed}
        (tmp / "report.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2, default=float))
        (tmp / "report.md").write_text(render_report(settings, rows))
    return Path(out) / "report.md"


def _f(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def render_report(settings: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [
        f"# qdiffuse demo: {settings['model']}",
        "",
        f"{settings['num']} samples per model, DDIM {settings['steps']} steps (eta 0), guidance "
        f"{settings['guidance']}, seed {settings['seed']}; every model starts from the same noise.",
        "FID is measured in the feature space of the shipped Fashion-MNIST classifier against the 10k test images; "
        "at this N it is biased upward, so compare rows with each other, not with published numbers.",
        "",
        "| model | size | FID | label acc. | FID to FP | PSNR to FP (dB) | SSIM to FP | BOPs reduction | "
        "calib. (s) | sampling (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['quant']} | {r['size_bytes'] / 1024:.0f} KiB | {_f(r['fid'], '.2f')} | "
            f"{_f(r.get('label_accuracy'), '.3f')} | {_f(r.get('fid_to_fp'), '.2f')} | "
            f"{_f(r.get('psnr_to_fp'), '.2f')} | {_f(r.get('ssim_to_fp'), '.3f')} | "
            f"{_f(r.get('bops_reduction'), '.1f')} | {_f(r.get('calibration_seconds'), '.1f')} | "
            f"{_f(r.get('sample_seconds'), '.1f')} |"
        )
    grids = ", ".join(f"`{'fp' if r['quant'] == 'FP' else r['quant']}.png`" for r in rows)
    lines += ["", f"Grids: {grids}. Quantized model folders: `bench/models/`.", ""]
    runtimes = [(r["quant"], r["runtime"]) for r in rows if r.get("runtime")]
    if runtimes:
        lines += ["What the quantized models ran on:", ""]
        lines += [f"- {quant}: {runtime}" for quant, runtime in runtimes]
        lines.append("")
    return "\n".join(lines)


PIPELINE_DEMO_RUNS = (("w8a8", "minmax"), ("w4a8", "mse"), ("w4a8", "ptqd"))


def run_pipeline_demo(
    out: Path,
    model: str = "fmnist-t2i",
    num: int = 120,
    steps: int = 20,
    guidance: float = 4.0,
    seed: int = 0,
    runs: tuple[tuple[str, str], ...] = PIPELINE_DEMO_RUNS,
    overwrite: bool = False,
    device: str = "cpu",
) -> Path:
    """The demo on a text-to-image pipeline: the pipeline grid (:mod:`qdiffuse.pipelines.bench`) at one DDIM
    setting, a prompt grid per model (one held-apart caption per class, the same seeds), and the report."""
    from qdiffuse.pipelines.bench import PipelineBenchConfig, evaluation_prompts, render_rows, run_pipeline_bench

    config = PipelineBenchConfig(
        model=model, quant=tuple(runs), samplers=((None, steps),), num=num, guidance=guidance, seed=seed,
        batch_size=min(num, 60), calib_prompts=32, calib_inference_steps=steps, calib_steps=min(steps, 10),
    )
    with atomic_dir(out, overwrite, DEMO_FOLDER) as tmp:
        rows = run_pipeline_bench(config, tmp / "bench", device, log=lambda _line: None)
        prompts = evaluation_prompts()
        per_class = len(prompts) // 10
        grids = []
        for path in sorted((tmp / "bench" / "samples").glob("*.npz")):
            with np.load(path) as data:
                images, which = data["arr_0"], data["labels"]
            # the first image of each class's first caption, then its second, ...: rows of ten classes
            order = [
                i for k in range(per_class) for c in range(10) for i in np.flatnonzero(which == c * per_class + k)[:1]
            ]
            name = path.stem.split("__")[0]
            save_grid(tmp / f"{name}.png", images[order], ncol=10)
            grids.append(name)
        settings = {"model": model, "num": num, "steps": steps, "guidance": guidance, "seed": seed}
        lines = [
            f"# qdiffuse demo: {model}",
            "",
            f"DDIM {steps} steps through diffusers' StableDiffusionPipeline (the quantized UNet inside the pipeline's "
            "own call; text encoder and VAE FP). FID in the shipped classifier's feature space against the 10k "
            "test images (biased upward at this N: compare rows with each other); text alignment: the classifier's "
            "accuracy at the class each prompt names.",
            "",
            render_rows(config, rows),
            "Prompt grids (columns: the ten classes; rows: captions): "
            + ", ".join(f"`{g}.png`" for g in grids)
            + ". Prompts: " + "; ".join(prompts[c * per_class] for c in range(10)) + ".",
            "",
            *(f"![{g}]({g}.png)" for g in grids),
            "",
        ]
        (tmp / "report.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2, default=float))
        (tmp / "report.md").write_text("\n".join(lines))
    return Path(out) / "report.md"


__all__ = ["run_demo", "render_report", "DEMO_RUNS", "run_pipeline_demo", "PIPELINE_DEMO_RUNS"]
