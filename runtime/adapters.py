"""Swappable LoRA adapters on the device: the adapter file, and how it feeds a bundle's LoRA slots.

A bundle exported with `--lora-slots R` has, for each adapted matmul node of layer i (a projection,
or a packed node such as qkv_proj), two float32 graph inputs `lora.{i}.{node}.A` [r, K] and
`lora.{i}.{node}.B` [N, r], and computes y = x @ W^T + (x @ A^T) @ B^T. The rank r is a symbolic
dimension of its own (`lora.{i}.{node}.rank`), so what is bound decides it: an adapter binds its
own rank (at most R per projection, the slots the manifest promises), a node it leaves alone and a
bundle with no adapter at all bind empty [0, K] / [N, 0] tensors, which add exactly zero.

An adapter file is a safetensors file with one pair per projection, `lora.{i}.{proj}.A` and `.B`,
B already multiplied by the LoRA scale; slot_feeds turns them into the graph's inputs. Its metadata
entry "edgellama.adapter" (JSON) pins the base bundle it was made for.

numpy only: this ships to devices.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgellama.errors import EdgeLlamaError
from edgellama.runtime import bundle as B

FORMAT = "edgellama-lora"
FORMAT_VERSION = 1
META_KEY = "edgellama.adapter"
INPUT_PREFIX = "lora."
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_MAX_HEADER = 16 * 1024 * 1024
_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2")}
_TENSOR = re.compile(r"^lora\.(\d+)\.([a-z_]+)\.([AB])$")


def slot_input(layer: int, proj: str, which: str) -> str:
    """Graph input name of a LoRA slot: which = "A" or "B"; "rank" names the symbolic rank dimension."""
    return f"{INPUT_PREFIX}{layer}.{proj}.{which}"


def projection_shape(arch: dict[str, Any], proj: str) -> tuple[int, int]:
    """(out features N, in features K) of one projection, from the manifest's architecture numbers."""
    H, I = int(arch["hidden_size"]), int(arch["intermediate_size"])
    hd = int(arch.get("head_dim") or H // int(arch["num_attention_heads"]))
    q, kv = int(arch["num_attention_heads"]) * hd, int(arch["num_key_value_heads"]) * hd
    shapes = {"q_proj": (q, H), "k_proj": (kv, H), "v_proj": (kv, H), "o_proj": (H, q),
              "gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}
    if proj not in shapes:
        raise EdgeLlamaError(f"unknown projection {proj!r}: expected one of {', '.join(PROJECTIONS)}")
    return shapes[proj]


def base_identity(manifest: B.Manifest) -> dict[str, Any]:
    """What an adapter file pins its base to: the source model, its shape, and the exact graph (its
    slots included) and weights. The weights file counts separately because the graph file of an
    external-data bundle holds only offsets: another checkpoint of the same shape would match it."""
    return {"source": manifest.source, "architecture": manifest.architecture,
            "graph_sha256": manifest.files.get(manifest.graph.file),
            "weights_sha256": manifest.files.get(B.ONNX_DATA)}


@dataclass
class AdapterFile:
    path: Path
    meta: dict[str, Any]
    tensors: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # (layer, proj) -> A, B

    @property
    def name(self) -> str:
        return str(self.meta.get("name") or self.path.stem)

    @property
    def targets(self) -> list[str]:
        return [p for p in PROJECTIONS if any(proj == p for _, proj in self.tensors)]


def _read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """A strict reader for the small files we write: the header is checked before any tensor is made."""
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise EdgeLlamaError(f"adapter file {path} not found") from None
    except OSError as exc:
        raise EdgeLlamaError(f"cannot read adapter file {path}: {exc.strerror or exc}") from None
    bad = f"{path.name} is not an edgellama adapter file"
    if len(blob) < 8:
        raise EdgeLlamaError(f"{bad} (truncated)")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > _MAX_HEADER or 8 + n > len(blob):
        raise EdgeLlamaError(f"{bad} (corrupt header)")
    try:
        header = json.loads(blob[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise EdgeLlamaError(f"{bad} (header is not JSON)") from None
    if not isinstance(header, dict):
        raise EdgeLlamaError(f"{bad} (corrupt header)")
    meta = header.pop("__metadata__", None) or {}
    data = memoryview(blob)[8 + n:]
    tensors = {}
    for name, entry in header.items():
        try:
            dtype, shape, (start, end) = _DTYPES[entry["dtype"]], [int(d) for d in entry["shape"]], entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise EdgeLlamaError(f"{bad} (tensor {name!r}: unsupported dtype or malformed entry)") from None
        count = math.prod(shape)  # exact: numpy's product could overflow on a hostile header
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= len(data)) \
                or min(shape, default=0) < 0 or count * dtype.itemsize != end - start:
            raise EdgeLlamaError(f"{bad} (tensor {name!r} does not match its bytes; the file may be truncated)")
        tensors[name] = np.frombuffer(data[start:end], dtype=dtype).reshape(shape).astype(np.float32)
    return tensors, meta if isinstance(meta, dict) else {}


def read_adapter_file(path: str | os.PathLike) -> AdapterFile:
    """Parse an adapter file and check it is internally consistent (not yet against a bundle)."""
    path = Path(path)
    if path.is_dir():
        raise EdgeLlamaError(f"{path} is a folder: give the adapter file written by `edgellama adapter` "
                             "(a PEFT adapter folder goes through `edgellama adapter` first)")
    tensors, raw_meta = _read_safetensors(path)
    try:
        meta = json.loads(raw_meta[META_KEY])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise EdgeLlamaError(f"{path.name} is not an edgellama adapter file (no {META_KEY} metadata)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise EdgeLlamaError(f"{path.name} is not an edgellama adapter file")
    if not isinstance(meta.get("format_version"), int) or meta["format_version"] > FORMAT_VERSION:
        raise EdgeLlamaError(f"adapter format version {meta.get('format_version')!r} is newer than this edgellama "
                             f"supports ({FORMAT_VERSION}): upgrade edgellama")
    out = AdapterFile(path, meta)
    pending: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for name, arr in tensors.items():
        m = _TENSOR.match(name)
        if not m or m[2] not in PROJECTIONS or arr.ndim != 2:
            raise EdgeLlamaError(f"{path.name}: unexpected tensor {name!r}")
        pending.setdefault((int(m[1]), m[2]), {})[m[3]] = arr
    for key, ab in sorted(pending.items()):
        if set(ab) != {"A", "B"}:
            raise EdgeLlamaError(f"{path.name}: layer {key[0]} {key[1]} has only its {''.join(ab)} matrix")
        out.tensors[key] = (ab["A"], ab["B"])
    if not out.tensors:
        raise EdgeLlamaError(f"{path.name} holds no LoRA tensors")
    return out


def check_adapter(adapter: AdapterFile, manifest: B.Manifest) -> None:
    """The adapter fits this bundle: same base, rank within the slots, projections the bundle adapts."""
    slots = manifest.extras.get("lora_slots")
    if not slots:
        raise EdgeLlamaError("this bundle has no LoRA slots: export the base with --lora-slots R to swap adapters "
                             "(or merge the adapter at export with --adapter)")
    want, got = base_identity(manifest), adapter.meta.get("base") or {}
    for key, what in (("architecture", "architecture"), ("source", "source model"), ("graph_sha256", "graph"),
                      ("weights_sha256", "weights file")):
        if got.get(key) != want[key]:
            raise EdgeLlamaError(f"adapter {adapter.name!r} was made for another base bundle (its {what} differs): "
                                 "rerun `edgellama adapter` against this bundle")
    R = int(slots["rank"])
    missing = sorted(set(adapter.targets) - set(slots["targets"]), key=PROJECTIONS.index)
    if missing:
        raise EdgeLlamaError(f"adapter {adapter.name!r} adapts {', '.join(missing)}, which this bundle has no LoRA "
                             f"slots for (slots: {', '.join(slots['targets'])})")
    layers = manifest.num_layers
    for (layer, proj), (a, b) in sorted(adapter.tensors.items()):
        n, k = projection_shape(manifest.architecture, proj)
        r = a.shape[0]
        if layer >= layers or a.shape[1] != k or b.shape != (n, r):
            raise EdgeLlamaError(f"adapter {adapter.name!r}: layer {layer} {proj} has shapes A {list(a.shape)}, "
                                 f"B {list(b.shape)}; this bundle needs A [r, {k}], B [{n}, r] (layers 0..{layers - 1})")
        if not 1 <= r <= R:
            raise EdgeLlamaError(f"adapter {adapter.name!r} has rank {r} at layer {layer} {proj}, more than this "
                                 f"bundle's {R} LoRA slots")


def slot_feeds(manifest: B.Manifest, tensors: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] | None = None
               ) -> dict[str, np.ndarray]:
    """Every LoRA input of the bundle: the adapter's tensors where it has them, empty tensors elsewhere
    (all of them for tensors=None), since a rank-0 side path adds exactly nothing.

    A packed node's inputs (extras["lora_slots"]["groups"], e.g. qkv_proj: q, k, v) get its parts'
    A stacked and their B on the block diagonal, so one side path computes every part's delta."""
    groups = (manifest.extras.get("lora_slots") or {}).get("groups") or {}
    tensors = tensors or {}
    feeds: dict[str, np.ndarray] = {}
    for spec in manifest.graph.inputs:
        if not spec.name.startswith(INPUT_PREFIX):
            continue
        m = _TENSOR.match(spec.name)
        if not m:
            raise EdgeLlamaError(f"the bundle has an unexpected LoRA input {spec.name!r}")
        layer, node, which = int(m[1]), m[2], m[3]
        parts = groups.get(node, [node])
        pairs = [tensors.get((layer, p)) for p in parts]
        if all(pair is None for pair in pairs):
            feeds[spec.name] = np.zeros([0 if isinstance(d, str) else d for d in spec.shape], np.float32)
        elif which == "A":
            feeds[spec.name] = np.ascontiguousarray(np.concatenate([a for a, _ in filter(None, pairs)]), np.float32)
        elif len(parts) == 1:
            feeds[spec.name] = np.ascontiguousarray(pairs[0][1], np.float32)
        else:
            rows = [projection_shape(manifest.architecture, p)[0] for p in parts]
            ranks = [0 if pair is None else pair[0].shape[0] for pair in pairs]
            b = np.zeros((sum(rows), sum(ranks)), np.float32)
            r0 = c0 = 0
            for pair, n, r in zip(pairs, rows, ranks):
                if pair is not None:
                    b[r0:r0 + n, c0:c0 + r] = pair[1]
                r0, c0 = r0 + n, c0 + r
            feeds[spec.name] = b
    return feeds


def load_adapter(path: str | os.PathLike, manifest: B.Manifest) -> tuple[AdapterFile, dict[str, np.ndarray]]:
    """Read, check against the bundle: (the adapter, every LoRA input to bind)."""
    adapter = read_adapter_file(path)
    check_adapter(adapter, manifest)
    return adapter, slot_feeds(manifest, adapter.tensors)
