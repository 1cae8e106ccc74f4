"""Quantization configuration: schemes, methods and the layer policy, as plain dataclasses.

A :class:`QuantConfig` says everything needed to reproduce a quantized model: the weight and activation formats,
how ranges are found (the method), which layers are kept at higher precision, and the calibration counts. It
round-trips through JSON so a saved model folder describes itself.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from qdiffuse.errors import ConfigError
from qdiffuse.formats.quartz import LZS_GROUP, STAGE1_GROUP
from qdiffuse.formats.spec import FormatSpec
from qdiffuse.validate import MAX_SEED, check_number

METHODS = (
    "minmax", "mse", "mse+bias", "ptqd", "qdiffusion", "qdiffusion+ptqd", "gptq", "gptq+ptqd", "mota", "mota+ptqd",
)
"""minmax/mse: round-to-nearest PTQ with that range search. mse+bias: mse, then empirical bias correction (each
layer's mean output error on the calibration set added to its bias; one extra forward pass). ptqd: mse ranges
plus PTQD's noise statistics, measured at quantization time and corrected at sampling time. qdiffusion: mse
ranges, then Q-Diffusion's block reconstruction (learned weight rounding and activation step sizes).
qdiffusion+ptqd: PTQD's statistics and corrections on top of the reconstructed model (the residual noise is what
reconstruction could not remove). gptq: mse ranges, weights rounded by GPTQ (one float pass for the layers'
input Hessians, then error-compensating rounding onto the same grids; much faster than reconstruction).
gptq+ptqd: PTQD's statistics and corrections on top of the GPTQ model. mota: sampling-aware reconstruction for the
higher-order solver named by ``calib_sampler`` (Mixed-Order Trajectory Alignment, see
:mod:`qdiffuse.calibration.trajectory`). mota+ptqd: PTQD on top, its statistics measured under the same solver."""
RECONSTRUCTING_METHODS = ("qdiffusion", "qdiffusion+ptqd", "mota", "mota+ptqd")
NOISE_CORRECTING_METHODS = ("ptqd", "qdiffusion+ptqd", "gptq+ptqd", "mota+ptqd")
TRAJECTORY_METHODS = ("mota", "mota+ptqd")
BIAS_CORRECTING_METHODS = ("mse+bias",)
OUTLIER_MODES = ("auto", "off")
"""auto: measure every integer-activation input on the calibration data and give the layers one static grid
cannot hold what they need (smoothing, dynamic ranges, outlier channels in FP, an FP input as the last resort;
see :mod:`qdiffuse.outliers.auto`); off: one grid per layer as the scheme says."""
MOTA_ALIGN_AT = ("blocks", "output", "both")
"""Where ``mota``'s higher-order terms act: the block stage (block outputs on the intermediate point), the
network-output stage after it (the FP network's ε there; needs ``recon_output_iters`` > 0), or both. The other
stage keeps the plain target."""
MOTA_PLAN_DATA = ("standard", "trajectory")
"""What ``mota`` decides its precision plan on (outlier treatments, the end-to-end guard, activation ranges, bias
correction): ``standard``, the schedule-wide time-step-aware set ``qdiffusion`` uses (``calib_steps`` of a
``STANDARD_CALIB_STEPS``-step ``STANDARD_CALIB_SAMPLER`` run), so the two methods start reconstruction from the
same model and differ only in what reconstruction fits; or ``trajectory``, the target solver's own rows, which
cover only the timesteps that solver visits (at 10 DPM-Solver++ steps none below t = 90 or above t = 900, where
a model's activations may need what the solver's rows never show). Reconstruction always fits the solver's rows."""
MOTA_OUTPUT_ITERS = 200
"""``mota``'s default network-output stage: its higher-order terms act there (``mota_align_at='output'``), on the
network's own ε, with the blocks reconstructed toward the plain target. Set ``recon_output_iters=0`` for the
block-level alignment alone (``mota_align_at`` then defaults to ``blocks``)."""
STANDARD_CALIB_SAMPLER = "ddim"
STANDARD_CALIB_STEPS = 50
RECON_UNITS = ("auto", "layer")
"""What reconstruction treats as one unit: diffusers blocks (layer by layer elsewhere), or every layer alone."""


def _int_weights(bits: int) -> FormatSpec:
    return FormatSpec(kind="int", bits=bits, symmetric=True, granularity="channel")


def _int_acts(bits: int) -> FormatSpec:
    return FormatSpec(kind="int", bits=bits, symmetric=False, granularity="tensor")


def _quartz() -> FormatSpec:
    return FormatSpec(
        kind="quartz", bits=4, granularity="group", group_size=STAGE1_GROUP, lzs_group=LZS_GROUP, rounding="nearest"
    )


SCHEMES: dict[str, tuple[FormatSpec, FormatSpec | None]] = {
    "w8a8": (_int_weights(8), _int_acts(8)),
    "w4a8": (_int_weights(4), _int_acts(8)),
    "w4a4": (_int_weights(4), _int_acts(4)),
    "w8a16": (_int_weights(8), None),
    "w4a16": (_int_weights(4), None),
    "fp8": (
        FormatSpec(kind="fp8_e4m3", granularity="channel"),
        FormatSpec(kind="fp8_e4m3", granularity="tensor"),
    ),
    "w4a4-g32": (
        _int_weights(4),
        FormatSpec(kind="int", bits=4, symmetric=False, granularity="group", group_size=32),
    ),
    "nvfp4": (FormatSpec(kind="nvfp4"), FormatSpec(kind="nvfp4")),
    "mxfp4": (FormatSpec(kind="mxfp4"), FormatSpec(kind="mxfp4")),
    "nvfp4-w4a8": (FormatSpec(kind="nvfp4"), _int_acts(8)),
    "mxfp4-w4a8": (FormatSpec(kind="mxfp4"), _int_acts(8)),
    "quartz-w4a4": (_quartz(), _quartz()),
    "quartz-w4a8": (_quartz(), _int_acts(8)),
    "quartz-a4": (_int_weights(4), _quartz()),
    "quartz-a4w8": (_int_weights(8), _quartz()),
}
"""Named schemes: (weight format, activation format or None for weight-only).

Integer weights are symmetric per output channel (what integer kernels expect); integer activations are
asymmetric per tensor, since post-SiLU/GELU activations are skewed. FP8 uses e4m3 with per-channel weight scales
and a per-tensor activation scale. NVFP4 and MXFP4 are blockwise by definition. ``w4a4-g32`` keeps INT4 weights
per channel and gives the INT4 activations one range per token and 32 consecutive channels, taken from the data
on every call (SVDQuant's INT4 activations use groups of 64): the per-tensor 4-bit grid of ``w4a4`` cannot hold a
transformer's tokens (BENCHMARKS.md, "W4A4": ``fmnist-dit`` FID 64.89 per tensor, 7.53 per group with GPTQ).
``nvfp4-w4a8``/``mxfp4-w4a8``: the FP4 weights under INT8 per-tensor activations. The ``quartz-*`` schemes put
QuaRTZ (:mod:`qdiffuse.formats.quartz`: INT8 per 64 values, leading-zero suppression to 4-bit codes per 16) on
weights and activations (``quartz-w4a4``), on weights under INT8 activations (``quartz-w4a8``), or on activations
under INT4 (``quartz-a4``) or INT8 (``quartz-a4w8``) per-channel weights; their activations take their stage-1
scales per call (``quartz_static`` calibrates them once instead), and ``lzs_group``/``lzs_rounding`` in
:meth:`QuantConfig.from_scheme` pick the variant (16 and ``nearest`` by default).
"""

MIXED_SCHEMES: dict[str, tuple[str, tuple[int, ...]]] = {"w4-mixed": ("w4a8", (4, 8)), "w8-mixed": ("w8a8", (4, 8))}
"""Step-aware mixed precision (PTQD): the base scheme's weights, activation bit-width chosen per step."""

RECOMMENDED_METHODS: dict[str, str] = {"w4a4-g32": "gptq"}
"""The method a scheme gets when none is named (others: ``minmax``). Measured in BENCHMARKS.md ("W4A4"):
``fmnist-tiny`` W4A4-g32 FID 10.11 with GPTQ against 22.96 with ``mse``."""

DEFAULT_GUARD_DB = 3.0
"""What 8-bit activations may cost end to end, in dB of output PSNR to FP against the weight-only model."""

HIGH_PRECISION = "w8a8"
"""Scheme for layers the policy keeps at higher precision when the main scheme is lower."""

KEEP_8BIT_BY_ARCHITECTURE: dict[str, tuple[str, ...]] = {
    "UNet2DModel": ("conv_in", "conv_out", "time_embedding.*", "class_embedding"),
    "UNet2DConditionModel": ("conv_in", "conv_out", "time_embedding.*", "class_embedding", "add_embedding.*"),
    "DiTTransformer2DModel": ("pos_embed.proj", "proj_out*", "*.norm1.emb.*", "transformer_blocks.*.norm1.linear"),
    "PixArtTransformer2DModel": ("pos_embed.proj", "proj_out*", "adaln_single.*", "caption_projection.*"),
    "SD3Transformer2DModel": (
        "pos_embed.proj", "proj_out*", "time_text_embed.*", "context_embedder", "transformer_blocks.*.norm1.linear",
        "transformer_blocks.*.norm1_context.linear", "norm_out.linear",
    ),
    "FluxTransformer2DModel": (
        "x_embedder", "proj_out*", "time_text_embed.*", "context_embedder", "transformer_blocks.*.norm1.linear",
        "transformer_blocks.*.norm1_context.linear", "single_transformer_blocks.*.norm.linear", "norm_out.linear",
    ),
}
"""Per denoiser, the layers Q-Diffusion and PTQD keep at 8 bits: first and last layers, the time/class/text
embedding path (SDXL's added text-time embedding, PixArt's caption projection, SD3/FLUX's context embedder and
pooled-text embedding) and every adaLN modulation (DiT, PixArt's single shared one, SD3/FLUX per block and at the
output), whose errors shift every later feature."""

DEFAULT_KEEP_8BIT = tuple(dict.fromkeys(p for patterns in KEEP_8BIT_BY_ARCHITECTURE.values() for p in patterns))
"""The union of :data:`KEEP_8BIT_BY_ARCHITECTURE` (each pattern matches only its own architecture's names)."""


DEFAULT_FP_INPUT = ("conv_in", "pos_embed.proj", "x_embedder")
"""Layers that read the noisy sample x_t itself; by default their input stays in floating point (their weights
follow the scheme). One per-tensor range must cover x_t at every step, about ±5 at the first and ±1 at the last,
so an 8-bit grid (step 0.04 on ``fmnist-tiny``) drowns the small noise the model has to find at the late steps:
there, at W8A8, this one quantizer is 97% of the single-step ε error that activations cause. Q-Diffusion and
BRECQ quantize layer outputs, so they never quantize the network input either."""


@dataclass(frozen=True)
class LayerRule:
    """Override the scheme for layers whose qualified name matches ``pattern`` (fnmatch syntax).

    ``scheme`` is a scheme name from :data:`SCHEMES` or ``"fp"`` to leave the layer unquantized.
    """

    pattern: str
    scheme: str

    def __post_init__(self) -> None:
        if self.scheme != "fp" and self.scheme not in SCHEMES:
            raise ConfigError(
                f"layer rule {self.pattern!r} names unknown scheme {self.scheme!r}; use 'fp' or one of "
                f"{', '.join(SCHEMES)}"
            )


@dataclass(frozen=True)
class QuantConfig:
    """Everything that defines a quantized model.

    weight/activation: the main formats (activation None means weight-only).
    method: how ranges are found and what runs after round-to-nearest PTQ (see :data:`METHODS`).
    rules: per-layer overrides, first match wins; by default first/last layers and embeddings at 8 bits.
    quantize_attention: also quantize the attention matmuls (Q, K, V at the activation format, the softmax
    output with its own unsigned quantizer of ``softmax_bits``).
    split_shortcuts: separate quantizers for the two halves of concatenated UNet skip inputs.
    fp_inputs: layer-name patterns whose input is not quantized (weights still are); :meth:`from_scheme` puts
    the layers that read x_t here (:data:`DEFAULT_FP_INPUT`). Empty in folders made before the field existed.
    dynamic_activations: dynamic (per-call) ranges for every activation; dynamic_layers: for these layers only.
    outliers: per-layer outlier and drift handling (see :data:`OUTLIER_MODES`); what ``auto`` decided is stored
    in ``dynamic_layers``, ``fp_inputs``, ``rules`` and each layer's input treatment, so loading never re-decides.
    guard_db: end-to-end budget (dB of output PSNR to FP the activations may cost against the weight-only model,
    measured after calibration); over it, the costliest layer inputs go to FP (:mod:`qdiffuse.outliers.guard`).
    0 turns it off; :meth:`from_scheme` sets 3 dB for 8-bit activations.
    lowrank_rank: SVDQuant's float branch of this rank on every integer-weight layer at least 8× wider (0: none).
    quartz_static: QuaRTZ activations with one calibrated stage-1 scale per group of channels, shared by every
    token, instead of scales taken from each call's data (the default, as QuaRTZ's authors run it).
    calib_steps / calib_per_step: time-step-aware calibration counts (steps evenly spaced over the sampler).
    recon_*: block reconstruction of the ``qdiffusion`` methods: learned-rounding and step-size iterations per
    block, calibration rows per iteration and in all, the two Adam learning rates, AdaRound's regulariser weight,
    its β schedule (start, end) and warm-up fraction, ``auto`` (diffusers blocks) or ``layer`` units, and the folder
    where finished blocks are written and a rerun resumes from (None: no checkpoints). See
    :class:`qdiffuse.calibration.reconstruct.ReconstructionSettings`. ``recon_output_iters`` / ``recon_output_lr``:
    the network-level stage after the blocks (0: none; :mod:`qdiffuse.calibration.output_align`), with the
    ``mota`` weights for the ``mota`` methods.
    mota_*: the ``mota`` methods' objective, weights of the plain block target, of the higher-order (aligned)
    target and of the cosine term, whether the solver's intermediate points are calibration rows too, and at which
    stage the higher-order terms act (:data:`MOTA_ALIGN_AT`), and which rows decide the precision plan
    (:data:`MOTA_PLAN_DATA`); the target solver is ``calib_sampler`` at
    ``calib_num_inference_steps``, and every step point of it is used.
    """

    scheme: str
    weight: FormatSpec
    activation: FormatSpec | None
    method: str = "minmax"
    rules: tuple[LayerRule, ...] = ()
    quantize_attention: bool = True
    softmax_bits: int = 8
    split_shortcuts: bool = True
    fp_inputs: tuple[str, ...] = ()
    dynamic_activations: bool = False
    dynamic_layers: tuple[str, ...] = ()
    outliers: str = "auto"
    guard_db: float = 0.0
    lowrank_rank: int = 0
    quartz_static: bool = False
    mixed_activation_bits: tuple[int, ...] = ()
    calib_steps: int = 20
    calib_per_step: int = 32
    calib_sampler: str = STANDARD_CALIB_SAMPLER
    calib_num_inference_steps: int = STANDARD_CALIB_STEPS
    seed: int = 0
    recon_iters: int = 500
    recon_act_iters: int = 200
    recon_batch_size: int = 32
    recon_max_samples: int = 256
    recon_lr_round: float = 1e-3
    recon_lr_act: float = 4e-4
    recon_round_reg: float = 0.01
    recon_beta: tuple[float, float] = (20.0, 2.0)
    recon_warmup: float = 0.2
    recon_blocks: str = "auto"
    recon_checkpoint_dir: str | None = None
    recon_output_iters: int = 0
    recon_output_lr: float = 1e-3
    mota_block: float = 1.0
    mota_align: float = 1.0
    mota_cos: float = 0.1
    mota_intermediate: bool = True
    mota_align_at: str = "blocks"
    mota_plan_data: str = "standard"

    def __post_init__(self) -> None:
        for flag, value, low, high, low_open in (
            ("--guard-db", self.guard_db, 0.0, 1000.0, False),
            ("--recon-lr", self.recon_lr_round, 0.0, 10.0, True),
            ("--recon-act-lr", self.recon_lr_act, 0.0, 10.0, True),
            ("--recon-reg", self.recon_round_reg, 0.0, 1e6, False),
            ("--recon-beta", self.recon_beta[0] if self.recon_beta else 1.0, 0.0, 1e4, True),
            ("--recon-beta", self.recon_beta[-1] if self.recon_beta else 1.0, 0.0, 1e4, True),
            ("--recon-warmup", self.recon_warmup, 0.0, 1.0, False),
            ("--recon-output-lr", self.recon_output_lr, 0.0, 10.0, True),
            ("--mota-block", self.mota_block, 0.0, 1e6, False),
            ("--mota-align", self.mota_align, 0.0, 1e6, False),
            ("--mota-cos", self.mota_cos, 0.0, 1e6, False),
        ):
            check_number(value, flag, low, high, low_open)
        for flag, value, high in (
            ("--calib-steps", self.calib_steps, 10**5),
            ("--calib-per-step", self.calib_per_step, 10**6),
            ("--calib-inference-steps", self.calib_num_inference_steps, 10**5),
            ("--recon-iters", self.recon_iters, 10**7),
            ("--recon-act-iters", self.recon_act_iters, 10**7),
            ("--recon-batch-size", self.recon_batch_size, 10**6),
            ("--recon-samples", self.recon_max_samples, 10**7),
            ("--recon-output-iters", self.recon_output_iters, 10**7),
            ("--seed", self.seed, MAX_SEED),
        ):
            check_number(value, flag, 0, high, integer=True)
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.method in TRAJECTORY_METHODS:
            from qdiffuse.sampling.schedulers import HIGHER_ORDER_SAMPLERS

            if self.calib_sampler not in HIGHER_ORDER_SAMPLERS:
                raise ConfigError(
                    f"--method {self.method} aligns to a higher-order solver's direction and --calib-sampler "
                    f"{self.calib_sampler} has none; use one of {', '.join(HIGHER_ORDER_SAMPLERS)} (the sampler "
                    "you will sample with)"
                )
            if self.mota_block == self.mota_align == self.mota_cos == 0:
                raise ConfigError("--mota-block, --mota-align and --mota-cos are all 0; give one a positive weight")
            if self.mota_plan_data not in MOTA_PLAN_DATA:
                raise ConfigError(
                    f"--mota-plan-data {self.mota_plan_data!r} unknown; use one of {', '.join(MOTA_PLAN_DATA)}"
                )
            if self.mota_align_at not in MOTA_ALIGN_AT:
                raise ConfigError(
                    f"--mota-align-at {self.mota_align_at!r} unknown; use one of {', '.join(MOTA_ALIGN_AT)}"
                )
            if self.mota_align_at != "blocks" and self.recon_output_iters == 0:
                raise ConfigError(
                    f"--mota-align-at {self.mota_align_at} aligns the network output, which needs "
                    "--recon-output-iters > 0 (e.g. 200)"
                )
        if self.outliers not in OUTLIER_MODES:
            raise ConfigError(f"outlier handling {self.outliers!r} unknown; use {' or '.join(OUTLIER_MODES)}")
        if not 0 <= self.lowrank_rank <= 1024:
            raise ConfigError(f"low-rank branch rank {self.lowrank_rank} must lie in 0..1024 (0: no branch)")
        if not (self.guard_db >= 0 and self.guard_db < float("inf")):
            raise ConfigError(f"guard budget {self.guard_db} dB must be a finite number >= 0 (0 turns it off)")
        if self.softmax_bits != 8:
            raise ConfigError(
                f"softmax_bits={self.softmax_bits} is not supported; the softmax output uses an unsigned 8-bit grid"
            )
        if self.mixed_activation_bits and (self.activation is None or self.activation.kind != "int"):
            raise ConfigError("mixed activation bit-widths need integer activations; use --scheme w4-mixed")
        if any(not 2 <= b <= 8 for b in self.mixed_activation_bits):
            raise ConfigError(f"mixed activation bits {self.mixed_activation_bits} out of range; use 2 to 8")
        if self.calib_steps < 1 or self.calib_per_step < 1:
            raise ConfigError("calibration counts must be positive; use e.g. --calib-steps 20 --calib-per-step 32")
        if self.recon_iters < 0 or self.recon_act_iters < 0 or self.recon_batch_size < 1:
            raise ConfigError(
                "reconstruction needs iterations >= 0 and a positive batch size; use e.g. --recon-iters 500"
            )
        if self.recon_max_samples < 1:
            raise ConfigError("reconstruction needs at least one calibration row; use e.g. --recon-samples 256")
        if self.recon_lr_round <= 0 or self.recon_lr_act <= 0 or self.recon_round_reg < 0:
            raise ConfigError("reconstruction learning rates must be > 0 and the regulariser >= 0")
        if len(self.recon_beta) != 2 or min(self.recon_beta) <= 0:
            raise ConfigError(
                f"reconstruction beta {self.recon_beta} must be two positive numbers, e.g. --recon-beta 20,2"
            )
        if not 0.0 <= self.recon_warmup < 1.0:
            raise ConfigError(f"reconstruction warm-up {self.recon_warmup} must lie in [0, 1)")
        if self.recon_blocks not in RECON_UNITS:
            raise ConfigError(
                f"reconstruction units {self.recon_blocks!r} unknown; use {' or '.join(RECON_UNITS)}"
            )

    @classmethod
    def from_scheme(
        cls,
        scheme: str,
        method: str | None = None,
        keep_8bit: tuple[str, ...] | None = DEFAULT_KEEP_8BIT,
        keep_fp: tuple[str, ...] = (),
        fp_inputs: tuple[str, ...] = DEFAULT_FP_INPUT,
        lzs_group: int | None = None,
        lzs_rounding: str | None = None,
        quartz_fit_lzs: bool | None = None,
        **kwargs: Any,
    ) -> QuantConfig:
        """Build a config from a scheme name, with the default layer policy unless told otherwise: first/last
        layers and embeddings at 8 bits below 8 bits, and a floating-point x_t input to the first layer.
        ``method=None`` takes the scheme's recommended method (:data:`RECOMMENDED_METHODS`). ``lzs_group`` and
        ``lzs_rounding`` (and ``quartz_fit_lzs=False``, plain min–max stage-1 scales) set the QuaRTZ variant of a
        ``quartz-*`` scheme's QuaRTZ formats."""
        method = RECOMMENDED_METHODS.get(scheme, "minmax") if method is None else method
        unknown = sorted(set(kwargs) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"unknown quantization settings {unknown}; see QuantConfig's fields")
        if scheme in MIXED_SCHEMES:
            base, bits = MIXED_SCHEMES[scheme]
            kwargs.setdefault("mixed_activation_bits", bits)
            weight, activation = SCHEMES[base]
        elif scheme in SCHEMES:
            weight, activation = SCHEMES[scheme]
        else:
            raise ConfigError(f"unknown scheme {scheme!r}; use one of {', '.join([*SCHEMES, *MIXED_SCHEMES])}")
        weight, activation = _quartz_variant(scheme, weight, activation, lzs_group, lzs_rounding, quartz_fit_lzs)
        rules = [LayerRule(p, "fp") for p in keep_fp]
        if keep_8bit and _is_below_8bit(weight, activation):
            rules += [LayerRule(p, HIGH_PRECISION) for p in keep_8bit]
        fp_inputs = tuple(fp_inputs) if activation is not None else ()
        if activation is not None and activation.kind == "int" and activation.bits >= 8 and scheme not in MIXED_SCHEMES:
            kwargs.setdefault("guard_db", DEFAULT_GUARD_DB)
        if method in TRAJECTORY_METHODS:
            kwargs.setdefault("recon_output_iters", MOTA_OUTPUT_ITERS)
            kwargs.setdefault("mota_align_at", "output" if kwargs["recon_output_iters"] > 0 else "blocks")
        return cls(
            scheme=scheme,
            weight=weight,
            activation=activation,
            method=method,
            rules=tuple(rules),
            fp_inputs=fp_inputs,
            **kwargs,
        )

    @property
    def observer(self) -> str:
        """Range search used for weights and activations."""
        return self.method if self.method in ("minmax", "mse") else "mse"

    @property
    def reconstructs(self) -> bool:
        """Block reconstruction after round-to-nearest PTQ."""
        return self.method in RECONSTRUCTING_METHODS

    @property
    def aligns_trajectory(self) -> bool:
        """MOTA: calibration on the target solver's trajectories, reconstruction toward its direction."""
        return self.method in TRAJECTORY_METHODS

    @property
    def uses_gptq(self) -> bool:
        """Integer weights rounded by GPTQ instead of to nearest (on the observer's grids)."""
        return self.method in ("gptq", "gptq+ptqd")

    @property
    def corrects_bias(self) -> bool:
        """Empirical bias correction of every quantized layer after round-to-nearest PTQ."""
        return self.method in BIAS_CORRECTING_METHODS

    @property
    def corrects_noise(self) -> bool:
        """PTQD statistics measured at quantization time, corrections applied at sampling time."""
        return self.method in NOISE_CORRECTING_METHODS

    def rule_for(self, layer_name: str) -> LayerRule | None:
        """The first rule matching ``layer_name`` (None: the layer follows the main scheme)."""
        return next((r for r in self.rules if fnmatch.fnmatchcase(layer_name, r.pattern)), None)

    def formats_for(self, layer_name: str) -> tuple[FormatSpec, FormatSpec | None] | None:
        """The (weight, activation) formats of one layer, or None to keep it in full precision."""
        rule = self.rule_for(layer_name)
        if rule is not None and rule.scheme == "fp":
            return None
        weight, activation = (self.weight, self.activation) if rule is None else SCHEMES[rule.scheme]
        if self.activation is None or self.has_fp_input(layer_name):
            activation = None
        return weight, activation

    def is_dynamic(self, layer_name: str) -> bool:
        """Whether the layer's input range is computed per call rather than calibrated (QuaRTZ activations are,
        unless ``quartz_static``)."""
        if self.dynamic_activations or layer_name in self.dynamic_layers:
            return True
        formats = self.formats_for(layer_name)
        act = formats[1] if formats else None
        return act is not None and act.kind == "quartz" and not self.quartz_static

    def has_fp_input(self, layer_name: str) -> bool:
        """True where the layer's input stays in floating point (see :data:`DEFAULT_FP_INPUT`)."""
        return any(fnmatch.fnmatchcase(layer_name, p) for p in self.fp_inputs)

    def activation_variants(self, layer_name: str) -> dict[str, FormatSpec] | None:
        """Per-step activation formats of a layer on the main scheme (None: one format, e.g. kept at 8 bits)."""
        if (
            not self.mixed_activation_bits
            or self.activation is None
            or self.rule_for(layer_name) is not None
            or self.has_fp_input(layer_name)
        ):
            return None
        return {f"a{b}": replace(self.activation, bits=b) for b in sorted(self.mixed_activation_bits)}

    def softmax_spec(self) -> FormatSpec:
        return FormatSpec(kind="int", bits=self.softmax_bits, unsigned=True, symmetric=False)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["weight"] = self.weight.to_dict()
        data["activation"] = self.activation.to_dict() if self.activation else None
        data["rules"] = [asdict(r) for r in self.rules]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        try:
            data = dict(data)
            data["weight"] = FormatSpec.from_dict(data["weight"])
            data["activation"] = FormatSpec.from_dict(data["activation"]) if data.get("activation") else None
            data["rules"] = tuple(LayerRule(**r) for r in data.get("rules", []))
            data["mixed_activation_bits"] = tuple(data.get("mixed_activation_bits", ()))
            data["fp_inputs"] = tuple(data.get("fp_inputs", ()))
            data["dynamic_layers"] = tuple(data.get("dynamic_layers", ()))
            if "recon_beta" in data:
                data["recon_beta"] = tuple(data["recon_beta"])
            return cls(**data)
        except (KeyError, TypeError) as exc:
            raise ConfigError(f"malformed quantization config ({exc}); re-run qdiffuse quantize") from None

    def with_overrides(self, **kwargs: Any) -> QuantConfig:
        return replace(self, **kwargs)


def _quartz_variant(
    scheme: str,
    weight: FormatSpec,
    activation: FormatSpec | None,
    lzs_group: int | None,
    rounding: str | None,
    fit_lzs: bool | None,
) -> tuple[FormatSpec, FormatSpec | None]:
    """The scheme's formats with the requested QuaRTZ variant (an error for a scheme without QuaRTZ)."""
    if lzs_group is None and rounding is None and fit_lzs is None:
        return weight, activation
    if "quartz" not in (weight.kind, activation.kind if activation else None):
        raise ConfigError(f"scheme {scheme!r} has no QuaRTZ format; --lzs-group/--lzs-rounding need a quartz-* scheme")
    changes: dict[str, Any] = {}
    if lzs_group is not None:
        changes["lzs_group"] = lzs_group
    if rounding is not None:
        changes["rounding"] = rounding
    if fit_lzs is not None:
        changes["fit_lzs"] = bool(fit_lzs)

    def pick(spec: FormatSpec | None) -> FormatSpec | None:
        return replace(spec, **changes) if spec is not None and spec.kind == "quartz" else spec

    new_weight = pick(weight)
    assert new_weight is not None
    return new_weight, pick(activation)


def _is_below_8bit(weight: FormatSpec, activation: FormatSpec | None) -> bool:
    bits = [weight.value_bits] + ([activation.value_bits] if activation else [])
    return min(bits) < 8


__all__ = [
    "SCHEMES",
    "MIXED_SCHEMES",
    "METHODS",
    "RECONSTRUCTING_METHODS",
    "NOISE_CORRECTING_METHODS",
    "TRAJECTORY_METHODS",
    "BIAS_CORRECTING_METHODS",
    "RECON_UNITS",
    "MOTA_ALIGN_AT",
    "MOTA_PLAN_DATA",
    "MOTA_OUTPUT_ITERS",
    "STANDARD_CALIB_SAMPLER",
    "STANDARD_CALIB_STEPS",
    "OUTLIER_MODES",
    "RECOMMENDED_METHODS",
    "QuantConfig",
    "LayerRule",
    "DEFAULT_KEEP_8BIT",
    "KEEP_8BIT_BY_ARCHITECTURE",
    "DEFAULT_FP_INPUT",
]
