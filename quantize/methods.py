"""Data-free searches for block scales and zero points that beat round-to-nearest.

Every method returns the same ``QuantizedTensor`` as ``quantize_rtn``; they differ only in
how each block's (scale, zero point) is chosen, always to minimise the block's squared
reconstruction error, optionally weighted per input channel by ``act_scale``.

``act_scale`` [K] is a per-input-channel activation magnitude (e.g. the RMS or mean |x|
seen in calibration). The output error of a row is about sum_k x_k^2 (w_k - dq_k)^2, so
the searches weight the squared error by ``act_scale**2``; AWQ-style data-aware
quantization plugs in here without touching the search code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgellama.errors import EdgeLlamaError
from edgellama.quantize.numerics import (
    QuantizedTensor,
    block_range,
    block_sum,
    minmax_params,
    check_weight,
    dequantize_blocks,
    quantize_rtn,
    quantize_with,
    range_params,
    row_chunks,
)

METHODS = ("rtn", "mse", "hqq")


@dataclass(frozen=True)
class MseClip:
    # Fractions of the min/max range tried per block; 1.0 is plain round-to-nearest, so the
    # search never does worse than it.
    ratios: tuple[float, ...] = tuple(np.round(np.linspace(1.0, 0.70, 16), 3))


@dataclass(frozen=True)
class Hqq:
    # 3 iterations from a 3-ratio start scored as well as 6 from 6 on de-gridded SmolLM2 (int4
    # default, KLD 0.069/0.110 against 0.071/0.114 on the two held-out texts) at half the time.
    iters: int = 3
    p: float = 0.7  # lp-norm of the error (p < 1 favours a sparse error: outliers are ignored)
    beta: float = 1.0  # half-quadratic penalty, grown by kappa each iteration
    kappa: float = 1.3
    # A coarse clipping search to start from: the alternation only finds a local optimum,
    # and starting from plain min/max leaves it worse than MseClip on wide blocks.
    init: MseClip = MseClip(ratios=(1.0, 0.9, 0.8))


def quantize(
    w: np.ndarray,
    bits: int,
    block_size: int,
    method: str = "rtn",
    symmetric: bool | None = None,
    act_scale: np.ndarray | None = None,
    scale_dtype: str = "float32",
    hessian: np.ndarray | None = None,
) -> QuantizedTensor:
    """Quantize a [N, K] weight with ``method`` in {"rtn", "mse", "hqq"}.

    ``hessian`` (X^T X [K, K] of calibration inputs): GPTQ, with ``method`` fitting each
    block's scale and zero point as the sweep reaches it (gptq.py).

    ``scale_dtype="float16"``: the scales will be stored in half precision; codes are
    chosen against the rounded scales.

    ``symmetric=None`` picks symmetric for 8 bits (per-channel int8 loses nothing by it) and
    asymmetric for 4 bits (a zero point is worth a lot with 16 levels).
    """
    if method not in METHODS:
        raise EdgeLlamaError(f"unknown quantization method {method!r}: expected one of {METHODS}")
    if symmetric is None:
        symmetric = bits == 8
    w = check_weight(w, bits, block_size)
    sw = error_weights(act_scale, w.shape[1], block_size)
    if method == "rtn":
        params = lambda wb, _sw: minmax_params(wb, bits, symmetric)  # noqa: E731
    elif method == "mse":
        params = lambda wb, sw: mse_clip_params(wb, sw, bits, symmetric)  # noqa: E731
    else:
        params = lambda wb, sw: hqq_params(wb, sw, bits, symmetric)  # noqa: E731
    if hessian is not None:
        from edgellama.quantize.gptq import gptq_quantize

        return gptq_quantize(w, hessian, bits, block_size, symmetric, params, sw, scale_dtype)
    if method == "rtn":
        # Round-to-nearest ignores act_scale: there is no search for it to weight.
        return quantize_rtn(w, bits, block_size, symmetric, scale_dtype)
    return quantize_with(w, bits, block_size, symmetric, params, sw, scale_dtype)


def sensitivity(w: np.ndarray, qt: QuantizedTensor) -> float:
    """Relative reconstruction error ||w - dq||^2 / ||w||^2 (0 for an all-zero weight)."""
    w = np.asarray(w)
    if w.shape != tuple(qt.shape):
        raise EdgeLlamaError(f"weight shape {w.shape} does not match quantized shape {tuple(qt.shape)}")
    zp = qt.zero_point_array()
    k = w.shape[1]
    err = ref = 0.0
    for rows in row_chunks(w.shape[0], qt.padded_k):
        d = dequantize_blocks(qt.codes[rows], qt.scales[rows], zp[rows], qt.block_size)[:, :k]
        x = w[rows].astype(np.float32)
        d -= x
        err += float(np.einsum("ij,ij->", d, d, dtype=np.float64))
        ref += float(np.einsum("ij,ij->", x, x, dtype=np.float64))
    return err / ref if ref > 0 else 0.0


def error_weights(act_scale: np.ndarray | None, k: int, block_size: int) -> np.ndarray | None:
    """sqrt of the per-element error weight as float32 [n_blocks, block_size], or None.

    None means uniform weights and no padding. Padded elements get weight 0 so that they do
    not pull a block's fitted scale towards zero.
    """
    n_blocks = -(-k // block_size)
    pad = n_blocks * block_size - k
    if act_scale is None:
        if not pad:
            return None
        sw = np.ones(k, np.float32)
    else:
        a = np.asarray(act_scale, np.float64)
        if a.shape != (k,):
            raise EdgeLlamaError(f"act_scale must have shape ({k},), got {a.shape}")
        if not np.isfinite(a).all() or (a < 0).any() or not (a > 0).any():
            raise EdgeLlamaError("act_scale must be finite, non-negative and not all zero")
        # Normalised so the weights average 1: only their relative size matters.
        sw = (np.abs(a) / np.sqrt(np.mean(a * a))).astype(np.float32)
    return np.pad(sw, (0, pad)).reshape(n_blocks, block_size)


def block_error(
    wb: np.ndarray, scale: np.ndarray, zp: np.ndarray, bits: int, sw: np.ndarray | None
) -> np.ndarray:
    """Weighted squared error [rows, n_blocks] of quantizing blocks ``wb`` with (scale, zp)."""
    qmax = (1 << bits) - 1
    inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale != 0)
    t = wb * inv[..., None]
    np.rint(t, out=t)
    # Clipping the signed level (code - zp) is clipping the code to 0..qmax.
    np.maximum(t, -zp[..., None], out=t)
    np.minimum(t, (qmax - zp)[..., None], out=t)
    t *= scale[..., None]
    t -= wb
    if sw is not None:
        t *= sw
    t *= t
    return block_sum(t)


def mse_clip_params(
    wb: np.ndarray, sw: np.ndarray | None, bits: int, symmetric: bool, cfg: MseClip = MseClip()
) -> tuple[np.ndarray, np.ndarray]:
    """Per block, the clipped min/max range (from ``cfg.ratios``) of least squared error."""
    lo, hi = block_range(wb, symmetric)
    best_s = best_z = best_e = None
    for ratio in cfg.ratios:
        s, z = range_params(lo, hi, bits, symmetric, ratio)
        e = block_error(wb, s, z, bits, sw)
        if best_e is None:
            best_s, best_z, best_e = s, z, e
            continue
        better = e < best_e
        best_s = np.where(better, s, best_s)
        best_z = np.where(better, z, best_z)
        best_e = np.where(better, e, best_e)
    return best_s, best_z


def hqq_params(
    wb: np.ndarray, sw: np.ndarray | None, bits: int, symmetric: bool, cfg: Hqq = Hqq()
) -> tuple[np.ndarray, np.ndarray]:
    """Half-quadratic refinement of each block's scale and (integer) zero point.

    Starting from a coarse clipping search (``cfg.init``), each iteration
      1. assigns codes q for the current (s, z) and measures the error e = w - (q - z) s;
      2. splits off the sparse part of e by the proximal step of the lp-norm (p < 1):
         e_sparse = sign(e) max(|e| - |e|^(p-1) / beta, 0), computed in units of the
         quantization step so that beta does not depend on the weight's magnitude;
      3. refits (s, z) in closed form by weighted least squares of (q - z) s against the
         target w - e_sparse, rounds z to an integer code and refits s for it.
    beta grows each iteration so the split freezes. Each block keeps the (s, z) of least
    weighted squared error seen, so the result is never worse than its start, itself never
    worse than round-to-nearest.
    """
    qmax = (1 << bits) - 1
    s, z = mse_clip_params(wb, sw, bits, symmetric, cfg.init)
    best_s, best_z, best_e = s, z, None
    h = None if sw is None else sw * sw
    beta = cfg.beta
    for it in range(cfg.iters + 1):
        inv = np.divide(1.0, s, out=np.zeros_like(s), where=s != 0)
        q = wb * inv[..., None]
        np.rint(q, out=q)
        q += z[..., None]
        np.clip(q, 0, qmax, out=q)
        e = q - z[..., None]
        e *= s[..., None]
        np.subtract(wb, e, out=e)  # e = w - dequantized
        sq = e * e
        if h is not None:
            sq *= h
        err = block_sum(sq)
        if best_e is None:
            best_e = err
        else:
            better = err < best_e
            best_s = np.where(better, s, best_s)
            best_z = np.where(better, z, best_z)
            best_e = np.where(better, err, best_e)
        if it == cfg.iters:
            break
        # Proximal lp step, in quantization steps: e <- e_sparse * |s|, written as
        # e * max(1 - |e|^(p-2) / beta, 0). The factor is 0 wherever |e| <= beta^(1/(p-2)),
        # which is most elements (rounding errors are under half a step), so the power is
        # taken, as exp(log()) (several times faster than np.power in float32), only where
        # it can be non-zero.
        step = np.abs(s)[..., None]
        e *= np.divide(1.0, step, out=np.zeros_like(step), where=step != 0)
        f = np.abs(e).reshape(-1)
        live = np.flatnonzero(f > np.float32(beta ** (1.0 / (cfg.p - 2.0))))
        v = f[live]
        np.log(v, out=v)
        v *= np.float32(cfg.p - 2.0)
        v -= np.float32(np.log(beta))
        np.exp(v, out=v)
        np.subtract(1.0, v, out=v)
        np.maximum(v, 0.0, out=v)
        f[:] = 0.0
        f[live] = v
        e *= f.reshape(e.shape)
        e *= step
        np.subtract(wb, e, out=e)  # target the codes should reproduce
        s, z = refit(q, e, h, z, s, symmetric, qmax)
        beta *= cfg.kappa
    return best_s, best_z


def refit(
    q: np.ndarray,
    t: np.ndarray,
    h: np.ndarray | None,
    z: np.ndarray,
    s: np.ndarray,
    symmetric: bool,
    qmax: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least-squares (s, z) for t ~= (q - z) s, z an integer code."""
    if h is None:
        n = np.float32(q.shape[-1])
        sq, st = block_sum(q), block_sum(t)
        sqq, sqt = block_sum(q * q), block_sum(q * t)
    else:
        n = h.sum(-1)
        qh, th = q * h, t * h
        sq, st = block_sum(qh), block_sum(th)
        sqq, sqt = block_sum(qh * q), block_sum(qh * t)
    if not symmetric:
        # Unconstrained affine fit t ~= a q + b gives s = a, z = -b / a; z is then rounded.
        var = n * sqq - sq * sq
        a = np.divide(n * sqt - sq * st, var, out=np.zeros_like(var), where=var > 0)
        b = (st - a * sq) / np.maximum(n, 1e-30)
        ok = a > 0
        z_new = np.divide(-b, a, out=z.copy(), where=ok)
        z = np.where(ok, np.clip(np.rint(z_new), 0, qmax), z).astype(np.float32)
    # Best scale for the (possibly new) integer zero point.
    den = sqq - 2 * z * sq + z * z * n
    num = sqt - z * st
    s_new = np.divide(num, den, out=s.copy(), where=den > 0)
    ok = (den > 0) & ((s_new > 0) | symmetric)
    s = np.where(ok, s_new, s).astype(np.float32)
    return s, z
