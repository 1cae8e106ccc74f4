"""Activation outliers and range drift: measure them, choose per layer what the format can hold, report it.

:mod:`.treatment` is the per-layer input rewrite (smoothing, rotation, outlier channels and a low-rank branch in
FP); :mod:`.stats` measures each quantized input's range structure on the calibration data; :mod:`.auto` scores
the candidate treatments per layer and decides; :mod:`.guard` checks the whole model against its weight-only twin;
:mod:`.sensitivity` ranks blocks and layers by what their quantized inputs cost; :mod:`.commands` is what the
command line prints of all this.
"""
