"""Built-in models: Fashion-MNIST IDX loading, the trainer's output folder, the shipped models and the registry."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from qdiffuse.errors import ConfigError, DataError, ModelLoadError, OutputError
from qdiffuse.models import builtin
from qdiffuse.models.architectures import NULL_CLASS, build_model, model_subfolder
from qdiffuse.models.fmnist import (
    FMNIST_CLASSES,
    FMNIST_FILES,
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    load_fmnist,
)
from qdiffuse.models.train import RECIPES, train_diffusion


def _write_idx(path: Path, data: np.ndarray, magic: int) -> None:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in data.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + data.astype(np.uint8).tobytes())


def _synthetic_fmnist(root: Path, n: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Write all four IDX files with n train and n test examples; images are 0 except a 255 square."""
    rng = np.random.default_rng(0)
    images = np.zeros((n, 28, 28), dtype=np.uint8)
    images[:, 10:18, 10:18] = 255
    images[0, 0, 0] = 128
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    for image_file, label_file in FMNIST_FILES.values():
        _write_idx(root / image_file, images, IDX_IMAGES_MAGIC)
        _write_idx(root / label_file, labels, IDX_LABELS_MAGIC)
    return images, labels


def test_loader_pads_and_scales(tmp_path: Path) -> None:
    images, labels = _synthetic_fmnist(tmp_path, n=5)
    x, y = load_fmnist("train", tmp_path)
    assert x.shape == (5, 1, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.tolist() == labels.tolist()
    assert x.min() >= -1.0 and x.max() <= 1.0
    # 2 pixels of padding on each side, filled with the background value -1.
    assert torch.all(x[:, :, :2, :] == -1) and torch.all(x[:, :, :, -2:] == -1)
    assert torch.all(x[:, 0, 12:20, 12:20] == 1.0)
    assert x[0, 0, 2, 2].item() == pytest.approx(128 / 127.5 - 1, abs=1e-6)
    x_test, _ = load_fmnist("test", tmp_path, limit=3)
    assert x_test.shape[0] == 3
    assert len(FMNIST_CLASSES) == 10


def test_loader_errors_name_the_file_and_the_fix(tmp_path: Path) -> None:
    _synthetic_fmnist(tmp_path)
    labels_file = tmp_path / FMNIST_FILES["train"][1]
    labels_file.unlink()
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz.*apt-get install dataset-fashion-mnist"):
        load_fmnist("train", tmp_path)

    images_file = tmp_path / FMNIST_FILES["test"][0]
    _write_idx(images_file, np.zeros((3, 28, 28)), IDX_LABELS_MAGIC)  # wrong magic number
    with pytest.raises(DataError, match=r"t10k-images.*magic number.*--data DIR"):
        load_fmnist("test", tmp_path)

    with gzip.open(images_file, "wb") as fh:  # header says 3 images, payload holds fewer bytes
        fh.write(IDX_IMAGES_MAGIC.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (3, 28, 28)))
        fh.write(b"\0" * 100)
    with pytest.raises(DataError, match="data bytes"):
        load_fmnist("test", tmp_path)

    images_file.write_bytes(b"not a gzip file")
    with pytest.raises(DataError, match="cannot read"):
        load_fmnist("test", tmp_path)

    with pytest.raises(DataError, match="not found"):
        load_fmnist("train", tmp_path / "nowhere")
    with pytest.raises(ConfigError):
        load_fmnist("validation", tmp_path)


def _fp16_tensors(path: Path) -> set[torch.dtype]:
    with safe_open(str(path), framework="pt") as fh:
        return {fh.get_tensor(k).dtype for k in fh.keys()}


def test_train_writes_a_diffusers_folder(tmp_path: Path) -> None:
    from diffusers import DDPMPipeline, UNet2DModel

    data = tmp_path / "data"
    data.mkdir()
    _synthetic_fmnist(data)
    out = tmp_path / "model"
    result = train_diffusion(
        "fmnist-tiny", str(data), out, steps=3, batch_size=4, lr=1e-3, device="cpu", seed=0, progress=False,
        log_every=1,
    )
    assert result == out.resolve()
    weights = out / "unet" / "diffusion_pytorch_model.safetensors"
    assert _fp16_tensors(weights) == {torch.float16}
    unet = UNet2DModel.from_pretrained(out / "unet", torch_dtype=torch.float32)
    sample = unet(torch.randn(2, 1, 32, 32), torch.tensor([10, 500]), class_labels=torch.tensor([3, NULL_CLASS]))
    assert sample.sample.shape == (2, 1, 32, 32)
    pipe = DDPMPipeline.from_pretrained(out)
    assert type(pipe.unet).__name__ == "UNet2DModel"
    card = (out / "README.md").read_text()
    assert "FP FID: not yet measured" in card and "CPU recipe" in card
    meta = json.loads((out / "qdiffuse.json").read_text())
    assert meta["null_class"] == NULL_CLASS and meta["num_classes"] == 10 and meta["steps"] == 3
    log = json.loads((out / "train_log.json").read_text())
    assert log["step"] == [1, 2, 3] and len(log["loss"]) == 3
    assert not list(tmp_path.glob(".model.*")), "the temporary folder must be renamed away"

    with pytest.raises(OutputError, match="already exists"):
        train_diffusion("fmnist-tiny", str(data), out, 1, 2, 1e-3, "cpu", 0, progress=False)

    more = train_diffusion(
        "fmnist-tiny", str(data), tmp_path / "more", 1, 2, 1e-3, "cpu", 0, progress=False, init_from=out
    )
    meta = json.loads((more / "qdiffuse.json").read_text())
    assert meta["steps"] == 4 and [s["steps"] for s in meta["stages"]] == [3, 1]
    assert "_name_or_path" not in json.loads((more / "unet" / "config.json").read_text())
    with pytest.raises(ConfigError, match="different architecture"):
        train_diffusion("fmnist-ddpm", str(data), tmp_path / "x", 1, 2, 1e-3, "cpu", 0, init_from=out)


def test_train_dit_with_in_memory_dataset(tmp_path: Path) -> None:
    from diffusers import DiTTransformer2DModel

    images = torch.rand(6, 1, 32, 32) * 2 - 1
    labels = torch.arange(6) % 10
    out = tmp_path / "dit"
    train_diffusion(
        "fmnist-dit", None, out, 2, 3, 1e-3, "cpu", 0, progress=False, dataset=(images, labels)
    )
    assert model_subfolder("fmnist-dit") == "transformer"
    assert _fp16_tensors(out / "transformer" / "diffusion_pytorch_model.safetensors") == {torch.float16}
    dit = DiTTransformer2DModel.from_pretrained(out / "transformer", torch_dtype=torch.float32).eval()
    # Row NULL_CLASS of every block's label table exists and is selected by the null label.
    table = dit.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
    assert table.num_embeddings == NULL_CLASS + 1
    eps = dit(torch.randn(2, 1, 32, 32), timestep=torch.tensor([1, 999]), class_labels=torch.tensor([0, 10]))
    assert eps.sample.shape == (2, 1, 32, 32)


def test_train_rejects_bad_settings(tmp_path: Path) -> None:
    data = (torch.zeros(2, 1, 32, 32), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ConfigError, match="fmnist-tiny"):
        train_diffusion("cifar", None, tmp_path / "a", 1, 1, 1e-3, "cpu", 0, dataset=data)
    with pytest.raises(ConfigError, match="steps"):
        train_diffusion("fmnist-tiny", None, tmp_path / "a", 0, 1, 1e-3, "cpu", 0, dataset=data)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="--device cpu"):
            train_diffusion("fmnist-tiny", None, tmp_path / "a", 1, 1, 1e-3, "cuda", 0, dataset=data)
    bad = (torch.zeros(2, 1, 28, 28), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(DataError, match="shape"):
        train_diffusion("fmnist-tiny", None, tmp_path / "a", 1, 1, 1e-3, "cpu", 0, dataset=bad)
    # every denoiser built-in has a recipe here; the pipeline built-in (fmnist-t2i) has its own (train_t2i.T2IRecipe)
    assert set(RECIPES) == {n for n, m in builtin.BUILTIN_MODELS.items() if not m.pipeline}
    assert all(set(r) == {"cpu", "gpu"} for r in RECIPES.values())


def test_shipped_fmnist_tiny_loads_with_plain_diffusers() -> None:
    from diffusers import DDIMScheduler, UNet2DModel

    assert "fmnist-tiny" in builtin.list_builtin()
    folder = builtin.builtin_path("fmnist-tiny")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size < 5_000_000
    assert _fp16_tensors(weights) == {torch.float16}
    unet = UNet2DModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch.float32).eval()
    scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    assert scheduler.config.num_train_timesteps == 1000
    with torch.no_grad():
        eps = unet(torch.randn(3, 1, 32, 32), torch.tensor([999, 500, 1]), class_labels=torch.tensor([0, 9, 10]))
    assert eps.sample.shape == (3, 1, 32, 32) and torch.isfinite(eps.sample).all()
    assert "FP FID:" in (folder / "README.md").read_text()


def test_shipped_fmnist_dit_loads_with_plain_diffusers() -> None:
    from diffusers import DDIMScheduler, DiTTransformer2DModel

    assert "fmnist-dit" in builtin.list_builtin()
    folder = builtin.builtin_path("fmnist-dit")
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    assert _fp16_tensors(weights) == {torch.float16}
    model = DiTTransformer2DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=torch.float32).eval()
    # diffusers' label embedding adds the null row (class 10) itself: 10 classes are configured
    assert model.config.patch_size == 2 and model.config.num_embeds_ada_norm == NULL_CLASS
    scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    assert scheduler.config.num_train_timesteps == 1000
    with torch.no_grad():
        out = model(
            torch.randn(3, 1, 32, 32), timestep=torch.tensor([999, 500, 1]), class_labels=torch.tensor([0, 9, 10])
        ).sample
    # learn_sigma is off: the transformer predicts ε only, with the input's channel count
    assert out.shape == (3, 1, 32, 32) and torch.isfinite(out).all()
    card = (folder / "README.md").read_text()
    assert "FP FID: not yet measured" not in card and "FP FID: 6.66" in card


@pytest.mark.parametrize("name", ["fmnist-tiny", "fmnist-dit"])
def test_shipped_fp_fid_is_recorded_with_its_command(name: str) -> None:
    """The card's FP FID and qdiffuse.json's ``fp_fid`` record are the same measurement, whose benchmark config
    ships in the repository, so a reader can rerun it."""
    folder = builtin.builtin_path(name)
    record = json.loads((folder / "qdiffuse.json").read_text())["fp_fid"]
    assert {"value", "num", "sampler", "steps", "eta", "guidance", "seed", "command", "date"} <= set(record)
    assert f"FP FID: {record['value']:.2f}" in (folder / "README.md").read_text()
    config = Path(__file__).resolve().parents[1] / record["command"].split("qdiffuse bench ", 1)[1].split()[0]
    bench = json.loads(config.read_text())
    assert name in bench["models"] and bench["num"] == record["num"] and bench["seed"] == record["seed"]
    assert bench["guidance"] == record["guidance"]
    assert {"sampler": record["sampler"], "steps": record["steps"], "eta": record["eta"]} in bench["samplers"]


def test_shipped_models_fit_the_package_budget() -> None:
    """The built-in folders (fp16 weights, cards, configs) ship in the wheel: together under 40 MB."""
    total = sum(f.stat().st_size for f in builtin.BUILTIN_ROOT.rglob("*") if f.is_file())
    assert total < 40_000_000
    assert {"fmnist-tiny", "fmnist-dit"} <= set(builtin.list_builtin())


@pytest.mark.parametrize("name", ["fmnist-tiny", "fmnist-dit"])
def test_shipped_models_draw_the_class_they_are_asked_for(name: str) -> None:
    """Twenty guided samples, two per class, scored by the shipped classifier: a model that ignores its label or
    draws noise scores about 0.1; the shipped ones score 0.75 and above with this seed."""
    from qdiffuse.eval.evaluate import evaluate_samples
    from qdiffuse.models.loading import load_model_folder
    from qdiffuse.sampling.loop import SampleRequest, sample, to_uint8

    loaded = load_model_folder(name)
    request = SampleRequest(num=20, steps=20, seed=0, labels=tuple(range(10)), guidance=2.0, batch_size=20)
    images, labels = sample(loaded.denoiser, loaded.scheduler_config, request)
    assert labels is not None
    result = evaluate_samples(to_uint8(images).numpy(), labels=labels.numpy(), kid_subsets=2, kid_subset_size=10)
    assert result["label_accuracy"] >= 0.6


def test_builtin_path_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="fmnist-tiny, fmnist-ddpm, fmnist-dit"):
        builtin.builtin_path("stable-diffusion")
    monkeypatch.setattr(builtin, "BUILTIN_ROOT", tmp_path)
    with pytest.raises(ModelLoadError, match="qdiffuse train fmnist-ddpm"):
        builtin.builtin_path("fmnist-ddpm")
    assert builtin.list_builtin() == []
    (tmp_path / "fmnist-tiny" / "unet").mkdir(parents=True)  # a half-written folder does not count
    with pytest.raises(ModelLoadError, match="not shipped"):
        builtin.builtin_path("fmnist-tiny")


def test_architectures_are_class_conditional_with_a_null_class() -> None:
    unet = build_model("fmnist-tiny")
    assert unet.class_embedding.num_embeddings == NULL_CLASS + 1
    assert sum(p.numel() for p in unet.parameters()) < 2_000_000
    with pytest.raises(ConfigError, match="fmnist-dit"):
        build_model("nope")
