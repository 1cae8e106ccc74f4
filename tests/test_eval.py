"""Evaluation: metrics against closed forms, fidelity measures, sample loading, feature extractors."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from qdiffuse.errors import ConfigError, DataError, ModelLoadError, OutputError
from qdiffuse.eval.classifier import (
    DEFAULT_DATA_DIR,
    FMNISTClassifier,
    load_classifier,
    load_reference_stats,
    pad_to_32,
    read_fmnist_split,
    train_classifier,
)
from qdiffuse.eval.evaluate import compare_to_fp, evaluate_samples, format_table, load_samples
from qdiffuse.eval.features import extract_features
from qdiffuse.eval.fidelity import mse, psnr, ssim, summarize
from qdiffuse.eval.inception import SPATIAL_DIM, FIDInceptionV3, expected_keys, load_inception
from qdiffuse.eval.metrics import (
    feature_stats,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)
from qdiffuse.fsutil import MARKER

HAVE_FMNIST = (DEFAULT_DATA_DIR / "t10k-images-idx3-ubyte.gz").is_file()
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST IDX files not installed")


# ---------------------------------------------------------------------------------------------- metrics


def test_frechet_identical_is_zero() -> None:
    rng = np.random.default_rng(0)
    mu, sigma = feature_stats(rng.normal(size=(500, 8)))
    assert 0.0 <= frechet_distance(mu, sigma, mu, sigma) < 1e-6


def test_frechet_matches_closed_form_for_diagonal_gaussians() -> None:
    mu1, mu2 = np.zeros(4), np.array([1.0, -2.0, 0.5, 0.0])
    a, b = np.array([1.0, 2.0, 0.5, 4.0]), np.array([3.0, 0.5, 0.5, 1.0])
    expected = float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)


def test_frechet_singular_covariance_stays_finite() -> None:
    rng = np.random.default_rng(1)
    f = rng.normal(size=(5, 16))  # 5 samples in 16-d: rank-4 covariance
    mu, sigma = feature_stats(f)
    mu2, sigma2 = feature_stats(rng.normal(size=(5, 16)))
    reference = frechet_distance(mu, sigma, mu2, sigma2)
    assert math.isfinite(reference)
    assert frechet_distance(mu, sigma, mu2, sigma2, method="eigh") == pytest.approx(reference, rel=1e-4)


def test_frechet_methods_agree() -> None:
    rng = np.random.default_rng(2)
    mu1, sigma1 = feature_stats(rng.normal(size=(300, 32)))
    mu2, sigma2 = feature_stats(rng.normal(size=(300, 32)) @ rng.normal(size=(32, 32)) * 0.3 + 0.5)
    reference = frechet_distance(mu1, sigma1, mu2, sigma2, method="sqrtm")
    assert frechet_distance(mu1, sigma1, mu2, sigma2, method="eigh") == pytest.approx(reference, rel=1e-8)
    with pytest.raises(ConfigError, match="unknown"):
        frechet_distance(mu1, sigma1, mu2, sigma2, method="svd")


def test_frechet_rejects_mismatched_dimensions() -> None:
    with pytest.raises(DataError, match="same feature extractor"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_kid_same_distribution_near_zero_and_shift_positive() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(600, 16)), rng.normal(size=(600, 16))
    same_mean, same_std = kernel_inception_distance(x, y, subsets=20, subset_size=200)
    shifted_mean, _ = kernel_inception_distance(x, y + 1.0, subsets=20, subset_size=200)
    assert abs(same_mean) < max(3 * same_std, 1e-2)
    assert shifted_mean > 10 * abs(same_mean) and shifted_mean > 0.1


def test_inception_score_of_uniform_one_hot_is_number_of_classes() -> None:
    k = 5
    probs = np.eye(k)[np.arange(100) % k]
    mean, std = inception_score(probs, splits=10)
    assert mean == pytest.approx(k) and std == pytest.approx(0.0, abs=1e-12)
    assert inception_score(probs * 50.0 - 25.0, splits=10)[0] == pytest.approx(k, rel=1e-6)  # as logits
    assert inception_score(np.eye(k)[np.zeros(100, dtype=int)], splits=10)[0] == pytest.approx(1.0)


def test_precision_recall_identical_and_disjoint() -> None:
    rng = np.random.default_rng(0)
    real = rng.normal(size=(400, 8))
    assert precision_recall(real, real.copy(), k=3) == (1.0, 1.0)
    assert precision_recall(real, real + 50.0, k=3) == (0.0, 0.0)
    half = np.concatenate([rng.normal(size=(200, 8)), rng.normal(size=(200, 8)) + 50.0])
    precision, recall = precision_recall(real, half, k=3, batch_size=64)
    assert 0.35 < precision < 0.55 and recall > 0.8


# ---------------------------------------------------------------------------------------------- fidelity


def test_psnr_identical_is_inf_and_matches_known_mse() -> None:
    a = np.full((2, 16, 16, 1), 100, dtype=np.uint8)
    b = a.copy()
    b[1] += 10  # MSE 100 on image 1
    assert np.isinf(psnr(a, a)).all()
    values = psnr(a, b)
    assert np.isinf(values[0])
    assert values[1] == pytest.approx(10 * math.log10(255.0**2 / 100.0))
    np.testing.assert_allclose(mse(a, b), [0.0, 100.0])
    summary = summarize(values)
    assert summary["identical"] == 1 and summary["mean"] == pytest.approx(values[1])


def test_ssim_identical_noise_and_constant_closed_form() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(3, 32, 32, 1), dtype=np.uint8)
    noise = rng.integers(0, 256, size=(3, 32, 32, 1), dtype=np.uint8)
    np.testing.assert_allclose(ssim(img, img), 1.0)
    assert (ssim(img, noise) < 0.2).all()
    x, y = np.full((1, 16, 16, 3), 100, np.uint8), np.full((1, 16, 16, 3), 110, np.uint8)
    c1 = (0.01 * 255) ** 2
    assert ssim(x, y)[0] == pytest.approx((2 * 100 * 110 + c1) / (100**2 + 110**2 + c1))


def test_fidelity_rejects_mismatched_shapes() -> None:
    with pytest.raises(DataError, match="same seeds"):
        psnr(np.zeros((2, 16, 16, 1), np.uint8), np.zeros((3, 16, 16, 1), np.uint8))


# ---------------------------------------------------------------------------------------------- load_samples


def test_load_samples_roundtrip(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, size=(4, 32, 32, 1), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", arr_0=images, labels=np.arange(4))
    loaded, labels = load_samples(tmp_path / "s.npz")
    np.testing.assert_array_equal(loaded, images)
    np.testing.assert_array_equal(labels, np.arange(4))
    np.savez(tmp_path / "gray.npz", images[..., 0])
    assert load_samples(tmp_path / "gray.npz")[0].shape == (4, 32, 32, 1)
    assert load_samples(tmp_path / "gray.npz")[1] is None


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "does not exist"),
        ("text", "not an .npz"),
        ({"images": np.zeros((2, 8, 8, 1), np.uint8)}, "no arr_0"),
        ({"arr_0": np.zeros((2, 8, 8, 1), np.float32)}, "dtype float32"),
        ({"arr_0": np.zeros((2, 8, 8, 5), np.uint8)}, "C = 1 or 3"),
        ({"arr_0": np.zeros((8, 8), np.uint8)}, "N x H x W x C"),
        ({"arr_0": np.zeros((0, 8, 8, 1), np.uint8)}, "no images"),
        ({"arr_0": np.zeros((2, 8, 8, 1), np.uint8), "labels": np.zeros(3, int)}, "one per image"),
        ({"arr_0": np.array([{"a": 1}], dtype=object)}, "not a readable .npz"),
    ],
)
def test_load_samples_errors(tmp_path: Path, content: object, match: str) -> None:
    path = tmp_path / "bad.npz"
    if isinstance(content, str):
        path.write_text(content)
    elif isinstance(content, dict):
        np.savez(path, **content)
    with pytest.raises(DataError, match=match):
        load_samples(path)


# ---------------------------------------------------------------------------------------------- classifier


@pytest.fixture(scope="module")
def classifier() -> FMNISTClassifier:
    return load_classifier()


def test_shipped_classifier_files_are_small() -> None:
    from qdiffuse.eval.classifier import builtin_classifier_dir

    folder = builtin_classifier_dir()
    total = sum(p.stat().st_size for p in folder.iterdir())
    assert total < 6 * 2**20
    stats = load_reference_stats()
    assert stats["mu"].shape == (128,) and stats["sigma"].shape == (128, 128)
    assert stats["spatial_sigma"].shape == (448, 448) and stats["features"].shape == (10000, 128)


def test_classifier_shapes(classifier: FMNISTClassifier) -> None:
    x = classifier.preprocess(torch.zeros(3, 28, 28, 1, dtype=torch.uint8))
    assert x.shape == (3, 1, 32, 32) and float(x.min()) == -1.0
    pool, logits, spatial = classifier.features(x)
    assert pool.shape == (3, 128) and logits.shape == (3, 10) and spatial.shape == (3, 448)
    with pytest.raises(DataError, match="inception"):
        classifier.preprocess(torch.zeros(1, 64, 64, 3, dtype=torch.uint8))


def test_load_classifier_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not a classifier folder"):
        load_classifier(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    (tmp_path / "classifier.safetensors").write_bytes(b"junk")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_classifier(tmp_path)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_train_classifier_writes_loadable_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    for prefix, n in (("train", 96), ("t10k", 32)):
        _write_idx(data / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(data / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    out = train_classifier(data, tmp_path / "clf", epochs=1, batch_size=32, seed=0)
    assert sorted(p.name for p in out.iterdir() if p.name != MARKER) == [
        "classifier.safetensors",
        "config.json",
        "reference_stats.safetensors",
    ]
    assert load_classifier(out).feature_dim == 128
    assert load_reference_stats(out)["features"].shape == (32, 128)
    with pytest.raises(OutputError, match="already exists"):
        train_classifier(data, out, epochs=1, batch_size=32)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@needs_fmnist
def test_shipped_classifier_accuracy_and_fid_baseline(classifier: FMNISTClassifier) -> None:
    images, labels = read_fmnist_split(DEFAULT_DATA_DIR, "test")
    real = pad_to_32(images[:1000])
    with torch.no_grad():
        logits = classifier(classifier.preprocess(torch.from_numpy(real)))
    accuracy = float((logits.argmax(1).numpy() == labels[:1000]).mean())
    assert accuracy >= 0.90

    result = evaluate_samples(real, labels=labels[:1000], kid_subsets=5)
    assert result["num_samples"] == 1000 and result["num_reference"] == 10000
    assert "biased upward" in result["note"]
    assert result["precision"] > 0.6 and result["recall"] > 0.6
    assert result["label_accuracy"] >= 0.90
    by_class = result["label_accuracy_by_class"]
    counts = np.bincount(labels[:1000], minlength=10)
    assert sorted(by_class, key=int) == [str(c) for c in range(10)]
    assert sum(by_class[str(c)] * counts[c] for c in range(10)) / 1000 == pytest.approx(result["label_accuracy"])
    assert min(by_class.values()) >= 0.5  # even shirts, the hardest class, are mostly recognised
    table = format_table(result)
    assert "| FID |" in table and "| label accuracy of class: 9 |" in table

    # trousers passed off as bags: only the bag class loses accuracy
    relabelled = np.where(labels[:1000] == 1, 8, labels[:1000])
    wrong = evaluate_samples(real, labels=relabelled, kid_subsets=5)["label_accuracy_by_class"]
    assert "1" not in wrong
    assert wrong["8"] < 0.6 * by_class["8"]
    assert all(wrong[c] == by_class[c] for c in wrong if c != "8")

    noise = np.random.default_rng(0).integers(0, 256, size=(1000, 32, 32, 1), dtype=np.uint8)
    noise_pool = extract_features(classifier, noise).pool
    ref = load_reference_stats()
    noise_fid = frechet_distance(*feature_stats(noise_pool), ref["mu"], ref["sigma"])
    noise_kid, _ = kernel_inception_distance(ref["features"].astype(np.float32), noise_pool, subsets=5)
    assert result["fid"] < 0.05 * noise_fid
    assert result["kid_mean"] < 0.05 * noise_kid


# ---------------------------------------------------------------------------------------------- evaluate API


def _blobs(n: int, seed: int, shift: int = 0) -> np.ndarray:
    """Synthetic 32x32 grayscale 'garments': bright rectangles of random size on black."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, 32, 32, 1), np.uint8)
    for i in range(n):
        h, w = rng.integers(8, 24, size=2)
        top, left = rng.integers(2, 32 - h - 1), rng.integers(2, 32 - w - 1)
        out[i, top : top + h, left : left + w] = min(255, 150 + shift + int(rng.integers(0, 60)))
    return out


def test_evaluate_with_image_and_stats_references(tmp_path: Path, classifier: FMNISTClassifier) -> None:
    ref_images, samples = _blobs(300, 0), _blobs(200, 1)
    np.savez(tmp_path / "ref.npz", arr_0=ref_images)
    from_images = evaluate_samples(samples, ref=tmp_path / "ref.npz", kid_subsets=3, kid_subset_size=100)
    assert from_images["num_reference"] == 300
    for key in ("fid", "sfid", "inception_score", "precision", "recall", "kid_mean", "kid_std"):
        assert math.isfinite(from_images[key]), key

    from qdiffuse.eval.evaluate import reference_statistics

    stats = reference_statistics(ref_images, classifier)
    np.savez(tmp_path / "stats.npz", mu=stats["mu"], sigma=stats["sigma"])
    from_stats = evaluate_samples(samples, ref=tmp_path / "stats.npz")
    assert from_stats["fid"] == pytest.approx(from_images["fid"], rel=1e-6)
    assert "sfid" not in from_stats and "precision" not in from_stats

    np.savez(tmp_path / "wrong.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(DataError, match="same extractor"):
        evaluate_samples(samples, ref=tmp_path / "wrong.npz")
    np.savez(tmp_path / "empty.npz", other=np.zeros(3))
    with pytest.raises(DataError, match="neither images"):
        evaluate_samples(samples, ref=tmp_path / "empty.npz")


def test_evaluate_config_errors(tmp_path: Path) -> None:
    samples = _blobs(8, 0)
    with pytest.raises(ConfigError, match="unknown feature extractor"):
        evaluate_samples(samples, extractor="clip")
    with pytest.raises(ConfigError, match="needs its weights"):
        evaluate_samples(samples, extractor="inception")
    with pytest.raises(ModelLoadError, match="do not exist"):
        evaluate_samples(samples, extractor="inception", inception_weights=tmp_path / "none.pth")


def test_compare_to_fp(classifier: FMNISTClassifier) -> None:
    fp = _blobs(64, 0)
    same = compare_to_fp(fp, fp.copy())
    assert same["ssim"]["mean"] == pytest.approx(1.0) and same["psnr"]["identical"] == 64
    assert same["class_agreement"] == 1.0 and abs(same["fid_to_fp"]) < 1e-3
    noisy = np.clip(fp.astype(int) + np.random.default_rng(0).integers(-20, 21, fp.shape), 0, 255)
    drift = compare_to_fp(fp, noisy.astype(np.uint8))
    assert drift["psnr"]["mean"] < 40 and drift["ssim"]["mean"] < 1.0 and drift["fid_to_fp"] > 0
    table = format_table(drift)
    assert "| PSNR (dB) |" in table and "Note:" in table
    nested = format_table({"fid": 1.5, "note": drift["note"], "fidelity": drift})
    assert "| fidelity to FP: SSIM |" in nested and nested.count("Note:") == 1
    rgb = np.zeros((4, 16, 16, 3), np.uint8)
    skipped = compare_to_fp(rgb, rgb)
    assert "fid_to_fp" not in skipped and "inception_weights" in skipped["note"]


# ---------------------------------------------------------------------------------------------- inception


def test_inception_key_layout() -> None:
    keys = expected_keys()
    assert keys["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert keys["Mixed_5b.branch_pool.conv.weight"] == (32, 192, 1, 1)
    assert keys["Mixed_6d.branch7x7_1.conv.weight"] == (160, 768, 1, 1)
    assert keys["Mixed_6e.branch7x7dbl_5.conv.weight"] == (192, 192, 1, 7)
    assert keys["Mixed_7a.branch3x3_2.conv.weight"] == (320, 192, 3, 3)
    assert keys["Mixed_7b.branch3x3dbl_3b.bn.running_var"] == (384,)
    assert keys["Mixed_7c.branch_pool.conv.weight"] == (192, 2048, 1, 1)
    assert keys["fc.weight"] == (1008, 2048) and keys["fc.bias"] == (1008,)
    assert not any(k.startswith("AuxLogits") for k in keys)
    # torchvision's ImageNet Inception-v3 has 27,161,264 parameters; minus its auxiliary head (3,326,696),
    # plus 8 more output classes (16,392).
    assert sum(math.prod(s) for k, s in keys.items() if "running" not in k) == 23_850_960


def test_inception_random_init_forward() -> None:
    model = FIDInceptionV3().eval()
    images = torch.randint(0, 256, (2, 32, 32, 1), dtype=torch.uint8)
    with torch.no_grad():
        x = model.preprocess(images)
        pool, logits, spatial = model.features(x)
    assert x.shape == (2, 3, 299, 299)
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008) and spatial.shape == (2, SPATIAL_DIM)


def test_inception_loading_checks_keys(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: torch.zeros(s, dtype=torch.float16) for k, s in expected_keys().items()}
    save_file(state, str(tmp_path / "ok.safetensors"))
    model = load_inception(tmp_path / "ok.safetensors")
    assert float(model.fc.weight.abs().sum()) == 0.0

    state_pth = {k: torch.zeros(1) for k in ("Conv2d_1a_3x3.conv.weight", "AuxLogits.fc.weight")}
    torch.save(state_pth, tmp_path / "bad.pth")
    with pytest.raises(ModelLoadError, match="ImageNet Inception"):
        load_inception(tmp_path / "bad.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ModelLoadError, match="not a valid safetensors"):
        load_inception(tmp_path / "junk.safetensors")
