"""The end-to-end guard: a quantized model may not lose more than a budget (dB) against its weight-only twin.

Per-layer treatments fix what one layer's grid cannot hold, but a network can still amplify small, healthy-looking
input errors (the full-resolution layers of a UNet's first block decide the detail of the last steps). After
calibration the guard compares the model's output on held-out calibration inputs with the FP model's, with and
without its activation grids; if the activations cost more than ``budget_db``, it measures each layer's share
(:func:`qdiffuse.outliers.sensitivity.input_sensitivity`) and gives the costliest inputs a floating-point input
until the model is within budget, or until ``max_fraction`` of the layers is used (then it says so). Every layer it
moves is reported with its cost.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from qdiffuse.calibration.collect import CalibrationSet
from qdiffuse.models.denoiser import Denoiser
from qdiffuse.nn.rewrite import set_quantization_enabled
from qdiffuse.outliers.sensitivity import input_sensitivity, model_outputs, psnr_db

GUARD_ROWS = 32


@dataclass
class GuardReport:
    """What the guard measured and did."""

    budget_db: float
    weight_only_db: float
    before_db: float
    after_db: float
    fp_input_layers: list[dict[str, Any]] = field(default_factory=list)
    within_budget: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget_db": self.budget_db,
            "weight_only_db": round(self.weight_only_db, 2),
            "before_db": round(self.before_db, 2),
            "after_db": round(self.after_db, 2),
            "within_budget": self.within_budget,
            "fp_input_layers": self.fp_input_layers,
        }


def guard_rows(calib: CalibrationSet, rows: int = GUARD_ROWS) -> CalibrationSet:
    """An evenly spread subset of the calibration set: every timestep it holds, ``rows`` rows in all."""
    n = len(calib)
    return calib.subset(torch.linspace(0, n - 1, min(rows, n)).round().long().unique())


def fp_reference(denoiser: Denoiser, probe: CalibrationSet, batch_size: int = 64) -> Tensor:
    """The FP model's outputs on the guard's rows (taken before the model is rewritten)."""
    return model_outputs(denoiser, probe, batch_size)


def give_fp_input(layer: nn.Module) -> None:
    """Drop a quantized layer's input quantizers: its input stays in floating point, its weight as it is."""
    layer.input_quantizers = nn.ModuleList()
    layer.act_spec = None


def run_guard(
    denoiser: Denoiser,
    probe: CalibrationSet,
    reference: Tensor,
    budget_db: float,
    max_fraction: float = 0.15,
    batch_size: int = 64,
) -> GuardReport:
    """Check the calibrated (simulated) model and move the costliest layer inputs to FP if it is over budget."""
    from qdiffuse.nn.layers import QuantLayer

    model = denoiser.model
    set_quantization_enabled(model, False)
    weight_only = psnr_db(model_outputs(denoiser, probe, batch_size), reference)
    set_quantization_enabled(model, True)
    before = psnr_db(model_outputs(denoiser, probe, batch_size), reference)
    report = GuardReport(budget_db, weight_only, before, before)
    if weight_only - before <= budget_db:
        return report
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLayer) and len(m.input_quantizers)}
    cap = max(1, int(len(layers) * max_fraction))
    rows, _ = input_sensitivity(denoiser, probe, per="layer", batch_size=batch_size)
    after = before
    for r in [r for r in rows if r.unit in layers][:cap]:
        # errors of several layers do not add up exactly (they compound through the network), so the model is
        # measured again after every move rather than predicted from the single-layer costs
        give_fp_input(layers[r.unit])
        report.fp_input_layers.append({"layer": r.unit, "alone_db": round(r.psnr_db, 2)})
        after = psnr_db(model_outputs(denoiser, probe, batch_size), reference)
        if weight_only - after <= budget_db:
            break
    report.after_db = after
    report.within_budget = weight_only - after <= budget_db + 1e-9
    return report


__all__ = ["run_guard", "GuardReport", "guard_rows", "fp_reference", "give_fp_input"]
