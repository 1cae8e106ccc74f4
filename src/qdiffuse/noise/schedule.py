"""What a scheduler step does with ε and with its injected noise, read off the scheduler itself.

PTQD's variance calibration needs, for every step, the coefficient c_t that multiplies ε in the update and the
standard deviation σ_t of the noise the sampler injects:  x_{t-1} = A_t x_t + c_t ε + σ_t z.  Instead of
hard-coding formulas per scheduler, the step is probed on copies of the scheduler (its state, including any
multistep history, is preserved): with the injected noise forced to zero, feeding ε = 1 instead of ε = 0 gives
c_t; with ε fixed, forcing the noise to one instead of zero gives σ_t. Every diffusers scheduler draws its noise
through ``randn_tensor`` in its own module, which is where the noise is forced — and where
:func:`scaled_noise` shrinks it at sampling time.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@contextmanager
def _patched_noise(scheduler: Any, make: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Replace the scheduler module's ``randn_tensor`` by ``make(standard_normal_draw)``."""
    module = sys.modules[type(scheduler).__module__]
    original = getattr(module, "randn_tensor", None)
    if original is None:
        yield
        return

    def patched(shape: Any, *args: Any, **kwargs: Any) -> Tensor:
        return make(original(shape, *args, **kwargs))

    module.randn_tensor = patched
    try:
        yield
    finally:
        module.randn_tensor = original


@contextmanager
def scaled_noise(scheduler: Any, factor: float) -> Iterator[None]:
    """Scale the noise the scheduler injects in the next step by ``factor`` (σ_t -> factor · σ_t)."""
    if factor == 1.0:
        yield
        return
    with _patched_noise(scheduler, lambda z: z * factor):
        yield


@dataclass(frozen=True)
class StepCoefficients:
    """c_t (ε coefficient) and σ_t (injected noise std) of one scheduler step, as scalars."""

    c: float
    sigma: float


def _step(scheduler: Any, eps: Tensor, t: Tensor, x: Tensor, kwargs: dict[str, Any], noise: float) -> Tensor:
    probe = copy.deepcopy(scheduler)
    with _patched_noise(probe, lambda z: torch.full_like(z, noise)):
        return probe.step(eps, t, x, **kwargs).prev_sample


def probe_step(scheduler: Any, t: Tensor, x: Tensor, eps: Tensor, kwargs: dict[str, Any]) -> StepCoefficients:
    """c_t and σ_t of the scheduler's next step at state (t, x, eps); the scheduler itself is not advanced."""
    kwargs = {k: v for k, v in kwargs.items() if k not in ("generator", "return_dict")}
    base = _step(scheduler, eps, t, x, kwargs, noise=0.0)
    shifted = _step(scheduler, eps + 1.0, t, x, kwargs, noise=0.0)
    noisy = _step(scheduler, eps, t, x, kwargs, noise=1.0)
    c = float((shifted - base).mean())
    sigma = float((noisy - base).mean())
    return StepCoefficients(c=c, sigma=abs(sigma))


__all__ = ["scaled_noise", "probe_step", "StepCoefficients"]
