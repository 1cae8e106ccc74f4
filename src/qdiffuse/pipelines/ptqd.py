"""PTQD inside diffusers' own pipeline call: statistics measured by running the pipeline, the correction applied
by a scheduler wrapper that any pipeline accepts.

Measurement runs the FP pipeline; at each denoiser call the quantized denoiser is called on the same inputs, and
at each ``scheduler.step`` the guided FP output the pipeline hands the scheduler is compared with the quantized
output combined the same way. How the pipeline combines its denoiser outputs (as is; classifier-free guidance
``u + g (c - u)``; the ε half of a learned-variance output) is not assumed per pipeline class: each candidate is
checked against the FP output the pipeline really produced, and a pipeline that does something else is refused.

The correction is PTQD's (:mod:`qdiffuse.noise.correction`) on whatever the denoiser predicts: for ε-prediction
models it is the paper's; for flow-matching models (SD3, FLUX) the same linear model v̂ = (1 + k) v + μ + noise is
fitted and removed from the velocity. Their Euler steps inject no noise, so variance calibration has nothing to
absorb there, and says so per step.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from qdiffuse.errors import ConfigError
from qdiffuse.noise.correction import PTQDCorrector, PTQDOptions
from qdiffuse.noise.schedule import scaled_noise
from qdiffuse.noise.stats import NoiseStats, StepAccumulator
from qdiffuse.pipelines.calibrate import check_prompts, pipeline_call, wrapped_step
from qdiffuse.pipelines.support import denoiser_component


def channels_first(x: Tensor) -> Tensor:
    """Image outputs are (B, C, H, W) already; packed token outputs (FLUX: B, tokens, features) put features
    second, so per-channel statistics are per feature, not per token."""
    return x.transpose(1, 2) if x.ndim == 3 else x


def channels_back(x: Tensor, like: Tensor) -> Tensor:
    return x.transpose(1, 2) if like.ndim == 3 else x


def flow_matching(scheduler: Any) -> bool:
    return not hasattr(scheduler, "alphas_cumprod") and hasattr(scheduler, "sigmas")


def forward_snr_of(scheduler: Any, timestep: float) -> float:
    """The forward process's SNR at ``timestep``: ᾱ/(1 - ᾱ) for DDPM-family schedules, ((1 - σ)/σ)² for flow
    matching (x_t = (1 - σ) x_0 + σ ε with σ = t / num_train_timesteps)."""
    if hasattr(scheduler, "alphas_cumprod"):
        a = scheduler.alphas_cumprod
        a = float(a[min(max(int(timestep), 0), len(a) - 1)])
        return a / max(1.0 - a, 1e-30)
    sigma = min(max(float(timestep) / float(scheduler.config.num_train_timesteps), 1e-6), 1.0)
    return ((1.0 - sigma) / sigma) ** 2


def _combinations(guidance: float, channels: int) -> list[tuple[str, Callable[[Tensor], Tensor]]]:
    def head(x: Tensor) -> Tensor:
        return x[:, :channels] if x.ndim == 4 and x.shape[1] == 2 * channels else x

    def halves(x: Tensor) -> tuple[Tensor, Tensor]:
        if x.shape[0] % 2:
            raise RuntimeError("an odd batch has no guided halves")
        first, second = x.chunk(2)
        return first, second

    def cfg(x: Tensor) -> Tensor:
        u, c = halves(x)
        return u + guidance * (c - u)

    def cfg_cond_first(x: Tensor) -> Tensor:
        c, u = halves(x)
        return u + guidance * (c - u)

    return [
        ("as is", lambda x: x),
        ("ε half", head),
        ("guidance", cfg),
        ("guidance, ε half", lambda x: head(cfg(x))),
        ("guidance (conditional first)", cfg_cond_first),
        ("guidance (conditional first), ε half", lambda x: head(cfg_cond_first(x))),
    ]


def _reproduces(combine: Callable[[Tensor], Tensor], raw_fp: Tensor, guided_fp: Tensor) -> bool:
    try:
        out = combine(raw_fp)
    except RuntimeError:
        return False
    tolerance = 1e-4 * (1.0 + float(guided_fp.abs().max()))
    return out.shape == guided_fp.shape and float((out - guided_fp).abs().max()) <= tolerance


def infer_combination(raw_fp: Tensor, guided_fp: Tensor, guidance: float) -> Callable[[Tensor], Tensor]:
    """The map the pipeline applied to its denoiser output(s) to get what it passed to ``scheduler.step``."""
    channels = guided_fp.shape[1] if guided_fp.ndim == 4 else -1
    for _name, combine in _combinations(guidance, channels):
        if _reproduces(combine, raw_fp, guided_fp):
            return combine
    raise ConfigError(
        "cannot tell how this pipeline combines its denoiser outputs before each scheduler step (not as is, not "
        "classifier-free guidance); PTQD is not available for it, use --method without +ptqd"
    )


@contextmanager
def _swapped(pipe: Any, component: str, model: nn.Module) -> Iterator[None]:
    original = getattr(pipe, component)
    setattr(pipe, component, model)
    try:
        yield
    finally:
        setattr(pipe, component, original)


def _first_tensor(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    return out[0]


@torch.no_grad()
def measure_pipeline_noise(
    pipe: Any,
    fp_model: nn.Module,
    prompts: list[str] | None = None,
    *,
    num_inference_steps: int = 20,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    seed: int = 0,
    batch_size: int = 4,
    **call_kwargs: Any,
) -> NoiseStats:
    """PTQD statistics of ``pipe``'s (quantized) denoiser against ``fp_model`` along the FP pipeline's
    trajectories on ``prompts``, keyed by the scheduler's timestep."""
    component = denoiser_component(pipe)
    prompts = check_prompts(prompts)
    quantized: nn.Module = getattr(pipe, component)
    scheduler = pipe.scheduler.scheduler if isinstance(pipe.scheduler, PTQDScheduler) else pipe.scheduler
    pending: list[tuple[Tensor, Tensor]] = []
    accumulators: dict[int, StepAccumulator] = {}
    combine: list[Callable[[Tensor], Tensor]] = []

    def shadow(_m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        pending.append((_first_tensor(out), _first_tensor(quantized(*args, **kwargs))))

    def pairing(original_step: Callable[..., Any]) -> Callable[..., Any]:
        def step(model_output: Tensor, timestep: Any, *args: Any, **kwargs: Any) -> Any:
            if not pending:  # a step without a denoiser call (a second-order scheduler's bookkeeping)
                return original_step(model_output, timestep, *args, **kwargs)
            raw_fp = torch.cat([fp for fp, _ in pending])
            raw_q = torch.cat([q for _, q in pending])
            pending.clear()
            if not combine or not _reproduces(combine[0], raw_fp, model_output):
                combine[:] = [infer_combination(raw_fp, model_output, guidance_scale)]
            guided_q = combine[0](raw_q)
            key = int(torch.as_tensor(timestep).reshape(-1)[0])
            fp_cf, q_cf = channels_first(model_output), channels_first(guided_q)
            if key not in accumulators:
                accumulators[key] = StepAccumulator(fp_cf.shape[1], seed=key)
            accumulators[key].update(fp_cf, q_cf)
            return original_step(model_output, timestep, *args, **kwargs)

        return step

    handle = fp_model.register_forward_hook(shadow, with_kwargs=True)
    previous = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        with wrapped_step(scheduler, pairing), _swapped(pipe, component, fp_model):
            for lo in range(0, len(prompts), batch_size):
                pipeline_call(
                    pipe, prompts[lo : lo + batch_size], num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale, height=height, width=width, seed=seed + lo, **call_kwargs,
                )
    finally:
        handle.remove()
        pipe.scheduler = previous
    stats = NoiseStats(
        settings={
            "sampler": type(scheduler).__name__,
            "steps": num_inference_steps,
            "eta": 0.0,
            "guidance": guidance_scale,
            "num": len(prompts),
            "seed": seed,
            "labels": None,
            "prediction": "velocity (flow matching)" if flow_matching(scheduler) else scheduler.config.get(
                "prediction_type", "epsilon"
            ),
        }
    )
    for t, acc in accumulators.items():
        step_stats, resid = acc.finish(t, forward_snr_of(scheduler, t))
        stats.steps[t] = step_stats
        stats.residual_samples[t] = resid
    return stats


class PTQDScheduler:
    """Any diffusers scheduler with PTQD's correction: ``pipe.scheduler = PTQDScheduler(pipe.scheduler, stats)``.

    Everything but ``step`` is the wrapped scheduler's (config, timesteps, ``set_timesteps``, scaling), and
    ``step`` keeps its signature, so pipelines that inspect it (to pass ``eta`` or ``generator``) see the same
    parameters. Before each step the model output is corrected, ``(out - μ_t) / (1 + k_t)``; the noise the step
    injects is shrunk by the residual quantization noise it carries (:class:`~qdiffuse.noise.correction.
    PTQDCorrector`). ``report()`` says, per timestep, what was applied and what could not be absorbed.
    """

    def __init__(self, scheduler: Any, stats: NoiseStats, options: PTQDOptions | None = None) -> None:
        if isinstance(scheduler, PTQDScheduler):
            scheduler = scheduler.scheduler
        self.scheduler = scheduler
        self.stats = stats
        self.corrector = PTQDCorrector(stats, options or PTQDOptions())
        self._timesteps: tuple[float, ...] | None = None

        def step(*args: Any, **kwargs: Any) -> Any:
            return self._corrected_step(*args, **kwargs)

        self.step = functools.wraps(scheduler.step)(step)

    def __reduce__(self) -> tuple[Any, ...]:
        """Copies and pickles rebuild the wrapper, so a copy's ``step`` drives the copy's own scheduler."""
        return (PTQDScheduler, (self.scheduler, self.stats, self.corrector.options))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("scheduler", "corrector", "stats", "_timesteps"):
            raise AttributeError(name)
        return getattr(self.scheduler, name)

    def _corrected_step(self, model_output: Tensor, timestep: Any, sample: Tensor, *args: Any, **kwargs: Any) -> Any:
        timesteps = getattr(self.scheduler, "timesteps", None)
        current = tuple(float(v) for v in timesteps) if timesteps is not None else None
        if current != self._timesteps:  # a new schedule: the step coefficients are probed again
            self.corrector.report.clear()
            self._timesteps = current
        t = torch.as_tensor(timestep).reshape(-1)[0]
        out = channels_back(self.corrector.eps_hook(0, t, channels_first(model_output)), model_output)
        factor = self.corrector.noise_hook(0, t, self.scheduler, sample, out, kwargs)
        with scaled_noise(self.scheduler, factor):
            return self.scheduler.step(out, timestep, sample, *args, **kwargs)

    def report(self) -> dict[str, Any]:
        return self.corrector.summary()

    def __repr__(self) -> str:
        return f"PTQDScheduler({type(self.scheduler).__name__}, {len(self.stats.steps)} measured steps)"


__all__ = ["PTQDScheduler", "measure_pipeline_noise", "infer_combination", "forward_snr_of"]
