"""PTQD corrections at sampling time, as hooks for the sampling loop (no scheduler is modified).

* ε ← (ε̂ − μ_{t,c}) / (1 + k_t) removes the correlated part and the bias of the quantization noise.
* Variance-schedule calibration: the residual noise σ_q(t)/(1 + k_t) enters x_{t−1} through the step's ε
  coefficient c_t, so the sampler's own injected noise is shrunk to keep the total variance:
  σ′_t² = max(σ_t² − c_t² σ_q(t)² / (1 + k_t)², 0). What cannot be absorbed (σ′_t would be negative, or the
  sampler injects nothing, as DDIM with η = 0) is reported per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from qdiffuse.noise.schedule import probe_step
from qdiffuse.noise.stats import NoiseStats


@dataclass(frozen=True)
class PTQDOptions:
    """Which corrections act; each can be switched off for ablations."""

    correct_k: bool = True
    correct_bias: bool = True
    calibrate_variance: bool = True

    @property
    def any(self) -> bool:
        return self.correct_k or self.correct_bias or self.calibrate_variance


@dataclass
class PTQDCorrector:
    """Hooks for :func:`qdiffuse.sampling.loop.sample` and the per-step record of what they did."""

    stats: NoiseStats
    options: PTQDOptions = field(default_factory=PTQDOptions)
    report: dict[int, dict[str, Any]] = field(default_factory=dict)

    def eps_hook(self, i: int, t: Tensor, eps: Tensor) -> Tensor:
        step, how = self.stats.lookup(int(t))
        entry = self.report.setdefault(int(t), {"timestep": int(t), "stats": how})
        entry.update(k=step.k, sigma_q=step.sigma_q)
        if self.options.correct_bias:
            mu = torch.tensor(step.mu, dtype=eps.dtype, device=eps.device)
            eps = eps - mu.view(1, -1, *([1] * (eps.ndim - 2)))
        if self.options.correct_k:
            eps = eps / (1.0 + step.k)
        return eps

    def noise_hook(self, i: int, t: Tensor, scheduler: Any, x: Tensor, eps: Tensor, kwargs: dict) -> float:
        step, _ = self.stats.lookup(int(t))
        entry = self.report.setdefault(int(t), {"timestep": int(t)})
        if "c" not in entry:
            coeff = probe_step(scheduler, t, x, eps, kwargs)
            gain = (1.0 + step.k) if self.options.correct_k else 1.0
            excess = (coeff.c * step.sigma_q / gain) ** 2
            new_var = max(coeff.sigma**2 - excess, 0.0)
            entry.update(
                c=coeff.c,
                sigma=coeff.sigma,
                quant_noise_var=excess,
                sigma_new=math.sqrt(new_var),
                unabsorbed_var=max(excess - coeff.sigma**2, 0.0),
            )
        if not self.options.calibrate_variance or entry["sigma"] <= 0:
            return 1.0
        return entry["sigma_new"] / entry["sigma"]

    def hooks(self) -> dict[str, Any]:
        """Keyword arguments for ``sample``: only the hooks that have something to do."""
        out: dict[str, Any] = {}
        if self.options.correct_k or self.options.correct_bias:
            out["eps_hook"] = self.eps_hook
        out["noise_hook"] = self.noise_hook
        return out

    def summary(self) -> dict[str, Any]:
        rows = [self.report[t] for t in sorted(self.report, reverse=True)]
        unabsorbed = [r for r in rows if r.get("unabsorbed_var", 0.0) > 0]
        return {
            "steps": rows,
            "steps_unabsorbed": len(unabsorbed),
            "interpolated": sum(1 for r in rows if r.get("stats") == "interpolated"),
        }


__all__ = ["PTQDOptions", "PTQDCorrector"]
