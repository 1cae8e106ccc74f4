"""Half precision end to end: models calibrated, quantized, saved, loaded and sampled in their own dtype.

Users load pipelines in bf16/fp16 and checkpoints are stored in fp16. These tests build the two tracebacks users
met (a bf16 pipeline through ``qdiffuse.quantize``, an fp16-saved folder through ``qdiffuse quantize``) and check
that quantized layers return the dtype they are given, that a folder records its dtype and loads back equal to
the in-memory model, and that the real kernels agree with the simulated layers at bf16.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qdiffuse.api import quantize
from qdiffuse.config import QuantConfig
from qdiffuse.errors import ConfigError
from qdiffuse.io import load_quantized, save_quantized
from qdiffuse.kernels.modules import RealLayer
from qdiffuse.models.dtypes import check_dtype_supported, dtype_name, parse_dtype, stored_dtype
from qdiffuse.models.loading import load_model_folder
from qdiffuse.nn.layers import QuantLayer
from qdiffuse.sampling.loop import SampleRequest, sample

HALF = [torch.bfloat16, torch.float16]
ALL = [torch.float32, *HALF]


def _small(scheme: str = "w8a8", **overrides: object) -> QuantConfig:
    return QuantConfig.from_scheme(scheme, calib_steps=2, calib_per_step=4, calib_num_inference_steps=4, **overrides)


def _probe(loaded: object, seed: int = 3) -> tuple:
    d = loaded.denoiser  # type: ignore[attr-defined]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3, *d.sample_shape, generator=gen)
    t = torch.tensor([900, 400, 20])
    labels = torch.tensor([0, 1, d.null_class]) if d.num_classes else None
    return x, t, labels, None


def _outputs(loaded: object, inputs: tuple) -> torch.Tensor:
    with torch.no_grad():
        return loaded.denoiser.forward_raw(*inputs)  # type: ignore[attr-defined]


def _layer_output_dtypes(model: torch.nn.Module, inputs: tuple, denoiser: object) -> set[torch.dtype]:
    seen: set[torch.dtype] = set()
    hooks = [
        m.register_forward_hook(lambda _m, _a, out: seen.add(out.dtype))
        for m in model.modules() if isinstance(m, (RealLayer, QuantLayer))
    ]
    try:
        with torch.no_grad():
            denoiser.forward_raw(*inputs)  # type: ignore[attr-defined]
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_dtype_names_parse_and_bad_ones_are_one_line() -> None:
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("float16") is torch.float16
    assert parse_dtype("auto") is None and parse_dtype(None) is None and parse_dtype(torch.float32) is torch.float32
    assert dtype_name(torch.bfloat16) == "bf16"
    with pytest.raises(ConfigError, match="use auto, fp32, bf16, fp16"):
        parse_dtype("int8")


def test_a_device_without_half_kernels_is_refused_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from qdiffuse.models import dtypes

    monkeypatch.setattr(dtypes, "_probe", lambda dtype, device: '"slow_conv2d_cpu" not implemented for \'Half\'')
    with pytest.raises(ConfigError, match="no fp16 kernels.*use --dtype fp32 or bf16") as info:
        check_dtype_supported(torch.float16, "cpu")
    assert "\n" not in str(info.value)
    check_dtype_supported(torch.float32, "cpu")  # float32 is never probed


BUILTIN_CASES = [
    *[(m, d) for m in ("fmnist-tiny", "fmnist-dit") for d in (torch.float32, torch.bfloat16)],
    # fp16 GEMMs on a CPU without native fp16 run 50-100x slower than float32 (BENCHMARKS.md, "Half precision"):
    # the token-wise DiT would take minutes, the UNet stands for both
    ("fmnist-tiny", torch.float16),
]


@pytest.mark.parametrize(("model", "dtype"), BUILTIN_CASES, ids=lambda v: v if isinstance(v, str) else dtype_name(v))
def test_builtins_quantize_save_load_sample_in_their_dtype(model: str, dtype: torch.dtype, tmp_path: Path) -> None:
    """The default W8A8 (outlier planning and guard included) in fp32, bf16 and fp16: every quantized layer
    returns the model's dtype, the folder records it, and the loaded model computes and samples exactly what the
    in-memory one did."""
    loaded = load_model_folder(model, dtype=dtype)
    assert loaded.denoiser.dtype == dtype
    # fp16 runs the plain grids, for time (the outlier treatments' dtype handling is bf16's, covered above)
    extra = {"outliers": "off", "guard_db": 0} if dtype == torch.float16 else {}
    quantize(loaded.denoiser, loaded.scheduler_config, _small(**extra), batch_size=16)
    inputs = _probe(loaded)
    assert _layer_output_dtypes(loaded.denoiser.model, inputs, loaded.denoiser) == {dtype}
    before = _outputs(loaded, inputs)
    assert before.dtype == torch.float32 and torch.isfinite(before).all()
    folder = save_quantized(loaded, tmp_path / "q")
    import json

    assert json.loads((folder / "quantization.json").read_text())["dtype"] == dtype_name(dtype)
    again = load_quantized(folder)
    assert again.denoiser.dtype == dtype
    torch.testing.assert_close(_outputs(again, inputs), before, atol=0, rtol=0)
    request = SampleRequest(num=2, steps=3, seed=1, labels=(0, 1) if loaded.denoiser.num_classes else None)
    images, _ = sample(loaded.denoiser, loaded.scheduler_config, request)
    images_again, _ = sample(again.denoiser, again.scheduler_config, request)
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    torch.testing.assert_close(images_again, images, atol=0, rtol=0)


def _rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt())


@pytest.mark.parametrize("scheme", ["w8a8", "w4a8", "w4a16"])
def test_real_kernels_agree_with_the_simulated_layers_at_bf16(scheme: str, tmp_path: Path) -> None:
    """At bf16 the integer kernels sum exactly and round once, the simulated layers multiply bf16-rounded values:
    the two agree to bf16's precision, as closely as the bf16 model is to the float32 one."""
    loaded = load_model_folder("fmnist-tiny", dtype="bf16")
    quantize(loaded.denoiser, loaded.scheduler_config, _small(scheme, outliers="off", guard_db=0), batch_size=16)
    folder = save_quantized(loaded, tmp_path / "q")
    inputs = _probe(loaded)
    real = _outputs(load_quantized(folder, runtime="real"), inputs)
    simulated = _outputs(load_quantized(folder, runtime="simulated"), inputs)
    as_fp32 = _outputs(load_quantized(folder, runtime="real", dtype="fp32"), inputs)
    assert _rel_error(real, simulated) < 0.02, _rel_error(real, simulated)
    assert _rel_error(real, as_fp32) < 0.02, _rel_error(real, as_fp32)


def test_a_folder_loads_in_another_dtype_when_asked(tmp_path: Path) -> None:
    loaded = load_model_folder("fmnist-tiny")
    quantize(loaded.denoiser, loaded.scheduler_config, _small(outliers="off", guard_db=0), batch_size=16)
    folder = save_quantized(loaded, tmp_path / "q")
    half = load_quantized(folder, dtype="bf16")
    assert half.denoiser.dtype == torch.bfloat16
    inputs = _probe(loaded)
    assert _layer_output_dtypes(half.denoiser.model, inputs, half.denoiser) == {torch.bfloat16}
    assert _rel_error(_outputs(half, inputs), _outputs(loaded, inputs)) < 0.02
    quantizer_scales = [b for n, b in half.denoiser.model.named_buffers() if n.endswith("quantizers.0.scale")]
    assert quantizer_scales and all(b.dtype == torch.float32 for b in quantizer_scales)


def test_auto_is_the_stored_dtype_but_fp16_on_a_cpu_computes_in_float32() -> None:
    from qdiffuse.models.dtypes import auto_dtype

    assert auto_dtype(torch.bfloat16, "cpu") is torch.bfloat16 and auto_dtype(torch.float16, "cuda") is torch.float16
    assert auto_dtype(torch.float16, "cpu") is torch.float32
    # the built-ins are stored in fp16 for size and run in float32 here unless asked otherwise
    assert load_model_folder("fmnist-tiny").denoiser.dtype is torch.float32


def test_stored_dtype_reads_the_safetensors_header(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(10, dtype=torch.float16), "b": torch.zeros(2), "i": torch.zeros(50, dtype=torch.long)},
              str(tmp_path / "w.safetensors"))
    assert stored_dtype([tmp_path / "w.safetensors"]) == torch.float16
    assert stored_dtype([]) == torch.float32


# -- pipelines ---------------------------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")

from pipeline_fixtures import CALLS, FIXTURES, tiny_sd  # noqa: E402

import qdiffuse  # noqa: E402

PROMPTS = ["a bag", "a coat"]


def _images(pipe: object, name: str) -> np.ndarray:
    out = pipe("a bag", generator=torch.Generator().manual_seed(1), output_type="np", **CALLS[name])  # type: ignore
    return np.asarray(out.images, dtype=np.float32)


def test_a_bf16_pipeline_quantizes_with_the_default_scheme(tmp_path: Path) -> None:
    """The first reported traceback: a pipeline loaded with torch_dtype=bfloat16 through qdiffuse.quantize."""
    from diffusers import StableDiffusionPipeline

    tiny_sd(tmp_path).save_pretrained(tmp_path / "fp")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "fp", torch_dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    fp = _images(pipe, "sd")
    qdiffuse.quantize(pipe, qdiffuse.QuantConfig.from_scheme("w8a8"), prompts=PROMPTS, **CALLS["sd"])
    assert pipe.unet.dtype == torch.bfloat16
    q = _images(pipe, "sd")
    assert np.isfinite(q).all() and np.abs(q - fp).max() > 0
    assert np.abs(q - fp).mean() < 0.05  # W8A8 stays close to the bf16 pipeline


def test_an_fp16_saved_pipeline_folder_quantizes_on_the_command_line(tmp_path: Path) -> None:
    """The second reported traceback: ``qdiffuse quantize`` on a folder saved in fp16 (its text encoder loads
    in fp16 by default, so the whole pipeline must run in fp16)."""
    from diffusers import StableDiffusionPipeline

    tiny_sd(tmp_path).save_pretrained(tmp_path / "fp32")
    StableDiffusionPipeline.from_pretrained(tmp_path / "fp32", torch_dtype=torch.float16).save_pretrained(
        tmp_path / "fp16"
    )
    (tmp_path / "p.txt").write_text("a bag\na coat\n")
    cli = [sys.executable, "-m", "qdiffuse.cli"]

    def run(*args: object) -> subprocess.CompletedProcess:
        return subprocess.run([*cli, *map(str, args)], capture_output=True, text=True, timeout=600)

    done = run("quantize", tmp_path / "fp16", "--scheme", "w8a8", "--prompts", tmp_path / "p.txt",
               "--calib-inference-steps", 2, "--calib-steps", 2, "--out", tmp_path / "q", "-q")
    assert done.returncode == 0, done.stderr[-2000:]
    import json

    # auto: fp16 weights on a CPU compute in float32 (no native fp16 GEMMs); --dtype picks another
    assert json.loads((tmp_path / "q" / "unet" / "quantization.json").read_text())["dtype"] == "fp32"
    done = run("quantize", tmp_path / "fp16", "--dtype", "bf16", "--prompts", tmp_path / "p.txt",
               "--calib-inference-steps", 2, "--calib-steps", 2, "--out", tmp_path / "qb", "-q")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((tmp_path / "qb" / "unet" / "quantization.json").read_text())["dtype"] == "bf16"
    info = run("info", tmp_path / "qb")
    assert info.returncode == 0 and "dtype:      bf16" in info.stdout, info.stderr[-2000:]
    bad = run("quantize", tmp_path / "fp16", "--dtype", "fp64", "--prompts", tmp_path / "p.txt",
              "--out", tmp_path / "q2")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().count("\n") == 0 and "--dtype 'fp64'" in bad.stderr
    assert not (tmp_path / "q2").exists()
    sampled = run("sample", tmp_path / "qb", "--prompt", "a bag", "--num", 1, "--steps", 2, "--out",
                  tmp_path / "s.npz", "-q")
    assert sampled.returncode == 0, sampled.stderr[-2000:]


@pytest.mark.parametrize("dtype", HALF, ids=dtype_name)
@pytest.mark.parametrize("name", list(FIXTURES))
def test_every_pipeline_family_in_half_precision(name: str, dtype: torch.dtype, tmp_path: Path) -> None:
    """SD, SDXL, PixArt, SD3 and FLUX in bf16 and fp16: quantize -> save -> load -> generate gives the images of
    the in-memory quantized pipeline, in the pipeline's dtype. Loaded as users load it (``torch_dtype``), so
    T5 keeps the float32 feed-forward output that transformers keeps in fp16."""
    FIXTURES[name](tmp_path).save_pretrained(tmp_path / "fp")
    pipe = type(FIXTURES[name](tmp_path)).from_pretrained(tmp_path / "fp", torch_dtype=dtype)
    component = "unet" if name in ("sd", "sdxl") else "transformer"
    if getattr(pipe, component).dtype != dtype:  # diffusers leaves SD3's transformer in float32 under torch_dtype
        getattr(pipe, component).to(dtype)
    pipe.set_progress_bar_config(disable=True)
    config = QuantConfig.from_scheme("w8a8", calib_steps=2, outliers="off", guard_db=0)
    qdiffuse.quantize(pipe, config, prompts=PROMPTS, **CALLS[name])
    q = _images(pipe, name)
    assert np.isfinite(q).all()
    folder = qdiffuse.save(pipe, tmp_path / "q")
    loaded = qdiffuse.load_pipeline(folder)
    loaded.set_progress_bar_config(disable=True)
    assert getattr(loaded, component).dtype == dtype
    np.testing.assert_allclose(_images(loaded, name), q, atol=1e-5)
