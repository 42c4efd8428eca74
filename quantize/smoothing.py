"""Per-input-channel scaling before quantization (AWQ / SmoothQuant): W x = (W diag(s)) (x / s).

Multiplying a weight's input columns by s and dividing its input by s changes nothing in exact
arithmetic, but it moves where the rounding happens:
  - columns that meet large activations get larger weights, so block quantization spends
    relatively more of its levels on them (AWQ's point: the error there costs most);
  - the activations lose their outlier channels, which is what onnxruntime's int8 activation
    blocks (MatMulNBits accuracy_level 4) round worst (SmoothQuant's point).
The exporter folds 1/s into whatever produced x (a norm's gain, or up_proj's rows), so the
graph gains no node.

s = a^ALPHA, a the calibration's mean |x| per input channel. ALPHA is one fixed number, chosen
by measurement (docs/quantization.md, de-gridded SmolLM2, two unrelated texts): 0.25 beat
0, 0.125, 0.375, 0.5 and a per-group search that minimised the simulated output error on the
calibration tokens; that search picked alphas that fit random tokens and lost on real text.
"""

from __future__ import annotations

import numpy as np

ALPHA = 0.25


def channel_scales(act: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """a^alpha normalised to a geometric mean of 1 (so neither side drifts in magnitude)."""
    a = np.maximum(np.asarray(act, np.float64), 1e-5)
    s = a ** alpha
    s /= np.exp(np.mean(np.log(s)))
    return s.astype(np.float32)
