"""Input validation shared by the format functions and the observers.

A single NaN or inf in a calibration batch poisons every range computed from it (min/max become inf,
scales NaN) and the failure only shows up much later as a black image. Checking where data enters keeps the
error next to its cause.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qdiffuse.errors import DataError


def check_finite(x: Tensor, what: str) -> None:
    """Raise :class:`DataError` if ``x`` holds any NaN or inf value.

    ``what`` names the tensor in the message (``"weight"``, ``"calibration activations"``) so the user knows
    where to look.
    """
    if x.is_floating_point() or x.is_complex():
        if not bool(torch.isfinite(x).all()):
            raise DataError(
                f"{what} contains NaN or inf values; run the model in float32 or remove the samples "
                "that overflow"
            )
