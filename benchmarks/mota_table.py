"""Markdown table (and FID-vs-steps plots) of the MOTA grid (BENCHMARKS.md, "Sampling-aware quantization").

    python benchmarks/mota_table.py runs/cpu-mota-w4a8 [--config benchmarks/cpu-mota-ablation.json] \
        [--plot benchmarks/plots/mota-w4a8] [--steps]

Rows and sampler settings come from the bench config (default: ``benchmarks/<run folder name>.json``); several
configs may share one run folder (the ablation reuses the main grid's FP cells).

One row per model and recipe: FID at every sampler setting of the grid, FID, PSNR and SSIM to FP at the first
setting, the share of the FID gap between the reference recipe (``qdiffusion`` by default) and FP that each recipe
closes there, the aligned error the quantized folder's manifest records (first-order ε to the FP solver's
direction, MSE) and the calibration time.

``--steps`` adds one row per sampler and step count with each recipe's paired FID difference to the reference
recipe and its bootstrap interval. ``--seeds`` adds a summary over calibration seeds at the first sampler setting:
labels that differ only by a ``-seedN`` suffix are one recipe (no suffix: the grid's seed), shown with every seed's
FID, their mean, and the gap closed by the mean against the reference recipe's mean.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from qdiffuse.bench import BenchConfig


def _f(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def _grid(run: Path, path: Path | None) -> BenchConfig:
    """The bench config of ``run``: ``path``, or ``benchmarks/<run folder name>.json``."""
    return BenchConfig.load(path or Path("benchmarks") / f"{run.name}.json")


def _cell(run: Path, model: str, sampler_key: str, key: str) -> dict | None:
    path = run / "cells" / f"{Path(model).name}__{sampler_key}__{key}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _aligned_mse(run: Path, model: str, key: str) -> float | None:
    manifest = run / "models" / f"{Path(model).name}__{key}" / "quantization.json"
    if not manifest.is_file():
        return None
    mota = json.loads(manifest.read_text()).get("calibration", {}).get("mota")
    return None if mota is None else mota["aligned_error"]["reconstructed"]["mse"]


def collect(run: Path, reference: str, path: Path | None = None) -> tuple[list[str], dict]:
    config = _grid(run, path)
    keys = [q.key for q in config.quant]
    samplers = [(s.key, f"{s.sampler} {s.steps}") for s in config.samplers]
    head = "| model | recipe | " + " | ".join(f"FID {name}" for _, name in samplers)
    first_name = samplers[0][1]
    head += (
        f" | FID to FP ({first_name}) | PSNR to FP ({first_name}) | SSIM to FP ({first_name}) "
        f"| gap closed ({first_name}) | aligned MSE | calibration s |"
    )
    rows = [head, "|" + "---|" * (len(samplers) + 8)]
    curves: dict = {}
    for model in config.models:
        first = samplers[0][0]
        fp = _cell(run, model, first, "fp")
        ref = _cell(run, model, first, reference)
        for key in ["fp", *keys]:
            cells = [_cell(run, model, s, key) for s, _ in samplers]
            if not any(cells):
                rows.append(f"| {model} | {key} | not run |" + " |" * (len(samplers) + 5))
                continue
            for (_, name), c in zip(samplers, cells, strict=True):
                if c:
                    family, steps = name.split()
                    curves.setdefault(model, {}).setdefault(family, {}).setdefault(key, []).append(
                        (int(steps), c["fid"])
                    )
            gap = None
            if key not in ("fp", reference) and fp and ref and cells[0] and ref["fid"] != fp["fid"]:
                gap = (ref["fid"] - cells[0]["fid"]) / (ref["fid"] - fp["fid"])
            c0 = cells[0] or {}
            seconds = next((c.get("calibration_seconds") for c in cells if c), None)
            rows.append(
                f"| {model} | {key} | "
                + " | ".join(_f(c["fid"] if c else None, ".2f") for c in cells)
                + f" | {_f(c0.get('fid_to_fp'), '.2f')} | {_f(c0.get('psnr_to_fp'), '.1f')} "
                f"| {_f(c0.get('ssim_to_fp'), '.3f')} | {_f(gap, '.0%')} | "
                f"{_f(_aligned_mse(run, model, key), '.4f')} | {_f(seconds, '.0f')} |"
            )
    return rows, curves


def seed_summary(run: Path, reference: str, path: Path | None = None) -> list[str]:
    """One row per model and recipe: FID, FID to FP and PSNR to FP per calibration seed and their means."""
    config = _grid(run, path)
    first = config.samplers[0]
    keys = [q.key for q in config.quant]
    recipes: dict[str, list[str]] = {}
    for key in keys:
        recipes.setdefault(re.sub(r"-seed\d+$", "", key), []).append(key)
    rows = [
        f"| model | recipe ({first.sampler} {first.steps}) | seeds | FID per seed | FID mean | gap closed (mean) "
        "| FID to FP (mean) | PSNR to FP (mean) |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    for model in config.models:
        fp = _cell(run, model, first.key, "fp")
        done = {
            base: [c for c in (_cell(run, model, first.key, k) for k in members) if c]
            for base, members in recipes.items()
        }
        ref = mean([c["fid"] for c in done.get(reference, [])])
        if fp:
            rows.append(f"| {model} | fp | – | {fp['fid']:.2f} | {fp['fid']:.2f} | – | – | – |")
        for base, cells in done.items():
            if not cells:
                continue
            fid = mean([c["fid"] for c in cells])
            gap = None
            if base != reference and fp and ref is not None and fid is not None and ref != fp["fid"]:
                gap = (ref - fid) / (ref - fp["fid"])
            rows.append(
                f"| {model} | {base} | {len(cells)} | "
                + ", ".join(f"{c['fid']:.2f}" for c in cells)
                + f" | {_f(fid, '.2f')} | {_f(gap, '.0%')} | "
                f"{_f(mean([c['fid_to_fp'] for c in cells if c.get('fid_to_fp') is not None]), '.2f')} | "
                f"{_f(mean([c['psnr_to_fp'] for c in cells if c.get('psnr_to_fp') is not None]), '.1f')} |"
            )
    return rows


def steps_table(
    run: Path, reference: str, path: Path | None, draws: int, compare: list[str] | None = None
) -> list[str]:
    """Two tables with one row per model, sampler and step count: every recipe's FID, with the paired FID
    difference of each ``compare`` recipe (default: all) to the reference and its bootstrap 90% interval (same
    noise per image; see ``fid_bootstrap.py``); then every recipe's PSNR to the FP samples."""
    from fid_bootstrap import interval, paired

    config = _grid(run, path)
    keys = [q.key for q in config.quant]
    others = [k for k in (compare or keys) if k != reference]
    unknown = sorted(set(others) - set(keys))
    if unknown:
        raise SystemExit(f"--compare names {unknown}, not recipes of {config.name}: choose from {keys}")
    fid_rows = [
        "| model | sampler | steps | FID fp | "
        + " | ".join(keys)
        + "".join(f" | {k} − {reference} (90% interval)" for k in others)
        + " |",
        "|" + "---|" * (4 + len(keys) + len(others)),
    ]
    psnr_rows = [
        "| model | sampler | steps | PSNR to FP: " + " | ".join(keys) + " |",
        "|" + "---|" * (3 + len(keys)),
    ]
    for model in config.models:
        for s in sorted(config.samplers, key=lambda s: (s.sampler, s.steps)):
            cells = {k: _cell(run, model, s.key, k) for k in ["fp", *keys]}
            if not any(cells.values()):
                continue
            diffs = []
            if cells.get(reference) and any(cells[k] for k in others):
                _, full, boot = paired(run, model, s.key, reference, draws)
                for k in others:
                    if cells[k] and k in boot:
                        lo, hi = interval(boot, k, reference)
                        diffs.append(f"{full[k] - full[reference]:+.2f} [{lo:+.2f}, {hi:+.2f}]")
                    else:
                        diffs.append("–")
            else:
                diffs = ["–"] * len(others)
            head = f"| {model} | {s.sampler} | {s.steps} | "
            fid_rows.append(
                head
                + " | ".join(_f(cells[k]["fid"] if cells[k] else None, ".2f") for k in ["fp", *keys])
                + "".join(f" | {d}" for d in diffs)
                + " |"
            )
            psnr_rows.append(
                head + " | ".join(_f(cells[k].get("psnr_to_fp") if cells[k] else None, ".1f") for k in keys) + " |"
            )
    return [*fid_rows, "", *psnr_rows]


FAMILY_NAMES = {"dpm++2m": "DPM-Solver++ 2M", "unipc": "UniPC", "ddim": "DDIM"}


def plot(curves: dict, prefix: Path, num: int) -> list[Path]:
    """One figure per model: a panel per sampler, FID against steps, a line per recipe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    written = []
    prefix.parent.mkdir(parents=True, exist_ok=True)
    for model, by_family in curves.items():
        families = list(by_family)
        keys = list(dict.fromkeys(k for family in families for k in by_family[family]))
        colors = {k: f"C{i}" for i, k in enumerate(k for k in keys if k != "fp")}
        fig, axes = plt.subplots(1, len(families), figsize=(4 * len(families), 3.5), squeeze=False, sharey=True)
        for ax, family in zip(axes[0], families, strict=True):
            for key, points in by_family[family].items():
                steps, fids = zip(*sorted(points), strict=True)
                style = {"color": "black", "linestyle": "--"} if key == "fp" else {"color": colors[key]}
                ax.plot(steps, fids, marker="o", label=key, **style)
            ax.set_yscale("log")  # minmax sits several times above the rest; a log axis keeps the others apart
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.yaxis.set_minor_formatter(ScalarFormatter())
            ax.set_xlabel(f"{FAMILY_NAMES.get(family, family)} steps")
            ax.set_xticks(sorted({n for pts in by_family[family].values() for n, _ in pts}))
            ax.set_title(f"{model}, {FAMILY_NAMES.get(family, family)}")
        axes[0][0].set_ylabel(f"FID (classifier features, N = {num})")
        handles = {h.get_label(): h for ax in axes[0] for h in ax.get_lines()}
        fig.legend([handles[k] for k in keys], keys, fontsize=7, loc="center right")
        fig.tight_layout(rect=(0, 0, 0.82, 1))
        out = prefix.with_name(f"{prefix.name}-{Path(model).name}.png")
        fig.savefig(out, dpi=110)
        plt.close(fig)
        written.append(out)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--config", type=Path, default=None, help="bench config (default: from the run's name)")
    parser.add_argument("--reference", default="w4a8-qdiffusion-r200")
    parser.add_argument("--plot", type=Path, default=None, help="write PREFIX-<model>.png")
    parser.add_argument("--seeds", action="store_true", help="add the summary over calibration seeds")
    parser.add_argument(
        "--steps",
        action="store_true",
        help="add one row per sampler and step count with paired differences to the reference",
    )
    parser.add_argument("--draws", type=int, default=200, help="bootstrap draws for --steps")
    parser.add_argument(
        "--compare", nargs="+", default=None, help="recipes whose paired difference --steps gives (default: all)"
    )
    args = parser.parse_args()
    rows, curves = collect(args.run, args.reference, args.config)
    print("\n".join(rows))
    if args.seeds:
        print()
        print("\n".join(seed_summary(args.run, args.reference, args.config)))
    if args.steps:
        print()
        print("\n".join(steps_table(args.run, args.reference, args.config, args.draws, args.compare)))
    if args.plot is not None:
        for path in plot(curves, args.plot, _grid(args.run, args.config).num):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
