"""Real low-bit execution: packed weights and INT8 / FP8 / packed-INT4 kernels per device, behind one dispatch.

``freeze(model)`` turns a calibrated (simulated) model into a real one; :func:`qdiffuse.io.load_quantized` builds
real layers straight from a folder's codes. ``runtime_report(model)`` says which kernel runs each layer and why
any layer fell back to simulated compute; ``available()`` lists the backends this machine has.
"""

from qdiffuse.kernels.dispatch import BACKENDS, FALLBACK, available, select_kernel
from qdiffuse.kernels.freeze import (
    RUNTIMES,
    LayerRuntime,
    RuntimeReport,
    check_runtime,
    freeze,
    model_bytes,
    real_layer,
    runtime_report,
)
from qdiffuse.kernels.modules import RealLayer

__all__ = [
    "BACKENDS",
    "FALLBACK",
    "RUNTIMES",
    "LayerRuntime",
    "RealLayer",
    "RuntimeReport",
    "available",
    "check_runtime",
    "freeze",
    "model_bytes",
    "real_layer",
    "runtime_report",
    "select_kernel",
]
