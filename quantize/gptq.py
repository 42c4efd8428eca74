"""GPTQ: block-wise quantization with second-order error compensation (Frantar et al., 2022).

Round-to-nearest and the scale searches treat each weight on its own. GPTQ quantizes the
input columns of a [N, K] weight one at a time and spreads each column's rounding error over
the columns not yet quantized, in the proportions that minimise the layer's output error
||W X - Q X||^2 over calibration inputs X. That needs only H = X^T X [K, K].

Scales and zero points are fitted per block when the sweep enters it, to the weights as the
earlier columns' corrections have left them, with the same per-block search as the
data-free methods (``params``). The codes, layout and padding rules are those of numerics.py,
so the result is an ordinary QuantizedTensor: nothing downstream knows GPTQ ran.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from edgellama.errors import EdgeLlamaError
from edgellama.quantize.numerics import QuantizedTensor, check_weight, storable_scales

# Dampening added to H's diagonal, as a fraction of its mean: keeps the inverse stable when
# the calibration tokens are fewer than K or some input channels never fire.
DAMP = 0.01
# Columns updated together before the rest of the matrix sees their error ("lazy batch").
LAZY = 128

ParamsFn = Callable[[np.ndarray, "np.ndarray | None"], tuple[np.ndarray, np.ndarray]]


def inverse_cholesky(h: np.ndarray, damp: float = DAMP) -> tuple[np.ndarray, np.ndarray]:
    """Upper Cholesky factor of (H + damp)^-1, and the mask of dead (never active) inputs."""
    h = np.array(h, np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += damp * float(np.mean(np.diag(h)))
    for _ in range(4):
        try:
            low = np.linalg.cholesky(h)
            break
        except np.linalg.LinAlgError:  # not positive definite at float precision: damp harder
            h[np.diag_indices_from(h)] += damp * float(np.mean(np.diag(h)))
    else:
        raise EdgeLlamaError("GPTQ: the calibration Hessian is not positive definite")
    inv_low = np.linalg.inv(low)
    hinv = inv_low.T @ inv_low
    return np.linalg.cholesky(hinv).T, dead


def gptq_quantize(w: np.ndarray, h: np.ndarray, bits: int, block_size: int, symmetric: bool, params: ParamsFn,
                  sw: np.ndarray | None = None, scale_dtype: str = "float32") -> QuantizedTensor:
    """Quantize w [N, K] against H = X^T X [K, K]; params(wb [N, 1, bs], sw [1, bs]) -> (scale, zp)."""
    w = check_weight(w, bits, block_size)
    n, k = w.shape
    if h.shape != (k, k):
        raise EdgeLlamaError(f"GPTQ: Hessian shape {h.shape} does not match the weight's K = {k}")
    n_blocks = -(-k // block_size)
    kp = n_blocks * block_size
    hinv, dead = inverse_cholesky(h)
    if kp != k:  # padded columns: quantized last, to exactly zero, and they take no error
        hinv = np.pad(hinv, ((0, kp - k), (0, kp - k)))
        hinv[np.arange(k, kp), np.arange(k, kp)] = 1.0
    W = np.zeros((n, kp), np.float64)
    W[:, :k] = w
    W[:, :k][:, dead] = 0.0
    codes = np.empty((n, kp), np.uint8)
    scales = np.empty((n, n_blocks), np.float32)
    zps = np.empty((n, n_blocks), np.float32)
    qmax = (1 << bits) - 1
    lazy = max(block_size, LAZY // block_size * block_size)
    for b0 in range(0, kp, lazy):
        b1 = min(b0 + lazy, kp)
        W1 = W[:, b0:b1].copy()
        E1 = np.zeros_like(W1)
        H1 = hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if col % block_size == 0:
                blk = col // block_size
                wb = W1[:, i:i + block_size].astype(np.float32)[:, None, :]
                s, z = params(wb, None if sw is None else sw[blk:blk + 1])
                s = storable_scales(s[:, 0], scale_dtype)
                scales[:, blk], zps[:, blk] = s, z[:, 0]
                inv = np.divide(1.0, s, out=np.zeros_like(s), where=s != 0).astype(np.float64)
                s64, z64 = s.astype(np.float64), z[:, 0].astype(np.float64)
            q = np.clip(np.rint(W1[:, i] * inv) + z64, 0, qmax)
            codes[:, col] = q.astype(np.uint8)
            err = (W1[:, i] - (q - z64) * s64) / H1[i, i]
            W1[:, i + 1:] -= np.outer(err, H1[i, i + 1:])
            E1[:, i] = err
        W[:, b1:] -= E1 @ hinv[b0:b1, b1:]
    return QuantizedTensor(codes=codes, scales=scales, zero_points=None if symmetric else zps.astype(np.uint8),
                           bits=bits, block_size=int(block_size), shape=(n, k), symmetric=symmetric)
