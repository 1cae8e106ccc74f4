"""PTQD quantization-noise statistics, measured per sampler step.

FP and quantized denoisers run on the *same* x_t along the FP trajectory (single-step errors, not accumulated
ones), with the condition and guidance used for sampling. With Δ = ε̂_q − ε_fp, each step t gets

* k_t: the slope of Δ on ε_fp (pooled within channels, clipped at ≥ 0) — the part of the noise correlated
  with the signal, which simply rescales ε;
* μ_{t,c}: the per-channel intercept, mean(Δ_c) − k_t · mean(ε_c) — a bias of the posterior mean;
* σ_q(t): the standard deviation of the residual Δ − k_t ε_fp − μ_{t,c} — uncorrelated noise that acts like
  extra sampler noise;
* SNR_Q(t) = ‖ε_fp‖² / ‖Δ‖² against the forward process's SNR_F(t) = ᾱ_t / (1 − ᾱ_t);
* a D'Agostino–Pearson normality test of the residual on a fixed random subsample.

Everything is accumulated as float64 sums, so the numbers do not depend on batch size.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from qdiffuse.errors import DataError

NORMALITY_SAMPLES = 4000
"""Residual values kept per step for the normality test and histograms; D'Agostino's test rejects any
real-world distribution at millions of samples, so a fixed moderate size keeps the p-value meaningful."""


@dataclass
class StepStats:
    """PTQD statistics of one timestep."""

    timestep: int
    k: float
    mu: list[float]
    sigma_q: float
    snr_q: float
    snr_f: float
    normality_p: float
    k_raw: float
    count: int


@dataclass
class NoiseStats:
    """Statistics for every timestep of one sampling setting, keyed by the scheduler's integer timestep."""

    settings: dict[str, Any]
    steps: dict[int, StepStats] = field(default_factory=dict)
    residual_samples: dict[int, list[float]] = field(default_factory=dict)

    def timesteps(self) -> list[int]:
        return sorted(self.steps, reverse=True)

    def lookup(self, t: int) -> tuple[StepStats, str]:
        """Statistics at timestep ``t``: measured (``"exact"``) or linearly interpolated between neighbours."""
        if t in self.steps:
            return self.steps[t], "exact"
        if not self.steps:
            raise DataError("no noise statistics measured; run qdiffuse analyze first")
        known = sorted(self.steps)
        if t <= known[0]:
            return self.steps[known[0]], "nearest"
        if t >= known[-1]:
            return self.steps[known[-1]], "nearest"
        hi = next(k for k in known if k > t)
        lo = max(k for k in known if k < t)
        w = (t - lo) / (hi - lo)
        a, b = self.steps[lo], self.steps[hi]

        def mix(x: float, y: float) -> float:
            return (1 - w) * x + w * y

        return (
            StepStats(
                timestep=t,
                k=mix(a.k, b.k),
                mu=[mix(x, y) for x, y in zip(a.mu, b.mu, strict=True)],
                sigma_q=mix(a.sigma_q, b.sigma_q),
                snr_q=mix(a.snr_q, b.snr_q),
                snr_f=mix(a.snr_f, b.snr_f),
                normality_p=float("nan"),
                k_raw=mix(a.k_raw, b.k_raw),
                count=0,
            ),
            "interpolated",
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "steps": [asdict(self.steps[t]) for t in self.timesteps()],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NoiseStats:
        try:
            steps = {int(s["timestep"]): StepStats(**s) for s in data["steps"]}
            return cls(settings=dict(data["settings"]), steps=steps)
        except (KeyError, TypeError) as exc:
            raise DataError(f"malformed noise statistics ({exc}); re-run qdiffuse analyze") from None

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, allow_nan=True))

    @classmethod
    def load(cls, path: Path) -> NoiseStats:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} is not valid JSON ({exc.msg}); re-run qdiffuse analyze") from None


class StepAccumulator:
    """Float64 running sums for one timestep; turns into :class:`StepStats` at the end."""

    def __init__(self, channels: int, seed: int = 0) -> None:
        self.n = 0
        z = lambda: torch.zeros(channels, dtype=torch.float64)  # noqa: E731
        self.s_e, self.s_d, self.s_ee, self.s_dd, self.s_ed = z(), z(), z(), z(), z()
        self.nc = torch.zeros(channels, dtype=torch.float64)
        self.sum_eps_sq = 0.0
        self.sum_delta_sq = 0.0
        self.kept: list[tuple[Tensor, Tensor, Tensor]] = []
        self.kept_count = 0
        self.gen = torch.Generator().manual_seed(seed)

    def update(self, eps_fp: Tensor, eps_q: Tensor) -> None:
        e = eps_fp.double().cpu()
        d = (eps_q - eps_fp).double().cpu()
        dims = [0] + list(range(2, e.ndim))
        per_channel = e[0].numel() // e.shape[1]
        self.nc += e.shape[0] * per_channel
        self.s_e += e.sum(dims)
        self.s_d += d.sum(dims)
        self.s_ee += (e * e).sum(dims)
        self.s_dd += (d * d).sum(dims)
        self.s_ed += (e * d).sum(dims)
        self.sum_eps_sq += float((e * e).sum())
        self.sum_delta_sq += float((d * d).sum())
        self.n += e.shape[0]
        if self.kept_count < NORMALITY_SAMPLES:
            flat_e = e.transpose(0, 1).reshape(e.shape[1], -1)
            flat_d = d.transpose(0, 1).reshape(d.shape[1], -1)
            take = min(NORMALITY_SAMPLES - self.kept_count, flat_e.shape[1] * flat_e.shape[0])
            idx = torch.randperm(flat_e.numel(), generator=self.gen)[:take]
            channel = idx // flat_e.shape[1]
            self.kept.append((flat_e.flatten()[idx], flat_d.flatten()[idx], channel))
            self.kept_count += take

    def finish(self, timestep: int, snr_f: float) -> tuple[StepStats, list[float]]:
        from scipy import stats as scipy_stats

        nc = self.nc
        mean_e, mean_d = self.s_e / nc, self.s_d / nc
        cov_ed = self.s_ed / nc - mean_e * mean_d
        var_e = self.s_ee / nc - mean_e**2
        var_d = self.s_dd / nc - mean_d**2
        k_raw = float((cov_ed * nc).sum() / (var_e * nc).sum().clamp_min(1e-30))
        k = max(k_raw, 0.0)
        mu = mean_d - k * mean_e
        resid_var = (var_d - 2 * k * cov_ed + k * k * var_e).clamp_min(0.0)
        sigma_q = math.sqrt(float((resid_var * nc).sum() / nc.sum()))
        e = torch.cat([x[0] for x in self.kept])
        d = torch.cat([x[1] for x in self.kept])
        ch = torch.cat([x[2] for x in self.kept])
        resid = (d - k * e - mu[ch]).numpy()
        p = float(scipy_stats.normaltest(resid).pvalue) if resid.size >= 20 else float("nan")
        snr_q = self.sum_eps_sq / max(self.sum_delta_sq, 1e-30)
        step = StepStats(
            timestep=timestep,
            k=k,
            mu=[float(v) for v in mu],
            sigma_q=sigma_q,
            snr_q=snr_q,
            snr_f=snr_f,
            normality_p=p,
            k_raw=k_raw,
            count=self.n,
        )
        return step, [float(v) for v in np.asarray(resid, dtype=np.float32)]


def forward_snr(alphas_cumprod: Tensor, t: int) -> float:
    a = float(alphas_cumprod[t])
    return a / max(1.0 - a, 1e-30)


__all__ = ["NoiseStats", "StepStats", "StepAccumulator", "forward_snr", "NORMALITY_SAMPLES"]
