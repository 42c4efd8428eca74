"""Block-wise integer weight quantization, independent of any file format.

A linear weight ``w`` is float32 [N, K] (HF layout: out_features x in_features). It is cut
into blocks of ``block_size`` consecutive elements along K, one scale (and zero point) per
block and row; ``block_size = K`` is per-output-channel quantization.

Codes are unsigned, as onnxruntime's MatMulNBits wants them: ``w ~= (code - zp) * scale``
with code in 0..2^bits-1. Symmetric quantization fixes zp = 2^(bits-1) (8 for int4, 128 for
int8), so symmetric codes are signed values shifted by half the range.

When K is not a multiple of ``block_size`` the last block is padded with zeros. The padding
enters the scale computation as zeros (harmless: zero is always inside a block's range) and
its codes equal the block's zero point, so padded elements dequantize to exactly 0.
``QuantizedTensor.codes`` keeps the padded width; ``dequantize`` drops it.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from edgellama.errors import EdgeLlamaError

SUPPORTED_BITS = (4, 8)

# Row chunks of about this many elements bound the float temporaries of every pass over a
# big tensor (a 262M-element embedding) to a few MiB, and keep them cache-friendly.
CHUNK_ELEMENTS = 1 << 18


def _workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


_WORKERS = _workers()
_POOL = ThreadPoolExecutor(_WORKERS, thread_name_prefix="edgellama-quantize") if _WORKERS > 1 else None


@dataclass
class QuantizedTensor:
    codes: np.ndarray  # uint8 [N, n_blocks * block_size], unpacked, 0..2^bits-1
    scales: np.ndarray  # float32 [N, n_blocks]
    zero_points: np.ndarray | None  # uint8 [N, n_blocks]; None: symmetric, 2^(bits-1)
    bits: int
    block_size: int
    shape: tuple[int, int]  # original [N, K]
    symmetric: bool

    @property
    def n_blocks(self) -> int:
        return self.scales.shape[1]

    @property
    def padded_k(self) -> int:
        return self.n_blocks * self.block_size

    def zero_point_array(self) -> np.ndarray:
        """Zero points as a uint8 [N, n_blocks] array, also for symmetric tensors."""
        if self.zero_points is not None:
            return self.zero_points
        return np.full(self.scales.shape, symmetric_zero_point(self.bits), np.uint8)

    def dequantize(self) -> np.ndarray:
        """The float32 [N, K] weight the codes stand for."""
        n, k = self.shape
        out = np.empty((n, k), np.float32)
        zp = self.zero_point_array()
        for rows in row_chunks(n, self.padded_k):
            out[rows] = dequantize_blocks(
                self.codes[rows], self.scales[rows], zp[rows], self.block_size
            )[:, :k]
        return out


def symmetric_zero_point(bits: int) -> int:
    return 1 << (bits - 1)


def row_chunks(n_rows: int, row_len: int) -> Iterator[slice]:
    step = max(1, CHUNK_ELEMENTS // max(row_len, 1))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def check_weight(w: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """Validate a weight and its quantization settings; return it as a floating [N, K] array."""
    if bits not in SUPPORTED_BITS:
        raise EdgeLlamaError(f"unsupported quantization bits {bits}: expected one of {SUPPORTED_BITS}")
    if not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise EdgeLlamaError(f"block_size must be a positive integer, got {block_size!r}")
    w = np.asarray(w)
    if w.ndim != 2 or w.shape[0] == 0 or w.shape[1] == 0:
        raise EdgeLlamaError(f"expected a non-empty 2-D [N, K] weight, got shape {w.shape}")
    if not np.issubdtype(w.dtype, np.floating):
        raise EdgeLlamaError(f"expected a floating-point weight, got {w.dtype}")
    # Not converted here: chunks become float32 as they are used, so a float16 (or
    # memory-mapped) table is never copied whole.
    for rows in row_chunks(w.shape[0], w.shape[1]):
        if not np.isfinite(w[rows]).all():
            raise EdgeLlamaError("weight contains NaN or infinite values; cannot quantize")
    return w


def blocked(w: np.ndarray, block_size: int) -> np.ndarray:
    """Rows of ``w`` as float32 [rows, n_blocks, block_size], zero-padded along K."""
    rows, k = w.shape
    n_blocks = -(-k // block_size)
    pad = n_blocks * block_size - k
    if pad:
        w = np.pad(w, ((0, 0), (0, pad)))
    return np.ascontiguousarray(w, np.float32).reshape(rows, n_blocks, block_size)


def dequantize_blocks(codes: np.ndarray, scales: np.ndarray, zp: np.ndarray, block_size: int) -> np.ndarray:
    """float32 [rows, n_blocks*block_size] from codes [rows, n_blocks*block_size]."""
    rows, n_blocks = scales.shape
    q = codes.reshape(rows, n_blocks, block_size).astype(np.float32)
    q -= zp[..., None]
    q *= scales[..., None]
    return q.reshape(rows, n_blocks * block_size)


def block_sum(x: np.ndarray) -> np.ndarray:
    """Sums over the last axis of [..., bs] as [...]: a matrix-vector product, which is several
    times faster than numpy's reductions over a short contiguous axis (the block searches'
    hot loop)."""
    k = x.shape[-1]
    return (np.ascontiguousarray(x).reshape(-1, k) @ np.ones(k, x.dtype)).reshape(x.shape[:-1])


def _block_reduce(x: np.ndarray, op: np.ufunc) -> np.ndarray:
    """op.reduce over the last axis by halving it: one pass of wide ufunc calls, not a short-axis loop."""
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        y = op(x[..., :half], x[..., half:2 * half])
        x = y if x.shape[-1] % 2 == 0 else np.concatenate([y, x[..., 2 * half:]], axis=-1)
    return x[..., 0]


def block_range(wb: np.ndarray, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """What min/max quantization covers in each block of ``wb`` [rows, n_blocks, bs].

    Symmetric: (extreme, extreme) where extreme is the signed element of largest magnitude.
    Asymmetric: (lo, hi) widened to include 0, so the zero point is an in-range integer.
    """
    lo, hi = _block_reduce(wb, np.minimum), _block_reduce(wb, np.maximum)
    if symmetric:
        extreme = np.where(-lo > hi, lo, hi)  # a tie goes to the positive end
        return extreme, extreme
    return np.minimum(lo, 0.0), np.maximum(hi, 0.0)


def range_params(
    lo: np.ndarray, hi: np.ndarray, bits: int, symmetric: bool, ratio: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point (both float32, zp integral) covering ``ratio`` x the range.

    Symmetric: the extreme element maps onto the most negative code, as in llama.cpp's
    Q4_0, so all 2^bits levels are used; the scale is negative when that element is
    positive. Constant-zero blocks get scale 0 and dequantize to 0.
    """
    qmax = (1 << bits) - 1
    half = symmetric_zero_point(bits)
    if symmetric:
        scale = (lo * np.float32(ratio / -half)).astype(np.float32)
        return scale, np.full(scale.shape, half, np.float32)
    scale = ((hi - lo) * np.float32(ratio / qmax)).astype(np.float32)
    safe = np.where(scale == 0, np.float32(1), scale)
    zp = np.clip(np.rint(-lo * np.float32(ratio) / safe), 0, qmax).astype(np.float32)
    return scale, zp


def minmax_params(wb: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Round-to-nearest scale and zero point of each block of ``wb`` [rows, n_blocks, bs]."""
    lo, hi = block_range(wb, symmetric)
    return range_params(lo, hi, bits, symmetric)


def encode(wb: np.ndarray, scale: np.ndarray, zp: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes [rows, n_blocks*bs] of blocks ``wb`` for a given scale and zero point."""
    qmax = (1 << bits) - 1
    inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale != 0)
    q = wb * inv[..., None]
    np.rint(q, out=q)
    q += zp[..., None]
    np.clip(q, 0, qmax, out=q)
    rows = wb.shape[0]
    return q.astype(np.uint8).reshape(rows, -1)


def quantize_rtn(w: np.ndarray, bits: int, block_size: int, symmetric: bool,
                 scale_dtype: str = "float32") -> QuantizedTensor:
    """Round-to-nearest block quantization with min/max (or absmax) scales."""
    return quantize_with(w, bits, block_size, symmetric, lambda wb, _: minmax_params(wb, bits, symmetric),
                         scale_dtype=scale_dtype)


ParamsFn = Callable[[np.ndarray, "np.ndarray | None"], tuple[np.ndarray, np.ndarray]]


def storable_scales(scale: np.ndarray, scale_dtype: str) -> np.ndarray:
    """``scale`` rounded to what the file will hold (float32 values either way).

    Codes are encoded against the rounded scales, so a float16-stored tensor dequantizes to
    exactly what was searched for, not to a slightly rescaled copy of it.
    """
    if scale_dtype == "float32":
        return scale
    if scale_dtype != "float16":
        raise EdgeLlamaError(f"scale dtype must be float32 or float16, got {scale_dtype!r}")
    f16 = np.finfo(np.float16).max
    return np.clip(scale, -f16, f16).astype(np.float16).astype(np.float32)


def quantize_with(
    w: np.ndarray, bits: int, block_size: int, symmetric: bool, params: ParamsFn, weights: np.ndarray | None = None,
    scale_dtype: str = "float32",
) -> QuantizedTensor:
    """Quantize ``w`` chunk by chunk, with ``params(wb, weights) -> (scale, zp)`` per block.

    ``weights`` is None or the float32 [n_blocks, block_size] square roots of per-input-
    channel error weights (zero over the padding), handed on to ``params``. ``scale_dtype``
    "float16" rounds the scales to half precision before the codes are chosen.
    """
    w = check_weight(w, bits, block_size)
    n, k = w.shape
    n_blocks = -(-k // block_size)
    codes = np.empty((n, n_blocks * block_size), np.uint8)
    scales = np.empty((n, n_blocks), np.float32)
    zps = np.empty((n, n_blocks), np.uint8)
    def one(rows: slice) -> None:
        wb = blocked(w[rows], block_size)
        scale, zp = params(wb, weights)
        scale = storable_scales(scale, scale_dtype)
        scales[rows] = scale
        zps[rows] = zp
        codes[rows] = encode(wb, scale, zp, bits)

    # Chunks are independent and numpy drops the GIL inside its loops, so one thread per core
    # runs them side by side; each writes only its own rows, so the bytes do not depend on it.
    chunks = list(row_chunks(n, n_blocks * block_size))
    if len(chunks) > 1 and _POOL is not None:
        for _ in _POOL.map(one, chunks):
            pass
    else:
        for rows in chunks:
            one(rows)
    return QuantizedTensor(
        codes=codes,
        scales=scales,
        zero_points=None if symmetric else zps,
        bits=bits,
        block_size=int(block_size),
        shape=(n, k),
        symmetric=symmetric,
    )
