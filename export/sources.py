"""Model sources behind one `load_source()`: a HF folder, a hub id, a GGUF file, or a built-in alias.

Every source yields the same thing: a validated LlamaConfig, lazy float32 tensors
under Hugging Face names, and the tokenizer files. Pickle checkpoints are refused,
never unpickled.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from edgellama.errors import EdgeLlamaError
from edgellama.export.config import LlamaConfig
from edgellama.export.safetensors_io import SafetensorsFile

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")


class TensorStore(Protocol):
    def names(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def get(self, name: str) -> np.ndarray: ...  # float32
    # Optional: fresh_arrays = True promises that get() returns a new array each call, which the
    # caller may change in place (the export's LayerPass then scales weights without copying them).


class DerivedStore:
    """A TensorStore that changes some of `base`'s tensors on the way out: names and shapes are the base's."""

    def __init__(self, base: TensorStore):
        self.base = base

    def names(self) -> list[str]:
        return self.base.names()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    @property
    def fresh_arrays(self) -> bool:  # a wrapper that may pass the base's arrays through promises what the base does
        return getattr(self.base, "fresh_arrays", False)


@dataclass
class Source:
    config: LlamaConfig
    tensors: TensorStore
    description: str  # what the manifest records as the source, e.g. "gguf:SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer_json: dict[str, Any] | None = None
    tokenizer_config: dict[str, Any] = field(default_factory=dict)
    generation_config: dict[str, Any] | None = None
    chat_template: str | None = None
    hf_config: dict[str, Any] = field(default_factory=dict)


class SafetensorsStore:
    """Tensors spread over one or more .safetensors files (sharded with an index, or not)."""

    fresh_arrays = True  # every get() reads the file again

    def __init__(self, files: list[Path]):
        self._where: dict[str, SafetensorsFile] = {}
        for path in files:
            st = SafetensorsFile(path)
            for name in st.keys():
                self._where[name] = st

    def names(self) -> list[str]:
        return list(self._where)

    def _file(self, name: str) -> SafetensorsFile:
        # Exporters ask every weight's shape before writing anything, so a wrong dtype fails early.
        st = self._where[name]
        dtype = st.infos[name].dtype
        if dtype not in FLOAT_DTYPES:  # an int tensor would be silently cast into a garbage weight
            raise EdgeLlamaError(f"{st.path.name}: tensor {name!r} is {dtype}, not a floating-point weight")
        return st

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(name).shape(name)

    def get(self, name: str) -> np.ndarray:
        return self._file(name).get(name)


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EdgeLlamaError(f"{what} not found: {path}") from None
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise EdgeLlamaError(f"{path.name} is not valid JSON ({exc.__class__.__name__})") from None
    except OSError as exc:
        raise EdgeLlamaError(f"cannot read {path}: {exc.strerror or exc}") from None


def load_hf_folder(folder: str | os.PathLike, description: str | None = None) -> Source:
    folder = Path(folder)
    hf = _read_json(folder / "config.json", "config.json")
    config = LlamaConfig.from_hf(hf)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        index_data = _read_json(index, "safetensors index")
        weight_map = index_data.get("weight_map") if isinstance(index_data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise EdgeLlamaError(f"{index.name} has no weight_map")
        shards = {str(f) for f in weight_map.values()}
        for f in shards:
            if os.path.isabs(f) or ".." in Path(f).parts:
                raise EdgeLlamaError(f"{index.name} lists a shard outside the checkpoint folder: {f!r}")
        files = sorted(folder / f for f in shards)
        for f in files:
            if not f.exists():
                raise EdgeLlamaError(f"shard {f.name} listed in {index.name} is missing")
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise EdgeLlamaError(f"{pickles[0]} is a pickle checkpoint: edgellama never unpickles; convert it to safetensors")
        raise EdgeLlamaError(f"no *.safetensors weights in {folder}")
    tok_json = folder / "tokenizer.json"
    tok_cfg = folder / "tokenizer_config.json"
    gen_cfg = folder / "generation_config.json"
    tokenizer_config = _read_json(tok_cfg, "tokenizer_config.json") if tok_cfg.exists() else {}
    if not isinstance(tokenizer_config, dict):
        raise EdgeLlamaError("tokenizer_config.json is not a JSON object")
    template = tokenizer_config.get("chat_template")
    jinja = folder / "chat_template.jinja"  # transformers 5 keeps the template in its own file
    if template is None and jinja.exists():
        template = jinja.read_text(encoding="utf-8")
    if isinstance(template, list):  # named templates: take the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return Source(
        config=config,
        tensors=SafetensorsStore(files),
        description=description or f"hf:{folder.resolve()}",
        tokenizer_json=_read_json(tok_json, "tokenizer.json") if tok_json.exists() else None,
        tokenizer_config=tokenizer_config,
        generation_config=_read_json(gen_cfg, "generation_config.json") if gen_cfg.exists() else None,
        chat_template=template,
        hf_config=hf,
    )


def load_hub(repo_id: str, *, revision: str | None = None) -> Source:
    """Resolve a hub id through huggingface_hub's cache (offline when already cached)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise EdgeLlamaError("hub ids need huggingface_hub: pip install 'edgellama[export]'") from None
    patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]
    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=True)
    except Exception:
        try:
            path = snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
        except Exception as exc:
            raise EdgeLlamaError(f"cannot fetch {repo_id!r} from the hub: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return load_hf_folder(path, description=f"hub:{repo_id}" + (f"@{revision}" if revision else ""))


def _alias_smollm2() -> Source:
    from edgellama.assets import SMOLLM2_GGUF, fetch

    src = load_gguf_file(fetch(SMOLLM2_GGUF))
    src.description = "alias:smollm2-135m-instruct"
    return src


ALIASES: dict[str, Callable[[], Source]] = {
    "smollm2-135m-instruct": _alias_smollm2,
}


def load_gguf_file(path: str | os.PathLike) -> Source:
    from edgellama.export.gguf_source import load_gguf

    return load_gguf(path)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def load_source(source: str | os.PathLike) -> Source:
    """Open any supported source. Raises EdgeLlamaError with a one-line reason otherwise."""
    text = str(source)
    path = Path(text)
    if text in ALIASES:
        return ALIASES[text]()
    if path.is_dir():
        return load_hf_folder(path)
    if path.is_file():
        if path.suffix == ".gguf":
            return load_gguf_file(path)
        if path.suffix in PICKLE_SUFFIXES:
            raise EdgeLlamaError(f"{path.name} is a pickle checkpoint: edgellama never unpickles; convert it to safetensors")
        if path.name == "config.json":
            return load_hf_folder(path.parent)
        with open(path, "rb") as f:
            if f.read(4) == b"GGUF":
                return load_gguf_file(path)
        raise EdgeLlamaError(f"unrecognised source file {path.name}: give a Hugging Face folder, a .gguf file or a hub id")
    if _HUB_ID.match(text) and not text.startswith((".", "/")):
        return load_hub(text)
    known = ", ".join(sorted(ALIASES))
    raise EdgeLlamaError(f"source {text!r} not found: not a folder, a file, a hub id (owner/name) or a known alias ({known})")
