"""A float ONNX bundle read back as a Source: HF-named float32 tensors, tokenizer, chat template, config.

So a bundle can be re-quantized, or serve as the reference, without its original checkpoint.
Initializers are located by scanning the protobuf wire format of model.onnx directly (no
onnx.load): a model under 2 GB keeps its weights inline, and parsing it would hold all of
them in memory at once. Each `get` then reads one tensor's bytes, from model.onnx or
model.onnx.data, and undoes what the graph builder did to it: MatMul weights are stored
transposed ([K, N]), q/k/v and gate/up packed into one matrix.
"""

from __future__ import annotations

import json
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgellama.errors import EdgeLlamaError
from edgellama.export.config import LlamaConfig
from edgellama.export.sources import Source
from edgellama.runtime import bundle as B

_FLOAT_TYPES = {1: np.dtype("<f4"), 10: np.dtype("<f2")}  # onnx TensorProto FLOAT, FLOAT16
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


@dataclass(frozen=True)
class Initializer:
    name: str
    data_type: int  # onnx TensorProto data type
    dims: tuple[int, ...]
    file: Path  # where the bytes are: model.onnx itself, or an external data file
    offset: int
    length: int


def _varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, wire type, value, payload start) of each field of one message in buf[start:end].

    value is the integer of a varint/fixed field, or the payload end of a length-delimited one.
    """
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, nxt = _varint(buf, pos)
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value = nxt = pos + n
        elif wire == 1:
            value, nxt = int.from_bytes(buf[pos:pos + 8], "little"), pos + 8
        elif wire == 5:
            value, nxt = int.from_bytes(buf[pos:pos + 4], "little"), pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if nxt > end:
            raise ValueError("truncated protobuf field")
        yield field, wire, value, pos
        pos = nxt


def _tensor(buf, start: int, end: int, model_path: Path) -> Initializer:
    name, data_type, dims, raw, location, external = "", 0, [], None, 0, {}
    for field, wire, value, pos in _fields(buf, start, end):
        if field == 1:  # dims: packed or one varint each
            if wire == 2:
                while pos < value:
                    d, pos = _varint(buf, pos)
                    dims.append(d)
            else:
                dims.append(value)
        elif field == 2:
            data_type = value
        elif field == 8:
            name = bytes(buf[pos:value]).decode("utf-8")
        elif field == 9:
            raw = (pos, value - pos)
        elif field == 13:  # external_data entry: key 1, value 2
            kv = {f: bytes(buf[p:v]).decode("utf-8") for f, w, v, p in _fields(buf, pos, value) if w == 2}
            external[kv.get(1, "")] = kv.get(2, "")
        elif field == 14:
            location = value
        elif field in (4, 5, 6, 7, 10, 11):  # typed data fields: the exporter never writes them
            raise ValueError(f"initializer {name or '?'} stores its values outside raw_data")
    if location == _EXTERNAL:
        rel = external.get("location", "")
        if not rel or os.path.isabs(rel) or ".." in Path(rel).parts:
            raise ValueError(f"initializer {name} has an unsafe external data location {rel!r}")
        return Initializer(name, data_type, tuple(dims), model_path.parent / rel,
                           int(external.get("offset", 0)), int(external["length"]))
    offset, length = raw if raw else (0, 0)
    return Initializer(name, data_type, tuple(dims), model_path, offset, length)


def scan_initializers(model_path: str | os.PathLike) -> dict[str, Initializer]:
    """Where each initializer's bytes are, without loading any of them."""
    model_path = Path(model_path)
    try:
        with open(model_path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            out: dict[str, Initializer] = {}
            for field, wire, end, pos in _fields(buf, 0, len(buf)):
                if field == 7 and wire == 2:  # ModelProto.graph
                    for gfield, gwire, gend, gpos in _fields(buf, pos, end):
                        if gfield == 5 and gwire == 2:  # GraphProto.initializer
                            t = _tensor(buf, gpos, gend, model_path)
                            out[t.name] = t
            return out
    except (OSError, ValueError, IndexError, UnicodeDecodeError, KeyError) as exc:
        raise EdgeLlamaError(f"cannot read the initializers of {model_path.name}: {exc}") from None


def read_initializer(init: Initializer) -> np.ndarray:
    """One float initializer as a numpy array of its stored dtype (a fresh copy)."""
    dtype = _FLOAT_TYPES.get(init.data_type)
    if dtype is None:
        raise EdgeLlamaError(f"initializer {init.name} is not a float tensor (onnx type {init.data_type})")
    count = int(np.prod(init.dims, dtype=np.int64))
    if count * dtype.itemsize != init.length:
        raise EdgeLlamaError(f"initializer {init.name} holds {init.length} bytes, not the {count * dtype.itemsize} "
                             f"its shape {list(init.dims)} needs")
    data = bytearray(init.length)  # writable, so torch can take the array without a copy
    try:
        with open(init.file, "rb") as f:
            f.seek(init.offset)
            got = f.readinto(data)
    except OSError as exc:
        raise EdgeLlamaError(f"cannot read {init.file.name}: {exc.strerror or exc}") from None
    if got != init.length:
        raise EdgeLlamaError(f"{init.file.name} is truncated (initializer {init.name})")
    return np.frombuffer(data, dtype).reshape(init.dims)


@dataclass(frozen=True)
class _Where:
    init: str  # initializer name
    transposed: bool  # stored as W.T ([K, N]) for MatMul
    rows: slice | None  # rows of the packed HF matrix this tensor is


class BundleTensors:
    """TensorStore over a float bundle's initializers, under Hugging Face names."""

    def __init__(self, inits: dict[str, Initializer], cfg: LlamaConfig):
        self._inits = inits
        self._where: dict[str, _Where] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._last: tuple[str, np.ndarray] | None = None  # q, k, v (gate, up) come in a row: read the pack once
        H, I, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
        q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
        self._plain("model.embed_tokens.weight", (cfg.vocab_size, H))
        self._plain("model.norm.weight", (H,))
        if not cfg.tie_word_embeddings:
            self._plain("lm_head.weight", (cfg.vocab_size, H))
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}"
            self._plain(f"{p}.input_layernorm.weight", (H,))
            self._plain(f"{p}.post_attention_layernorm.weight", (H,))
            self._linear(f"{p}.self_attn", "qkv_proj", [("q_proj", q), ("k_proj", kv), ("v_proj", kv)], H)
            self._linear(f"{p}.self_attn", "o_proj", [("o_proj", H)], q)
            self._linear(f"{p}.mlp", "gate_up_proj", [("gate_proj", I), ("up_proj", I)], H)
            self._linear(f"{p}.mlp", "down_proj", [("down_proj", H)], I)

    def _need(self, init: str, shape: tuple[int, ...]) -> None:
        if init not in self._inits:
            raise EdgeLlamaError(f"the bundle's graph has no initializer {init!r}: not an edgellama float bundle?")
        got = self._inits[init].dims
        if got != shape:
            raise EdgeLlamaError(f"initializer {init!r} has shape {list(got)}, but the manifest's architecture "
                                 f"implies {list(shape)}")

    def _plain(self, name: str, shape: tuple[int, ...]) -> None:
        self._need(name, shape)
        self._where[name], self._shapes[name] = _Where(name, False, None), shape

    def _linear(self, prefix: str, packed: str, parts: list[tuple[str, int]], k: int) -> None:
        """A MatMul weight, packed (`{packed}.weight_t`) or, if the graph did not pack it, one per part."""
        packed_init = f"{prefix}.{packed}.weight_t"
        if len(parts) > 1 and packed_init in self._inits:
            self._need(packed_init, (k, sum(n for _, n in parts)))
            start = 0
            for part, n in parts:
                name = f"{prefix}.{part}.weight"
                self._where[name] = _Where(packed_init, True, slice(start, start + n))
                self._shapes[name] = (n, k)
                start += n
            return
        for part, n in parts:
            init = f"{prefix}.{part}.weight_t"
            self._need(init, (k, n))
            self._where[f"{prefix}.{part}.weight"] = _Where(init, True, None)
            self._shapes[f"{prefix}.{part}.weight"] = (n, k)

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def get(self, name: str) -> np.ndarray:
        w = self._where[name]
        if self._last is not None and self._last[0] == w.init:
            arr = self._last[1]
        else:
            arr = read_initializer(self._inits[w.init])
            self._last = (w.init, arr) if w.rows is not None else None
        if w.transposed:
            arr = arr.T
        if w.rows is not None:
            arr = arr[w.rows]
        return np.ascontiguousarray(arr, dtype=np.float32)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EdgeLlamaError(f"bundle file {path.name} is unreadable: {exc}") from None


def load_bundle_source(bundle_dir: str | os.PathLike) -> Source:
    """A float (fp32/fp16) ONNX bundle as a Source. Quantized bundles are refused: their weights are lossy."""
    root = Path(bundle_dir)
    m = B.read_manifest(root)
    if m.graph.kind != "onnx":
        raise EdgeLlamaError(f"{root} is a {m.graph.kind} bundle: only float ONNX bundles can be read back")
    if m.quantization:
        raise EdgeLlamaError("already quantized: quantize the float bundle or the original checkpoint")
    cfg = LlamaConfig.from_hf(m.architecture)
    tensors = BundleTensors(scan_initializers(root / m.graph.file), cfg)
    tok_json = _read_json(root / "tokenizer.json")
    if tok_json is None:
        raise EdgeLlamaError(f"bundle {root} has no tokenizer.json")
    return Source(
        config=cfg,
        tensors=tensors,
        description=f"{m.source} (via its {m.dtype} bundle)",  # the checkpoint the weights came from
        tokenizer_json=tok_json,
        tokenizer_config=_read_json(root / "tokenizer_config.json") or {},
        generation_config=_read_json(root / B.GENERATION_CONFIG),
        chat_template=m.chat_template,
        hf_config=dict(m.architecture),
    )
