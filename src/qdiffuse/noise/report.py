"""Plots and a Markdown report of PTQD noise statistics (what quantization did at every denoising step)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from qdiffuse.noise.stats import NoiseStats


def _plt():  # noqa: ANN202 - matplotlib.pyplot module
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(stats: NoiseStats, path: Path) -> None:
    """k_t, σ_q(t) and SNR_Q vs SNR_F against the timestep, in one figure."""
    plt = _plt()
    ts = stats.timesteps()
    steps = [stats.steps[t] for t in ts]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(ts, [s.k for s in steps], marker=".")
    axes[0].set_title("correlation slope k_t")
    axes[1].plot(ts, [s.sigma_q for s in steps], marker=".")
    axes[1].set_title("residual std σ_q(t)")
    axes[2].semilogy(ts, [s.snr_q for s in steps], marker=".", label="SNR_Q (quantization)")
    axes[2].semilogy(ts, [s.snr_f for s in steps], marker=".", label="SNR_F (forward process)")
    axes[2].set_title("signal-to-noise ratios")
    axes[2].legend()
    for ax in axes:
        ax.set_xlabel("timestep t")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_histograms(stats: NoiseStats, path: Path, panels: int = 4) -> None:
    """Residual histograms at a few steps, each against the Gaussian of the same mean and std."""
    plt = _plt()
    ts = [t for t in stats.timesteps() if stats.residual_samples.get(t)]
    if not ts:
        return
    pick = [ts[round(i * (len(ts) - 1) / max(panels - 1, 1))] for i in range(min(panels, len(ts)))]
    fig, axes = plt.subplots(1, len(pick), figsize=(4 * len(pick), 3.5))
    axes = np.atleast_1d(axes)
    for ax, t in zip(axes, pick, strict=True):
        r = np.asarray(stats.residual_samples[t])
        mean, std = float(r.mean()), float(r.std()) or 1e-12
        ax.hist(r, bins=60, density=True, alpha=0.6)
        grid = np.linspace(r.min(), r.max(), 200)
        ax.plot(grid, np.exp(-0.5 * ((grid - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi)))
        ax.set_title(f"t={t}  p={stats.steps[t].normality_p:.2g}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def render_markdown(stats: NoiseStats, correction: dict[str, Any] | None = None) -> str:
    s = stats.settings
    lines = [
        "# Quantization-noise analysis (PTQD)",
        "",
        f"Sampler {s['sampler']}, {s['steps']} steps, eta {s['eta']}, guidance {s['guidance']}, "
        f"{s['num']} trajectories (seed {s['seed']}). Single-step errors of the quantized denoiser on the FP "
        "trajectory: Δ = ε_q − ε_fp = k·ε_fp + μ_c + residual.",
        "",
        "![curves](noise_curves.png)",
        "",
        "![residual histograms](noise_histograms.png)",
        "",
        "| t | k_t | σ_q | SNR_Q | SNR_F | normality p | mean |μ_c| |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in stats.timesteps():
        st = stats.steps[t]
        mu = float(np.mean(np.abs(st.mu)))
        lines.append(
            f"| {t} | {st.k:.4f} | {st.sigma_q:.4f} | {st.snr_q:.1f} | {st.snr_f:.3g} | "
            f"{st.normality_p:.2g} | {mu:.4f} |"
        )
    if correction:
        lines += [
            "",
            "## Variance-schedule calibration",
            "",
            f"Steps whose quantization noise exceeds the sampler's own noise (not fully absorbed): "
            f"{correction['steps_unabsorbed']} of {len(correction['steps'])}.",
            "",
            "| t | c_t | σ_t | σ′_t | unabsorbed variance |",
            "|---|---|---|---|---|",
        ]
        for r in correction["steps"]:
            if "c" in r:
                lines.append(
                    f"| {r['timestep']} | {r['c']:.4f} | {r['sigma']:.4f} | {r['sigma_new']:.4f} | "
                    f"{r['unabsorbed_var']:.3g} |"
                )
    return "\n".join(lines) + "\n"


def write_report(stats: NoiseStats, folder: Path, correction: dict[str, Any] | None = None) -> Path:
    plot_curves(stats, folder / "noise_curves.png")
    plot_histograms(stats, folder / "noise_histograms.png")
    path = folder / "noise_report.md"
    path.write_text(render_markdown(stats, correction))
    return path


def write_analysis(folder: Path, stats: NoiseStats, correction: dict[str, Any]) -> Path:
    """What ``qdiffuse analyze`` writes (for a model or a pipeline): the statistics, the variance bookkeeping and
    the report with its plots; returns the report's path."""
    import json

    (folder / "noise_stats.json").write_text(json.dumps(stats.to_dict(), indent=2))
    (folder / "variance_calibration.json").write_text(json.dumps(correction, indent=2))
    return write_report(stats, folder, correction)


__all__ = ["write_analysis", "write_report", "render_markdown", "plot_curves", "plot_histograms"]
