"""Calibration by running the pipeline itself on prompts.

A pipeline's denoiser is only ever called by the pipeline (text encoding, classifier-free guidance, the
scheduler's own input scaling, SDXL's size conditions, FLUX's token packing), so calibration records the
denoiser's exact inputs while the FP pipeline generates from the user's prompts with the guidance and sampler they
will use: every argument of every call, replayed verbatim later (:class:`~qdiffuse.calibration.call_inputs.
CallInputs`). Steps are counted by the pipeline's calls to ``scheduler.step``, so a pipeline that calls its
denoiser twice per step (separate conditional and unconditional passes) is recorded whole.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from qdiffuse.calibration.call_inputs import CallInputs
from qdiffuse.calibration.collect import CalibrationSet, calibration_step_indices
from qdiffuse.errors import ConfigError, DataError
from qdiffuse.pipelines.support import denoiser_component

DEFAULT_PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a watercolor painting of a lighthouse at dawn",
    "a close-up portrait of an old man with a beard, studio lighting",
    "a bowl of fruit on a wooden table, oil painting",
    "a futuristic city skyline at night, neon lights",
    "a red sports car on a mountain road",
    "a cat sleeping on a windowsill in the sun",
    "an isometric illustration of a cozy library",
)
"""Prompts that calibrate when the user gives none: varied subjects, styles and lighting."""

CONSTANT_ARGUMENTS = frozenset({"img_ids", "txt_ids"})
"""Tensor arguments that are the same for every image of a call whatever their first dimension (FLUX's 2-D
positional ids of the image and text tokens), so they are never taken for per-row inputs."""


TIMESTEP_SCALE = {"FluxTransformer2DModel": 1000}
"""Denoisers whose pipeline passes the timestep divided by this: recorded on the scheduler's scale (so every
per-timestep analysis reads it as such) and divided again on replay (:meth:`qdiffuse.models.denoiser.Denoiser.
forward_raw`)."""


def check_prompts(prompts: Sequence[str] | None) -> list[str]:
    if prompts is None:
        return list(DEFAULT_PROMPTS)
    prompts = [p for p in (str(x).strip() for x in prompts) if p]
    if not prompts:
        raise DataError("the prompt list is empty; give at least one non-empty prompt, one per line")
    return prompts


def split_call(model: nn.Module, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor, CallInputs]:
    """One denoiser call as (noisy sample, timestep per row, every other input)."""
    bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    bound = dict(bound)
    parameters = inspect.signature(model.forward).parameters
    for name, parameter in parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD and isinstance(bound.get(name), dict):
            bound.update(bound.pop(name))
    sample_name = next(iter(parameters))
    sample = bound.pop(sample_name)
    timestep = torch.as_tensor(bound.pop("timestep"))
    batch = sample.shape[0]
    timestep = timestep.reshape(-1).detach().cpu() * TIMESTEP_SCALE.get(type(model).__name__, 1)
    if timestep.numel() == 1:
        timestep = timestep.expand(batch).clone()
    constants = {k: bound.pop(k) for k in list(bound) if k in CONSTANT_ARGUMENTS}
    inputs = CallInputs.from_call(bound, batch)
    for key, value in constants.items():
        inputs.constants[key] = value.detach().cpu() if isinstance(value, Tensor) else value
    return sample.detach().cpu(), timestep, inputs


@contextmanager
def counting_steps(scheduler: Any) -> Iterator[list[int]]:
    """A counter of the pipeline's ``scheduler.step`` calls while the context is open."""
    count = [0]

    def counted(original: Callable[..., Any]) -> Callable[..., Any]:
        def step(*args: Any, **kwargs: Any) -> Any:
            try:
                return original(*args, **kwargs)
            finally:
                count[0] += 1

        return step

    with wrapped_step(scheduler, counted):
        yield count


@contextmanager
def wrapped_step(scheduler: Any, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Iterator[None]:
    """``scheduler.step`` replaced on the instance by ``wrap(step)`` (with the original's signature, which
    pipelines inspect) while the context is open; whatever the instance had before is put back."""
    import functools

    original = scheduler.step
    had = scheduler.__dict__.get("step")
    scheduler.step = functools.wraps(original)(wrap(original))
    try:
        yield
    finally:
        if had is None:
            del scheduler.step
        else:
            scheduler.step = had


def pipeline_call(
    pipe: Any,
    prompts: list[str],
    *,
    num_inference_steps: int,
    guidance_scale: float,
    height: int | None,
    width: int | None,
    seed: int,
    **extra: Any,
) -> Any:
    """One generation in latent space (no decoding), with the pipeline's refusals as one line and without its
    progress bar (qdiffuse's own bars say what runs)."""
    with refusals_as_one_line(pipe), no_progress_bar(pipe):
        return pipe(
            prompts,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            generator=torch.Generator().manual_seed(seed),
            output_type="latent",
            **extra,
        )


@contextmanager
def no_progress_bar(pipe: Any) -> Iterator[None]:
    had = hasattr(pipe, "_progress_bar_config")
    previous = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(**{**previous, "disable": True})
    try:
        yield
    finally:
        if had:
            pipe._progress_bar_config = previous
        else:
            del pipe._progress_bar_config


@contextmanager
def refusals_as_one_line(pipe: Any) -> Iterator[None]:
    """The pipeline's own input checks (ValueError/TypeError before its denoiser is first called) become one
    line naming the reason; anything raised once the denoiser runs is not the user's input and keeps its
    traceback."""
    model = getattr(pipe, denoiser_component(pipe))
    started = [False]
    handle = model.register_forward_pre_hook(lambda *_: started.__setitem__(0, True))
    try:
        yield
    except (ValueError, TypeError) as exc:
        if started[0]:
            raise
        reason = " ".join(str(exc).split())[:200]
        raise ConfigError(f"the pipeline refused the call ({reason})") from None
    finally:
        handle.remove()


@torch.no_grad()
def collect_pipeline_calibration(
    pipe: Any,
    prompts: Sequence[str] | None = None,
    *,
    num_inference_steps: int = 20,
    guidance_scale: float = 7.5,
    calib_steps: int = 10,
    height: int | None = None,
    width: int | None = None,
    seed: int = 0,
    batch_size: int = 4,
    **call_kwargs: Any,
) -> CalibrationSet:
    """Run the FP pipeline on ``prompts`` and keep the denoiser's inputs at ``calib_steps`` evenly spaced steps:
    every call of those steps (both halves of a guided call), with the real text embeddings and extra inputs."""
    component = denoiser_component(pipe)
    prompts = check_prompts(prompts)
    model: nn.Module = getattr(pipe, component)
    keep = set(calibration_step_indices(num_inference_steps, calib_steps))
    xs: list[Tensor] = []
    ts: list[Tensor] = []
    inputs: list[CallInputs] = []
    steps = [0]

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if steps[0] in keep:
            x, t, rest = split_call(module, args, kwargs)
            xs.append(x)
            ts.append(t)
            inputs.append(rest)

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        for lo in range(0, len(prompts), batch_size):
            with counting_steps(pipe.scheduler) as count:
                steps = count
                pipeline_call(
                    pipe, list(prompts[lo : lo + batch_size]), num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale, height=height, width=width, seed=seed + lo, **call_kwargs,
                )
    finally:
        handle.remove()
    if not xs:
        raise DataError("the pipeline never called its denoiser; check num_inference_steps")
    return CalibrationSet(torch.cat(xs), torch.cat(ts), None, CallInputs.cat(inputs))


__all__ = ["DEFAULT_PROMPTS", "check_prompts", "collect_pipeline_calibration", "split_call", "pipeline_call"]
