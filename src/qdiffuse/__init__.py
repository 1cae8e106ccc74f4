"""qdiffuse: noise-aware post-training quantization of diffusion models."""

__version__ = "0.1.0"
