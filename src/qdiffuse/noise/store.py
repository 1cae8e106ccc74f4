"""Noise statistics inside a quantized folder: one file per sampling setting under ``noise/``.

Statistics are keyed by timestep within a setting (sampler, steps, eta, guidance). Sampling with the same setting
reuses them exactly; another setting with the same guidance reuses them interpolated over timesteps, and says so.
"""

from __future__ import annotations

import json
from pathlib import Path

from qdiffuse.fsutil import atomic_file
from qdiffuse.noise.stats import NoiseStats
from qdiffuse.sampling.loop import SampleRequest

NOISE_DIR = "noise"


def stats_key(sampler: str, steps: int, eta: float, guidance: float) -> str:
    return f"{sampler}-{steps}-eta{eta:g}-g{guidance:g}"


def request_key(request: SampleRequest) -> str:
    return stats_key(request.sampler, request.steps, request.eta, request.guidance)


def stats_json(stats: NoiseStats) -> str:
    return json.dumps(stats.to_dict(), indent=2)


def stats_relpath(stats: NoiseStats) -> str:
    s = stats.settings
    return f"{NOISE_DIR}/{stats_key(s['sampler'], s['steps'], s['eta'], s['guidance'])}.json"


def save_stats(folder: Path, stats: NoiseStats) -> Path:
    """Store ``stats`` in the quantized ``folder`` (atomically) and record the file's hash in its
    ``integrity.json``, so the folder still verifies after statistics are added."""
    from qdiffuse.integrity import record_files

    rel = stats_relpath(stats)
    path = Path(folder) / rel
    path.parent.mkdir(exist_ok=True)
    with atomic_file(path, overwrite=True) as tmp:
        tmp.write_text(stats_json(stats))
    record_files(Path(folder), [rel])
    return path


def find_stats(folder: Path, request: SampleRequest) -> tuple[NoiseStats | None, str]:
    """Stats for ``request``: ``("exact")``, or from another setting with the same guidance (``"interpolated"``)."""
    noise = Path(folder) / NOISE_DIR
    exact = noise / f"{request_key(request)}.json"
    if exact.is_file():
        return NoiseStats.load(exact), "exact"
    candidates = sorted(noise.glob("*.json")) if noise.is_dir() else []
    same_guidance = []
    for path in candidates:
        stats = NoiseStats.load(path)
        if float(stats.settings.get("guidance", 1.0)) == float(request.guidance):
            same_guidance.append(stats)
    if not same_guidance:
        return None, "missing"
    same_guidance.sort(key=lambda s: (s.settings["sampler"] != request.sampler, -int(s.settings["steps"])))
    return same_guidance[0], "interpolated"


__all__ = ["save_stats", "find_stats", "stats_key", "request_key", "stats_relpath", "stats_json", "NOISE_DIR"]
