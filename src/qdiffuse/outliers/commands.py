"""What the command line shows of outlier handling: the decisions of a quantize run, and the sensitivity report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qdiffuse.errors import ConfigError


def decision_lines(calibration: dict[str, Any], limit: int = 12) -> list[str]:
    """Lines for ``quantize`` and ``info`` from a folder's calibration record (empty: nothing was decided)."""
    lines = []
    outliers = calibration.get("outliers")
    if outliers:
        choices = ", ".join(f"{n}× {c}" for c, n in sorted(outliers["choices"].items(), key=lambda kv: -kv[1]))
        lines.append(f"outliers:   {outliers['layers']} integer-activation inputs checked: {choices}")
        changed = sorted(outliers["changed"], key=lambda d: d["sqnr_db"].get("static", 0.0))
        for d in changed[:limit]:
            static = d["sqnr_db"].get("static", float("nan"))
            chosen = d["sqnr_db"].get(d["choice"], float("nan"))
            cost = ""
            if d["fp_channels"]:
                cost = f", {d['fp_channels']} channels ({d['fp_macs_fraction']:.1%} of MACs) in FP"
            lines.append(
                f"  {d['layer']}: {d['choice']} ({static:.1f} -> {chosen:.1f} dB worst step; {d['reason']}{cost})"
            )
        if len(changed) > limit:
            lines.append(f"  ... {len(changed) - limit} more (quantization.json: calibration.outliers)")
    guard = calibration.get("guard")
    if guard:
        moved = guard["fp_input_layers"]
        verdict = "within" if guard["within_budget"] else "OVER"
        lines.append(
            f"guard:      output PSNR to FP {guard['before_db']:.1f} -> {guard['after_db']:.1f} dB, weight-only "
            f"{guard['weight_only_db']:.1f} dB: {verdict} the {guard['budget_db']:g} dB budget"
            + (f"; {len(moved)} layer inputs moved to FP: {', '.join(m['layer'] for m in moved)}" if moved else "")
        )
    return lines


def sensitivity_command(
    model: str,
    scheme: str,
    method: str,
    outliers: str,
    per: str,
    num: int,
    seed: int,
    guidance: float,
    batch_size: int,
    device: str,
    json_out: Path | None,
    overwrite: bool,
    calib: dict[str, int] | None = None,
) -> str:
    """Quantize ``model`` in memory (or load a quantized folder, simulated) and rank its units by what their
    quantized inputs cost at the output; returns the report text."""
    import torch

    from qdiffuse.api import quantize
    from qdiffuse.calibration.collect import collect_calibration
    from qdiffuse.config import QuantConfig
    from qdiffuse.fsutil import JSON, atomic_file, check_output_path
    from qdiffuse.io import is_quantized_folder, load_quantized
    from qdiffuse.models.loading import load_model_folder
    from qdiffuse.nn.rewrite import set_quantization_enabled
    from qdiffuse.outliers.sensitivity import format_rows, input_sensitivity

    if per not in ("block", "layer"):
        raise ConfigError(f"--per {per!r} unknown; use block or layer")
    if num < 1:
        raise ConfigError(f"--num {num} must be at least 1")
    if json_out is not None:
        check_output_path(json_out, overwrite, JSON, inputs=[model] if Path(model).exists() else [])
    config = None
    if not is_quantized_folder(model):
        # the guard stays off: this report shows what the grids themselves cost, before any layer is moved to FP
        config = QuantConfig.from_scheme(scheme, method=method, outliers=outliers, seed=seed, guard_db=0,
                                         **(calib or {}))
    if config is None:
        loaded = load_quantized(model, device, runtime="simulated")
        set_quantization_enabled(loaded.denoiser.model, False)
        data = collect_calibration(loaded.denoiser, loaded.scheduler_config, n_steps=10, n_per_step=num, seed=seed,
                                   guidance=guidance, batch_size=batch_size)
        set_quantization_enabled(loaded.denoiser.model, True)
        title = f"{model} (quantized folder; inputs from its weight-only sampler)"
    else:
        loaded = load_model_folder(model, device)
        data = collect_calibration(loaded.denoiser, loaded.scheduler_config, n_steps=10, n_per_step=num,
                                   seed=seed + 104729, guidance=guidance, batch_size=batch_size)
        quantize(loaded.denoiser, loaded.scheduler_config, config, guidance=guidance, batch_size=batch_size,
                 runtime="simulated")
        title = f"{model} {scheme} {method}, outliers {outliers}, no guard"
    with torch.no_grad():
        rows, headline = input_sensitivity(loaded.denoiser, data, per=per, batch_size=batch_size)
    lines = [
        f"sensitivity of {title}: PSNR (dB) of the output with only one {per}'s inputs quantized, against the "
        f"weight-only model, on {len(data)} inputs over {len({int(t) for t in data.t.tolist()})} timesteps",
        f"all inputs quantized: {headline['all_inputs_db']:.1f} dB",
        *format_rows(rows),
    ]
    if json_out is not None:
        with atomic_file(json_out, overwrite, JSON) as tmp:
            tmp.write_text(json.dumps({"headline": headline, "rows": [r.to_dict() for r in rows]}, indent=2))
    return "\n".join(lines) + "\n"


__all__ = ["decision_lines", "sensitivity_command"]
