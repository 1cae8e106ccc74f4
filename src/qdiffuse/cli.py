"""The ``qdiffuse`` command line.

Every user error is a :class:`~qdiffuse.errors.QDiffuseError` or a usage error: printed as one line on stderr
with exit code 2, no traceback, and no output file left behind (outputs are written atomically).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from qdiffuse import interrupts
from qdiffuse.errors import ConfigError, QDiffuseError
from qdiffuse.interrupts import Terminated
from qdiffuse.sampling.schedulers import SAMPLER_HELP

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Noise-aware post-training quantization of diffusion models.",
)

Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")]
Device = Annotated[str, typer.Option(help="cpu, cuda or auto.")]
Dtype = Annotated[
    str,
    typer.Option(
        help="Compute dtype: auto (a folder's own: the dtype its weights are stored in, fp16 on a CPU as fp32, or "
        "the one a quantized folder records), fp32, bf16 or fp16 (bf16 is the CPU's half precision)."
    ),
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
NoVerify = Annotated[
    bool,
    typer.Option(
        "--no-verify", help="Load a quantized folder without checking its content hashes (its claims still are)."
    ),
]
Runtime = Annotated[
    str,
    typer.Option(
        help="How a quantized folder runs: real (packed weights on INT8/FP8/INT4 kernels; layers without a kernel "
        "fall back to simulated compute, reported) or simulated (float weights, fake quantization)."
    ),
]


def parse_labels(text: str | None) -> tuple[int, ...] | None:
    """'0-9' or '1,3,5-7' -> (0, ..., 9) / (1, 3, 5, 6, 7)."""
    if text is None or text == "":
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, sep, hi = part.strip().partition("-")
            if sep:
                out.extend(range(int(lo), int(hi) + 1))
            else:
                out.append(int(lo))
    except ValueError:
        raise ConfigError(f"--labels {text!r} is not a list like '0-9' or '1,3,5'") from None
    if not out:
        raise ConfigError(f"--labels {text!r} names no class; use e.g. '0-9'")
    return tuple(out)


def parse_pair(text: str, flag: str) -> tuple[float, float]:
    """'20,2' -> (20.0, 2.0)."""
    try:
        first, second = (float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"{flag} {text!r} is not two numbers like '20,2'") from None
    return first, second


def _input_paths(*sources: str | Path | None) -> list[Path]:
    """The command's inputs that are files or folders on disk (built-in names are not): never valid outputs."""
    return [Path(s) for s in sources if s is not None and Path(s).exists()]


def check_sampler(name: str, flag: str) -> None:
    """Reject an unknown sampler name before any model is loaded."""
    from qdiffuse.sampling.schedulers import SAMPLERS

    if name not in SAMPLERS:
        raise ConfigError(f"unknown {flag} {name!r}; use one of {', '.join(SAMPLERS)}")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"--device {device!r} is unknown; use cpu, cuda or auto")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return device


def _setup(quiet: bool) -> None:
    from qdiffuse.progress import set_progress_enabled

    set_progress_enabled(not quiet)


def load_condition(path: Path | None):  # noqa: ANN201 - Tensor | None
    if path is None:
        return None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"--condition {path} is not a readable safetensors file ({exc})") from None
    if "encoder_hidden_states" not in tensors:
        raise ConfigError(
            f"--condition {path} needs a tensor named 'encoder_hidden_states' ([seq, dim] or [N, seq, dim])"
        )
    return tensors["encoder_hidden_states"].float()


@app.command()
def quantize(
    model: Annotated[str, typer.Argument(help="Built-in model name or diffusers folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for the quantized model.")],
    scheme: Annotated[
        str,
        typer.Option(
            help="w8a8, w4a8, w4a4, w4a4-g32, w8a16, w4a16, fp8, nvfp4, mxfp4, nvfp4-w4a8, mxfp4-w4a8 (FP4 weights, "
            "INT8 activations), quartz-w4a4 (QuaRTZ weights and activations), quartz-w4a8 (QuaRTZ weights, INT8 "
            "activations), quartz-a4 / quartz-a4w8 (QuaRTZ activations, INT4 / INT8 weights), w4-mixed, w8-mixed."
        ),
    ] = "w8a8",
    method: Annotated[
        str | None,
        typer.Option(
            help="minmax, mse, mse+bias (mse + bias correction), ptqd (mse + noise correction), qdiffusion "
            "(mse + reconstruction), qdiffusion+ptqd (both), gptq (mse + GPTQ weight rounding, a fast "
            "alternative to reconstruction), gptq+ptqd (gptq + noise correction), mota (reconstruction aligned to "
            "the higher-order solver given by --calib-sampler/--calib-inference-steps) or mota+ptqd. Default: the "
            "scheme's recommended method (gptq for w4a4-g32, minmax otherwise)."
        ),
    ] = None,
    calib_steps: Annotated[int, typer.Option(help="Sampler steps to take calibration inputs from.")] = 20,
    calib_per_step: Annotated[int, typer.Option(help="Trajectories (inputs per calibration step).")] = 32,
    calib_sampler: Annotated[
        str | None,
        typer.Option(help="Sampler that generates calibration data (mota: the solver you will sample with). "
                     "Default: ddim; a pipeline's own scheduler for pipeline folders."),
    ] = None,
    calib_inference_steps: Annotated[int, typer.Option(help="Steps of that sampler.")] = 50,
    guidance: Annotated[
        float | None,
        typer.Option(help="Guidance you will sample with (calibrates both halves). Default 1; a pipeline's own."),
    ] = None,
    prompts: Annotated[
        Path | None, typer.Option(help="Pipeline folders: calibration prompts, one per line (default: a built-in set).")
    ] = None,
    labels: Annotated[str | None, typer.Option(help="Classes to calibrate on, e.g. 0-9.")] = None,
    keep_fp: Annotated[list[str] | None, typer.Option(help="Layer-name pattern to keep in full precision.")] = None,
    no_keep_8bit: Annotated[bool, typer.Option("--no-keep-8bit", help="Quantize first/last layers too.")] = False,
    quantize_input: Annotated[
        bool,
        typer.Option(
            "--quantize-input", help="Also quantize the noisy sample x_t entering the first layer (FP by default)."
        ),
    ] = False,
    dynamic: Annotated[bool, typer.Option("--dynamic", help="Dynamic (per-call) activation ranges.")] = False,
    outliers: Annotated[
        str,
        typer.Option(help="auto: per-layer smoothing, dynamic ranges or FP outlier channels where the calibration "
                     "data needs them; off: one grid per layer."),
    ] = "auto",
    guard_db: Annotated[
        float | None,
        typer.Option(help="Largest output PSNR loss (dB) the activations may cost against the weight-only model; "
                     "over it the costliest inputs go to FP (default 3 for 8-bit activations, 0 = off)."),
    ] = None,
    lowrank_rank: Annotated[
        int, typer.Option(help="SVDQuant: a float branch of this rank on every wide integer-weight layer (0: none).")
    ] = 0,
    lzs_group: Annotated[
        int | None, typer.Option(help="quartz-*: values per leading-zero-suppression flag, 16 (default) or 32.")
    ] = None,
    lzs_rounding: Annotated[
        str | None,
        typer.Option(help="quartz-*: nearest (default; the authors' code) or truncate (the paper) when suppressing."),
    ] = None,
    quartz_static: Annotated[
        bool,
        typer.Option("--quartz-static", help="quartz-*: calibrated stage-1 activation scales instead of per call."),
    ] = False,
    quartz_plain_minmax: Annotated[
        bool,
        typer.Option(
            "--quartz-plain-minmax",
            help="quartz-*: stage-1 scales map each group's max to 127 (plain min-max) instead of 112, the largest "
            "code LZS keeps; an ablation (LZS then shrinks every group's max by 12%).",
        ),
    ] = False,
    no_attention: Annotated[bool, typer.Option("--no-attention", help="Leave attention matmuls in FP.")] = False,
    no_split: Annotated[bool, typer.Option("--no-split", help="No shortcut splitting.")] = False,
    condition: Annotated[Path | None, typer.Option(help="safetensors with encoder_hidden_states.")] = None,
    analysis_num: Annotated[int, typer.Option(help="ptqd: trajectories for the noise statistics.")] = 64,
    analysis_eta: Annotated[float, typer.Option(help="ptqd: eta of the sampling setting analysed.")] = 0.0,
    snr_margin: Annotated[float, typer.Option(help="Mixed precision: low bits where SNR_Q >= margin*SNR_F.")] = 1.0,
    recon_iters: Annotated[int, typer.Option(help="qdiffusion: learned-rounding iterations per block.")] = 500,
    recon_act_iters: Annotated[
        int, typer.Option(help="qdiffusion: activation step-size iterations per block (0: keep the ranges).")
    ] = 200,
    recon_batch_size: Annotated[int, typer.Option(help="qdiffusion: calibration rows per iteration.")] = 32,
    recon_samples: Annotated[int, typer.Option(help="qdiffusion: calibration rows used in all.")] = 256,
    recon_lr: Annotated[float, typer.Option(help="qdiffusion: learning rate of the rounding variables.")] = 1e-3,
    recon_act_lr: Annotated[float, typer.Option(help="qdiffusion: learning rate of the step sizes.")] = 4e-4,
    recon_reg: Annotated[float, typer.Option(help="qdiffusion: weight of AdaRound's rounding regulariser.")] = 0.01,
    recon_beta: Annotated[str, typer.Option(help="qdiffusion: regulariser beta, start,end.")] = "20,2",
    recon_warmup: Annotated[float, typer.Option(help="qdiffusion: fraction of iterations without it.")] = 0.2,
    recon_blocks: Annotated[str, typer.Option(help="qdiffusion: auto (diffusers blocks) or layer.")] = "auto",
    checkpoint_dir: Annotated[
        Path | None, typer.Option(help="qdiffusion: save finished blocks here and resume from them.")
    ] = None,
    recon_output_iters: Annotated[
        int | None,
        typer.Option(help="qdiffusion/mota: network-output stage iterations after the blocks (0: none; default "
                     "200 for mota, 0 otherwise)."),
    ] = None,
    recon_output_lr: Annotated[float, typer.Option(help="qdiffusion/mota: its learning rate (log space).")] = 1e-3,
    mota_block: Annotated[float, typer.Option(help="mota: weight of the plain block target.")] = 1.0,
    mota_align: Annotated[float, typer.Option(help="mota: weight of the higher-order (aligned) target.")] = 1.0,
    mota_cos: Annotated[float, typer.Option(help="mota: weight of the cosine term on the aligned target.")] = 0.1,
    mota_align_at: Annotated[
        str | None,
        typer.Option(help="mota: where the higher-order terms act: blocks, output (needs --recon-output-iters), "
                     "both (default: output, or blocks with --recon-output-iters 0)."),
    ] = None,
    mota_plan_data: Annotated[
        str,
        typer.Option(help="mota: rows that decide outlier treatments, guard and ranges: standard (qdiffusion's "
                     "schedule-wide set) or trajectory (the solver's own rows)."),
    ] = "standard",
    no_mota_intermediate: Annotated[
        bool, typer.Option("--no-mota-intermediate", help="mota: step points only, no intermediate-point rows.")
    ] = False,
    seed: int = 0,
    batch_size: int = 64,
    device: Device = "auto",
    dtype: Dtype = "auto",
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Quantize a model with time-step-aware calibration and save it as a folder."""
    _setup(quiet)
    from qdiffuse.models.dtypes import parse_dtype

    parse_dtype(dtype)
    from qdiffuse.config import DEFAULT_FP_INPUT, DEFAULT_KEEP_8BIT, QuantConfig
    from qdiffuse.fsutil import QUANTIZED_FOLDER, check_output_path
    from qdiffuse.pipeline import quantize_folder
    from qdiffuse.pipelines.commands import is_pipeline_folder
    from qdiffuse.sampling.loop import SampleRequest

    pipeline = is_pipeline_folder(model)
    if calib_sampler is not None:
        check_sampler(calib_sampler, "--calib-sampler")
    if guidance is None:
        from qdiffuse.pipelines.commands import default_guidance

        guidance = default_guidance(model) if pipeline else 1.0
    if prompts is not None and not pipeline:
        raise ConfigError("--prompts calibrates pipeline folders (model_index.json); this model takes --labels")
    config = QuantConfig.from_scheme(
        scheme,
        method=method,
        keep_8bit=None if no_keep_8bit else DEFAULT_KEEP_8BIT,
        keep_fp=tuple(keep_fp or ()),
        fp_inputs=() if quantize_input else DEFAULT_FP_INPUT,
        quantize_attention=not no_attention,
        split_shortcuts=not no_split,
        dynamic_activations=dynamic,
        lzs_group=lzs_group,
        lzs_rounding=lzs_rounding,
        quartz_fit_lzs=False if quartz_plain_minmax else None,
        quartz_static=quartz_static,
        outliers=outliers,
        lowrank_rank=lowrank_rank,
        **({} if guard_db is None else {"guard_db": guard_db}),
        calib_steps=calib_steps,
        calib_per_step=calib_per_step,
        calib_sampler=calib_sampler or "ddim",
        calib_num_inference_steps=calib_inference_steps,
        seed=seed,
        recon_iters=recon_iters,
        recon_act_iters=recon_act_iters,
        recon_batch_size=recon_batch_size,
        recon_max_samples=recon_samples,
        recon_lr_round=recon_lr,
        recon_lr_act=recon_act_lr,
        recon_round_reg=recon_reg,
        recon_beta=parse_pair(recon_beta, "--recon-beta"),
        recon_warmup=recon_warmup,
        recon_blocks=recon_blocks,
        recon_checkpoint_dir=None if checkpoint_dir is None else str(checkpoint_dir),
        **({} if recon_output_iters is None else {"recon_output_iters": recon_output_iters}),
        recon_output_lr=recon_output_lr,
        mota_block=mota_block,
        mota_align=mota_align,
        mota_cos=mota_cos,
        mota_intermediate=not no_mota_intermediate,
        **({} if mota_align_at is None else {"mota_align_at": mota_align_at}),
        mota_plan_data=mota_plan_data,
    )
    check_output_path(out, overwrite, QUANTIZED_FOLDER, inputs=_input_paths(model, condition))
    if checkpoint_dir is not None and checkpoint_dir.exists() and not checkpoint_dir.is_dir():
        raise ConfigError(f"--checkpoint-dir {checkpoint_dir} is a file; pass a folder (created if missing)")
    if pipeline:
        from qdiffuse.pipelines.commands import quantize_pipeline_folder

        quantize_pipeline_folder(
            model, out, config, prompts, guidance=guidance, steps=calib_inference_steps, sampler=calib_sampler,
            overwrite=overwrite, device=resolve_device(device), dtype=dtype,
        )
        return
    label_list = parse_labels(labels)
    analysis = SampleRequest(
        num=analysis_num,
        steps=calib_inference_steps,
        sampler=calib_sampler or "ddim",
        eta=analysis_eta,
        seed=seed + 7919,
        labels=label_list,
        guidance=guidance,
        batch_size=batch_size,
    )
    loaded = quantize_folder(
        model,
        out,
        config,
        guidance=guidance,
        labels=label_list,
        cond=load_condition(condition),
        batch_size=batch_size,
        device=resolve_device(device),
        overwrite=overwrite,
        analysis=analysis,
        snr_margin=snr_margin,
        dtype=dtype,
    )
    from qdiffuse.api import quant_state
    from qdiffuse.outliers.commands import decision_lines

    state = quant_state(loaded.denoiser.model)
    calibration = state.calibration if state else {}
    if not quiet:  # -q: the decisions stay in the folder, for `qdiffuse info`
        for line in decision_lines(calibration):
            typer.echo(line)
    guard = calibration.get("guard")
    if guard and not guard["within_budget"]:
        loss = guard["weight_only_db"] - guard["after_db"]
        typer.echo(
            f"warning: the activations still cost {loss:.1f} dB of output PSNR against the weight-only model "
            f"(budget {guard['budget_db']:g} dB); `qdiffuse sensitivity {model} --scheme {config.scheme}` shows "
            "where",
            err=True,
        )
    typer.echo(f"wrote {out} ({config.scheme}, {config.method})")


@app.command()
def sample(
    model: Annotated[str, typer.Argument(help="Built-in name, diffusers folder or quantized folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output .npz (arr_0 uint8 NHWC, labels).")],
    num: Annotated[int, typer.Option("--num", "-n", help="Number of images.")] = 64,
    steps: int = 50,
    sampler: Annotated[
        str | None, typer.Option(help=SAMPLER_HELP + " Default: ddim; a pipeline's own scheduler for pipelines.")
    ] = None,
    eta: Annotated[float, typer.Option(help="DDIM eta (0 deterministic, 1 DDPM-like).")] = 0.0,
    seed: int = 0,
    labels: Annotated[str | None, typer.Option(help="Classes to cycle through, e.g. 0-9.")] = None,
    guidance: Annotated[
        float | None, typer.Option(help="Classifier-free guidance scale (1: none). Default 1; a pipeline's own.")
    ] = None,
    prompt: Annotated[str | None, typer.Option(help="Pipelines: the text to generate from.")] = None,
    prompts: Annotated[Path | None, typer.Option(help="Pipelines: prompts to cycle through, one per line.")] = None,
    grid: Annotated[Path | None, typer.Option(help="Also write a PNG grid.")] = None,
    condition: Annotated[Path | None, typer.Option(help="safetensors with encoder_hidden_states.")] = None,
    ptqd: Annotated[
        bool | None, typer.Option("--ptqd/--no-ptqd", help="PTQD corrections (default: on for ptqd methods).")
    ] = None,
    no_k: Annotated[bool, typer.Option("--no-k-correction", help="Ablation: keep the correlated part.")] = False,
    no_bias: Annotated[bool, typer.Option("--no-bias-correction", help="Ablation: keep the bias.")] = False,
    no_variance: Annotated[
        bool, typer.Option("--no-variance-calibration", help="Ablation: keep the sampler's noise.")
    ] = False,
    fp_model: Annotated[str | None, typer.Option("--fp", help="FP model, if statistics must be measured.")] = None,
    batch_size: int = 64,
    runtime: Runtime = "real",
    device: Device = "auto",
    dtype: Dtype = "auto",
    overwrite: Overwrite = False,
    no_verify: NoVerify = False,
    quiet: Quiet = False,
) -> None:
    """Sample images; the same seed gives the same noise for FP and quantized models."""
    _setup(quiet)
    from qdiffuse.models.dtypes import parse_dtype

    parse_dtype(dtype)
    from qdiffuse.api import quant_state
    from qdiffuse.fsutil import PNG, SAMPLES, check_output_path
    from qdiffuse.imageio import save_grid, save_samples
    from qdiffuse.noise.correction import PTQDOptions
    from qdiffuse.pipeline import load_any, sampling_hooks
    from qdiffuse.sampling.loop import SampleRequest, to_uint8

    if sampler is not None:
        check_sampler(sampler, "--sampler")
    from qdiffuse.pipelines.commands import is_pipeline_folder

    if is_pipeline_folder(model):
        from qdiffuse.pipelines.commands import default_guidance, sample_pipeline_folder

        sample_pipeline_folder(
            model, out, prompt=prompt, prompts=prompts, num=num, steps=steps, sampler=sampler,
            guidance=default_guidance(model) if guidance is None else guidance, seed=seed, batch_size=batch_size,
            grid=grid,
            overwrite=overwrite, device=resolve_device(device), runtime=runtime, verify=not no_verify, dtype=dtype,
        )
        return
    if prompt is not None or prompts is not None:
        raise ConfigError("--prompt/--prompts drive pipeline folders (model_index.json); this model takes --labels")
    sampler = sampler or "ddim"
    guidance = 1.0 if guidance is None else guidance
    request = SampleRequest(
        num=num,
        steps=steps,
        sampler=sampler,
        eta=eta,
        seed=seed,
        labels=parse_labels(labels),
        guidance=guidance,
        batch_size=batch_size,
    )
    inputs = _input_paths(model, condition, fp_model)
    from qdiffuse.distributed.world import detect
    from qdiffuse.kernels import check_runtime, runtime_report
    from qdiffuse.sampling.loop import sample as run_sample

    def check_outputs() -> None:
        check_output_path(out, overwrite, SAMPLES, inputs)
        if grid is not None:
            check_output_path(grid, overwrite, PNG, inputs)

    def load(device: str):  # noqa: ANN202 - (loaded model, batch sampler)
        loaded = load_any(model, device, runtime, verify=not no_verify, dtype=dtype)
        cond = load_condition(condition)
        options = PTQDOptions(correct_k=not no_k, correct_bias=not no_bias, calibrate_variance=not no_variance)
        hooks = sampling_hooks(
            model, loaded, request, ptqd=ptqd, options=options, fp_model=fp_model, cond=cond, device=device
        )

        def sample_batches(batches: list[int] | None):  # noqa: ANN202 - (uint8 images, labels)
            images, image_labels = run_sample(
                loaded.denoiser, loaded.scheduler_config, request, cond, batches=batches, **hooks
            )
            return to_uint8(images).numpy(), None if image_labels is None else image_labels.numpy()

        return loaded, sample_batches

    def write(arr, image_labels) -> None:  # noqa: ANN001
        save_samples(out, arr, image_labels, overwrite, inputs)
        if grid is not None:
            save_grid(grid, arr, overwrite, inputs=inputs)
        typer.echo(f"wrote {out} ({arr.shape[0]} images)")

    check_runtime(runtime)
    world = detect()
    if world.launched:
        from qdiffuse.distributed.commands import sample_launched

        if not world.is_main:
            _setup(True)
        command = {
            "out": str(out), "num": num, "steps": steps, "sampler": sampler, "eta": eta, "seed": seed,
            "labels": labels, "guidance": guidance, "grid": None if grid is None else str(grid),
            "condition": None if condition is None else str(condition), "ptqd": ptqd, "no_k": no_k,
            "no_bias": no_bias, "no_variance": no_variance, "fp_model": fp_model, "batch_size": batch_size,
            "runtime": runtime, "overwrite": overwrite, "world_size": world.size,
        }
        sample_launched(
            world, model=model, out=out, request=request, device=resolve_device(device), command=command,
            check_outputs=check_outputs, load=load, write=write,
        )
        return
    check_outputs()
    loaded, sample_batches = load(resolve_device(device))
    arr, image_labels = sample_batches(None)
    write(arr, image_labels)
    if quant_state(loaded.denoiser.model) is not None:
        typer.echo(runtime_report(loaded.denoiser.model).summary())


@app.command()
def analyze(
    folder: Annotated[Path, typer.Argument(help="A quantized model folder or quantized pipeline folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Report folder (plots, JSON, Markdown).")],
    num: Annotated[int, typer.Option("--num", "-n", help="FP trajectories to measure on.")] = 64,
    steps: int = 50,
    sampler: Annotated[
        str | None, typer.Option(help="Sampler you will sample with. Default: ddim; a pipeline's own scheduler.")
    ] = None,
    eta: float = 0.0,
    guidance: Annotated[
        float | None, typer.Option(help="Guidance you will sample with. Default 1; a pipeline's own.")
    ] = None,
    prompts: Annotated[
        Path | None, typer.Option("--prompts", help="Pipelines: prompt file, one per line (cycled to --num).")
    ] = None,
    labels: Annotated[str | None, typer.Option(help="Classes, e.g. 0-9.")] = None,
    seed: int = 0,
    fp_model: Annotated[str | None, typer.Option("--fp", help="FP model (default: the folder's source).")] = None,
    condition: Annotated[Path | None, typer.Option(help="safetensors with encoder_hidden_states.")] = None,
    batch_size: int = 64,
    device: Device = "auto",
    overwrite: Overwrite = False,
    no_verify: NoVerify = False,
    quiet: Quiet = False,
) -> None:
    """Measure PTQD noise statistics per step, store them in the folder and write a report."""
    _setup(quiet)

    from qdiffuse.fsutil import REPORT_FOLDER, atomic_dir, check_output_path
    from qdiffuse.io import is_quantized_folder
    from qdiffuse.noise.correction import PTQDCorrector
    from qdiffuse.noise.pipeline import analyze_quantized
    from qdiffuse.noise.precision import PlanSwitcher, load_plan
    from qdiffuse.noise.report import write_analysis
    from qdiffuse.noise.store import save_stats
    from qdiffuse.pipelines.store import is_quantized_pipeline
    from qdiffuse.sampling.loop import SampleRequest
    from qdiffuse.sampling.loop import sample as run_sample

    if is_quantized_pipeline(folder):
        from qdiffuse.pipelines.commands import analyze_pipeline_folder, default_guidance

        analyze_pipeline_folder(
            folder, out, prompts_file=prompts, num=num, steps=steps, sampler=sampler,
            guidance=default_guidance(folder) if guidance is None else guidance, seed=seed, fp=fp_model,
            batch_size=batch_size,
            overwrite=overwrite, device=resolve_device(device), verify=not no_verify,
        )
        return
    if prompts is not None:
        raise ConfigError("--prompts is for quantized pipeline folders; this model takes --labels")
    sampler = sampler or "ddim"
    guidance = 1.0 if guidance is None else guidance
    if not is_quantized_folder(folder):
        raise ConfigError(f"{folder} is not a quantized model folder (no quantization.json); run qdiffuse quantize")
    check_sampler(sampler, "--sampler")
    inputs = _input_paths(str(folder), condition, fp_model)
    check_output_path(out, overwrite, REPORT_FOLDER, inputs)
    device = resolve_device(device)
    request = SampleRequest(
        num=num, steps=steps, sampler=sampler, eta=eta, seed=seed, labels=parse_labels(labels),
        guidance=guidance, batch_size=batch_size,
    )
    cond = load_condition(condition)
    stats = analyze_quantized(folder, request, fp_model, cond, device, verify=not no_verify)
    corrector = PTQDCorrector(stats)
    probe = SampleRequest(num=1, steps=steps, sampler=sampler, eta=eta, seed=seed, labels=request.labels,
                          guidance=guidance, batch_size=1)
    from qdiffuse.io import load_quantized

    quantized = load_quantized(folder, device, verify=not no_verify)
    hooks = corrector.hooks()
    plan = load_plan(folder)
    if plan is not None:
        hooks["on_step"] = PlanSwitcher(plan, quantized.denoiser.model).on_step
    run_sample(quantized.denoiser, quantized.scheduler_config, probe, cond, description="variance bookkeeping",
               **hooks)
    with atomic_dir(out, overwrite, REPORT_FOLDER, inputs) as tmp:
        report = write_analysis(tmp, stats, corrector.summary())
    save_stats(folder, stats)
    typer.echo(f"wrote {out / report.name}; statistics stored in {folder}")


@app.command()
def info(
    folder: Annotated[Path, typer.Argument(help="A quantized model folder.")],
    layer_runtime: Annotated[
        bool,
        typer.Option("--runtime", help="Per layer: its kernel, bytes in memory and, for a fallback, why."),
    ] = False,
    no_verify: NoVerify = False,
) -> None:
    """Print scheme, size, memory, kernels, compute, precision plan and per-layer formats of a quantized folder."""
    import json

    from qdiffuse.io import describe_folder, is_quantized_folder
    from qdiffuse.pipelines.store import PIPELINE_FILE, is_quantized_pipeline

    if is_quantized_pipeline(folder):
        marker = json.loads((Path(folder) / PIPELINE_FILE).read_text())
        component = str(marker.get("denoiser"))
        index = json.loads((Path(folder) / "model_index.json").read_text())
        from qdiffuse.pipelines.text_store import quantized_encoder_names, text_encoder_lines

        quantized = [component, *quantized_encoder_names(folder, marker)]
        others = sorted(
            k for k, v in index.items()
            if not k.startswith("_") and k not in quantized and isinstance(v, list) and v[0] is not None
        )
        typer.echo(f"pipeline:   {marker.get('pipeline')}; quantized: {', '.join(quantized)}; FP, untouched: "
                   f"{', '.join(others)}")
        for line in text_encoder_lines(folder, marker):
            typer.echo(f"text enc.:  {line.replace('`', '')}")
        folder = Path(folder) / component
    if not is_quantized_folder(folder):
        raise ConfigError(f"{folder} is not a quantized model folder (no quantization.json); run qdiffuse quantize")
    from qdiffuse.io import load_quantized
    from qdiffuse.kernels import model_bytes, runtime_report

    model = load_quantized(folder, "cpu", verify=not no_verify).denoiser.model  # a bad folder fails before any line
    desc = describe_folder(folder)
    mib = 1024 * 1024
    typer.echo(f"folder:     {desc['path']}")
    typer.echo(f"source:     {desc['source']}")
    typer.echo(f"scheme:     {desc['scheme']}   method: {desc['method']}")
    typer.echo(f"dtype:      {desc['dtype']} (what the model computes in; quantizer scales are float32)")
    typer.echo(f"formats:    {'; '.join(desc['formats'])}")
    ratio = desc["fp32_bytes"] / max(desc["bytes_on_disk"], 1)
    typer.echo(
        f"size:       {desc['bytes_on_disk'] / mib:.2f} MiB on disk "
        f"(FP32 {desc['fp32_bytes'] / mib:.2f} MiB, {ratio:.2f}x smaller)"
    )
    report = runtime_report(model)
    memory = model_bytes(model)["total"]
    typer.echo(
        f"memory:     {memory / mib:.2f} MiB loaded on the real runtime (FP32 {desc['fp32_bytes'] / mib:.2f} MiB, "
        f"{desc['fp32_bytes'] / max(memory, 1):.2f}x smaller)"
    )
    typer.echo(f"            {report.summary()}")
    calib = desc["calibration"]
    if calib:
        typer.echo(f"calibrated: {calib.get('inputs')} inputs over {len(calib.get('timesteps', []))} timesteps")
        mota = calib.get("mota")
        if isinstance(mota, dict) and isinstance(mota.get("aligned_error"), dict):
            err = mota["aligned_error"]
            typer.echo(
                f"mota:       aligned to {mota.get('sampler')} at {mota.get('steps')} steps; first-order eps to the FP "
                "solver's direction (MSE): "
                + ", ".join(f"{k.replace('_', '-')} {v['mse']:.5f}" for k, v in err.items() if isinstance(v, dict))
            )
        from qdiffuse.outliers.commands import decision_lines

        for line in decision_lines(calib, limit=10**6):
            typer.echo(line)
    cost_path = folder / "cost.json"
    if cost_path.is_file():
        cost = json.loads(cost_path.read_text())
        typer.echo(
            f"compute:    {cost['macs_per_call'] / 1e6:.1f} M MACs per call, {cost['bops_per_call'] / 1e9:.2f} G BOPs "
            f"({cost['bops_reduction']:.1f}x fewer than FP32)"
        )
    plan_path = folder / "precision_plan.json"
    if plan_path.is_file():
        from qdiffuse.noise.precision import load_plan

        plan = load_plan(folder)
        shares = ", ".join(f"{k}: {v:.0%} of steps" for k, v in plan.fraction().items())
        typer.echo(f"precision:  per-step activation plan ({shares}; measured on {plan.settings['sampler']} "
                   f"{plan.settings['steps']} steps)")
        for t in sorted(plan.per_timestep, reverse=True):
            typer.echo(f"  t={t:<5} {plan.per_timestep[t]}")
    typer.echo(f"layers:     {len(desc['plan'])} quantized")
    width = max((len(p["name"]) for p in desc["plan"]), default=10)
    by_name = {layer.name: layer for layer in report.layers}
    for p in desc["plan"]:
        typer.echo(f"  {p['name']:<{width}}  {p['label']}")
        layer = by_name.get(p["name"])
        if layer_runtime and layer is not None:
            typer.echo(f"  {'':<{width}}    {' + '.join(layer.kernels)}, {layer.packed_bytes / 1024:.1f} KiB")
            for reason in layer.fallback:
                typer.echo(f"  {'':<{width}}    fallback: {reason}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for grids and report.")] = Path(
        "qdiffuse-demo"
    ),
    model: Annotated[str, typer.Option(help="Built-in model (or diffusers folder) to run on.")] = "fmnist-tiny",
    num: Annotated[
        int | None, typer.Option("--num", "-n", help="Images per model. Default 50; 120 for pipelines.")
    ] = None,
    steps: Annotated[int, typer.Option(help="DDIM steps (eta 0).")] = 20,
    guidance: Annotated[float | None, typer.Option(help="Guidance scale. Default 2; 4 for pipelines.")] = None,
    runtime: Runtime = "real",
    device: Device = "auto",
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """The main job on a built-in model: quantize, sample FP and quantized, write grids and a report."""
    _setup(quiet)
    from qdiffuse.demo import run_demo, run_pipeline_demo
    from qdiffuse.pipelines.commands import is_pipeline_folder

    if is_pipeline_folder(model):
        from qdiffuse.pipelines.commands import resolve_pipeline

        if model != "fmnist-t2i" and not (resolve_pipeline(model) / "training.json").is_file():
            raise ConfigError(
                "the pipeline demo scores Fashion-MNIST prompts (FID and text alignment in the shipped classifier's "
                "space); run it on fmnist-t2i or a folder qdiffuse train fmnist-t2i wrote"
            )
        report = run_pipeline_demo(
            out, model=model, num=120 if num is None else num, steps=steps,
            guidance=4.0 if guidance is None else guidance,
            overwrite=overwrite, device=resolve_device(device),
        )
        typer.echo(report.read_text())
        typer.echo(f"wrote {report}")
        return
    report = run_demo(
        out, model=model, num=50 if num is None else num, steps=steps, guidance=2.0 if guidance is None else guidance,
        overwrite=overwrite, device=resolve_device(device),
        runtime=runtime,
    )
    typer.echo(report.read_text())
    typer.echo(f"wrote {report}")


@app.command()
def train(
    name: Annotated[str, typer.Argument(help="fmnist-tiny, fmnist-ddpm, fmnist-dit, fmnist-t2i or classifier.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    data: Annotated[Path | None, typer.Option(help="Folder with the four Fashion-MNIST IDX .gz files.")] = None,
    steps: Annotated[int | None, typer.Option(help="Training steps (default: the recipe's).")] = None,
    epochs: Annotated[int, typer.Option(help="Classifier epochs.")] = 8,
    batch_size: Annotated[int | None, typer.Option(help="Batch size (default: the recipe's).")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate (default: the recipe's).")] = None,
    init_from: Annotated[Path | None, typer.Option(help="Continue training from this model folder.")] = None,
    ema_decay: Annotated[float | None, typer.Option(help="EMA decay (default: the recipe's).")] = None,
    seed: int = 0,
    device: Device = "auto",
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Train a built-in diffusion model (or the evaluation classifier) on Fashion-MNIST."""
    _setup(quiet)
    device = resolve_device(device)
    if name == "fmnist-t2i":
        from qdiffuse.models.train_t2i import T2IRecipe, train_fmnist_t2i

        base = T2IRecipe()
        recipe = T2IRecipe(
            unet_steps=base.unet_steps if steps is None else steps,
            unet_batch=base.unet_batch if batch_size is None else batch_size,
            unet_lr=base.unet_lr if lr is None else lr,
            ema_decay=base.ema_decay if ema_decay is None else ema_decay,
        )
        path = train_fmnist_t2i(out, data, recipe, seed=seed, overwrite=overwrite, log=None if quiet else typer.echo)
        typer.echo(f"wrote {path}")
        return
    if name == "classifier":
        from qdiffuse.eval.classifier import train_classifier

        kwargs = {"data_dir": data} if data is not None else {}
        path = train_classifier(
            out_dir=out, epochs=epochs, batch_size=batch_size or 128, device=device, seed=seed,
            overwrite=overwrite, progress=None if quiet else typer.echo, **kwargs,
        )
    else:
        from qdiffuse.models.train import recipe_for, train_diffusion

        recipe = recipe_for(name, "gpu" if device.startswith("cuda") else "cpu")
        path = train_diffusion(
            name,
            data,
            out,
            steps=steps or recipe.steps,
            batch_size=batch_size or recipe.batch_size,
            lr=lr or recipe.lr,
            ema_decay=ema_decay or recipe.ema_decay,
            device=device,
            seed=seed,
            init_from=init_from,
            progress=not quiet,
            overwrite=overwrite,
        )
    typer.echo(f"wrote {path}")


@app.command("eval")
def evaluate(
    samples: Annotated[Path, typer.Argument(help="Samples .npz (arr_0 uint8 NHWC).")],
    ref: Annotated[str, typer.Option(help="'fmnist' (shipped statistics) or a reference .npz.")] = "fmnist",
    fp: Annotated[Path | None, typer.Option(help="FP samples from the same seeds, for fidelity.")] = None,
    inception: Annotated[Path | None, typer.Option(help="Inception-v3 FID weights file on disk.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the results as JSON.")] = None,
    prompts: Annotated[
        Path | None,
        typer.Option("--prompts", help="The prompt file the samples were drawn from: adds text alignment."),
    ] = None,
    device: Device = "auto",
    overwrite: Overwrite = False,
) -> None:
    """FID, sFID, IS, precision/recall, KID (and fidelity to FP samples) of a samples file; with --prompts, text
    alignment (the classifier's accuracy at the Fashion-MNIST class each image's prompt names)."""
    import json
    from contextlib import nullcontext

    from qdiffuse.distributed.world import agree, detect, join, leave, on_every_rank
    from qdiffuse.eval.evaluate import format_table
    from qdiffuse.eval.features import shared_extraction
    from qdiffuse.fsutil import JSON, atomic_file, check_output_path

    world = detect()
    device = join(world, resolve_device(device))
    if world.launched:
        agree(world, {"samples": str(samples), "ref": ref, "fp": str(fp), "inception": str(inception),
                      "json": str(json_out), "overwrite": overwrite, "world_size": world.size})
    if json_out is not None:
        on_every_rank(world, lambda: check_output_path(json_out, overwrite, JSON, inputs=[samples]), main_only=True)
    if world.launched:  # a file one rank cannot read fails every rank before the first collective
        on_every_rank(world, lambda: _check_eval_inputs(samples, fp, inception))
    classes = _prompt_classes(prompts) if prompts is not None else None
    with shared_extraction(world) if world.launched else nullcontext():
        results = _evaluate(samples, ref, fp, inception, device, classes)
    leave(world)
    if not world.is_main:
        return
    typer.echo(format_table(results))
    if json_out is not None:
        with atomic_file(json_out, overwrite, JSON, inputs=[samples]) as tmp:
            tmp.write_text(json.dumps(results, indent=2, default=float))


def _check_eval_inputs(samples: Path, fp: Path | None, inception: Path | None) -> None:
    from qdiffuse.eval.evaluate import load_samples

    for path in (samples, fp):
        if path is not None:
            load_samples(path)
    if inception is not None and not Path(inception).is_file():
        raise ConfigError(f"--inception {inception} is not a file on this machine; copy the weights to every node")


def _prompt_classes(prompts: Path) -> list[int]:
    """The class each prompt of the file names (one-line error for a prompt that names none)."""
    from qdiffuse.models.captions import class_named
    from qdiffuse.pipelines.commands import read_prompts

    texts = read_prompts(prompts) or []
    classes = [class_named(t) for t in texts]
    for text, cls in zip(texts, classes, strict=True):
        if cls is None:
            raise ConfigError(f"--prompts: {text!r} names no Fashion-MNIST class; text alignment needs one per prompt")
    return [int(c) for c in classes if c is not None]


def _evaluate(
    samples: Path, ref: str, fp: Path | None, inception: Path | None, device: str, classes: list[int] | None = None
) -> dict:
    """``eval``'s metrics (feature extraction shared over the ranks when launched by torchrun)."""
    from qdiffuse.eval.evaluate import compare_to_fp, evaluate_samples, load_samples

    images, labels = load_samples(samples)
    if classes is not None:
        import numpy as np

        if labels is None or int(labels.max()) >= len(classes) or int(labels.min()) < 0:
            raise ConfigError(f"{samples} has no prompt index per image for these {len(classes)} prompts; sample "
                              "them with qdiffuse sample --prompts FILE")
        labels = np.asarray(classes)[labels]
    extractor = "inception" if inception is not None else "classifier"
    results = evaluate_samples(
        images, ref, extractor=extractor, inception_weights=inception, device=device, labels=labels
    )
    if fp is not None:
        fp_images, _ = load_samples(fp)
        if fp_images.shape != images.shape:
            raise ConfigError(f"--fp samples have shape {fp_images.shape}, expected {images.shape}; same request")
        results["fidelity"] = compare_to_fp(fp_images, images, inception_weights=inception, device=device)
    if classes is not None and "label_accuracy" in results:
        results["text_alignment"] = results["label_accuracy"]
    return results


@app.command()
def bench(
    config: Annotated[Path, typer.Argument(help="Benchmark config JSON (see benchmarks/).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Results folder; finished cells are reused.")],
    runtime: Annotated[
        str | None, typer.Option(help="real or simulated; overrides the config's 'runtime' (default real).")
    ] = None,
    device: Device = "auto",
    quiet: Quiet = False,
) -> None:
    """Run a benchmark grid (model x scheme x method x sampler), resumable, writing JSON and Markdown.

    Start the same command in several processes to split the grid: each cell is computed by one of them. Under
    torchrun the ranks are those processes (one GPU each; --out on a disk every rank sees) and rank 0 writes the
    results once every cell is done.
    """
    import hashlib

    from qdiffuse.distributed.world import agree, detect, join

    world = detect()
    _setup(quiet or not world.is_main)
    from qdiffuse.bench import Bench, BenchConfig

    if _is_pipeline_bench(config):
        from qdiffuse.pipelines.bench import PipelineBenchConfig, run_pipeline_bench

        if world.launched:
            raise ConfigError("pipeline grids run in one process; start them without torchrun")
        run_pipeline_bench(PipelineBenchConfig.from_json(config), out, resolve_device(device),
                           log=(lambda _line: None) if quiet else typer.echo)
        typer.echo((out / "report.md").read_text())
        return
    cfg = BenchConfig.load(config)
    if runtime is not None:
        from dataclasses import replace

        from qdiffuse.kernels import check_runtime

        cfg = replace(cfg, runtime=check_runtime(runtime))
    device = join(world, resolve_device(device))
    if world.launched:
        digest = hashlib.sha256(Path(config).read_bytes()).hexdigest()[:16]
        agree(world, {"config": digest, "out": str(out.resolve()), "runtime": runtime, "world_size": world.size})
    Bench(cfg, out, device).run(write=world.is_main)
    if world.is_main:
        typer.echo((out / "results.md").read_text())


def _is_pipeline_bench(config: Path) -> bool:
    """A grid over one pipeline (``"model"``, a pipeline folder or built-in) rather than bare denoisers."""
    import json

    try:
        data = json.loads(Path(config).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False  # BenchConfig.load says what is wrong with it
    if not isinstance(data, dict) or not isinstance(data.get("model"), str):
        return False
    from qdiffuse.pipelines.commands import is_pipeline_folder

    return is_pipeline_folder(data["model"])


@app.command()
def sensitivity(
    model: Annotated[str, typer.Argument(help="Built-in name, twin, diffusers folder or quantized folder.")],
    scheme: Annotated[str, typer.Option(help="Scheme to quantize with (ignored for a quantized folder).")] = "w8a8",
    method: Annotated[str, typer.Option(help="Method to quantize with (ignored for a quantized folder).")] = "minmax",
    outliers: Annotated[str, typer.Option(help="auto or off (ignored for a quantized folder).")] = "off",
    per: Annotated[str, typer.Option(help="block or layer.")] = "block",
    num: Annotated[int, typer.Option("--num", "-n", help="Trajectories; inputs are taken at 10 of their steps.")] = 8,
    calib_steps: Annotated[int, typer.Option(help="Calibration: sampler steps to take inputs from.")] = 20,
    calib_per_step: Annotated[int, typer.Option(help="Calibration: trajectories.")] = 32,
    seed: int = 0,
    guidance: float = 1.0,
    batch_size: int = 64,
    device: Device = "auto",
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the rows as JSON.")] = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Rank blocks or layers by what their quantized inputs cost at the output, per timestep range."""
    _setup(quiet)
    from qdiffuse.outliers.commands import sensitivity_command

    typer.echo(sensitivity_command(model, scheme, method, outliers, per, num, seed, guidance, batch_size,
                                   resolve_device(device), json_out, overwrite,
                                   {"calib_steps": calib_steps, "calib_per_step": calib_per_step}), nl=False)


@app.command()
def speed(
    models: Annotated[
        list[str] | None,
        typer.Argument(help="fmnist-tiny, fmnist-dit (default: both), sd15-unet, dit-xl2 (random weights, large)."),
    ] = None,
    schemes: Annotated[
        str, typer.Option(help="Comma-separated schemes to quantize (minmax) and time; w8a8:fp-attention leaves "
                          "the attention matmuls in FP.")
    ] = (
        "w8a8,w4a8,w8a16,w4a16"
    ),
    batch: Annotated[
        str | None, typer.Option(help="Batch sizes, e.g. 1,8,64 (default: 1,8,64 built-ins; 1,2,8 large models).")
    ] = None,
    repeats: Annotated[int, typer.Option(help="Timed calls per row (the median is reported).")] = 10,
    warmup: Annotated[int, typer.Option(help="Untimed calls before them.")] = 2,
    threads: Annotated[int, typer.Option(help="torch.set_num_threads for the whole run.")] = 1,
    peers: Annotated[bool, typer.Option("--peers/--no-peers", help="Also time torchao / quanto if installed.")] = True,
    simulated: Annotated[str, typer.Option(help="Scheme also timed before freeze: auto (the first) or none.")] = "auto",
    compile: Annotated[bool, typer.Option("--compile", help="Also time each real model under torch.compile.")] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write every row as JSON.")] = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
) -> None:
    """Denoiser latency and weight memory of FP32, BF16 and real quantized runtimes, side by side (CPU)."""
    _setup(quiet)
    from qdiffuse.speed import speed_command

    log = None if quiet else (lambda line: typer.echo(line, err=True))
    typer.echo(speed_command(models, schemes, batch, repeats, warmup, threads, peers, simulated, json_out, overwrite,
                             log, compile), nl=False)


def _is_a(exc: BaseException, name: str) -> bool:
    """Match click's exception classes by name: typer bundles its own copy of them, click may be another."""
    return any(cls.__name__ == name for cls in type(exc).__mro__)


def _show_warnings_on_one_line() -> None:
    """qdiffuse's own warnings print as ``warning: …`` lines, once each; other libraries' keep Python's format."""
    import warnings

    from qdiffuse.errors import QDiffuseWarning

    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):  # type: ignore[no-untyped-def]
        if issubclass(category, QDiffuseWarning):
            print(f"warning: {message}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show


INTERRUPTED = "error: interrupted (Ctrl-C); no partial output was left"
TERMINATED = "error: terminated (SIGTERM); no partial output was left"


def main() -> None:
    """Entry point: run the app, turning user errors into one-line messages and exit code 2."""
    from qdiffuse.allocator import keep_freed_memory

    keep_freed_memory()
    _show_warnings_on_one_line()
    signal.signal(signal.SIGTERM, _raise_terminated)
    interrupts.install()
    _import_runtime()
    command = typer.main.get_command(app)
    try:
        code = command.main(args=sys.argv[1:], prog_name="qdiffuse", standalone_mode=False)
        interrupts.raise_pending()
    except QDiffuseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except Terminated:
        print(TERMINATED, file=sys.stderr)
        sys.exit(143)
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        if _is_a(exc, "NoArgsIsHelpError"):
            command.main(args=["--help"], prog_name="qdiffuse", standalone_mode=False)
            sys.exit(2)
        if _is_a(exc, "ClickException"):
            message = " ".join(exc.format_message().split())
            print(f"error: {message} (see qdiffuse --help)", file=sys.stderr)
            sys.exit(2)
        if _is_a(exc, "Abort"):
            print(INTERRUPTED, file=sys.stderr)
            sys.exit(130)
        raise
    # typer turns Ctrl-C into a returned exit code (130) once the command has unwound (outputs cleaned up)
    if isinstance(code, int) and code:
        if code == 130:
            print(INTERRUPTED, file=sys.stderr)
        sys.exit(code)


def entry() -> None:
    """The ``qdiffuse`` executable: :func:`main`, then an immediate exit with its code.

    Interpreter shutdown takes seconds after torch and diffusers are loaded, and a Ctrl-C in that time killed
    the process by the signal (exit -2, no message) after it had finished; outputs are already complete and
    flushed when ``main`` returns, so nothing is lost by skipping the shutdown.
    """
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, int) and exc.code is not None:
            print(exc.code, file=sys.stderr)
    except KeyboardInterrupt:  # after main had handled everything: its outputs are complete or absent
        print(INTERRUPTED, file=sys.stderr)
        code = 130
    late = interrupts.pending()
    if code == 0 and late is not None:  # swallowed while main unwound: outputs are complete, still say so
        terminated = isinstance(late, Terminated)
        print(TERMINATED if terminated else INTERRUPTED, file=sys.stderr)
        code = 143 if terminated else 130
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _import_runtime() -> None:
    """Import numpy and torch with Ctrl-C held back: interrupted half-way, torch swallows the KeyboardInterrupt
    and goes on with numpy half-loaded, and the command then fails with an unrelated error. A Ctrl-C pressed
    meanwhile is delivered right after, where the command can handle it."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        import numpy  # noqa: F401
        import torch  # noqa: F401
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


if __name__ == "__main__":
    entry()
