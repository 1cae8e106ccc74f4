"""Straight-through rounding.

Rounding has a zero gradient almost everywhere, which would stop reconstruction (AdaRound/BRECQ) and
step-size learning (LSQ) dead. The straight-through estimator (STE) keeps the rounded value in the forward
pass and pretends the rounding was the identity in the backward pass, so gradients reach both the input
and the scale.
"""

from __future__ import annotations

import torch
from torch import Tensor


def round_ste(x: Tensor) -> Tensor:
    """Round to the nearest integer (ties to even, as ``torch.round``) with an identity gradient.

    Written as ``x + (round(x) - x).detach()`` so the forward value is exactly ``round(x)`` while autograd
    sees ``x``; this works on any float dtype and device without a custom autograd function.
    """
    return x + (torch.round(x) - x).detach()
