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
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from functools import lru_cache
from pathlib import Path
from types import UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints

from edgellama.errors import EdgeLlamaError
from edgellama.fsutil import is_temp_sibling

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
# Optional input of a graph with logits "last" (an overridable initializer, default [1], so it is
# not among the manifest's inputs): how many final positions get logits. Named as transformers'
# generate() argument. Bundles exported before it have none (then only one position, ever).
LOGITS_TO_KEEP = "logits_to_keep"
# Optional input of a fast graph with the padding row (an overridable int64 scalar, default 0):
# 1 gives every attention run one padding row, so decode steps and speculative verification rows
# are bitwise the same numbers (docs/speculative.md). Plain decode leaves it at 0: two-row attention
# costs 2-8% of decode at a short context and ~37% at a 2048-token one. Bundles exported before it
# pad every run.
PAD_ROWS = "pad_rows"
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
        if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
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
            raise EdgeLlamaError(f"{MANIFEST} is malformed: {' '.join(str(exc).split())[:300]}") from None
        if not isinstance(m.files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in m.files.items()):
            raise EdgeLlamaError(f"{MANIFEST} is malformed: 'files' must map names to sha256 strings")
        hints = _hints(cls)
        for f in fields(cls):  # the dataclass declarations are the schema: a wrong type fails here, not deep in a runtime
            if not _conforms(getattr(m, f.name), hints[f.name]):
                raise EdgeLlamaError(f"{MANIFEST} is malformed: {f.name!r} has the wrong type")
        if m.context_length < 1:
            raise EdgeLlamaError(f"{MANIFEST} is malformed: invalid context_length")
        arch = m.architecture
        if not all(_count(arch.get(k)) for k in ARCH_SIZES):
            raise EdgeLlamaError(f"{MANIFEST} is malformed: 'architecture' needs positive integers "
                                 f"{', '.join(ARCH_SIZES)}")
        if not _inside(m.graph.file):
            raise EdgeLlamaError(f"{MANIFEST} is malformed: graph file {m.graph.file!r} is not a path inside the bundle")
        threads = m.session_options.get("intra_op_num_threads", 0)
        if not _conforms(threads, int) or threads < 0 or not isinstance(m.session_options.get("config_entries", {}), dict):
            raise EdgeLlamaError(f"{MANIFEST} is malformed: invalid 'session_options'")
        t = m.tokens
        if any(not 0 <= i < arch["vocab_size"] for i in [*t.eos_ids, *(x for x in (t.bos_id, t.pad_id) if x is not None)]):
            raise EdgeLlamaError(f"{MANIFEST} is malformed: a token id in 'tokens' is outside the vocabulary")
        return m


ARCH_SIZES = ("num_hidden_layers", "num_key_value_heads", "head_dim", "vocab_size")  # what runtimes size buffers from


@lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _conforms(value: Any, hint: Any) -> bool:
    """Does a value parsed from JSON have the type a dataclass field declares? (A bool is no int here.)"""
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return True
    if origin in (Union, UnionType):
        return any(_conforms(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(_conforms(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_conforms(k, args[0]) and _conforms(v, args[1]) for k, v in value.items())
    if is_dataclass(hint):
        return isinstance(value, hint) and all(_conforms(getattr(value, f.name), _hints(hint)[f.name])
                                               for f in fields(hint))
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _inside(rel: str) -> bool:
    return bool(rel) and not Path(rel).is_absolute() and ".." not in Path(rel).parts


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
    if is_temp_sibling(root):  # may even hold a manifest, if killed just before its rename
        raise EdgeLlamaError(f"{root} is the work directory of an unfinished export, not a bundle")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EdgeLlamaError(f"{root} is not a bundle: {MANIFEST} is missing") from None
    except (ValueError, RecursionError):  # undecodable, not JSON, nested too deep, a 5000-digit number
        raise EdgeLlamaError(f"{path} is corrupt (not JSON)") from None
    manifest = Manifest.from_dict(data)
    if verify:
        verify_files(root, manifest)
    return manifest


def verify_files(root: Path, manifest: Manifest) -> None:
    graph = manifest.graph.file
    if graph not in manifest.files and not any(k.startswith(graph + "/") for k in manifest.files):
        raise EdgeLlamaError(f"{MANIFEST} has no checksum for the graph {graph}")  # it would load unverified
    for rel, digest in sorted(manifest.files.items()):
        p = root / rel
        if not _inside(rel):
            raise EdgeLlamaError(f"{MANIFEST} lists an unsafe path {rel!r}")
        if not p.is_file():
            raise EdgeLlamaError(f"bundle file {rel} is missing")
        if sha256_file(p) != digest:
            raise EdgeLlamaError(f"bundle file {rel} is corrupt or altered (sha256 mismatch)")
