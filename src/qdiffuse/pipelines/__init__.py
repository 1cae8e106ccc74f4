"""diffusers pipelines end to end: calibrate by running the pipeline, quantize its denoiser, save and load it."""
