"""Step-aware mixed precision (PTQD): the activation bit-width of each step from SNR_Q against SNR_F.

Early (noisy) steps tolerate much more quantization noise than late ones: the diffusion process itself has a
signal-to-noise ratio SNR_F(t) = ᾱ_t / (1 − ᾱ_t) that is tiny at large t. A step may use a low activation
bit-width when the quantization SNR at that width, SNR_Q(t) = ‖ε_fp‖² / ‖Δ‖², is at least ``margin`` × SNR_F(t);
otherwise it uses the next width up. Weights are shared by all steps.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from qdiffuse.errors import ConfigError, DataError
from qdiffuse.models.denoiser import Denoiser
from qdiffuse.nn.quantizer import activation_variants, set_activation_variant
from qdiffuse.noise.analyze import measure_noise
from qdiffuse.sampling.loop import SampleRequest

PLAN_FILE = "precision_plan.json"


@dataclass
class PrecisionPlan:
    """Activation variant per timestep; ``variants`` ordered from fewest to most bits."""

    variants: list[str]
    per_timestep: dict[int, str]
    settings: dict[str, Any]
    margin: float = 1.0
    snr_q: dict[str, dict[int, float]] = field(default_factory=dict)
    snr_f: dict[int, float] = field(default_factory=dict)

    def variant_for(self, t: int) -> str:
        """Measured timesteps use their choice; others the choice of the nearest measured timestep."""
        if t in self.per_timestep:
            return self.per_timestep[t]
        if not self.per_timestep:
            return self.variants[-1]
        nearest = min(self.per_timestep, key=lambda k: (abs(k - t), k))
        return self.per_timestep[nearest]

    def fraction(self) -> dict[str, float]:
        n = max(len(self.per_timestep), 1)
        return {v: sum(1 for x in self.per_timestep.values() if x == v) / n for v in self.variants}

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["per_timestep"] = {str(k): v for k, v in sorted(self.per_timestep.items(), reverse=True)}
        data["snr_q"] = {v: {str(k): x for k, x in d.items()} for v, d in self.snr_q.items()}
        data["snr_f"] = {str(k): x for k, x in self.snr_f.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrecisionPlan:
        try:
            return cls(
                variants=list(data["variants"]),
                per_timestep={int(k): v for k, v in data["per_timestep"].items()},
                settings=dict(data["settings"]),
                margin=float(data.get("margin", 1.0)),
                snr_q={v: {int(k): x for k, x in d.items()} for v, d in data.get("snr_q", {}).items()},
                snr_f={int(k): x for k, x in data.get("snr_f", {}).items()},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"malformed precision plan ({exc}); re-run qdiffuse quantize") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def load_plan(folder: Path) -> PrecisionPlan | None:
    path = Path(folder) / PLAN_FILE
    if not path.is_file():
        return None
    try:
        return PrecisionPlan.from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON ({exc.msg}); re-run qdiffuse quantize") from None


def _variant_bits(key: str) -> int:
    return int(key.lstrip("a"))


def choose_precision(
    fp: Denoiser,
    quantized: Denoiser,
    scheduler_config: dict[str, Any],
    request: SampleRequest,
    margin: float = 1.0,
    cond: Tensor | None = None,
) -> PrecisionPlan:
    """Measure SNR_Q per step at every activation variant and pick the lowest that the step tolerates."""
    variants = sorted(activation_variants(quantized.model), key=_variant_bits)
    if not variants:
        raise ConfigError("this model has a single activation format; quantize with --scheme w4-mixed")
    snr_q: dict[str, dict[int, float]] = {}
    snr_f: dict[int, float] = {}
    for key in variants:
        set_activation_variant(quantized.model, key)
        stats = measure_noise(fp, quantized, scheduler_config, request, cond)
        snr_q[key] = {t: s.snr_q for t, s in stats.steps.items()}
        snr_f = {t: s.snr_f for t, s in stats.steps.items()}
    set_activation_variant(quantized.model, variants[-1])
    per_timestep = {}
    for t, need in snr_f.items():
        ok = [v for v in variants if snr_q[v][t] >= margin * need]
        per_timestep[t] = ok[0] if ok else variants[-1]
    from qdiffuse.noise.analyze import request_settings

    return PrecisionPlan(variants, per_timestep, request_settings(request), margin, snr_q, snr_f)


class PlanSwitcher:
    """Sampling-loop hook that activates each step's variant before the network call."""

    def __init__(self, plan: PrecisionPlan, model: Any) -> None:
        self.plan = plan
        self.model = model
        self.used: dict[int, str] = {}

    def on_step(self, i: int, t: Tensor, x: Tensor, labels: Tensor | None, cond: Tensor | None) -> None:
        key = self.plan.variant_for(int(t.flatten()[0]))
        set_activation_variant(self.model, key)
        self.used[int(t.flatten()[0])] = key


__all__ = ["PrecisionPlan", "choose_precision", "PlanSwitcher", "load_plan", "PLAN_FILE"]
