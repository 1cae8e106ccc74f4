"""diffusers pipelines end to end on a tiny random Stable Diffusion pipeline built from configs: calibration by the
pipeline's own calls, quantize -> save -> load -> pipe(prompt), and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import qdiffuse  # noqa: E402
from qdiffuse.config import QuantConfig  # noqa: E402
from qdiffuse.errors import ConfigError, DataError, ModelLoadError  # noqa: E402
from qdiffuse.pipelines.stable_diffusion import collect_pipeline_calibration  # noqa: E402
from qdiffuse.progress import set_progress_enabled  # noqa: E402

set_progress_enabled(False)


def tiny_tokenizer(root: Path) -> object:
    """A CLIP tokenizer from a character vocabulary written here (no download)."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(
        str(root / "vocab.json"), str(root / "merges.txt"), pad_token="<|endoftext|>", model_max_length=16
    )


def tiny_sd(root: Path) -> object:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    tokenizer = tiny_tokenizer(root)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(tokenizer.get_vocab()), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), latent_channels=4,
        norm_num_groups=8, sample_size=16,
    )
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet.eval(), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


PROMPTS = ["a red cat", "a blue dog", "a green tree"]
CALL = {"num_inference_steps": 3, "height": 16, "width": 16, "guidance_scale": 4.0}


def test_calibration_records_the_pipelines_own_denoiser_calls(tmp_path: Path) -> None:
    pipe = tiny_sd(tmp_path)
    calib = collect_pipeline_calibration(pipe, PROMPTS, calib_steps=3, **CALL)
    # 3 prompts x 3 steps x 2 guided halves, latent 4 x 2 x 2 (16 px / the VAE's factor 2... of 2 blocks)
    assert len(calib) == 3 * 3 * 2 and calib.x.shape[1] == 4
    assert calib.cond.shape == (18, 16, 32)
    # the halves differ (text vs empty prompt) and the text embeddings are the encoder's, not a stub
    with torch.no_grad():
        ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=16, return_tensors="pt").input_ids
        embeds = pipe.text_encoder(ids)[0]
    torch.testing.assert_close(calib.cond[3:6], embeds, atol=1e-5, rtol=1e-5)
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
        qdiffuse.quantize(pipe, QuantConfig.from_scheme("w8a8", method="ptqd"), prompts=PROMPTS, **CALL)
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
    index["_class_name"] = "StableDiffusionXLPipeline"
    (tmp_path / "sd" / "model_index.json").write_text(json.dumps(index))
    bad = run("quantize", tmp_path / "sd", "--out", tmp_path / "q2")
    assert bad.returncode == 2 and "StableDiffusionXLPipeline is not supported yet" in bad.stderr
    assert not (tmp_path / "q2").exists()
