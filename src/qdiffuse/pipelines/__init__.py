"""diffusers pipelines end to end: calibrate by running the pipeline, quantize its denoiser, PTQD inside the
pipeline's own call, save and load the pipeline folder.

``support`` (which pipelines, which component), ``calibrate`` (recording the denoiser's calls), ``quantize``,
``ptqd`` (statistics and the scheduler wrapper), ``store`` (folders), ``commands`` (the command line).
"""
