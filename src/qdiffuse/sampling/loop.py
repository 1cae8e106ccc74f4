"""The sampling loop: any diffusers scheduler around a :class:`Denoiser`, with hooks for what quantization needs.

Noise is drawn from one generator per batch seeded from ``(seed, batch index)``, so a full-precision and a
quantized model given the same request start from the same x_T and get the same injected noise: their outputs
can be compared image by image. Hooks let calibration record the network inputs and let noise correction change
ε before the scheduler sees it, without touching the scheduler.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from qdiffuse.errors import ConfigError, DataError
from qdiffuse.models.denoiser import Denoiser
from qdiffuse.noise.schedule import scaled_noise
from qdiffuse.progress import progress_bar
from qdiffuse.sampling.schedulers import check_conditioning, make_scheduler, set_timesteps, validate_steps
from qdiffuse.validate import MAX_SEED, check_fits_in_memory, check_number

StepCallback = Callable[[int, Tensor, Tensor, Tensor | None, Tensor | None], None]
"""on_step(step_index, t, network_x, network_labels, network_cond), called before every network call."""

EpsHook = Callable[[int, Tensor, Tensor], Tensor]
"""eps_hook(step_index, t, eps) -> eps, applied to the guided ε before the scheduler step."""

NoiseHook = Callable[[int, Tensor, Any, Tensor, Tensor, dict], float]
"""noise_hook(step_index, t, scheduler, x, eps, step_kwargs) -> factor on the noise the step injects."""


MAX_SAMPLES = 10**8
"""More samples than any evaluation uses (50k is the field's FID standard); beyond it, a typo."""


@dataclass(frozen=True)
class SampleRequest:
    """What to sample: count, sampler and its settings, seed and conditioning."""

    num: int
    steps: int = 50
    sampler: str = "ddim"
    eta: float = 0.0
    seed: int = 0
    labels: tuple[int, ...] | None = None
    guidance: float = 1.0
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.num <= 0:
            raise ConfigError(f"--num {self.num} must be positive")
        check_number(self.num, "--num", 1, MAX_SAMPLES, integer=True)
        if self.batch_size <= 0:
            raise ConfigError(f"--batch-size {self.batch_size} must be positive")
        check_number(self.batch_size, "--batch-size", 1, MAX_SAMPLES, integer=True)
        if self.steps <= 0:
            raise ConfigError(f"--steps {self.steps} must be positive")
        if self.eta < 0:
            raise ConfigError(f"--eta {self.eta} must be >= 0")
        check_number(self.eta, "--eta", 0.0, 1.0)  # DDIM: sigma_t > sqrt(1 - alpha_bar) beyond 1, NaN images
        check_number(self.guidance, "--guidance", 0.0, 100.0)
        check_number(self.seed, "--seed", 0, MAX_SEED, integer=True)

    def check_fits(self, sample_shape: tuple[int, ...]) -> None:
        """The finished images (float32, then uint8) must fit in memory: fail before sampling, not after."""
        per_sample = math.prod(sample_shape) * (4 + 1)
        check_fits_in_memory(
            self.num * per_sample, f"--num {self.num} samples of shape {tuple(sample_shape)}",
            "sample fewer and run several seeds",
        )


def resolve_labels(denoiser: Denoiser, labels: Sequence[int] | None, num: int) -> Tensor | None:
    """Class labels for ``num`` samples, cycling through ``labels`` (default: every class the model knows)."""
    if denoiser.num_classes is None:
        if labels:
            raise ConfigError("this model is not class-conditional; drop --labels")
        return None
    classes = list(labels) if labels else list(range(denoiser.num_classes))
    bad = [c for c in classes if not 0 <= c < denoiser.num_classes]
    if bad:
        raise ConfigError(f"labels {bad} are out of range; this model knows classes 0-{denoiser.num_classes - 1}")
    return torch.tensor([classes[i % len(classes)] for i in range(num)], dtype=torch.long)


def stub_condition(denoiser: Denoiser, num: int) -> Tensor | None:
    """A fixed text-condition tensor for a ``UNet2DConditionModel`` when the user gives none.

    Deterministic (its own seed) so FP and quantized runs see the same condition.
    """
    if denoiser.kind != "unet_cond":
        return None
    gen = torch.Generator().manual_seed(1234)
    one = torch.randn(1, denoiser.cond_length, denoiser.cross_attention_dim, generator=gen)
    return one.expand(num, -1, -1).clone()


def check_condition(denoiser: Denoiser, cond: Tensor, num: int) -> Tensor | None:
    """A text condition [seq, dim] or [N, seq, dim] expanded to ``num`` rows, or a one-line error."""
    if denoiser.kind != "unet_cond":
        raise ConfigError("--condition applies to text-conditional models (UNet2DConditionModel) only")
    if cond.ndim == 2:
        cond = cond.unsqueeze(0)
    if cond.ndim != 3 or cond.shape[-1] != denoiser.cross_attention_dim:
        raise ConfigError(
            f"--condition has shape {tuple(cond.shape)}; expected [seq, {denoiser.cross_attention_dim}] or "
            f"[N, seq, {denoiser.cross_attention_dim}]"
        )
    if cond.shape[0] == 1:
        return cond.expand(num, -1, -1)
    if cond.shape[0] < num:
        raise ConfigError(f"--condition holds {cond.shape[0]} rows for {num} samples; give 1 row or at least {num}")
    return cond[:num]


def batch_generator(seed: int, batch_index: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + batch_index)


def _step_kwargs(scheduler: object, eta: float, generator: torch.Generator) -> dict[str, object]:
    params = inspect.signature(scheduler.step).parameters
    kwargs: dict[str, object] = {}
    if "generator" in params:
        kwargs["generator"] = generator
    if "eta" in params:
        kwargs["eta"] = eta
    elif eta not in (0.0, 1.0):
        raise ConfigError(f"--eta applies to ddim only; this sampler ignores it (got {eta})")
    return kwargs


@torch.no_grad()
def sample(
    denoiser: Denoiser,
    scheduler_config: dict,
    request: SampleRequest,
    cond: Tensor | None = None,
    on_step: StepCallback | None = None,
    eps_hook: EpsHook | None = None,
    noise_hook: NoiseHook | None = None,
    description: str = "sampling",
    batches: Sequence[int] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Run the sampler; returns images in [-1, 1] (N, C, H, W) and their labels.

    ``batches`` samples only those batch indices of the request (in the order given), each exactly as in the
    whole run: a batch's noise, labels and condition depend on its index alone, which is what lets ranks of a
    distributed run and resumed runs share one request.
    """
    request.check_fits(denoiser.sample_shape)
    first = make_scheduler(request.sampler, scheduler_config)
    validate_steps(first, request.steps)
    set_timesteps(first, request.steps)
    check_conditioning(request.sampler, first)
    labels = resolve_labels(denoiser, request.labels, request.num)
    cond = stub_condition(denoiser, request.num) if cond is None else check_condition(denoiser, cond, request.num)
    device = denoiser.device
    images: list[Tensor] = []
    n_batches = num_batches(request)
    todo = list(range(n_batches)) if batches is None else list(batches)
    if any(not 0 <= b < n_batches for b in todo):
        raise ConfigError(f"batch indices {todo} out of range for {n_batches} batches")
    with progress_bar(description, len(todo) * request.steps) as bar:
        for b in todo:
            lo, hi = b * request.batch_size, min(request.num, (b + 1) * request.batch_size)
            scheduler = make_scheduler(request.sampler, scheduler_config)
            validate_steps(scheduler, request.steps)
            set_timesteps(scheduler, request.steps)
            gen = batch_generator(request.seed, b)
            x = torch.randn((hi - lo, *denoiser.sample_shape), generator=gen) * scheduler.init_noise_sigma
            x = x.to(device)
            blabels = labels[lo:hi].to(device) if labels is not None else None
            bcond = cond[lo:hi].to(device) if cond is not None else None
            kwargs = _step_kwargs(scheduler, request.eta, gen)
            for i, t in enumerate(scheduler.timesteps):
                model_in = scheduler.scale_model_input(x, t)
                t_batch = t.expand(model_in.shape[0]).to(device)
                if on_step is not None:
                    nx, nl, nc = denoiser.guided_inputs(model_in, blabels, bcond, request.guidance)
                    on_step(i, t_batch[:1].expand(nx.shape[0]), nx, nl, nc)
                eps = denoiser(model_in, t_batch, blabels, bcond, request.guidance)
                if eps_hook is not None:
                    eps = eps_hook(i, t, eps)
                factor = 1.0 if noise_hook is None else noise_hook(i, t, scheduler, x, eps, kwargs)
                with scaled_noise(scheduler, factor):
                    x = scheduler.step(eps, t, x, **kwargs).prev_sample
                bar.advance()
            if not torch.isfinite(x).all():
                raise DataError(
                    f"the model produced NaN or inf samples (batch {b}); its weights or the quantization are broken"
                )
            images.append(x.float().cpu())
    if not images:
        return torch.empty((0, *denoiser.sample_shape)), None if labels is None else labels[:0]
    if batches is not None and labels is not None:
        labels = torch.cat([labels[b * request.batch_size : (b + 1) * request.batch_size] for b in todo])
    return torch.cat(images), labels


def num_batches(request: SampleRequest) -> int:
    return (request.num + request.batch_size - 1) // request.batch_size


def to_uint8(images: Tensor) -> Tensor:
    """ADM convention: clamp to [-1, 1], then (x + 1) * 127.5 rounded, as N×H×W×C uint8."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous()


__all__ = [
    "SampleRequest",
    "sample",
    "num_batches",
    "to_uint8",
    "resolve_labels",
    "stub_condition",
    "batch_generator",
]
