"""The main job on a built-in model: quantize at several schemes, sample with the FP model's seeds, report.

Everything a user needs to judge a scheme in one folder: sample grids side by side, fidelity to the FP samples
drawn from the same noise (PSNR/SSIM, FID between the two sets, class agreement), FID against the shipped
Fashion-MNIST test statistics, and the size each quantized folder takes on disk.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from qdiffuse.api import quantize
from qdiffuse.config import QuantConfig
from qdiffuse.fsutil import atomic_dir, folder_size
from qdiffuse.imageio import save_grid, save_samples
from qdiffuse.io import save_quantized
from qdiffuse.models.loading import LoadedModel, load_model_folder
from qdiffuse.sampling.loop import SampleRequest, sample, to_uint8

DEMO_RUNS = (("w8a8", "minmax"), ("w4a8", "mse"), ("w4a4", "mse"))


def _sample(loaded: LoadedModel, request: SampleRequest, name: str) -> tuple[np.ndarray, np.ndarray | None, float]:
    start = time.perf_counter()
    images, labels = sample(loaded.denoiser, loaded.scheduler_config, request, description=f"sampling {name}")
    return to_uint8(images).numpy(), None if labels is None else labels.numpy(), time.perf_counter() - start


def _fp32_bytes(loaded: LoadedModel) -> int:
    return sum(p.numel() * 4 for p in loaded.denoiser.model.state_dict().values())


def run_demo(
    out: Path,
    model: str = "fmnist-tiny",
    num: int = 200,
    steps: int = 50,
    guidance: float = 2.0,
    seed: int = 0,
    runs: tuple[tuple[str, str], ...] = DEMO_RUNS,
    overwrite: bool = False,
    calib: dict[str, Any] | None = None,
) -> Path:
    """Run the demo into folder ``out`` (written atomically); returns the report path."""
    from qdiffuse.eval.evaluate import compare_to_fp, evaluate_samples

    fp = load_model_folder(model)
    if fp.denoiser.null_class is None:
        guidance = 1.0
    request = SampleRequest(num=num, steps=steps, sampler="ddim", seed=seed, guidance=guidance)
    rows: list[dict[str, Any]] = []
    with atomic_dir(out, overwrite) as tmp:
        fp_images, labels, fp_time = _sample(fp, request, "FP")
        save_samples(tmp / "fp.npz", fp_images, labels)
        save_grid(tmp / "fp.png", fp_images[:100], ncol=10)
        fp_eval = evaluate_samples(fp_images, "fmnist", labels=labels)
        rows.append(
            {
                "model": "FP32",
                "size_bytes": _fp32_bytes(fp),
                "fid": fp_eval["fid"],
                "label_accuracy": fp_eval.get("label_accuracy"),
                "sample_seconds": fp_time,
            }
        )
        for scheme, method in runs:
            q = load_model_folder(model)
            config = QuantConfig.from_scheme(scheme, method=method, seed=seed, **(calib or {}))
            start = time.perf_counter()
            quantize(q.denoiser, q.scheduler_config, config, guidance=guidance)
            calib_time = time.perf_counter() - start
            name = f"{scheme}-{method}"
            save_quantized(q, tmp / "models" / name)
            images, _, q_time = _sample(q, request, name)
            save_samples(tmp / f"{name}.npz", images, labels)
            save_grid(tmp / f"{name}.png", images[:100], ncol=10)
            q_eval = evaluate_samples(images, "fmnist", labels=labels)
            fidelity = compare_to_fp(fp_images, images)
            rows.append(
                {
                    "model": name,
                    "size_bytes": folder_size(tmp / "models" / name),
                    "fid": q_eval["fid"],
                    "label_accuracy": q_eval.get("label_accuracy"),
                    "fid_to_fp": fidelity.get("fid_to_fp"),
                    "psnr_to_fp": fidelity["psnr"]["mean"],
                    "ssim_to_fp": fidelity["ssim"]["mean"],
                    "class_agreement": fidelity.get("class_agreement"),
                    "calibration_seconds": calib_time,
                    "sample_seconds": q_time,
                }
            )
        settings = {
            "model": model,
            "num": num,
            "sampler": "ddim",
            "steps": steps,
            "eta": 0.0,
            "guidance": guidance,
            "seed": seed,
        }
        (tmp / "report.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2))
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
        "| model | size | FID | label acc. | FID to FP | PSNR to FP (dB) | SSIM to FP | class agreement | "
        "calib. (s) | sampling (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['size_bytes'] / 1024:.0f} KiB | {_f(r['fid'], '.2f')} | "
            f"{_f(r.get('label_accuracy'), '.3f')} | {_f(r.get('fid_to_fp'), '.2f')} | "
            f"{_f(r.get('psnr_to_fp'), '.2f')} | {_f(r.get('ssim_to_fp'), '.3f')} | "
            f"{_f(r.get('class_agreement'), '.3f')} | {_f(r.get('calibration_seconds'), '.1f')} | "
            f"{_f(r.get('sample_seconds'), '.1f')} |"
        )
    lines += ["", "Grids: " + ", ".join(f"`{r['model'] if r['model'] != 'FP32' else 'fp'}.png`" for r in rows), ""]
    return "\n".join(lines)


__all__ = ["run_demo", "render_report", "DEMO_RUNS"]
