"""diffusers pipelines end to end on tiny random pipelines built from configs (SD, SDXL, PixArt-Sigma, SD3, FLUX):
calibration by the pipeline's own calls, quantize -> save -> load -> pipe(prompt), the command line, the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from pipeline_fixtures import CALLS, FIXTURES, tiny_sd  # noqa: E402

import qdiffuse  # noqa: E402
from qdiffuse.config import QuantConfig  # noqa: E402
from qdiffuse.errors import ConfigError, DataError, ModelLoadError  # noqa: E402
from qdiffuse.pipelines.calibrate import collect_pipeline_calibration  # noqa: E402
from qdiffuse.progress import set_progress_enabled  # noqa: E402

set_progress_enabled(False)


PROMPTS = ["a red cat", "a blue dog", "a green tree"]
CALL = {"num_inference_steps": 3, "height": 16, "width": 16, "guidance_scale": 4.0}


def test_calibration_records_the_pipelines_own_denoiser_calls(tmp_path: Path) -> None:
    pipe = tiny_sd(tmp_path)
    calib = collect_pipeline_calibration(pipe, PROMPTS, calib_steps=3, **CALL)
    # 3 prompts x 3 steps x 2 guided halves, latent 4 x 8 x 8 (16 px over the VAE's factor 2)
    assert len(calib) == 3 * 3 * 2 and calib.x.shape == (18, 4, 8, 8)
    text = calib.cond.rows["encoder_hidden_states"]
    assert text.shape == (18, 16, 32)
    # the halves differ (text vs empty prompt) and the text embeddings are the encoder's, not a stub
    with torch.no_grad():
        ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=16, return_tensors="pt").input_ids
        embeds = pipe.text_encoder(ids)[0]
    torch.testing.assert_close(text[3:6], embeds, atol=1e-5, rtol=1e-5)
    assert sorted(set(calib.t.tolist()), reverse=True) == [int(t) for t in pipe.scheduler.timesteps]


def test_quantize_save_load_generate(tmp_path: Path) -> None:
    pipe = tiny_sd(tmp_path)
    gen = torch.Generator().manual_seed(1)
    fp_images = pipe("a red cat", generator=gen, output_type="np", **CALL).images
    config = QuantConfig.from_scheme("w8a8", calib_steps=3)
    assert qdiffuse.quantize(pipe, config, prompts=PROMPTS, **CALL) is pipe
    q_images = pipe("a red cat", generator=torch.Generator().manual_seed(1), output_type="np", **CALL).images
    folder = qdiffuse.save(pipe, tmp_path / "q")
    assert (folder / "unet" / "quantization.json").is_file() and (folder / "text_encoder").is_dir()
    loaded = qdiffuse.load_pipeline(folder)
    assert type(loaded).__name__ == "StableDiffusionPipeline"
    again = loaded("a red cat", generator=torch.Generator().manual_seed(1), output_type="np", **CALL).images
    assert again.shape == fp_images.shape == (1, 16, 16, 3) and np.isfinite(again).all()
    np.testing.assert_allclose(again, q_images, atol=1e-5)  # the saved pipeline is the quantized one
    assert np.abs(q_images - fp_images).max() > 0  # and it is quantized


def test_refusals_are_one_line(tmp_path: Path) -> None:
    pipe = tiny_sd(tmp_path)
    with pytest.raises(DataError, match="prompt list is empty"):
        qdiffuse.quantize(pipe, QuantConfig.from_scheme("w8a8"), prompts=["  ", ""], **CALL)
    with pytest.raises(ConfigError, match="not built yet"):
        qdiffuse.quantize(pipe, QuantConfig.from_scheme("w8a8", method="mota", calib_sampler="dpm++2m"),
                          prompts=PROMPTS, **CALL)
    with pytest.raises(ModelLoadError, match="not quantized"):
        qdiffuse.save(pipe, tmp_path / "q")
    assert not (tmp_path / "q").exists()
    from diffusers import DDPMPipeline

    with pytest.raises(ConfigError, match="DDPMPipeline is not supported yet; qdiffuse quantizes StableDiffusion"):
        qdiffuse.quantize(DDPMPipeline(unet=pipe.unet, scheduler=pipe.scheduler), QuantConfig.from_scheme("w8a8"))


def test_command_line_on_pipeline_folders(tmp_path: Path) -> None:
    """quantize a pipeline folder with a prompt file, sample FP and quantized with shared seeds, info, bad input."""
    import subprocess
    import sys

    exe = str(Path(sys.executable).parent / "qdiffuse")

    def run(*args: object) -> subprocess.CompletedProcess:
        return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=300,
                              env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})

    tiny_sd(tmp_path).save_pretrained(tmp_path / "sd")
    (tmp_path / "prompts.txt").write_text("a red cat\n\na blue dog\n")
    q = tmp_path / "q"
    res = run("quantize", tmp_path / "sd", "--out", q, "--scheme", "w8a8", "--prompts", tmp_path / "prompts.txt",
              "--calib-inference-steps", 3, "--calib-steps", 3, "--guidance", 4)
    assert res.returncode == 0, res.stderr[-2000:]
    common = ("--prompts", tmp_path / "prompts.txt", "--num", 3, "--steps", 3, "--guidance", 4, "-q")
    assert run("sample", q, "--out", tmp_path / "q.npz", *common).returncode == 0
    assert run("sample", tmp_path / "sd", "--out", tmp_path / "fp.npz", *common).returncode == 0
    with np.load(tmp_path / "q.npz") as qz, np.load(tmp_path / "fp.npz") as fz:
        assert qz["arr_0"].shape == fz["arr_0"].shape == (3, 16, 16, 3) and qz["arr_0"].dtype == np.uint8
        assert qz["labels"].tolist() == [0, 1, 0]
    info = run("info", q)
    assert info.returncode == 0 and "quantized: unet; FP, untouched: scheduler, text_encoder, tokenizer, vae" in (
        info.stdout
    ), info.stdout + info.stderr
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "binary.txt").write_bytes(b"\x00\x01\x02")
    for args, fragment in (
        (("--prompts", tmp_path / "empty.txt"), "holds no prompts"),
        (("--prompts", tmp_path / "binary.txt"), "is not text"),
        ((), "pass --prompt TEXT or --prompts FILE"),
    ):
        bad = run("sample", q, "--out", tmp_path / "bad.npz", "--num", 2, "--steps", 2, *args)
        lines = [line for line in bad.stderr.splitlines() if line.strip()]
        assert bad.returncode == 2 and len(lines) == 1 and fragment in lines[0], bad.stderr[-1000:]
        assert not (tmp_path / "bad.npz").exists()
    index = json.loads((tmp_path / "sd" / "model_index.json").read_text())
    index["_class_name"] = "DDPMPipeline"
    (tmp_path / "sd" / "model_index.json").write_text(json.dumps(index))
    bad = run("quantize", tmp_path / "sd", "--out", tmp_path / "q2")
    assert bad.returncode == 2 and "DDPMPipeline is not supported yet" in bad.stderr
    assert not (tmp_path / "q2").exists()


FAMILY_PROMPTS = ["a red cat", "a blue dog", "a green tree"]


def _generate(pipe: object, name: str) -> np.ndarray:
    return pipe("a red cat", generator=torch.Generator().manual_seed(1), output_type="np", **CALLS[name]).images


@pytest.mark.parametrize("name", list(FIXTURES))
def test_every_pipeline_family_quantize_save_load_generate(name: str, tmp_path: Path) -> None:
    """SD, SDXL, PixArt-Sigma, SD3 and FLUX: W8A8 through the pipeline's own calls, the saved pipeline is the
    quantized one (same images after loading, with real kernels), and the per-architecture layer policy holds."""
    pipe = FIXTURES[name](tmp_path)
    pipe.set_progress_bar_config(disable=True)
    fp_images = _generate(pipe, name)
    component = "unet" if name in ("sd", "sdxl") else "transformer"
    config = QuantConfig.from_scheme("w4a8", calib_steps=2)
    qdiffuse.quantize(pipe, config, prompts=FAMILY_PROMPTS, **CALLS[name])
    q_images = _generate(pipe, name)
    assert np.isfinite(q_images).all() and np.abs(q_images - fp_images).max() > 0
    folder = qdiffuse.save(pipe, tmp_path / "q")
    assert (folder / component / "quantization.json").is_file() and (folder / "README.md").is_file()
    assert f"`{component}` quantized" not in (folder / "README.md").read_text()  # the card names it, FP list apart
    loaded = qdiffuse.load_pipeline(folder)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is type(pipe)
    np.testing.assert_allclose(_generate(loaded, name), q_images, atol=1e-5)

    from qdiffuse.kernels import runtime_report

    model = getattr(loaded, component)
    assert runtime_report(model).summary()  # real runtime by default
    labels = {p.name: p.label for p in qdiffuse.api.quant_state(model).plan}
    eight_bit = {
        "sdxl": "add_embedding.linear_1",
        "pixart": "adaln_single.linear",
        "sd3": "context_embedder",
        "flux": "single_transformer_blocks.0.norm.linear",
    }
    if name in eight_bit:
        assert labels[eight_bit[name]].startswith("W:int8"), labels[eight_bit[name]]
    first = {"sd": "conv_in", "sdxl": "conv_in", "pixart": "pos_embed.proj", "sd3": "pos_embed.proj",
             "flux": "x_embedder"}[name]
    assert labels[first] == "W:int8-sym-channel A:fp", labels[first]  # reads x_t: 8-bit weights, FP input
    four_bit = [label for label in labels.values() if label.startswith("W:int4")]
    assert four_bit, labels


def test_calibration_replays_each_familys_extra_inputs(tmp_path: Path) -> None:
    """What each pipeline passes besides (x_t, t): recorded per row when batch-first, once when constant, and
    replayed verbatim (the replayed FP output equals the output the pipeline's own call produced)."""
    from qdiffuse.models.denoiser import Denoiser

    seen = {}
    for name, builder in FIXTURES.items():
        (tmp_path / name).mkdir()
        pipe = builder(tmp_path / name)
        pipe.set_progress_bar_config(disable=True)
        component = "unet" if name in ("sd", "sdxl") else "transformer"
        model = getattr(pipe, component)
        outputs: list[torch.Tensor] = []
        handle = model.register_forward_hook(lambda _m, _a, out, box=outputs: box.append(out[0].detach().clone()))
        calib = collect_pipeline_calibration(pipe, FAMILY_PROMPTS[:2], calib_steps=2, **CALLS[name])
        handle.remove()
        seen[name] = calib
        denoiser = Denoiser.from_model(model)
        with torch.no_grad():
            replay = torch.cat([denoiser.forward_raw(*b) for b in calib.batches(3)])
        torch.testing.assert_close(replay, torch.cat(outputs), atol=1e-5, rtol=1e-5)
    sdxl = seen["sdxl"].cond
    assert sdxl.rows["added_cond_kwargs.text_embeds"].shape[0] == len(seen["sdxl"])
    assert sdxl.rows["added_cond_kwargs.time_ids"].shape == (len(seen["sdxl"]), 6)
    pixart = seen["pixart"].cond
    assert "encoder_attention_mask" in pixart.rows and pixart.constants["added_cond_kwargs.resolution"] is None
    flux = seen["flux"]
    assert flux.cond.constants["img_ids"].shape == (16, 3) and flux.cond.constants["txt_ids"].shape == (16, 3)
    # on the scheduler's scale, though FLUX's pipeline passes t / 1000 (the replay above divides again)
    assert flux.t.max() == 1000.0 and seen["sd3"].t.max() == 1000.0
    # a calibration file round-trips every part
    path = tmp_path / "flux-calib.safetensors"
    flux.save(path)
    again = type(flux).load(path)
    assert again.cond.digest() == flux.cond.digest() and torch.equal(again.x, flux.x)


def test_bare_pipeline_denoisers_are_refused_outside_their_pipeline(tmp_path: Path) -> None:
    from qdiffuse.models.denoiser import Denoiser

    pipe = FIXTURES["flux"](tmp_path)
    denoiser = Denoiser.from_model(pipe.transformer)
    with pytest.raises(ConfigError, match="driven by its diffusers pipeline; quantize the pipeline folder"):
        denoiser.forward_raw(torch.zeros(1, 16, 64), torch.zeros(1))


@pytest.mark.parametrize("name", ["sdxl", "flux"])
def test_text_encoders_quantized_in_memory(name: str, tmp_path: Path) -> None:
    """Every text encoder (two CLIPs; CLIP + T5) on real kernels, calibrated by the pipeline's own call; saving such
    a pipeline writes them quantized (tests/test_text_encoder_store.py loads them back)."""
    from qdiffuse.kernels import runtime_report
    from qdiffuse.pipelines.text_encoders import quantize_text_encoders

    pipe = FIXTURES[name](tmp_path)
    pipe.set_progress_bar_config(disable=True)
    fp_images = _generate(pipe, name)
    settings = {k: v for k, v in CALLS[name].items() if k != "num_inference_steps"}
    counts = quantize_text_encoders(pipe, "w8a8", FAMILY_PROMPTS, **settings)
    assert set(counts) == {"text_encoder", "text_encoder_2"} and min(counts.values()) > 0
    assert runtime_report(pipe.text_encoder_2).summary().startswith("runtime: real")
    images = _generate(pipe, name)
    assert np.isfinite(images).all() and 0 < np.abs(images - fp_images).max() < 0.5
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_text_encoders(pipe, "w8a8", FAMILY_PROMPTS, **settings)
    qdiffuse.quantize(pipe, QuantConfig.from_scheme("w8a8", calib_steps=2), prompts=FAMILY_PROMPTS, **CALLS[name])
    folder = qdiffuse.save(pipe, tmp_path / "q")
    marker = json.loads((folder / "qdiffuse_pipeline.json").read_text())
    assert marker["text_encoders"] == {"text_encoder": "w8a8", "text_encoder_2": "w8a8"}
    assert all((folder / name / "quantization.json").is_file() for name in counts)
