"""Byte layouts of a QuantizedTensor for the ONNX operators that consume it.

Plain numpy arrays and attribute dicts only: the ONNX exporter wraps them in initializers,
and nothing here imports onnx. All layouts were checked against onnxruntime (see
tests/test_quant_numerics.py):

* ``com.microsoft.MatMulNBits``: B uint8 [N, n_blocks, block_size*bits/8], codes packed
  low bits first along K; scales [N, n_blocks]; zero points packed the same way into
  [N, ceil(n_blocks*bits/8)], or absent for symmetric (the operator's default zero point
  is 2^(bits-1), ours). K need not be a multiple of block_size: B keeps the padded codes.
* ``com.microsoft.GatherBlockQuantized`` over uint8 data: untied, a 2-D table
  [V, ceil(H*bits/8)] quantized along axis 1 whose scales and zero points are exactly
  MatMulNBits's. Tied to an lm_head, the 3-D MatMulNBits B itself (quantize_axis 2), so one
  initializer serves both nodes; it then takes scales and zero points as [V, n_blocks, 1]
  and outputs [..., n_blocks, block_size], which the graph reshapes (and trims when H is
  not a multiple of block_size). MatMulNBits insists on its 3-D B and 2-D (or flat)
  scales, so a 2-D GatherBlockQuantized can only share B through a Reshape, which
  onnxruntime constant-folds into a second copy of the table.
* ONNX ``DequantizeLinear`` (opset 21, blocked): one value per element, INT4/INT8 when
  symmetric (code - 2^(bits-1), no zero point) and UINT4/UINT8 with a zero point when not;
  stored [K, N] with axis 0 (feeds MatMul) or [N, K] with axis 1. ``onnx_raw_data`` gives
  the bytes of an ONNX tensor's raw_data (4-bit: the flattened tensor packed in pairs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from edgellama.errors import EdgeLlamaError
from edgellama.quantize.numerics import QuantizedTensor, symmetric_zero_point


@dataclass
class MatMulNBitsWeights:
    B: np.ndarray  # uint8 [N, n_blocks, block_size * bits / 8]
    scales: np.ndarray  # float32 [N, n_blocks]
    zero_points: np.ndarray | None  # uint8 [N, ceil(n_blocks * bits / 8)]; None: 2^(bits-1)
    attributes: dict = field(default_factory=dict)  # K, N, bits, block_size


@dataclass
class GatherBlockQuantizedWeights:
    data: np.ndarray  # uint8, [V, ceil(H*bits/8)] or, tied, MatMulNBits's B
    scales: np.ndarray  # float32 [V, n_blocks] or, tied, [V, n_blocks, 1]
    zero_points: np.ndarray | None  # uint8, packed like data; None: 2^(bits-1)
    attributes: dict = field(default_factory=dict)  # bits, block_size, gather_axis, quantize_axis


@dataclass
class DequantizeLinearWeights:
    data: np.ndarray  # int8 or uint8 values, one per element: [K, N] (axis 0) or [N, K] (axis 1)
    scale: np.ndarray  # float32 with n_blocks along ``axis``
    zero_point: np.ndarray | None  # uint8 like data (unsigned types only)
    onnx_type: str  # "INT4" | "UINT4" | "INT8" | "UINT8" (onnx.TensorProto names)
    axis: int
    block_size: int


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned ``bits``-wide values along the last axis, low bits first.

    [..., L] -> uint8 [..., ceil(L * bits / 8)]; a partial last byte is zero-filled.
    """
    values = np.asarray(values, np.uint8)
    if bits == 8:
        return values.copy()
    per = 8 // bits
    length = values.shape[-1]
    pad = -length % per
    if pad:
        values = np.pad(values, [(0, 0)] * (values.ndim - 1) + [(0, pad)])
    grouped = values.reshape(*values.shape[:-1], -1, per)
    out = grouped[..., 0].copy()
    for j in range(1, per):
        out |= grouped[..., j] << np.uint8(bits * j)
    return out


def unpack_bits(packed: np.ndarray, bits: int, length: int) -> np.ndarray:
    """Inverse of ``pack_bits``: uint8 [..., bytes] -> uint8 [..., length]."""
    packed = np.asarray(packed, np.uint8)
    if bits == 8:
        return packed[..., :length].copy()
    per = 8 // bits
    mask = np.uint8((1 << bits) - 1)
    parts = [(packed >> np.uint8(bits * j)) & mask for j in range(per)]
    return np.stack(parts, axis=-1).reshape(*packed.shape[:-1], -1)[..., :length]


def check_ort_block_size(block_size: int, op: str) -> None:
    if block_size < 16 or block_size & (block_size - 1):
        raise EdgeLlamaError(f"{op} needs a power-of-two block_size >= 16, got {block_size}")


def matmul_nbits(qt: QuantizedTensor) -> MatMulNBitsWeights:
    """Inputs B, scales, zero_points and attributes of a MatMulNBits node for ``qt``."""
    check_ort_block_size(qt.block_size, "MatMulNBits")
    n, k = qt.shape
    b = pack_bits(qt.codes, qt.bits).reshape(n, qt.n_blocks, qt.block_size * qt.bits // 8)
    zp = None if qt.zero_points is None else pack_bits(qt.zero_points, qt.bits)
    attrs = {"K": k, "N": n, "bits": qt.bits, "block_size": qt.block_size}
    return MatMulNBitsWeights(B=b, scales=qt.scales, zero_points=zp, attributes=attrs)


def gather_block_quantized(qt: QuantizedTensor, tied: bool = False) -> GatherBlockQuantizedWeights:
    """Inputs of a GatherBlockQuantized node looking up rows of a quantized [V, H] table.

    ``tied=True`` returns MatMulNBits's B as data (equal bytes and shape to
    ``matmul_nbits(qt).B``, so the exporter can give both nodes one initializer); the
    node's output is then [..., n_blocks, block_size] and must be reshaped to
    [..., n_blocks * block_size] and trimmed to H.
    """
    check_ort_block_size(qt.block_size, "GatherBlockQuantized")
    v, h = qt.shape
    attrs = {"bits": qt.bits, "block_size": qt.block_size, "gather_axis": 0}
    if tied:
        data = pack_bits(qt.codes, qt.bits).reshape(v, qt.n_blocks, qt.block_size * qt.bits // 8)
        scales = qt.scales.reshape(v, qt.n_blocks, 1)
        # One zero point per [.., 1] row: packing a single value is the value itself.
        zp = None if qt.zero_points is None else qt.zero_points.reshape(v, qt.n_blocks, 1).copy()
        return GatherBlockQuantizedWeights(data, scales, zp, {**attrs, "quantize_axis": 2})
    data = pack_bits(qt.codes[:, :h], qt.bits)
    zp = None if qt.zero_points is None else pack_bits(qt.zero_points, qt.bits)
    return GatherBlockQuantizedWeights(data, qt.scales, zp, {**attrs, "quantize_axis": 1})


def dequantize_linear(qt: QuantizedTensor, layout: Literal["kn", "nk"] = "kn") -> DequantizeLinearWeights:
    """Inputs of a blocked opset-21 DequantizeLinear producing the weight.

    layout "kn": data [K, N], axis 0, so that MatMul(x, DQ(data)) is the linear layer.
    layout "nk": data [N, K] (HF layout), axis 1.
    """
    if layout not in ("kn", "nk"):
        raise EdgeLlamaError(f"unknown DequantizeLinear layout {layout!r}: expected 'kn' or 'nk'")
    n, k = qt.shape
    codes = qt.codes[:, :k]
    if qt.zero_points is None:
        # Signed storage makes the zero point 0, which DequantizeLinear may then omit.
        data = (codes.astype(np.int16) - symmetric_zero_point(qt.bits)).astype(np.int8)
        zp, kind = None, "INT"
    else:
        data, zp, kind = codes, qt.zero_points, "UINT"
    scale = qt.scales
    if layout == "kn":
        data, scale = np.ascontiguousarray(data.T), np.ascontiguousarray(scale.T)
        zp = None if zp is None else np.ascontiguousarray(zp.T)
    else:
        data = np.ascontiguousarray(data)
    return DequantizeLinearWeights(
        data=data,
        scale=scale,
        zero_point=zp,
        onnx_type=f"{kind}{qt.bits}",
        axis=0 if layout == "kn" else 1,
        block_size=qt.block_size,
    )


def onnx_raw_data(values: np.ndarray, bits: int) -> bytes:
    """raw_data bytes of an ONNX tensor of 4- or 8-bit integers holding ``values``.

    ONNX packs 4-bit tensors over the flattened element order, two per byte, the first
    element in the low nibble; signed values are stored in two's complement.
    """
    flat = np.ascontiguousarray(values).reshape(-1)
    if bits == 8:
        return flat.tobytes()
    if bits != 4:
        raise EdgeLlamaError(f"ONNX has no {bits}-bit integer tensor type here: expected 4 or 8")
    return pack_bits(flat.view(np.uint8) & np.uint8(0x0F), 4).tobytes()
