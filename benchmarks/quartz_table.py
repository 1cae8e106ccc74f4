"""Markdown table of the QuaRTZ grids (BENCHMARKS.md, "QuaRTZ"): one row per model and recipe, from bench cells.

    python benchmarks/quartz_table.py runs/cpu-quartz-w4a4-ddim runs/cpu-quartz-w4a4-dpm runs/cpu-quartz-w4a8-ddim

Adds what the bench table does not hold: the bits each weight and activation takes as stored (values plus scales
and flags, from the schemes' formats) and FID as a multiple of the FP cell's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from qdiffuse.bench import BenchConfig
from qdiffuse.config import QuantConfig


def _bits(setting: dict) -> str:
    options = {k: v for k, v in setting.get("config", {}).items() if k in ("lzs_group", "lzs_rounding")}
    config = QuantConfig.from_scheme(setting["scheme"], method=setting["method"], **options)
    act = f"{config.activation.effective_bits:.2f}" if config.activation else "16"
    return f"{config.weight.effective_bits:.2f} / {act}"


def _f(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def table(run: Path) -> list[str]:
    config_name = json.loads((run / "results.json").read_text())["meta"]["config"] if (
        run / "results.json"
    ).is_file() else run.name
    path = Path("benchmarks") / f"{config_name}.json"
    config = BenchConfig.load(path)
    raw = {q.get("label") or f"{q['scheme']}-{q['method']}": q for q in json.loads(path.read_text())["quant"]}
    rows = []
    for model in config.models:
        for sampler in config.samplers:
            prefix = f"{Path(model).name}__{sampler.key}__"
            fp_cell = run / "cells" / f"{prefix}fp.json"
            fp = json.loads(fp_cell.read_text()) if fp_cell.is_file() else None
            if fp:
                rows.append(f"| {model} | {sampler.sampler} {sampler.steps} | FP | {fp['fid']:.2f} | 1 | – | – | – | "
                            f"32 / 32 | {fp.get('size_bytes', 0) / 1024:.0f} | – |")
            for key in raw:
                cell = run / "cells" / f"{prefix}{key}.json"
                if not cell.is_file():
                    rows.append(f"| {model} | {sampler.sampler} {sampler.steps} | {key} | not run | | | | | | | |")
                    continue
                r = json.loads(cell.read_text())
                ratio = r["fid"] / fp["fid"] if fp else None
                rows.append(
                    f"| {model} | {sampler.sampler} {sampler.steps} | {key} | {r['fid']:.2f} | {_f(ratio, '.2f')} | "
                    f"{_f(r.get('fid_to_fp'), '.2f')} | {_f(r.get('psnr_to_fp'), '.1f')} | "
                    f"{_f(r.get('ssim_to_fp'), '.3f')} | {_bits(raw[key])} | {r['size_bytes'] / 1024:.0f} | "
                    f"{_f(r.get('calibration_seconds'), '.0f')} |"
                )
    return rows


def main() -> None:
    print("| model | sampler | recipe | FID | × FP | FID to FP | PSNR to FP | SSIM to FP | bits W / A | size (KiB) "
          "| calib. (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for run in sys.argv[1:]:
        for row in table(Path(run)):
            print(row)


if __name__ == "__main__":
    main()
