"""Evaluate sample sets: distribution metrics against a reference, and fidelity to full-precision samples.

Samples travel as ``.npz`` files in the ADM convention: ``arr_0`` holds uint8 ``N x H x W x C`` images and an
optional ``labels`` array holds class labels. Two feature spaces are available:

* ``classifier`` (default): the Fashion-MNIST classifier shipped with qdiffuse, whose test-set statistics ship
  next to it (``ref="fmnist"``), so FID works offline with nothing to download;
* ``inception``: the FID Inception-v3, from a weights file the user has on disk, for numbers comparable with
  the literature; its reference must be given as an ``.npz`` of images or precomputed statistics.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qdiffuse.errors import ConfigError, DataError
from qdiffuse.eval.classifier import load_classifier, load_reference_stats
from qdiffuse.eval.features import FeatureNetwork, Features, check_images, extract_features
from qdiffuse.eval.fidelity import fidelity
from qdiffuse.eval.inception import load_inception
from qdiffuse.eval.metrics import (
    feature_stats,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)

EXTRACTORS = ("classifier", "inception")
SMALL_N = 2048
BUILTIN_REFS = ("fmnist",)

Result = dict[str, Any]


def load_samples(path: str | Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Read an ADM-style ``.npz``: ``(images uint8 [N, H, W, C], labels int64 [N] or None)``.

    Arrays are read with ``allow_pickle=False``, so a crafted file cannot run code.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"sample file {path} does not exist; pass the .npz written by `qdiffuse sample`")
    if not path.is_file():
        raise DataError(f"{path} is not a file; pass an .npz sample file")
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path} is not an .npz archive; save samples with np.savez(path, arr_0=images)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "arr_0" not in archive.files:
                raise DataError(
                    f"{path} has no arr_0 (keys: {', '.join(archive.files) or 'none'}); store the images as "
                    "arr_0, e.g. np.savez(path, images)"
                )
            images = archive["arr_0"]
            labels = archive["labels"] if "labels" in archive.files else None
    except DataError:
        raise
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path} is not a readable .npz ({exc}); write it again with np.savez") from exc
    images = check_images(images, f"arr_0 in {path}")
    if labels is not None:
        n = images.shape[0]
        if labels.ndim != 1 or labels.shape[0] != n or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(
                f"labels in {path} have shape {labels.shape} and dtype {labels.dtype}; "
                f"expected {n} integers, one per image"
            )
        labels = labels.astype(np.int64)
    return images, labels


def _load_network(
    extractor: str, inception_weights: str | Path | None, classifier: str | Path | None, device: str
) -> FeatureNetwork:
    if extractor == "classifier":
        return load_classifier(classifier, device=device)
    if extractor == "inception":
        if inception_weights is None:
            raise ConfigError(
                "extractor 'inception' needs its weights file; pass inception_weights="
                "pt_inception-2015-12-05-6726825d.pth (or use extractor 'classifier')"
            )
        return load_inception(inception_weights, device=device)
    raise ConfigError(f"unknown feature extractor {extractor!r}; use one of {', '.join(EXTRACTORS)}")


def _read_reference_file(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise DataError(f"reference {path} does not exist; pass 'fmnist' or an .npz of images or statistics")
    if path.suffix == ".safetensors":
        return load_reference_stats(path)
    if not zipfile.is_zipfile(path):
        raise DataError(f"reference {path} is not an .npz archive; pass images as arr_0 or stats as mu/sigma")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {k: archive[k] for k in archive.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"reference {path} is not a readable .npz ({exc}); write it with np.savez") from exc


def reference_statistics(
    images: np.ndarray, net: FeatureNetwork, batch_size: int = 256, device: str = "cpu"
) -> dict[str, np.ndarray]:
    """Statistics of a reference image set in ``net``'s feature space, in the layout ``--ref`` files use.

    Keys: ``mu``, ``sigma``, ``spatial_mu``, ``spatial_sigma`` (float64) and ``features`` (float32 pool
    features). Save with ``np.savez(path, **stats)`` to reuse them without recomputing.
    """
    feats = extract_features(net, images, batch_size=batch_size, device=device)
    mu, sigma = feature_stats(feats.pool)
    smu, ssigma = feature_stats(feats.spatial)
    return {"mu": mu, "sigma": sigma, "spatial_mu": smu, "spatial_sigma": ssigma, "features": feats.pool}


def _resolve_reference(
    ref: str | Path,
    extractor: str,
    net: FeatureNetwork,
    classifier: str | Path | None,
    batch_size: int,
    device: str,
) -> tuple[dict[str, np.ndarray], int | None]:
    """Reference stats for ``ref`` plus the number of reference images they summarize (if known)."""
    if isinstance(ref, str) and ref in BUILTIN_REFS:
        if extractor != "classifier":
            raise ConfigError(
                f"the built-in reference {ref!r} holds classifier statistics; with extractor {extractor!r} "
                "pass ref=REF.npz holding reference images (arr_0) or statistics (mu, sigma) in that space"
            )
        stats = load_reference_stats(classifier)
        return stats, int(stats["features"].shape[0]) if "features" in stats else None
    raw = _read_reference_file(Path(ref))
    stats: dict[str, np.ndarray] = {}
    # ADM's reference batches call the spatial statistics mu_s/sigma_s.
    for key, aliases in (
        ("mu", ("mu",)),
        ("sigma", ("sigma",)),
        ("spatial_mu", ("spatial_mu", "mu_s")),
        ("spatial_sigma", ("spatial_sigma", "sigma_s")),
        ("features", ("features",)),
    ):
        for alias in aliases:
            if alias in raw:
                stats[key] = np.asarray(raw[alias])
                break
    count: int | None = None
    if "arr_0" in raw:
        images = check_images(raw["arr_0"], f"reference images (arr_0 in {ref})")
        computed = reference_statistics(images, net, batch_size=batch_size, device=device)
        for key, value in computed.items():
            stats.setdefault(key, value)
        count = int(images.shape[0])
    elif "features" in stats:
        count = int(stats["features"].shape[0])
    if "mu" not in stats or "sigma" not in stats:
        raise DataError(
            f"reference {ref} has neither images (arr_0) nor statistics (mu and sigma); write it with "
            "np.savez(path, arr_0=images) or np.savez(path, **reference_statistics(...))"
        )
    return stats, count


def _check_dims(stats: dict[str, np.ndarray], feats: Features, ref: str | Path, extractor: str) -> None:
    pairs = (("mu", feats.pool), ("spatial_mu", feats.spatial), ("features", feats.pool))
    for key, sample_feats in pairs:
        if key in stats and stats[key].shape[-1] != sample_feats.shape[1]:
            raise DataError(
                f"reference {ref} has {key} of dimension {stats[key].shape[-1]} but the {extractor} "
                f"features have {sample_feats.shape[1]}; compute the reference with the same extractor"
            )


def _small_n_note(n: int) -> str:
    return (
        f"only {n} samples (< {SMALL_N}): FID and sFID are biased upward at small N, so compare them "
        "only between runs with the same N (KID is unbiased)"
    )


def evaluate_samples(
    samples: np.ndarray,
    ref: str | Path = "fmnist",
    extractor: str = "classifier",
    inception_weights: Path | None = None,
    batch_size: int = 256,
    device: str = "cpu",
    *,
    labels: np.ndarray | None = None,
    classifier: str | Path | None = None,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    k: int = 3,
    fid_method: str = "eigh",
) -> Result:
    """FID, sFID, IS, precision, recall and KID of ``samples`` (uint8 NHWC) against a reference.

    ``ref`` is ``"fmnist"`` (the shipped Fashion-MNIST test-set statistics, classifier space only) or an
    ``.npz``/``.safetensors`` file holding reference images (``arr_0``) and/or statistics (``mu``, ``sigma``,
    optionally ``spatial_mu``/``spatial_sigma`` or ADM's ``mu_s``/``sigma_s``, and ``features`` for
    precision/recall and KID); precomputed statistics take precedence over images. Metrics whose inputs the
    reference lacks are left out. With ``labels`` and the classifier extractor, ``label_accuracy`` reports how
    often the classifier agrees with the class the samples were conditioned on, and ``label_accuracy_by_class``
    the same per class: one class the model cannot draw hides in the average but not there.

    ``fid_method`` picks how FID/sFID take the covariance square root (see
    :func:`~qdiffuse.eval.metrics.frechet_distance`): ``"eigh"`` (default, fast, agrees with the reference
    ``"sqrtm"`` to ~1e-7 relative) or ``"sqrtm"``.

    The result also holds ``num_samples``, ``num_reference``, ``extractor`` and, when N < 2048, a ``note``
    that FID is biased upward at small N.
    """
    samples = check_images(samples)
    n = int(samples.shape[0])
    if n < k + 1:
        raise DataError(f"only {n} samples; evaluation needs at least {k + 1}, and FID needs thousands")
    net = _load_network(extractor, inception_weights, classifier, device)
    # the reference first: a wrong path or feature space should fail before minutes of feature extraction
    stats, num_ref = _resolve_reference(ref, extractor, net, classifier, batch_size, device)
    feats = extract_features(net, samples, batch_size=batch_size, device=device)
    _check_dims(stats, feats, ref, extractor)

    result: Result = {"num_samples": n, "num_reference": num_ref, "extractor": extractor}
    mu, sigma = feature_stats(feats.pool)
    result["fid"] = frechet_distance(mu, sigma, stats["mu"], stats["sigma"], method=fid_method)
    if "spatial_mu" in stats and "spatial_sigma" in stats:
        smu, ssigma = feature_stats(feats.spatial)
        result["sfid"] = frechet_distance(smu, ssigma, stats["spatial_mu"], stats["spatial_sigma"], method=fid_method)
    is_mean, is_std = inception_score(feats.logits, splits=min(10, n))
    result["inception_score"] = is_mean
    result["inception_score_std"] = is_std
    if "features" in stats:
        ref_feats = stats["features"].astype(np.float32)
        result["precision"], result["recall"] = precision_recall(ref_feats, feats.pool, k=k)
        result["kid_mean"], result["kid_std"] = kernel_inception_distance(
            ref_feats, feats.pool, subsets=kid_subsets, subset_size=kid_subset_size
        )
    if labels is not None and extractor == "classifier":
        labels = np.asarray(labels)
        if labels.shape != (n,):
            raise DataError(f"labels have shape {labels.shape}, expected ({n},); pass one label per sample")
        correct = feats.logits.argmax(axis=1) == labels
        result["label_accuracy"] = float(correct.mean())
        result["label_accuracy_by_class"] = {
            str(int(c)): float(correct[labels == c].mean()) for c in np.unique(labels)
        }
    if n < SMALL_N:
        result["note"] = _small_n_note(n)
    return result


def _classifier_fits(images: np.ndarray) -> bool:
    return images.shape[-1] == 1 and tuple(images.shape[1:3]) in ((32, 32), (28, 28))


@torch.no_grad()
def compare_to_fp(
    fp_samples: np.ndarray,
    q_samples: np.ndarray,
    *,
    extractor: str | None = "auto",
    inception_weights: Path | None = None,
    classifier: str | Path | None = None,
    batch_size: int = 256,
    device: str = "cpu",
    fid_method: str = "eigh",
) -> Result:
    """How closely quantized samples follow full-precision samples drawn from the same seeds.

    Returns per-image MSE/PSNR/SSIM summaries (``mse``, ``psnr``, ``ssim``: dicts of mean/std/min), and, in a
    feature space, ``fid_to_fp`` (FID between the two sets) and ``class_agreement`` (fraction of pairs the
    classifier puts in the same class; classifier only). ``extractor="auto"`` uses the classifier for 32x32
    grayscale images, Inception when ``inception_weights`` is given, and otherwise skips the feature metrics
    with a note; ``None`` always skips them.
    """
    fp_samples = check_images(fp_samples, "full-precision samples")
    q_samples = check_images(q_samples, "quantized samples")
    result: Result = {"num_samples": int(fp_samples.shape[0])}
    result.update(fidelity(fp_samples, q_samples))
    notes: list[str] = []
    if extractor == "auto":
        if _classifier_fits(fp_samples):
            extractor = "classifier"
        elif inception_weights is not None:
            extractor = "inception"
        else:
            extractor = None
            notes.append("no feature extractor fits these images; pass inception_weights for fid_to_fp")
    if extractor is not None:
        net = _load_network(extractor, inception_weights, classifier, device)
        f_fp = extract_features(net, fp_samples, batch_size=batch_size, device=device)
        f_q = extract_features(net, q_samples, batch_size=batch_size, device=device)
        result["extractor"] = extractor
        result["fid_to_fp"] = frechet_distance(*feature_stats(f_fp.pool), *feature_stats(f_q.pool), method=fid_method)
        if extractor == "classifier":
            agree = f_fp.logits.argmax(axis=1) == f_q.logits.argmax(axis=1)
            result["class_agreement"] = float(agree.mean())
        if fp_samples.shape[0] < SMALL_N:
            notes.append(_small_n_note(int(fp_samples.shape[0])))
    if notes:
        result["note"] = "; ".join(notes)
    return result


_LABELS = {
    "num_samples": "samples",
    "num_reference": "reference images",
    "extractor": "feature extractor",
    "fid": "FID",
    "sfid": "sFID",
    "inception_score": "IS",
    "inception_score_std": "IS std",
    "precision": "precision",
    "recall": "recall",
    "kid_mean": "KID",
    "kid_std": "KID std",
    "label_accuracy": "label accuracy",
    "label_accuracy_by_class": "label accuracy of class",
    "text_alignment": "text alignment (class the prompt names)",
    "mse": "MSE (0-255)",
    "psnr": "PSNR (dB)",
    "ssim": "SSIM",
    "fid_to_fp": "FID to FP",
    "class_agreement": "class agreement",
    "fidelity": "fidelity to FP",
}


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool | str):
        return str(value)
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        v = float(value)
        if math.isinf(v) or math.isnan(v):
            return str(v)
        if v != 0.0 and abs(v) < 1e-2:
            return f"{v:.2e}"
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"
    if isinstance(value, dict):
        parts = [f"{_fmt(value.get('mean'))} ± {_fmt(value.get('std'))}", f"min {_fmt(value.get('min'))}"]
        if value.get("identical"):
            parts.append(f"{int(value['identical'])} identical")
        return ", ".join(parts)
    return str(value)


def _rows(results: Result, prefix: str = "") -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for key, value in results.items():
        if key == "note":
            continue
        label = prefix + _LABELS.get(key, key)
        if isinstance(value, dict) and "mean" not in value:  # a nested result, e.g. compare_to_fp's
            rows.extend(_rows(value, prefix=f"{label}: "))
        else:
            rows.append((label, _fmt(value)))
    return rows


def _notes(results: Result) -> list[str]:
    notes = [str(results["note"])] if results.get("note") else []
    for value in results.values():
        if isinstance(value, dict):
            notes.extend(n for n in _notes(value) if n not in notes)
    return notes


def format_table(results: Result) -> str:
    """A two-column Markdown table of a result from :func:`evaluate_samples` or :func:`compare_to_fp`.

    Per-image summaries show as ``mean ± std, min``; nested results (a ``compare_to_fp`` result stored under a
    key of an ``evaluate_samples`` result) become prefixed rows; notes are printed under the table, once each.
    """
    lines = ["| metric | value |", "| --- | --- |"]
    lines.extend(f"| {label} | {value} |" for label, value in _rows(results))
    notes = _notes(results)
    if notes:
        lines.append("")
        lines.extend(f"Note: {note}" for note in notes)
    return "\n".join(lines)
