"""``qdiffuse speed``: denoiser latency and weight memory of FP32, BF16 and real quantized runtimes, side by side.

Why one process and these rules: a CPU's speed drifts (frequency, a neighbour's load, the page cache), so every
runtime of a model is timed in the same process on the same inputs, FP32 both first and last (ratios use the mean
of the two, and both are printed so drift is visible), each number a median of several calls after warm-up calls
that take the one-off costs (oneDNN primitive creation, allocator growth) out of the measurement. The thread count
is pinned because the kernels scale differently with threads, and everything runs under ``torch.inference_mode``
as a deployed sampler would, with the allocator ``qdiffuse sample`` uses (:mod:`qdiffuse.allocator`: freed
activations stay in the heap instead of page-faulting on every call).

Besides the shipped built-ins, two random-weight models of real size show what the kernels do where the GEMMs are
large: Stable Diffusion 1.5's UNet and DiT-XL/2, built from their published configs with ``cls.from_config``
(latency and memory do not depend on the weights' values, so nothing is downloaded). They are only built when
asked for by name: each takes gigabytes and minutes.

Optional peer rows (torchao, optimum-quanto) run when those packages are importable; they are not dependencies.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qdiffuse.errors import ConfigError
from qdiffuse.models.denoiser import Denoiser

BUILTIN_SPEED_MODELS = ("fmnist-tiny", "fmnist-dit")
"""Built-in models timed when no model is named."""

LARGE_MODELS: dict[str, dict[str, Any]] = {
    "sd15-unet": {
        "class": "UNet2DConditionModel",
        "description": "random-weight UNet2DConditionModel, Stable Diffusion 1.5's unet config, latent 4×64×64, "
        "text condition 77×768",
        "cond_length": 77,
        "config": {
            "sample_size": 64,
            "in_channels": 4,
            "out_channels": 4,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "block_out_channels": [320, 640, 1280, 1280],
            "layers_per_block": 2,
            "cross_attention_dim": 768,
            "attention_head_dim": 8,
            "norm_num_groups": 32,
            "norm_eps": 1e-5,
            "act_fn": "silu",
            "downsample_padding": 1,
            "flip_sin_to_cos": True,
            "freq_shift": 0,
            "mid_block_scale_factor": 1,
            "center_input_sample": False,
        },
    },
    "dit-xl2": {
        "class": "DiTTransformer2DModel",
        "description": "random-weight DiTTransformer2DModel, DiT-XL/2's config, latent 4×32×32, 1000 classes",
        "cond_length": None,
        "config": {
            "num_layers": 28,
            "num_attention_heads": 16,
            "attention_head_dim": 72,
            "in_channels": 4,
            "out_channels": 8,
            "patch_size": 2,
            "sample_size": 32,
            "num_embeds_ada_norm": 1000,
            "norm_type": "ada_norm_zero",
            "activation_fn": "gelu-approximate",
            "attention_bias": True,
            "norm_elementwise_affine": False,
            "norm_num_groups": 32,
            "upcast_attention": False,
            "dropout": 0.0,
        },
    },
}
"""Random-weight models of real size, built from their published configs (no download, no weights)."""

DEFAULT_SCHEMES = ("w8a8", "w4a8", "w8a16", "w4a16")
BUILTIN_BATCHES = (1, 8, 64)
LARGE_BATCHES = (1, 2, 8)
CALIB_ROWS = 4
"""Random calibration rows: latency does not depend on the ranges found, only on the formats."""

DDPM_SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "linear", "prediction_type": "epsilon"}


def speed_models() -> list[str]:
    """Names ``qdiffuse speed`` accepts: the shipped built-ins and the random large models."""
    from qdiffuse.models.builtin import list_builtin

    return [*list_builtin(), *LARGE_MODELS]


def parse_int_list(text: str, flag: str) -> tuple[int, ...]:
    """'1,8,64' -> (1, 8, 64); every value a positive integer."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{flag} {text!r} is not a list of positive integers like '1,8,64'") from None
    if not values or any(v <= 0 for v in values):
        raise ConfigError(f"{flag} {text!r} needs positive integers like '1,8,64'")
    return values


def parse_name_list(text: str) -> tuple[str, ...]:
    """'w8a8, w4a8' -> ('w8a8', 'w4a8')."""
    return tuple(v.strip() for v in text.split(",") if v.strip())


@dataclass(frozen=True)
class SpeedSettings:
    """What to time. ``batches`` None: (1, 8, 64) for built-ins and (1, 2, 8) for the large models.
    ``simulated``: the scheme whose simulated (pre-freeze) model is also timed; "auto" is the first scheme,
    None none."""

    models: tuple[str, ...] = BUILTIN_SPEED_MODELS
    schemes: tuple[str, ...] = DEFAULT_SCHEMES
    batches: tuple[int, ...] | None = None
    repeats: int = 10
    warmup: int = 2
    threads: int = 1
    peers: bool = True
    simulated: str | None = "auto"
    compile: bool = False
    """Also time each real model under ``torch.compile`` (inductor; the warm-up calls absorb compilation)."""
    calib_rows: int = CALIB_ROWS
    seed: int = 0

    def __post_init__(self) -> None:
        """Reject every bad setting before any model is built: a large model takes minutes to get to."""
        known = speed_models()
        if not self.models:
            raise ConfigError(f"name at least one model; use one of {', '.join(known)}")
        for name in self.models:
            if name not in known:
                raise ConfigError(f"unknown model {name!r} for qdiffuse speed; use one of {', '.join(known)}")
        for scheme in self.schemes:
            quant_config(scheme)  # raises ConfigError naming the schemes
        if self.simulated not in (None, "auto") and self.simulated not in self.schemes:
            raise ConfigError(f"--simulated {self.simulated!r} is not among --schemes {','.join(self.schemes)}")
        if self.batches is not None and (not self.batches or any(int(b) <= 0 for b in self.batches)):
            raise ConfigError(f"--batch {self.batches} needs positive integers like 1,8,64")
        for what, value, low in (
            ("--repeats", self.repeats, 1), ("--warmup", self.warmup, 0), ("--threads", self.threads, 1),
            ("calib_rows", self.calib_rows, 1),
        ):
            if value < low:
                raise ConfigError(f"{what} {value} must be at least {low}")

    @property
    def simulated_scheme(self) -> str | None:
        if self.simulated == "auto":
            return self.schemes[0] if self.schemes else None
        return self.simulated

    def batches_for(self, model: str) -> tuple[int, ...]:
        if self.batches is not None:
            return tuple(self.batches)
        return LARGE_BATCHES if model in LARGE_MODELS else BUILTIN_BATCHES


@dataclass
class SpeedRow:
    """One runtime of one model at one batch size. ``median_ms`` None: the runtime did not run (see status)."""

    model: str
    runtime: str
    batch: int
    median_ms: float | None = None
    times_ms: list[float] = field(default_factory=list)
    speedup_vs_fp32: float | None = None
    speedup_vs_bf16: float | None = None
    weight_bytes: int | None = None
    weight_ratio_vs_fp32: float | None = None
    peak_rss_bytes: int | None = None
    rss_growth_bytes: int | None = None
    detail: str = ""
    status: str = "ok"
    grad_mode: str = "inference_mode"


@dataclass
class SpeedResult:
    settings: SpeedSettings
    environment: dict[str, Any]
    rows: list[SpeedRow]
    models: dict[str, dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": dataclasses.asdict(self.settings),
            "environment": self.environment,
            "models": self.models,
            "rows": [dataclasses.asdict(r) for r in self.rows],
        }

    def markdown(self) -> str:
        return format_markdown(self)


# --------------------------------------------------------------------------------------------------- subjects


@dataclass
class Subject:
    """A model to time, in FP32, with the inputs of every batch size."""

    name: str
    denoiser: Denoiser
    scheduler_config: dict[str, Any]
    description: str


def build_subject(name: str, seed: int) -> Subject:
    """A built-in loaded from its folder, or a large model built at random from its config table entry."""
    if name in LARGE_MODELS:
        import warnings

        import diffusers

        spec = LARGE_MODELS[name]
        cls = getattr(diffusers, spec["class"])
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = cls.from_config(spec["config"]).eval()
        meta = {"cond_length": spec["cond_length"]} if spec["cond_length"] else None
        return Subject(name, Denoiser.from_model(model, meta), dict(DDPM_SCHEDULER), spec["description"])
    from qdiffuse.models.loading import load_model_folder

    loaded = load_model_folder(name)
    loaded.denoiser.model.float().eval()
    return Subject(name, loaded.denoiser, loaded.scheduler_config, f"built-in {type(loaded.denoiser.model).__name__}")


Inputs = tuple[Tensor, Tensor, Tensor | None, Tensor | None]


def make_inputs(denoiser: Denoiser, batch: int, generator: torch.Generator) -> Inputs:
    """Random x_t, timesteps, class labels (class-conditional models) and text condition (text-conditional)."""
    x = torch.randn(batch, *denoiser.sample_shape, generator=generator)
    t = torch.randint(0, 1000, (batch,), generator=generator)
    labels = None
    if denoiser.num_classes:
        labels = torch.randint(0, denoiser.num_classes, (batch,), generator=generator)
    cond = None
    if denoiser.kind == "unet_cond":
        cond = torch.randn(batch, denoiser.cond_length, denoiser.cross_attention_dim, generator=generator)
    return x, t, labels, cond


def cast_inputs(inputs: Inputs, dtype: torch.dtype) -> Inputs:
    """Float inputs in ``dtype``; timesteps and labels stay integers."""
    x, t, labels, cond = inputs
    return x.to(dtype), t, labels, None if cond is None else cond.to(dtype)


def tensor_bytes(t: Tensor) -> int:
    """Bytes a tensor holds, looking inside tensor subclasses (torchao, quanto) whose ``element_size`` is that of
    the dtype they pretend to be."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names if getattr(t, n) is not None)
    return t.numel() * t.element_size()


def module_bytes(model: nn.Module) -> int:
    """Parameters plus buffers, each tensor once."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in seen or tensor.device.type == "meta":
            continue
        seen.add(id(tensor))
        total += tensor_bytes(tensor)
    return total


# ----------------------------------------------------------------------------------------------------- timing


class GradModeError(RuntimeError):
    """The runtime cannot run under ``torch.inference_mode``."""


def time_forward(
    call: Callable[[], object], warmup: int, repeats: int, allow_no_grad: bool = False
) -> tuple[list[float], int | None, int | None, str]:
    """Per-call milliseconds of ``repeats`` calls after ``warmup`` calls, the sampled peak RSS and its growth over
    the RSS before the first call, and the grad mode used.

    ``allow_no_grad``: a peer library that fails under inference mode (optimum-quanto's 4-bit weights set a
    version counter) is timed under ``torch.no_grad`` instead, and the row says so.
    """
    from qdiffuse.memory import PeakMemory, resident_bytes

    modes: list[tuple[str, Callable[[], Any]]] = [("inference_mode", torch.inference_mode)]
    if allow_no_grad:
        modes.append(("no_grad", torch.no_grad))
    for k, (mode, context) in enumerate(modes):
        before = resident_bytes()
        try:
            with context(), PeakMemory("cpu", interval=0.02) as peak:
                for _ in range(warmup):
                    call()
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    call()
                    times.append((time.perf_counter() - start) * 1000.0)
        except RuntimeError as exc:
            if k + 1 < len(modes) and "inference" in str(exc):
                continue
            raise
        growth = None if peak.bytes is None or before is None else max(peak.bytes - before, 0)
        return times, peak.bytes, growth, mode
    raise GradModeError("no grad mode worked")  # pragma: no cover - the loop returns or raises


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise), so the RSS of the
    next row starts from what is really alive rather than from every earlier row's high-water mark."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _forward(denoiser: Denoiser, inputs: Inputs) -> Callable[[], object]:
    x, t, labels, cond = inputs

    def call() -> object:
        return denoiser.forward_raw(x, t, labels, cond)

    return call


# ------------------------------------------------------------------------------------------------------ peers


def _peer_specs() -> list[tuple[str, Callable[[nn.Module, Denoiser, Any], None]]]:
    """(row name, quantize-in-place) for each peer; the import happens in the quantize step."""

    def torchao(config_name: str) -> Callable[[nn.Module, Denoiser, Any], None]:
        def apply(model: nn.Module, denoiser: Denoiser, calib: Any) -> None:
            import torchao.quantization as tq

            tq.quantize_(model, getattr(tq, config_name)())

        return apply

    def quanto(weights: str, activations: str | None) -> Callable[[nn.Module, Denoiser, Any], None]:
        def apply(model: nn.Module, denoiser: Denoiser, calib: Any) -> None:
            import optimum.quanto as oq

            act = None if activations is None else getattr(oq, activations)
            oq.quantize(model, weights=getattr(oq, weights), activations=act)
            if activations is not None:
                with torch.no_grad(), oq.Calibration():
                    denoiser.forward_raw(calib.x, calib.t, calib.labels, calib.cond)
            oq.freeze(model)

        return apply

    return [
        ("torchao int8-dyn-act-int8-weight", torchao("Int8DynamicActivationInt8WeightConfig")),
        ("torchao int8-weight-only", torchao("Int8WeightOnlyConfig")),
        ("quanto w8a8", quanto("qint8", "qint8")),
        ("quanto w4a16", quanto("qint4", None)),
    ]


def peer_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for package in ("torchao", "optimum-quanto"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


def _peer_installed(name: str) -> bool:
    """Whether the peer's distribution is installed (its metadata, not an importable folder: an uninstalled
    optimum-quanto leaves its JIT-built extension folder behind, which still imports as a namespace package)."""
    return peer_versions()["torchao" if name.startswith("torchao") else "optimum-quanto"] is not None


# -------------------------------------------------------------------------------------------------------- run


def environment(threads: int) -> dict[str, Any]:
    """What the numbers were measured on."""
    import platform

    from qdiffuse.kernels import available

    cpu = platform.processor() or platform.machine()
    flags: list[str] = []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    flags = [x for x in ("avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16") if x in have]
                    break
    except OSError:
        pass
    return {
        "torch": torch.__version__,
        "cpu": cpu,
        "cpu_flags": flags,
        "threads": threads,
        "kernels": available(),
        "peers": peer_versions(),
    }


def run_speed(settings: SpeedSettings, log: Callable[[str], None] | None = None) -> SpeedResult:
    """Time every runtime of every model in ``settings``; ``log`` gets one line per finished measurement."""
    from qdiffuse.allocator import keep_freed_memory

    say = log or (lambda _line: None)
    # Same allocator as ``qdiffuse sample``: without it, per-call activations page-fault on every call.
    allocator = "glibc, freed blocks kept" if keep_freed_memory() else "default"
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    rows: list[SpeedRow] = []
    models: dict[str, dict[str, Any]] = {}
    try:
        for name in settings.models:
            subject = build_subject(name, settings.seed)
            n_params = sum(p.numel() for p in subject.denoiser.model.parameters())
            models[name] = {
                "class": type(subject.denoiser.model).__name__,
                "parameters": n_params,
                "description": subject.description,
                "sample_shape": list(subject.denoiser.sample_shape),
            }
            say(f"{name}: {models[name]['class']}, {n_params / 1e6:.1f}M parameters")
            rows += _time_model(subject, settings, say)
            del subject
            release_memory()
    finally:
        torch.set_num_threads(previous_threads)
    return SpeedResult(settings, {**environment(settings.threads), "allocator": allocator}, rows, models)


def _time_model(subject: Subject, settings: SpeedSettings, say: Callable[[str], None]) -> list[SpeedRow]:
    from qdiffuse.calibration.collect import CalibrationSet

    generator = torch.Generator().manual_seed(settings.seed)
    denoiser = subject.denoiser
    inputs = {b: make_inputs(denoiser, b, generator) for b in settings.batches_for(subject.name)}
    calib = CalibrationSet(*make_inputs(denoiser, settings.calib_rows, generator))
    rows: list[SpeedRow] = []

    def measure(runtime: str, den: Denoiser, dtype: torch.dtype, weight_bytes: int, detail: str,
                allow_no_grad: bool = False) -> None:
        release_memory()  # calibration's and freezing's garbage out of the row's RSS
        for batch, batch_inputs in inputs.items():
            call = _forward(den, cast_inputs(batch_inputs, dtype))
            times, peak, growth, mode = time_forward(call, settings.warmup, settings.repeats, allow_no_grad)
            row = SpeedRow(
                subject.name, runtime, batch, statistics.median(times), [round(v, 3) for v in times],
                weight_bytes=weight_bytes, peak_rss_bytes=peak, rss_growth_bytes=growth, detail=detail,
                grad_mode=mode,
            )
            if mode != "inference_mode":
                row.detail = (detail + "; " if detail else "") + f"timed under torch.{mode}: fails under inference_mode"
            rows.append(row)
            say(f"  {subject.name} {runtime} batch {batch}: {row.median_ms:.2f} ms")

    fp32_bytes = module_bytes(denoiser.model)
    measure("fp32 (start)", denoiser, torch.float32, fp32_bytes, "")

    bf16 = dataclasses.replace(denoiser, model=_to_bf16(copy.deepcopy(denoiser.model)))
    measure("bf16", bf16, torch.bfloat16, module_bytes(bf16.model), "")
    del bf16
    release_memory()

    for scheme in settings.schemes:
        _time_scheme(subject, scheme, calib, settings, measure)
        release_memory()

    if settings.peers:
        for peer, apply in _peer_specs():
            if not _peer_installed(peer):
                rows += [SpeedRow(subject.name, peer, b, status="not installed") for b in inputs]
                say(f"  {subject.name} {peer}: not installed")
                continue
            model = copy.deepcopy(denoiser.model)
            den = dataclasses.replace(denoiser, model=model)
            try:
                apply(model, den, calib)
                measure(peer, den, torch.float32, module_bytes(model), "", allow_no_grad=True)
            except Exception as exc:  # a peer's failure is its row's result, not ours
                message = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
                rows += [SpeedRow(subject.name, peer, b, status=f"error: {message}") for b in inputs
                         if not any(r.runtime == peer and r.batch == b for r in rows)]
                say(f"  {subject.name} {peer}: {message}")
            del model, den
            release_memory()

    measure("fp32 (end)", denoiser, torch.float32, fp32_bytes, "")
    _fill_ratios(rows, fp32_bytes)
    return rows


FP_ATTENTION = ":fp-attention"
"""Scheme suffix: quantize every Linear/Conv2d but leave the two attention matmuls in FP (fused SDPA)."""


def quant_config(scheme: str) -> Any:
    """The minmax config a speed row times; ``w8a8:fp-attention`` keeps the attention matmuls in FP."""
    from qdiffuse.config import QuantConfig

    name, fp_attention = (scheme[: -len(FP_ATTENTION)], True) if scheme.endswith(FP_ATTENTION) else (scheme, False)
    return QuantConfig.from_scheme(name, method="minmax", quantize_attention=not fp_attention)


def _to_bf16(model: nn.Module) -> nn.Module:
    """The whole model in bfloat16, as the BF16 row means it (diffusers' advice to keep some modules in float32
    applies to ``from_pretrained`` and is silenced here)."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        return model.to(torch.bfloat16)
    finally:
        diffusers_logging.set_verbosity(level)


def _time_scheme(
    subject: Subject, scheme: str, calib: Any, settings: SpeedSettings, measure: Callable[..., None]
) -> None:
    """Quantize a copy (minmax on the random calibration rows), time it simulated if asked, freeze, time it real."""
    from qdiffuse.api import quantize
    from qdiffuse.kernels import freeze, model_bytes, runtime_report

    den = dataclasses.replace(subject.denoiser, model=copy.deepcopy(subject.denoiser.model))
    config = quant_config(scheme)
    # Simulated first (the path calibration runs on), frozen here, so both are timed from one calibration.
    quantize(den, subject.scheduler_config, config, calib=calib, batch_size=len(calib), runtime="simulated")
    if scheme == settings.simulated_scheme:
        measure(f"{scheme} simulated", den, torch.float32, model_bytes(den.model)["total"],
                runtime_report(den.model).summary())
    report = freeze(den.model)
    measure(scheme, den, torch.float32, model_bytes(den.model)["total"], report.summary())
    if settings.compile:
        compiled = dataclasses.replace(den, model=torch.compile(den.model))
        measure(f"{scheme} compiled", compiled, torch.float32, model_bytes(den.model)["total"],
                "torch.compile (inductor); the blocked attention stays eager")
        del compiled
    del den


def _fill_ratios(rows: list[SpeedRow], fp32_bytes: int) -> None:
    """Speed-ups against the mean of the two FP32 medians and against BF16, per batch; bytes against FP32."""
    by = {(r.runtime, r.batch): r.median_ms for r in rows}
    for row in rows:
        if row.weight_bytes is not None:
            row.weight_ratio_vs_fp32 = row.weight_bytes / fp32_bytes
        if row.median_ms is None:
            continue
        start, end = by.get(("fp32 (start)", row.batch)), by.get(("fp32 (end)", row.batch))
        if start is not None and end is not None:
            row.speedup_vs_fp32 = (start + end) / 2 / row.median_ms
        bf16 = by.get(("bf16", row.batch))
        if bf16 is not None:
            row.speedup_vs_bf16 = bf16 / row.median_ms


# ----------------------------------------------------------------------------------------------------- output


def _num(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def format_markdown(result: SpeedResult) -> str:
    """One table of every row, FP32 drift per model and batch, and the setup it was measured on."""
    s, env = result.settings, result.environment
    lines = [
        f"# qdiffuse speed: denoiser forward, {env['threads']} thread(s), median of {s.repeats} after "
        f"{s.warmup} warm-up calls, torch.inference_mode",
        "",
        f"torch {env['torch']} · {env['cpu']} ({', '.join(env['cpu_flags']) or 'no VNNI/AMX flags'}) · allocator: "
        f"{env.get('allocator', 'default')} · peers: "
        + ", ".join(f"{k} {v or 'not installed'}" for k, v in env["peers"].items()),
        "",
    ]
    for name, info in result.models.items():
        drift = []
        for row in result.rows:
            if row.model == name and row.runtime == "fp32 (start)":
                end = next((r for r in result.rows if r.model == name and r.runtime == "fp32 (end)"
                            and r.batch == row.batch), None)
                drift.append(f"batch {row.batch}: {_num(row.median_ms, '.2f')} → "
                             f"{_num(end.median_ms if end else None, '.2f')} ms")
        lines.append(f"- **{name}**: {info['description']}, {info['parameters'] / 1e6:.1f}M parameters; "
                     f"FP32 start → end: {'; '.join(drift)}")
    lines += [
        "",
        "Speed-ups are against the mean of the two FP32 medians of the same batch. Weights: parameters, buffers "
        "and packed kernels held in memory. Peak RSS: whole process, sampled every 20 ms (growth over the call's "
        "start in parentheses).",
        "",
        "| model | runtime | batch | median ms | × FP32 | × BF16 | weights MiB | weights / FP32 | peak RSS MiB "
        "| kernels |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    shown: set[tuple[str, str]] = set()
    for r in result.rows:
        key = (r.model, r.runtime)
        if r.status != "ok":
            detail = r.status
        elif key in shown:
            detail = "″" if r.detail else ""
        else:
            detail = r.detail.removeprefix("runtime: ")
        shown.add(key)
        rss = "—" if r.peak_rss_bytes is None else f"{r.peak_rss_bytes / 2**20:.0f}"
        if r.rss_growth_bytes is not None:
            rss += f" (+{r.rss_growth_bytes / 2**20:.0f})"
        weights = None if r.weight_bytes is None else r.weight_bytes / 2**20
        lines.append(
            f"| {r.model} | {r.runtime} | {r.batch} | {_num(r.median_ms, '.2f')} | {_num(r.speedup_vs_fp32, '.2f')} "
            f"| {_num(r.speedup_vs_bf16, '.2f')} | {_num(weights, '.2f')} | {_num(r.weight_ratio_vs_fp32, '.3f')} "
            f"| {rss} | {detail} |"
        )
    return "\n".join(lines) + "\n"


def speed_command(
    models: list[str] | None,
    schemes: str,
    batch: str | None,
    repeats: int,
    warmup: int,
    threads: int,
    peers: bool,
    simulated: str,
    json_out: Path | None,
    overwrite: bool,
    log: Callable[[str], None] | None,
    compile: bool = False,
) -> str:
    """What ``qdiffuse speed`` does, from its raw options: validate everything (and the output path) first, time,
    write the JSON, return the Markdown table."""
    from qdiffuse.fsutil import JSON, check_output_path

    settings = SpeedSettings(
        models=tuple(models) if models else BUILTIN_SPEED_MODELS,
        schemes=parse_name_list(schemes),
        batches=None if batch is None else parse_int_list(batch, "--batch"),
        repeats=repeats,
        warmup=warmup,
        threads=threads,
        peers=peers,
        simulated=None if simulated.lower() == "none" else simulated,
        compile=compile,
    )
    if json_out is not None:
        check_output_path(json_out, overwrite, JSON)
    result = run_speed(settings, log)
    if json_out is not None:
        write_json(result, json_out, overwrite)
    return result.markdown()


def write_json(result: SpeedResult, path: Path, overwrite: bool = False) -> None:
    """Write the result atomically (a temporary sibling renamed into place)."""
    from qdiffuse.fsutil import JSON, atomic_file

    with atomic_file(path, overwrite, JSON) as tmp:
        tmp.write_text(json.dumps(result.to_dict(), indent=2))


__all__ = [
    "BUILTIN_SPEED_MODELS",
    "LARGE_MODELS",
    "DEFAULT_SCHEMES",
    "SpeedSettings",
    "SpeedRow",
    "SpeedResult",
    "run_speed",
    "format_markdown",
    "write_json",
    "speed_command",
    "parse_int_list",
    "parse_name_list",
    "speed_models",
    "module_bytes",
    "tensor_bytes",
]
