"""A strict, lazy GGUF reader (header parsed by hand through a numpy memmap; tensor data read on demand).

Every count, length and shape in the header is checked against the bytes that are
actually left in the file before anything is sized from it, so a lying header is
refused with a one-line EdgeLlamaError instead of a huge allocation. Dequantization
is delegated to the `gguf` package, one tensor at a time.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgellama.errors import EdgeLlamaError

try:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
    from gguf.quants import dequantize
except ImportError:  # the base install (a device) runs bundles and never reads GGUF
    raise EdgeLlamaError("reading GGUF files needs the gguf package: pip install 'edgellama[export]'") from None

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NESTING = 4
_INT64_MAX = 2**63 - 1

_SCALARS: dict[GGUFValueType, np.dtype] = {
    GGUFValueType.UINT8: np.dtype("u1"),
    GGUFValueType.INT8: np.dtype("i1"),
    GGUFValueType.UINT16: np.dtype("<u2"),
    GGUFValueType.INT16: np.dtype("<i2"),
    GGUFValueType.UINT32: np.dtype("<u4"),
    GGUFValueType.INT32: np.dtype("<i4"),
    GGUFValueType.FLOAT32: np.dtype("<f4"),
    GGUFValueType.BOOL: np.dtype("u1"),
    GGUFValueType.UINT64: np.dtype("<u8"),
    GGUFValueType.INT64: np.dtype("<i8"),
    GGUFValueType.FLOAT64: np.dtype("<f8"),
}
# The fewest bytes one value of each type can occupy: what a declared count is checked against.
_MIN_SIZE = {**{t: d.itemsize for t, d in _SCALARS.items()}, GGUFValueType.STRING: 8, GGUFValueType.ARRAY: 12}
_MIN_KV = 8 + 4 + 1  # key length, value type, one byte of value
_MIN_TENSOR_INFO = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, offset


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    ne: tuple[int, ...]  # GGUF order, innermost first: ne[0] is the row length
    qtype: GGMLQuantizationType
    offset: int  # absolute, in the file
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy / PyTorch order (outermost first)."""
        return tuple(reversed(self.ne))


class _Cursor:
    """Reads little-endian fields from a buffer, refusing to step past its end."""

    def __init__(self, buf: memoryview, label: str):
        self.buf, self.label, self.pos, self.size = buf, label, 0, len(buf)

    def left(self) -> int:
        return self.size - self.pos

    def take(self, n: int, what: str) -> int:
        if n > self.left():
            raise EdgeLlamaError(f"{self.label}: truncated GGUF file ({what} at byte {self.pos} runs past the end)")
        start = self.pos
        self.pos += n
        return start

    def u32(self, what: str) -> int:
        return struct.unpack_from("<I", self.buf, self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack_from("<Q", self.buf, self.take(8, what))[0]

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        start = self.take(n, what)
        try:
            return bytes(self.buf[start:start + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise EdgeLlamaError(f"{self.label}: {what} at byte {start} is not valid UTF-8") from None

    def value_type(self, what: str) -> GGUFValueType:
        raw = self.u32(f"type of {what}")
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise EdgeLlamaError(f"{self.label}: {what} has an unknown GGUF value type {raw}") from None

    def value(self, vtype: GGUFValueType, what: str, depth: int = 0) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string(what)
        if vtype == GGUFValueType.ARRAY:
            if depth >= _MAX_NESTING:
                raise EdgeLlamaError(f"{self.label}: {what} nests arrays deeper than {_MAX_NESTING}")
            etype = self.value_type(f"elements of {what}")
            count = self.u64(f"length of {what}")
            if count > self.left() // _MIN_SIZE[etype]:
                raise EdgeLlamaError(f"{self.label}: {what} declares {count} elements, more than the file can hold")
            if etype in _SCALARS:
                dt = _SCALARS[etype]
                arr = np.frombuffer(self.buf, dt, count, self.take(count * dt.itemsize, what)).copy()
                return arr.astype(bool) if etype == GGUFValueType.BOOL else arr
            return [self.value(etype, what, depth + 1) for _ in range(count)]
        dt = _SCALARS[vtype]
        v = np.frombuffer(self.buf, dt, 1, self.take(dt.itemsize, what))[0]
        if vtype == GGUFValueType.BOOL:
            return bool(v)
        if vtype == GGUFValueType.FLOAT32:
            return float(str(v))  # the shortest decimal that is this float32: 1e-05, not 9.99999974e-06
        return v.item()


class GGUFFile:
    """The parsed header of a GGUF v2/v3 file; tensors are read (and dequantized) on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        label = self.path.name
        try:
            size = self.path.stat().st_size
            if size < 4 + 4 + 8 + 8:
                with open(self.path, "rb") as f:
                    head = f.read(4)
                if head != MAGIC:
                    raise EdgeLlamaError(f"{label}: not a GGUF file (bad magic {head!r})")
                raise EdgeLlamaError(f"{label}: truncated GGUF file ({size} bytes, shorter than a header)")
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        except OSError as exc:
            raise EdgeLlamaError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        cur = _Cursor(memoryview(self._mm), label)
        magic = bytes(self._mm[:4])
        if magic != MAGIC:
            raise EdgeLlamaError(f"{label}: not a GGUF file (bad magic {magic!r})")
        cur.take(4, "magic")
        version = cur.u32("version")
        if version not in VERSIONS:
            if struct.unpack("<I", struct.pack(">I", version))[0] in VERSIONS:
                raise EdgeLlamaError(f"{label}: big-endian GGUF files are not supported")
            raise EdgeLlamaError(f"{label}: unsupported GGUF version {version} (edgellama reads versions 2 and 3)")
        self.version = version
        n_tensors = cur.u64("tensor count")
        n_kv = cur.u64("metadata count")
        if n_kv > cur.left() // _MIN_KV:
            raise EdgeLlamaError(f"{label}: metadata count {n_kv} is more than the file can hold")
        if n_tensors > cur.left() // _MIN_TENSOR_INFO:
            raise EdgeLlamaError(f"{label}: tensor count {n_tensors} is more than the file can hold")

        self.metadata: dict[str, Any] = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}")
            if key in self.metadata:
                raise EdgeLlamaError(f"{label}: duplicate metadata key {key!r}")
            self.metadata[key] = cur.value(cur.value_type(f"metadata {key!r}"), f"metadata {key!r}")

        align = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if isinstance(align, bool) or not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise EdgeLlamaError(f"{label}: general.alignment must be a power of two, got {align!r}")
        self.alignment = align

        pending = []
        for i in range(n_tensors):
            name = cur.string(f"name of tensor #{i}")
            n_dims = cur.u32(f"rank of tensor {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise EdgeLlamaError(f"{label}: tensor {name!r} has {n_dims} dimensions (GGUF allows 1 to {MAX_DIMS})")
            ne = tuple(cur.u64(f"dims of tensor {name!r}") for _ in range(n_dims))
            raw_type = cur.u32(f"type of tensor {name!r}")
            try:
                qtype = GGMLQuantizationType(raw_type)
                block, type_size = GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise EdgeLlamaError(f"{label}: tensor {name!r} has an unknown ggml type {raw_type}") from None
            offset = cur.u64(f"offset of tensor {name!r}")
            pending.append((name, ne, qtype, block, type_size, offset))

        self.data_offset = -(-cur.pos // align) * align
        data_len = size - self.data_offset
        self.tensors: dict[str, GGUFTensorInfo] = {}
        for name, ne, qtype, block, type_size, offset in pending:
            if name in self.tensors:
                raise EdgeLlamaError(f"{label}: duplicate tensor {name!r}")
            dims = list(ne)
            if any(d == 0 for d in ne):
                raise EdgeLlamaError(f"{label}: tensor {name!r} has an empty dimension {dims}")
            if ne[0] % block:
                raise EdgeLlamaError(f"{label}: tensor {name!r} has rows of {ne[0]}, not a multiple of the "
                                     f"{qtype.name} block size {block}")
            count = 1
            for d in ne:  # stop at the first step past int64, as ggml would overflow there
                count *= d
                if count > _INT64_MAX:
                    raise EdgeLlamaError(f"{label}: tensor {name!r} dims {dims} overflow a 64-bit element count")
            nbytes = count // block * type_size
            if offset % align:
                raise EdgeLlamaError(f"{label}: tensor {name!r} offset {offset} is not {align}-byte aligned")
            if data_len < 0 or offset > data_len or nbytes > data_len - offset:
                raise EdgeLlamaError(f"{label}: tensor {name!r} ({qtype.name} {dims}, {nbytes} bytes at data offset "
                                     f"{offset}) lies beyond the end of the file; it may be truncated")
            self.tensors[name] = GGUFTensorInfo(name, ne, qtype, self.data_offset + offset, nbytes)
        spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in self.tensors.values())
        for (_, end0, a), (start1, _, b) in zip(spans, spans[1:]):
            if start1 < end0:
                raise EdgeLlamaError(f"{label}: tensors {a!r} and {b!r} overlap")

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as rows, read when asked. Read, not a view of the mapping: mapped pages
        stay in this process's RSS for as long as the mapping lives (the header parse touches only
        its own), so a large checkpoint would be carried to the end of an export."""
        t = self.tensors[name]
        block, type_size = GGML_QUANT_SIZES[t.qtype]
        row_bytes = t.ne[0] // block * type_size
        with open(self.path, "rb") as f:
            f.seek(t.offset)
            data = np.fromfile(f, dtype=np.uint8, count=t.nbytes)
        if data.size != t.nbytes:
            raise EdgeLlamaError(f"{self.path.name}: tensor {name!r} is truncated")
        return data.reshape(*t.shape[:-1], row_bytes)

    def get(self, name: str) -> np.ndarray:
        """The tensor as float32 in numpy order (a HF [out, in] weight comes back [out, in])."""
        t = self.tensors[name]
        try:
            out = dequantize(self.raw(name), t.qtype)
        except NotImplementedError:
            raise EdgeLlamaError(f"{self.path.name}: tensor {name!r} is {t.qtype.name}, "
                                 "which edgellama cannot dequantize") from None
        return np.array(out, dtype=np.float32, copy=True).reshape(t.shape)
