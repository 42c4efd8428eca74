"""A strict, lazy safetensors reader (numpy, no torch, no pickle).

The header is validated before any tensor is touched: offsets must tile the data
region exactly and agree with dtype x shape, so a lying header is refused before
a large allocation.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgellama.errors import EdgeLlamaError

_DTYPES = {
    "F32": (np.dtype("<f4"), 4),
    "F16": (np.dtype("<f2"), 2),
    "BF16": (np.dtype("<u2"), 2),  # widened to float32 by hand: numpy has no bfloat16
    "F64": (np.dtype("<f8"), 8),
    "I64": (np.dtype("<i8"), 8),
    "I32": (np.dtype("<i4"), 4),
    "I16": (np.dtype("<i2"), 2),
    "I8": (np.dtype("i1"), 1),
    "U8": (np.dtype("u1"), 1),
    "BOOL": (np.dtype("?"), 1),
}
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
    """Parse and validate a safetensors header: (tensors, metadata, data offset)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise EdgeLlamaError(f"{path.name}: not a safetensors file (truncated header)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise EdgeLlamaError(f"{path.name}: corrupt safetensors header (length {n} exceeds file size {size})")
            raw = f.read(n)
    except OSError as exc:
        raise EdgeLlamaError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # undecodable, not JSON, nested too deep, a 5000-digit number
        raise EdgeLlamaError(f"{path.name}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise EdgeLlamaError(f"{path.name}: corrupt safetensors header (not an object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise EdgeLlamaError(f"{path.name}: corrupt safetensors metadata")
    data_len = size - 8 - n
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype = entry["dtype"]
            shape = tuple(entry["shape"])
            start, end = entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise EdgeLlamaError(f"{path.name}: malformed header entry for tensor {name!r}") from None
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise EdgeLlamaError(f"{path.name}: tensor {name!r} has unsupported dtype {dtype!r}")
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise EdgeLlamaError(f"{path.name}: tensor {name!r} has an invalid shape {list(shape)}")
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= data_len):
            raise EdgeLlamaError(f"{path.name}: tensor {name!r} has offsets [{start}, {end}] outside the file "
                                 f"(data is {data_len} bytes; the file may be truncated)")
        count = 1
        for d in shape:
            count *= d
        if count * _DTYPES[dtype][1] != end - start:
            raise EdgeLlamaError(f"{path.name}: tensor {name!r} of shape {list(shape)} and dtype {dtype} "
                                 f"does not match its {end - start} bytes")
        infos[name] = TensorInfo(dtype, shape, start, end)
    spans = sorted((i.start, i.end) for i in infos.values() if i.end > i.start)
    for (s0, e0), (s1, _) in zip(spans, spans[1:]):
        if s1 < e0:
            raise EdgeLlamaError(f"{path.name}: corrupt safetensors header (tensor data overlaps)")
    return infos, {str(k): str(v) for k, v in meta.items()}, 8 + n


class SafetensorsFile:
    """Lazy access to the tensors of one .safetensors file, returned as float32 (or native ints)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.infos, self.metadata, self._offset = read_header(self.path)

    def keys(self) -> list[str]:
        return list(self.infos)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.infos[name].shape

    def get(self, name: str) -> np.ndarray:
        info = self.infos[name]
        dt, size = _DTYPES[info.dtype]
        # Read, not memory-mapped: pages of a mapping stay in this process's RSS for as long as
        # the mapping lives, so exporting a 2.5 GB checkpoint would carry all of it to the end.
        with open(self.path, "rb") as f:
            f.seek(self._offset + info.start)
            arr = np.fromfile(f, dtype=dt, count=(info.end - info.start) // size)
        if arr.size * size != info.end - info.start:
            raise EdgeLlamaError(f"{self.path.name}: tensor {name!r} is truncated")
        arr = arr.reshape(info.shape)
        if info.dtype == "BF16":
            return _widen_bf16(arr)
        if arr.dtype.kind == "f" and arr.dtype != np.float32:
            return arr.astype(np.float32)
        return arr


def _widen_bf16(raw: np.ndarray) -> np.ndarray:
    """bf16 bits (uint16) -> float32. torch's conversion when torch is there (the exporter's case):
    measured 8x faster than numpy's on this machine's fresh pages (the 1B shape's checkpoint: 7 s of
    widening per full read), most of numpy's time being page faults on its huge-page-advised output."""
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        return torch.from_numpy(raw).view(torch.bfloat16).float().numpy()
    wide = raw.astype(np.uint32)  # numpy has no bfloat16: widen the bits, then shift them into place
    wide <<= 16
    return wide.view(np.float32)


def save_file(tensors: dict[str, np.ndarray], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write float32/float16/int tensors as safetensors, deterministically (sorted names)."""
    rev = {v[0]: k for k, v in _DTYPES.items() if k != "BF16"}
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    arrays = []
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        key = rev.get(arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype)
        if key is None:
            raise EdgeLlamaError(f"cannot save tensor {name!r} of dtype {arr.dtype}")
        header[name] = {"dtype": key, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes())
