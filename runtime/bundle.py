"""The bundle format: the contract between the exporters and every runtime.

A bundle is one directory: a graph (model.onnx [+ data] or model.mlpackage), the
tokenizer files, genai_config.json, config.json and the `edgellama.json` manifest,
which records what the graph is and the sha256 of every other file. This module is
the single source of truth for the manifest schema, file names and graph I/O names.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from edgellama.errors import EdgeLlamaError

FORMAT = "edgellama-bundle"
FORMAT_VERSION = 1
MANIFEST = "edgellama.json"
ONNX_MODEL = "model.onnx"
ONNX_DATA = "model.onnx.data"
COREML_MODEL = "model.mlpackage"
GENAI_CONFIG = "genai_config.json"
HF_CONFIG = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
GENERATION_CONFIG = "generation_config.json"

# Graph I/O, as onnxruntime-genai and optimum name them.
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"
LLAMA3_STOP_TOKENS = ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>")


def past_name(layer: int, kind: str) -> str:
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    return f"present.{layer}.{kind}"


@dataclass
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: float32, float16, int64
    shape: list[int | str]  # symbolic dims are strings


@dataclass
class GraphInfo:
    kind: str  # "onnx" | "coreml"
    file: str
    form: str  # "fast" | "portable" | "coreml-stateful" | "coreml-stateless"
    attention: str  # "gqa" (GroupQueryAttention, share buffer) | "mha" (standard ops, concat cache) | ...
    past_present_share_buffer: bool
    logits: str  # "last" (last position only) | "all"
    opset: int | None = None
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)


@dataclass
class TokenInfo:
    bos_id: int | None
    eos_ids: list[int]  # every id that ends generation (Llama 3: eot, end_of_text, eom)
    pad_id: int | None
    add_bos: bool = True


@dataclass
class Manifest:
    source: str
    architecture: dict[str, Any]  # the Hugging Face config numbers (LlamaConfig.to_hf())
    dtype: str  # fp32 | fp16
    graph: GraphInfo
    context_length: int  # the longest context the graph serves (KV buffers are sized from it)
    tokens: TokenInfo
    chat_template: str | None
    quantization: dict[str, Any] | None = None
    session_options: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    extras: dict[str, Any] = field(default_factory=dict)  # verification, devices hint, adapters, ...
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    created_by: str = ""

    @property
    def num_layers(self) -> int:
        return int(self.architecture["num_hidden_layers"])

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True, ensure_ascii=False) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise EdgeLlamaError(f"{MANIFEST} is not an edgellama manifest")
        version = d.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise EdgeLlamaError(f"bundle format version {version!r} is newer than this edgellama supports "
                                 f"({FORMAT_VERSION}): upgrade edgellama")
        try:
            g = dict(d["graph"])
            g["inputs"] = [TensorSpec(**t) for t in g.get("inputs", [])]
            g["outputs"] = [TensorSpec(**t) for t in g.get("outputs", [])]
            known = {f.name for f in fields(cls)}
            args = {k: v for k, v in d.items() if k in known}
            args["graph"] = GraphInfo(**g)
            args["tokens"] = TokenInfo(**d["tokens"])
            m = cls(**args)
        except (KeyError, TypeError, ValueError) as exc:
            raise EdgeLlamaError(f"{MANIFEST} is malformed: {exc}") from None
        if not isinstance(m.files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in m.files.items()):
            raise EdgeLlamaError(f"{MANIFEST} is malformed: 'files' must map names to sha256 strings")
        if not isinstance(m.context_length, int) or m.context_length < 1:
            raise EdgeLlamaError(f"{MANIFEST} is malformed: invalid context_length")
        return m


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def bundle_files(root: Path) -> list[str]:
    """Every file under root except the manifest, as sorted POSIX relative paths."""
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            out.append(p.relative_to(root).as_posix())
    return out


def checksum_tree(root: Path) -> dict[str, str]:
    return {rel: sha256_file(root / rel) for rel in bundle_files(root)}


def read_manifest(bundle: str | os.PathLike, *, verify: bool = True) -> Manifest:
    """Load a bundle's manifest; with verify, check every file's sha256 before anything loads it."""
    root = Path(bundle)
    path = root / MANIFEST
    if not root.is_dir():
        raise EdgeLlamaError(f"bundle {root} not found (expected a directory)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EdgeLlamaError(f"{root} is not a bundle: {MANIFEST} is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise EdgeLlamaError(f"{path} is corrupt (not JSON)") from None
    manifest = Manifest.from_dict(data)
    if verify:
        verify_files(root, manifest)
    return manifest


def verify_files(root: Path, manifest: Manifest) -> None:
    for rel, digest in sorted(manifest.files.items()):
        p = root / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise EdgeLlamaError(f"{MANIFEST} lists an unsafe path {rel!r}")
        if not p.is_file():
            raise EdgeLlamaError(f"bundle file {rel} is missing")
        if sha256_file(p) != digest:
            raise EdgeLlamaError(f"bundle file {rel} is corrupt or altered (sha256 mismatch)")
