"""Where a quantized model loses its accuracy: the cost of each block's and each layer's quantized inputs.

The model's weights stay quantized throughout; only the activation quantizers are switched. With every input
in floating point the model is its weight-only twin (W8A8 → W8A16); switching on the inputs of one unit at a time
and measuring the network output against that twin isolates what each unit's activation grids cost, per range of
timesteps. The units with the lowest PSNR are where the loss is (channel outliers, drifting ranges, or just a
sensitive layer); :mod:`qdiffuse.outliers.auto` decides per layer, this module shows the result end to end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from qdiffuse.calibration.collect import CalibrationSet
from qdiffuse.models.denoiser import Denoiser
from qdiffuse.progress import progress_bar

T_RANGES = ((667, 1000, "high noise"), (334, 666, "mid"), (0, 333, "low noise"))


@dataclass
class SensitivityRow:
    """PSNR (dB) of the model output with only ``unit``'s inputs quantized, against the weight-only model."""

    unit: str
    layers: int
    psnr_db: float
    by_t: dict[str, float] = field(default_factory=dict)
    eps_mse: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "unit": self.unit,
            "layers": self.layers,
            "psnr_db": round(self.psnr_db, 2),
            "eps_mse": self.eps_mse,
            "by_t": {k: round(v, 2) for k, v in self.by_t.items()},
        }


def _switchable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from qdiffuse.kernels.modules import RealLayer
    from qdiffuse.nn.attention import QuantAttnProcessor
    from qdiffuse.nn.layers import QuantLayer

    out = []
    for name, module in model.named_modules():
        if isinstance(module, RealLayer):
            raise ValueError("the sensitivity report needs the simulated runtime; load with runtime='simulated'")
        if isinstance(module, QuantLayer) and len(module.input_quantizers):
            out.append((name, module))
        processor = getattr(module, "processor", None)
        if isinstance(processor, QuantAttnProcessor):
            out.append((f"{name}.attention-matmuls", processor))
    return out


def block_of(name: str) -> str:
    """The diffusers block a layer belongs to: ``down_blocks.1``, ``mid_block``, ``transformer_blocks.3``, or the
    top-level layer itself (``conv_in``, ``time_embedding``...)."""
    parts = name.split(".")
    if parts[0].endswith("_blocks") and len(parts) > 1:
        return ".".join(parts[:2])
    return parts[0]


@torch.no_grad()
def model_outputs(denoiser: Denoiser, data: CalibrationSet, batch_size: int) -> Tensor:
    return torch.cat([denoiser.forward_raw(x, t, lab, c).float().cpu() for x, t, lab, c in data.batches(batch_size)])


def psnr_db(out: Tensor, ref: Tensor, t: Tensor | None = None, lo: int = 0, hi: int = 10**9) -> float:
    if t is not None:
        rows = (t >= lo) & (t <= hi)
        if not rows.any():
            return float("nan")
        out, ref = out[rows], ref[rows]
    err = (out - ref).pow(2).mean().item()
    return 10 * math.log10(max(ref.pow(2).mean().item(), 1e-30) / max(err, 1e-30))


def input_sensitivity(
    denoiser: Denoiser, data: CalibrationSet, per: str = "block", batch_size: int = 64
) -> tuple[list[SensitivityRow], dict[str, float]]:
    """Rows for every block (``per="block"``) or layer (``"layer"``), worst first, and the headline numbers:
    ``all_inputs_db`` (every input quantized, against the weight-only model)."""
    units: dict[str, list[nn.Module]] = {}
    for name, module in _switchable(denoiser.model):
        key = block_of(name) if per == "block" else name
        units.setdefault(key, []).append(module)
    modules = [m for ms in units.values() for m in ms]

    def enable(selected: list[nn.Module]) -> None:
        for m in modules:
            m.quant_enabled = False
        for m in selected:
            m.quant_enabled = True

    t = data.t.float()
    try:
        enable([])
        ref = model_outputs(denoiser, data, batch_size)
        enable(modules)
        headline = {"all_inputs_db": psnr_db(model_outputs(denoiser, data, batch_size), ref)}
        rows = []
        with progress_bar(f"sensitivity per {per}", len(units)) as bar:
            for unit, members in units.items():
                enable(members)
                out = model_outputs(denoiser, data, batch_size)
                by_t = {label: psnr_db(out, ref, t, lo, hi) for lo, hi, label in T_RANGES}
                rows.append(
                    SensitivityRow(unit, len(members), psnr_db(out, ref), by_t, float((out - ref).pow(2).mean()))
                )
                bar.advance()
    finally:
        for m in modules:
            m.quant_enabled = True
    rows.sort(key=lambda r: r.psnr_db)
    return rows, headline


def format_rows(rows: list[SensitivityRow], limit: int | None = None) -> list[str]:
    labels = [label for _, _, label in T_RANGES]
    lines = [f"{'unit':<48} {'layers':>6} {'PSNR dB':>8}  " + "  ".join(f"{x:>10}" for x in labels)]
    for r in rows[:limit]:
        per_t = "  ".join(f"{r.by_t.get(x, float('nan')):>10.1f}" for x in labels)
        lines.append(f"{r.unit:<48} {r.layers:>6} {r.psnr_db:>8.1f}  {per_t}")
    return lines


__all__ = ["input_sensitivity", "SensitivityRow", "format_rows", "block_of", "model_outputs", "psnr_db"]
