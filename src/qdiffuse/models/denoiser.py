"""One calling convention for every supported network: ``eps = denoiser(x_t, t, labels, cond, guidance)``.

diffusers models differ in argument names (``sample``/``hidden_states``, ``class_labels``,
``encoder_hidden_states``) and outputs (DiT may predict a learned variance in extra channels). Samplers,
calibration and the noise analysis talk to this wrapper only, so each works for all model types.

The transformers of text-to-image pipelines (PixArt, SD3, FLUX) are only ever called by their pipeline, with
the keyword inputs the pipeline builds; for them (and for a ``UNet2DConditionModel`` called by a pipeline, e.g.
SDXL's) ``cond`` is the recorded :class:`~qdiffuse.calibration.call_inputs.CallInputs` of the calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from qdiffuse.calibration.call_inputs import CallInputs
from qdiffuse.errors import ConfigError

MODEL_KINDS = {
    "UNet2DModel": "unet",
    "UNet2DConditionModel": "unet_cond",
    "DiTTransformer2DModel": "dit",
    "PixArtTransformer2DModel": "pixart",
    "SD3Transformer2DModel": "sd3",
    "FluxTransformer2DModel": "flux",
}

PIPELINE_KINDS = frozenset({"pixart", "sd3", "flux"})
"""Denoisers quantized through their diffusers pipeline only (qdiffuse's own sampler does not drive them)."""

SAMPLE_ARGUMENT = {"unet": "sample", "unet_cond": "sample"}

PIPELINE_TIMESTEP_SCALE = {"flux": 1000}
"""FLUX's pipeline passes t / 1000; calibration records t (see :data:`qdiffuse.pipelines.calibrate.TIMESTEP_SCALE`)."""
"""The name of the noisy-sample argument where it is not ``hidden_states``."""


@dataclass
class Denoiser:
    """A diffusion network with its conditioning conventions.

    num_classes: real classes a class-conditional model knows (None: unconditional).
    null_class: the label index meaning "no class", used for classifier-free guidance (None: no guidance).
    cross_attention_dim / cond_length: shape of the text condition of a ``UNet2DConditionModel``.
    """

    model: nn.Module
    kind: str
    in_channels: int
    sample_size: int
    num_classes: int | None = None
    null_class: int | None = None
    cross_attention_dim: int | None = None
    cond_length: int = 8

    @classmethod
    def from_model(cls, model: nn.Module, meta: dict | None = None) -> Denoiser:
        """Read the conventions off a diffusers model's config, with ``meta`` (qdiffuse.json) overriding."""
        meta = meta or {}
        name = type(model).__name__
        if name not in MODEL_KINDS:
            raise ConfigError(f"unsupported model class {name}; use one of {', '.join(MODEL_KINDS)}")
        kind = MODEL_KINDS[name]
        config = model.config
        sample_size = getattr(config, "sample_size", None)
        if isinstance(sample_size, (list, tuple)) and sample_size:
            sample_size = sample_size[0]
        if kind in PIPELINE_KINDS and not isinstance(sample_size, int):
            sample_size = 0  # FLUX has none: its pipeline chooses the token grid per call
        elif isinstance(sample_size, bool) or not isinstance(sample_size, int) or sample_size < 1:
            raise ConfigError(f"the model config's sample_size {sample_size!r} must be a positive integer (e.g. 32)")
        num_classes = null_class = None
        if kind == "dit":
            num_classes = config.num_embeds_ada_norm
            null_class = num_classes
        elif getattr(config, "num_class_embeds", None):
            num_classes = config.num_class_embeds
        num_classes = meta.get("num_classes", num_classes)
        null_class = meta.get("null_class", null_class)
        table = _label_table_size(model, kind)
        for what, value in (("num_classes", num_classes), ("null_class", null_class)):
            if value is None:
                continue
            limit = table if what == "num_classes" else (table - 1 if table else None)
            if not isinstance(value, int) or value < 0 or (limit is not None and value > limit):
                raise ConfigError(
                    f"qdiffuse.json {what}={value!r} does not fit the model's class embedding of {table} entries; "
                    "fix qdiffuse.json"
                )
        return cls(
            model=model,
            kind=kind,
            in_channels=config.in_channels,
            sample_size=int(sample_size),
            num_classes=num_classes,
            null_class=null_class,
            cross_attention_dim=getattr(config, "cross_attention_dim", None) if kind == "unet_cond" else None,
            cond_length=int(meta.get("cond_length", 8)),
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: what the network's float parameters are (float32, bf16 or fp16)."""
        return model_dtype(self.model)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.sample_size, self.sample_size)

    def null_condition(self, batch: int) -> Tensor | None:
        if self.kind != "unet_cond":
            return None
        return torch.zeros(batch, self.cond_length, self.cross_attention_dim, device=self.device)

    @property
    def pipeline_only(self) -> bool:
        return self.kind in PIPELINE_KINDS

    def forward_raw(
        self, x: Tensor, t: Tensor, labels: Tensor | None = None, cond: Tensor | CallInputs | None = None
    ) -> Tensor:
        """One network call on exactly these inputs (what calibration records and replays).

        The sample (and a text condition tensor) is cast to the network's dtype and the output comes back in
        float32 whatever the network computes in, so samplers, losses and statistics never do their arithmetic in
        bf16. A pipeline's recorded inputs are replayed as recorded (in the pipeline's own dtypes)."""
        dtype = self.dtype
        x = x.to(dtype)
        if isinstance(cond, Tensor) and cond.is_floating_point():
            cond = cond.to(dtype)
        return self._call(x, t, labels, cond).float()

    def _call(self, x: Tensor, t: Tensor, labels: Tensor | None, cond: Tensor | CallInputs | None) -> Tensor:
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if isinstance(cond, CallInputs):
            argument = SAMPLE_ARGUMENT.get(self.kind, "hidden_states")
            t = t / PIPELINE_TIMESTEP_SCALE[self.kind] if self.kind in PIPELINE_TIMESTEP_SCALE else t
            return self.model(**{argument: x, "timestep": t}, **cond.kwargs(), return_dict=False)[0]
        if self.pipeline_only:
            raise ConfigError(
                f"a {type(self.model).__name__} is driven by its diffusers pipeline; quantize the pipeline folder "
                "(qdiffuse quantize FOLDER --prompts FILE, or qdiffuse.quantize(pipe, config, prompts=...))"
            )
        if self.kind == "unet":
            return self.model(x, t, class_labels=labels).sample
        if self.kind == "unet_cond":
            if cond is None:
                cond = self.null_condition(x.shape[0])
            return self.model(x, t, encoder_hidden_states=cond).sample
        if labels is None:
            labels = torch.full((x.shape[0],), self.null_class, dtype=torch.long, device=x.device)
        out = self.model(x, timestep=t, class_labels=labels).sample
        return out[:, : self.in_channels]

    def guided_inputs(
        self, x: Tensor, labels: Tensor | None, cond: Tensor | None, guidance: float
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """The network inputs for one guided evaluation: [conditional; unconditional] when guiding."""
        if guidance == 1.0:
            return x, labels, cond
        if self.kind == "unet_cond":
            uncond = self.null_condition(x.shape[0])
            return torch.cat([x, x]), None, torch.cat([cond, uncond])
        if labels is None or self.null_class is None:
            raise ConfigError(
                "classifier-free guidance needs a class-conditional model with a null class; use --guidance 1"
            )
        null = torch.full_like(labels, self.null_class)
        return torch.cat([x, x]), torch.cat([labels, null]), None

    def __call__(
        self,
        x: Tensor,
        t: Tensor,
        labels: Tensor | None = None,
        cond: Tensor | None = None,
        guidance: float = 1.0,
    ) -> Tensor:
        """ε prediction with classifier-free guidance ``eps_u + g (eps_c - eps_u)`` when ``guidance != 1``."""
        xin, lin, cin = self.guided_inputs(x, labels, cond, guidance)
        if guidance != 1.0 and t.ndim == 1:
            t = torch.cat([t, t])
        return self.combine_guidance(self.forward_raw(xin, t, lin, cin), guidance)

    @staticmethod
    def combine_guidance(raw: Tensor, guidance: float) -> Tensor:
        """Guided ε from the network output on :meth:`guided_inputs` (conditional half first)."""
        if guidance == 1.0:
            return raw
        eps_c, eps_u = raw.chunk(2)
        return eps_u + guidance * (eps_c - eps_u)


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype a network computes in: that of its floating-point parameters (a quantized model's norms, biases
    and embeddings keep it; its quantizer scales are buffers, always float32). float32 if it has none."""
    for tensor in model.parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


def _label_table_size(model: nn.Module, kind: str) -> int | None:
    """Entries of the class-embedding table (labels must index into it), or None without one."""
    if kind == "dit":
        return model.config.num_embeds_ada_norm + 1
    embedding = getattr(model, "class_embedding", None)
    return getattr(embedding, "num_embeddings", None)


__all__ = ["Denoiser", "MODEL_KINDS", "model_dtype"]
