"""The timestep of the model call in progress, for modules that need it but are not handed it.

A forward pre-hook on the root module reads ``timestep`` (the second positional argument of diffusers UNets,
a keyword of DiTs) and keeps it per sample, so layers deep inside the model (a twin's drifting input, a range
statistic per timestep) can read it without changing any forward signature.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from qdiffuse.errors import ModelLoadError


class TimestepClock:
    """Pre-hook (``with_kwargs=True``) on a root module; ``t`` is the current call's timestep, one per sample.

    ``strict``: a call without a timestep is an error (modules that cannot work without one), else ``t`` is None.
    """

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self.t: Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        if t is None:
            if self.strict:
                raise ModelLoadError("this model needs the timestep in its call (model(x, t, ...))")
            self.t = None
            return
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        t = torch.as_tensor(t).reshape(-1).float().to(sample.device)
        self.t = t.expand(sample.shape[0]) if t.numel() == 1 else t


__all__ = ["TimestepClock"]
