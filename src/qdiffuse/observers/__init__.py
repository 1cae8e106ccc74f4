"""Range observers: estimate each quantizer's clipping range from weights or calibration activations.

``make_observer("minmax" | "percentile" | "mse", spec, **options)`` builds one; every observer has
``update(x)``, ``compute_range()`` and ``compute_qparams()`` (see :class:`Observer` for the shapes).
"""

from __future__ import annotations

from typing import Any

from qdiffuse.errors import ConfigError
from qdiffuse.formats.spec import FormatSpec
from qdiffuse.observers.base import Observer
from qdiffuse.observers.minmax import MinMaxObserver
from qdiffuse.observers.mse import MSEObserver
from qdiffuse.observers.percentile import PercentileObserver

OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
}

__all__ = ["OBSERVERS", "MSEObserver", "MinMaxObserver", "Observer", "PercentileObserver", "make_observer"]


def make_observer(name: str, spec: FormatSpec, **kwargs: Any) -> Observer:
    """The observer called ``name`` for ``spec``; ``kwargs`` go to its constructor (``percentile=99.9``)."""
    cls = OBSERVERS.get(name)
    if cls is None:
        raise ConfigError(f"unknown observer {name!r}; use one of {', '.join(OBSERVERS)}")
    try:
        return cls(spec, **kwargs)
    except TypeError as exc:
        raise ConfigError(
            f"observer {name!r} got an unknown option ({exc}); check the observer settings"
        ) from None
