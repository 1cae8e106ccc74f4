"""The benchmark harness: a grid of model × scheme × method × sampler setting, resumable cell by cell.

A config (JSON) names the grid; every cell's result is written to ``OUT/cells/<key>.json`` as soon as it is
done, so a rerun skips finished cells and an interrupted run loses at most one. Quantized models are saved once
per (model, scheme, method) under ``OUT/models`` and reused by every sampler setting. Each quantized cell is
compared with the FP cell of the same model and sampler setting, drawn from the same seeds.

Several processes given the same config and ``OUT`` split the grid between them: each claims a cell (and a
quantized model) with an exclusive lock before computing it, skips what another process holds, and at the end
waits for those. The locks are the kernel's (``flock``), so a worker that is killed releases its claims and
another one takes them over.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qdiffuse.config import NOISE_CORRECTING_METHODS, QuantConfig
from qdiffuse.errors import ConfigError, OutputError
from qdiffuse.fsutil import atomic_file, folder_size
from qdiffuse.progress import progress_bar
from qdiffuse.sampling.loop import SampleRequest, sample, to_uint8

try:
    import fcntl
except ImportError:  # not on Windows: one worker per folder there
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)


@contextmanager
def claim(lock_path: Path, wait: bool = True) -> Iterator[bool]:
    """Hold an exclusive lock on ``lock_path`` for the block and yield True; yield False at once when another
    process holds it and ``wait`` is False.

    The holder must check, once it has the lock, whether the work is already done: a waiting worker gets the
    lock after the one that did it. The lock file is left in place; it is empty and costs nothing.
    """
    if fcntl is None:
        yield True
        return
    fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing releases the lock


@dataclass(frozen=True)
class SamplerSetting:
    sampler: str
    steps: int
    eta: float = 0.0

    def __post_init__(self) -> None:
        from qdiffuse.sampling.schedulers import SAMPLERS

        if self.sampler not in SAMPLERS:
            raise ConfigError(f"bench sampler {self.sampler!r} unknown; use one of {', '.join(SAMPLERS)}")

    @property
    def key(self) -> str:
        return f"{self.sampler}{self.steps}-eta{self.eta:g}"


SCHEME_OPTIONS = ("lzs_group", "lzs_rounding", "quartz_fit_lzs")
"""Keys of a setting's ``config`` that :meth:`QuantConfig.from_scheme` takes to vary the scheme's formats."""


def _unknown_config_fields(overrides: dict[str, Any]) -> list[str]:
    """Keys that are not QuantConfig fields or scheme options a bench config may set (scheme and method have their
    own keys)."""
    known = {f.name for f in fields(QuantConfig)} | set(SCHEME_OPTIONS)
    return sorted(set(overrides) - known | ({"scheme", "method"} & set(overrides)))


@dataclass(frozen=True)
class QuantSetting:
    scheme: str
    method: str
    ptqd: dict[str, bool] = field(default_factory=dict)
    label: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    """QuantConfig fields for this setting only (e.g. ``recon_iters``), over the grid's ``calib``."""
    snr_margin: float = 1.0
    """Mixed precision: a step takes the low bit-width where SNR_Q >= snr_margin * SNR_F."""
    correct_noise: bool = False
    """Apply PTQD's corrections at sampling time to a method that does not measure them itself (statistics are
    measured on demand and stored in the shared model folder): e.g. a ``qdiffusion`` model, without repeating its
    reconstruction, is the ``qdiffusion+ptqd`` model."""
    model: str = ""
    """The label of another setting of the grid whose quantized folder this one samples: its calibration settings
    are taken over, so only sampling-time options (``correct_noise``, ``ptqd``) differ, e.g. ``mota+ptqd`` on the
    ``mota`` calibration instead of a second one."""

    def __post_init__(self) -> None:
        if (self.config or self.snr_margin != 1.0) and not self.label:
            raise ConfigError(
                f"bench quant setting {self.scheme}-{self.method} with 'config' or 'snr_margin' needs a 'label'"
            )
        unknown = _unknown_config_fields(self.config)
        if unknown:
            raise ConfigError(
                f"bench quant setting {self.key}: unknown config fields {unknown}; use QuantConfig fields "
                "such as recon_iters"
            )

    @property
    def key(self) -> str:
        return self.label or f"{self.scheme}-{self.method}"

    @property
    def model_key(self) -> str:
        """Settings that differ only in sampling-time options (PTQD ablations) share one quantized model."""
        if self.config or self.snr_margin != 1.0:
            return self.model or self.label
        return f"{self.scheme}-{self.method}"

    @property
    def corrects_noise(self) -> bool:
        return self.correct_noise or self.method in NOISE_CORRECTING_METHODS


MIN_BENCH_SAMPLES = 4
"""Below precision/recall's k + 1 neighbours (k = 3, :func:`qdiffuse.eval.evaluate.evaluate_samples`) no metric
can be computed; FID itself needs thousands to mean much."""

CONFIG_KEYS = frozenset(
    {"name", "models", "samplers", "quant", "num", "seed", "guidance", "batch_size", "calib", "analysis_num", "runtime"}
)


@dataclass
class BenchConfig:
    name: str
    models: list[str]
    samplers: list[SamplerSetting]
    quant: list[QuantSetting]
    num: int = 1000
    seed: int = 0
    guidance: float = 2.0
    batch_size: int = 100
    calib: dict[str, Any] = field(default_factory=dict)
    """QuantConfig fields for every cell: calibration counts, and policy fields such as ``fp_inputs``."""
    analysis_num: int = 64
    runtime: str = "real"
    """How quantized cells execute: ``real`` kernels (fallbacks reported per cell) or ``simulated``."""

    def __post_init__(self) -> None:
        from qdiffuse.kernels import check_runtime

        check_runtime(self.runtime)
        if self.num < MIN_BENCH_SAMPLES:
            raise ConfigError(
                f"bench config {self.name}: num {self.num} is too few samples for FID and precision/recall; use at "
                f"least {MIN_BENCH_SAMPLES} (the field reports 10k-50k)"
            )
        # every count and setting a cell will use, checked now rather than after the first cell's sampling
        SampleRequest(num=self.num, seed=self.seed, guidance=self.guidance, batch_size=self.batch_size)
        SampleRequest(num=self.analysis_num, seed=self.seed, guidance=self.guidance, batch_size=self.batch_size)
        for s in self.samplers:
            SampleRequest(num=self.num, steps=s.steps, sampler=s.sampler, eta=s.eta)
        unknown = _unknown_config_fields(self.calib)
        if unknown:
            raise ConfigError(
                f"bench config {self.name}: unknown 'calib' fields {unknown}; use QuantConfig fields such "
                "as calib_steps"
            )
        self.quant = [self._shared(quant) for quant in self.quant]
        for quant in self.quant:  # every cell's quantization settings, before the first cell runs
            self.quant_config(quant)

    def _shared(self, quant: QuantSetting) -> QuantSetting:
        """``quant`` with the calibration settings of the setting it names in ``model`` (checked to agree)."""
        if not quant.model:
            return quant
        owner = next((q for q in self.quant if q.label == quant.model and not q.model), None)
        if owner is None:
            raise ConfigError(
                f"bench config {self.name}: setting {quant.key} samples model '{quant.model}', which is not the "
                "label of another setting without 'model'; name a labelled setting of this grid"
            )
        if (quant.scheme, quant.method) != (owner.scheme, owner.method) or (
            (quant.config or quant.snr_margin != 1.0)
            and (quant.config, quant.snr_margin) != (owner.config, owner.snr_margin)
        ):
            raise ConfigError(
                f"bench config {self.name}: setting {quant.key} differs from '{owner.key}' in scheme, method or "
                "config; a setting that reuses a model may change only sampling-time options (correct_noise, ptqd)"
            )
        return replace(quant, config=owner.config, snr_margin=owner.snr_margin)

    def quant_config(self, quant: QuantSetting) -> QuantConfig:
        """A cell's own settings override the grid's calibration settings, its seed among them, so repeats of
        one recipe under other calibration seeds are cells of one grid."""
        return QuantConfig.from_scheme(
            quant.scheme, method=quant.method, **{"seed": self.seed, **self.calib, **quant.config}
        )

    @classmethod
    def load(cls, path: Path) -> BenchConfig:
        try:
            data = json.loads(Path(path).read_text())
            if not isinstance(data, dict):
                raise TypeError("the file must hold a JSON object")
            unknown = sorted(set(data) - CONFIG_KEYS)
            if unknown:
                raise ConfigError(f"bench config {path}: unknown keys {unknown}; use {', '.join(sorted(CONFIG_KEYS))}")
            return cls(
                name=data["name"],
                models=list(data["models"]),
                samplers=[SamplerSetting(**s) for s in data["samplers"]],
                quant=[QuantSetting(**q) for q in data["quant"]],
                num=int(data.get("num", 1000)),
                seed=int(data.get("seed", 0)),
                guidance=float(data.get("guidance", 2.0)),
                batch_size=int(data.get("batch_size", 100)),
                calib=dict(data.get("calib", {})),
                analysis_num=int(data.get("analysis_num", 64)),
                runtime=str(data.get("runtime", "real")),
            )
        except FileNotFoundError:
            raise ConfigError(f"bench config {path} does not exist") from None
        except OSError as exc:
            raise ConfigError(f"bench config {path} cannot be read ({exc.strerror or exc}); pass a JSON file") from None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"bench config {path} is malformed ({exc}); see benchmarks/*.json") from None


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


class Bench:
    """Runs the cells of a :class:`BenchConfig` into ``out``."""

    def __init__(self, config: BenchConfig, out: Path, device: str = "cpu") -> None:
        self.config = config
        self.out = Path(out)
        self.device = device
        if self.out.exists() and not self.out.is_dir():
            raise OutputError(f"bench output {self.out} is a file; pass a folder to --out")
        try:
            for sub in ("cells", "models", "samples"):
                (self.out / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(
                f"cannot create the bench folder {self.out} ({exc.strerror}); choose another --out"
            ) from None
        if not os.access(self.out / "cells", os.W_OK):
            raise OutputError(f"bench folder {self.out} is not writable; choose another --out")

    def _cell_path(self, model: str, setting: SamplerSetting, quant: QuantSetting | None) -> Path:
        q = quant.key if quant else "fp"
        return self.out / "cells" / f"{Path(model).name}__{setting.key}__{q}.json"

    def _request(self, setting: SamplerSetting) -> SampleRequest:
        return SampleRequest(
            num=self.config.num,
            steps=setting.steps,
            sampler=setting.sampler,
            eta=setting.eta,
            seed=self.config.seed,
            guidance=self.config.guidance,
            batch_size=self.config.batch_size,
        )

    def _quantized_folder(self, model: str, quant: QuantSetting) -> tuple[Path, dict[str, Any]]:
        """The quantized folder of ``quant`` (made once) and its calibration cost: seconds and peak memory."""
        folder = self.out / "models" / f"{Path(model).name}__{quant.model_key}"
        timing = folder.with_suffix(".time.json")
        with claim(folder.with_name(f".{folder.name}.lock")):
            if folder.is_dir() and timing.is_file():
                return folder, json.loads(timing.read_text())
            return folder, self._quantize(model, quant, folder, timing)

    def _quantize(self, model: str, quant: QuantSetting, folder: Path, timing: Path) -> dict[str, Any]:
        from qdiffuse.memory import PeakMemory
        from qdiffuse.pipeline import quantize_folder

        config = self.config.quant_config(quant)
        analysis = SampleRequest(
            num=self.config.analysis_num,
            steps=config.calib_num_inference_steps,
            sampler=config.calib_sampler,
            seed=self.config.seed + 7919,
            guidance=self.config.guidance,
            batch_size=self.config.batch_size,
        )
        start = time.perf_counter()
        with PeakMemory(self.device) as peak:
            quantize_folder(
                model,
                folder,
                config,
                guidance=self.config.guidance,
                batch_size=self.config.batch_size,
                device=self.device,
                overwrite=True,
                analysis=analysis,
                snr_margin=quant.snr_margin,
            )
        cost = {"seconds": time.perf_counter() - start, "peak_mib": peak.mib}
        with atomic_file(timing, overwrite=True) as tmp:
            tmp.write_text(json.dumps(cost))
        return cost

    def _ensure_exact_stats(self, folder: Path, request: SampleRequest) -> float | None:
        """Measure PTQD statistics for exactly this sampler setting if the folder lacks them (seconds taken)."""
        from dataclasses import replace

        from qdiffuse.noise.pipeline import analyze_quantized
        from qdiffuse.noise.store import find_stats, save_stats

        with claim(folder.with_name(f".{folder.name}.stats.lock")):
            if find_stats(folder, request)[1] == "exact":
                return None
            start = time.perf_counter()
            analysis = replace(request, num=self.config.analysis_num, seed=self.config.seed + 7919)
            save_stats(folder, analyze_quantized(folder, analysis, device=self.device))
            return time.perf_counter() - start

    def _samples(self, model: str, setting: SamplerSetting, quant: QuantSetting | None) -> tuple[Any, ...]:
        from qdiffuse.kernels import runtime_report
        from qdiffuse.noise.correction import PTQDOptions
        from qdiffuse.pipeline import load_any, sampling_hooks

        request = self._request(setting)
        extra: dict[str, Any] = {}
        if quant is None:
            source: str | Path = model
            loaded = load_any(model, self.device)
            hooks: dict[str, Any] = {}
            extra["size_bytes"] = sum(p.numel() * 4 for p in loaded.denoiser.model.state_dict().values())
        else:
            source, calib_cost = self._quantized_folder(model, quant)
            loaded = load_any(source, self.device, self.config.runtime)
            extra["runtime"] = runtime_report(loaded.denoiser.model).summary()
            ptqd = quant.corrects_noise
            options = PTQDOptions(**quant.ptqd) if ptqd else None
            if ptqd:
                extra["analysis_seconds"] = self._ensure_exact_stats(Path(source), request)
            hooks = sampling_hooks(source, loaded, request, ptqd=ptqd, options=options, device=self.device)
            extra["size_bytes"] = folder_size(source)
            extra["calibration_seconds"] = calib_cost["seconds"]
            extra["calibration_peak_mib"] = calib_cost.get("peak_mib")
            cost = Path(source) / "cost.json"
            if cost.is_file():
                c = json.loads(cost.read_text())
                extra["bops_reduction"] = c["bops_reduction"]
        start = time.perf_counter()
        images, labels = sample(
            loaded.denoiser,
            loaded.scheduler_config,
            request,
            description=f"{model} {setting.key} {quant.key if quant else 'fp'}",
            **hooks,
        )
        extra["sample_seconds"] = time.perf_counter() - start
        return to_uint8(images).numpy(), None if labels is None else labels.numpy(), extra

    def run_cell(self, model: str, setting: SamplerSetting, quant: QuantSetting | None) -> dict[str, Any]:
        """The row of one cell: read if finished, otherwise computed here (after waiting for another worker that
        holds it, which usually finishes it)."""
        row = self._try_cell(model, setting, quant, wait=True)
        assert row is not None  # a waiting claim always succeeds
        return row

    def _try_cell(
        self, model: str, setting: SamplerSetting, quant: QuantSetting | None, wait: bool
    ) -> dict[str, Any] | None:
        """Like :meth:`run_cell`, but None (at once) when another worker holds the cell and ``wait`` is False."""
        path = self._cell_path(model, setting, quant)
        if path.is_file():
            return json.loads(path.read_text())
        with claim(path.with_name(f".{path.stem}.lock"), wait=wait) as held:
            if not held:
                return None
            if path.is_file():
                return json.loads(path.read_text())
            return self._compute_cell(model, setting, quant, path)

    def _compute_cell(
        self, model: str, setting: SamplerSetting, quant: QuantSetting | None, path: Path
    ) -> dict[str, Any]:
        from qdiffuse.eval.evaluate import compare_to_fp, evaluate_samples

        images, labels, extra = self._samples(model, setting, quant)
        npz = self.out / "samples" / path.with_suffix(".npz").name
        np.savez(npz, arr_0=images, **({"labels": labels} if labels is not None else {}))
        metrics = evaluate_samples(images, "fmnist", labels=labels, device=self.device)
        row: dict[str, Any] = {
            "model": model,
            "sampler": setting.sampler,
            "steps": setting.steps,
            "eta": setting.eta,
            "quant": quant.key if quant else "FP",
            "num": self.config.num,
            "guidance": self.config.guidance,
            "fid": metrics["fid"],
            "kid": metrics.get("kid_mean"),
            "precision": metrics.get("precision"),
            "recall": metrics.get("recall"),
            "label_accuracy": metrics.get("label_accuracy"),
            **extra,
        }
        if quant is not None:
            self.run_cell(model, setting, None)  # the FP samples: made first, or by another worker
            fp_npz = self.out / "samples" / self._cell_path(model, setting, None).with_suffix(".npz").name
            fp_images = np.load(fp_npz)["arr_0"]
            fidelity = compare_to_fp(fp_images, images, device=self.device)
            row.update(
                fid_to_fp=fidelity.get("fid_to_fp"),
                psnr_to_fp=fidelity["psnr"]["mean"],
                ssim_to_fp=fidelity["ssim"]["mean"],
            )
        with atomic_file(path, overwrite=True) as tmp:
            tmp.write_text(json.dumps(row, indent=2, default=float))
        return row

    def run(self, write: bool = True) -> list[dict[str, Any]]:
        """Every cell's row, computing the missing ones; ``write=False`` leaves results.json/.md to another
        worker (the ranks of a torchrun launch other than 0)."""
        cells = [
            (m, s, q) for m in self.config.models for s in self.config.samplers for q in [None, *self.config.quant]
        ]
        rows: dict[int, dict[str, Any]] = {}
        with progress_bar("benchmark cells", len(cells)) as bar:
            held_elsewhere = []
            for i, (m, s, q) in enumerate(cells):
                row = self._try_cell(m, s, q, wait=False)
                if row is None:
                    logger.info("cell %s is being run by another worker", self._cell_path(m, s, q).stem)
                    held_elsewhere.append(i)
                    continue
                rows[i] = row
                bar.advance()
            for i in held_elsewhere:
                rows[i] = self.run_cell(*cells[i])
                bar.advance()
        ordered = [rows[i] for i in range(len(cells))]
        if not write:
            return ordered
        meta = {"config": self.config.name, "machine": machine(), "date": date.today().isoformat()}
        with atomic_file(self.out / "results.json", overwrite=True) as tmp:
            tmp.write_text(json.dumps({"meta": meta, "rows": ordered}, indent=2, default=float))
        with atomic_file(self.out / "results.md", overwrite=True) as tmp:
            tmp.write_text(render_table(ordered, meta))
        return ordered


def _f(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def render_table(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"Config `{meta['config']}` on {meta['machine']}, {meta['date']}.",
        "",
        "| model | sampler | steps | eta | quant | N | FID | KID | label acc. | FID to FP | PSNR to FP | size (KiB) "
        "| BOPs red. | calib. (s) | calib. peak (MiB) | sampling (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['sampler']} | {r['steps']} | {r['eta']:g} | {r['quant']} | {r['num']} | "
            f"{_f(r['fid'], '.2f')} | {_f(r.get('kid'), '.4f')} | {_f(r.get('label_accuracy'), '.3f')} | "
            f"{_f(r.get('fid_to_fp'), '.2f')} | {_f(r.get('psnr_to_fp'), '.1f')} | {r['size_bytes'] / 1024:.0f} | "
            f"{_f(r.get('bops_reduction'), '.1f')} | {_f(r.get('calibration_seconds'), '.0f')} | "
            f"{_f(r.get('calibration_peak_mib'), '.0f')} | {_f(r.get('sample_seconds'), '.0f')} |"
        )
    return "\n".join(lines) + "\n"


__all__ = ["Bench", "BenchConfig", "SamplerSetting", "QuantSetting", "render_table"]
