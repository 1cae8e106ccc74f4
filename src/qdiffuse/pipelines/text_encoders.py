"""Quantizing a pipeline's text encoders in memory: the text path's share of the quantization error.

MixDQ found the text path the most quantization-sensitive part of SDXL-Turbo, so it must be measurable on its own:
:func:`quantize_text_encoders` rewrites every ``nn.Linear`` of the pipeline's text encoders (CLIP, T5, BERT) to a
scheme, calibrates the activation ranges on the encoders' real inputs (the pipeline run once on the prompts), and
freezes them onto the kernels like a denoiser. Embedding tables and normalisations stay FP.

Each quantized encoder keeps how it was made (:data:`TEXT_STATE_ATTR`: the config, plan and calibration facts), so
:func:`qdiffuse.save` writes it as a qdiffuse folder in its component's subfolder and
:func:`qdiffuse.load_pipeline` rebuilds it on the runtime asked for (:mod:`qdiffuse.pipelines.text_store`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from qdiffuse.errors import ConfigError

TEXT_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3")
TEXT_STATE_ATTR = "qdiffuse_text_state"
"""Where a quantized text encoder keeps its :class:`~qdiffuse.api.QuantState` for saving. Not the denoiser's
``qdiffuse_state``: code that finds that attribute takes the module for a quantized denoiser."""
SCHEME_ATTR = "qdiffuse_text_scheme"
KEEP_FP = ("*.DenseReluDense.wo",)
"""Layers left FP: T5's feed-forward output projection reads its own ``weight`` dtype inside ``forward``, which a
layer running on packed codes does not have."""


def text_encoders(pipe: Any) -> dict[str, nn.Module]:
    return {name: getattr(pipe, name) for name in TEXT_COMPONENTS if isinstance(getattr(pipe, name, None), nn.Module)}


def text_encoder_state(module: nn.Module) -> Any:
    """The :class:`~qdiffuse.api.QuantState` of a text encoder quantized by :func:`quantize_text_encoders` (or
    loaded from a folder), None for any other module."""
    return getattr(module, TEXT_STATE_ATTR, None)


def quantized_text_encoders(pipe: Any) -> list[str]:
    from qdiffuse.nn.rewrite import quant_layers

    out = []
    for name, module in text_encoders(pipe).items():
        if getattr(module, SCHEME_ATTR, None) is not None or any(True for _ in quant_layers(module)):
            out.append(name)
    return out


@torch.no_grad()
def quantize_text_encoders(
    pipe: Any,
    scheme: str,
    prompts: Sequence[str],
    *,
    method: str = "mse",
    runtime: str = "real",
    layers: Sequence[str] | None = None,
    **call_kwargs: Any,
) -> dict[str, int]:
    """Quantize the text encoders of ``pipe`` in place to ``scheme`` (activation ranges from running the pipeline
    on ``prompts`` for one step); ``layers``: fnmatch patterns of the only Linear layers to quantize (the rest stay
    FP), for per-layer sensitivity; they match names inside each encoder, so on a pipeline with two encoders a
    pattern selects the same-named layer of both. Returns the number of quantized layers per encoder."""
    from qdiffuse.api import QuantState
    from qdiffuse.calibration.ptq import calibrate_weights
    from qdiffuse.config import QuantConfig
    from qdiffuse.kernels import check_runtime, freeze
    from qdiffuse.nn.rewrite import activation_quantizers, quantize_model
    from qdiffuse.pipelines.calibrate import check_prompts, pipeline_call

    check_runtime(runtime)
    encoders = text_encoders(pipe)
    if not encoders:
        raise ConfigError(f"{type(pipe).__name__} has no text encoder to quantize")
    if quantized_text_encoders(pipe):
        raise ConfigError("this pipeline's text encoders are already quantized; load it again to change them")
    config = QuantConfig.from_scheme(
        scheme, method=method, keep_8bit=None, keep_fp=KEEP_FP, fp_inputs=(), outliers="off", guard_db=0
    )
    if layers is not None:
        import fnmatch

        from qdiffuse.config import LayerRule

        keep = [n for enc in encoders.values() for n, m in enc.named_modules() if isinstance(m, nn.Linear)
                and not any(fnmatch.fnmatchcase(n, p) for p in layers)]
        config = replace(config, rules=config.rules + tuple(LayerRule(n, "fp") for n in keep))
    counts, plans = {}, {}
    for name, encoder in encoders.items():
        plans[name] = quantize_model(encoder, config)
        counts[name] = len(plans[name])
        calibrate_weights(encoder)
    quantizers = [q for enc in encoders.values() for _, q in activation_quantizers(enc) if q.needs_calibration]
    for q in quantizers:
        q.start_calibration()
    settings = {"guidance_scale": 7.5, "height": None, "width": None, **call_kwargs, "num_inference_steps": 1}
    texts = list(check_prompts(prompts))
    for lo in range(0, len(texts), 8):
        pipeline_call(pipe, texts[lo : lo + 8], seed=0, **settings)
    for q in quantizers:
        q.finish_calibration()
    calibration = {"prompts": len(texts), "pipeline": type(pipe).__name__}
    for name, encoder in encoders.items():
        setattr(encoder, SCHEME_ATTR, scheme)
        setattr(encoder, TEXT_STATE_ATTR, QuantState(config, plans[name], dict(calibration)))
        if runtime == "real":
            freeze(encoder)
    return counts


__all__ = [
    "quantize_text_encoders",
    "quantized_text_encoders",
    "text_encoder_state",
    "text_encoders",
    "TEXT_COMPONENTS",
    "TEXT_STATE_ATTR",
]
