"""Evaluation of generated samples: feature extractors, distribution metrics and fidelity to FP samples.

The main entry points are :func:`evaluate_samples` (FID, sFID, IS, precision/recall, KID against a
reference), :func:`compare_to_fp` (paired PSNR/SSIM/MSE and FID between FP and quantized samples) and
:func:`load_samples` (ADM-style ``.npz`` files).
"""

from qdiffuse.eval.evaluate import (
    compare_to_fp,
    evaluate_samples,
    format_table,
    load_samples,
    reference_statistics,
)

__all__ = ["compare_to_fp", "evaluate_samples", "format_table", "load_samples", "reference_statistics"]
