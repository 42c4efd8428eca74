"""Session-wide fixtures: the real Llama 3.2 tokenizer, tiny random checkpoints, and their exported bundles.

Each tiny model is built once and each (model, form, dtype) bundle exported once per session;
tests must treat what these fixtures return as read-only (copy or link before editing).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from helpers import TINY_CONFIGS, TinyLlama, make_tiny_llama


@dataclass
class TinyModel:
    name: str
    spec: TinyLlama
    folder: Path  # HF layout: config.json, model.safetensors, tokenizer files
    hf: Any  # the transformers LlamaForCausalLM the folder was saved from


@dataclass
class ExportedBundle:
    model: TinyModel
    dir: Path
    report: Any  # edgellama.export.onnx_export.ExportReport
    manifest: Any  # edgellama.runtime.bundle.Manifest
    log: list[str]


@pytest.fixture(scope="session", autouse=True)
def own_host_profile(tmp_path_factory) -> Path:
    """Tests never read or write the user's measured host profile (~/.cache/edgellama): a profile
    left there by another version, or measured under other load, must not change what they see.
    Child processes inherit the variable; a test that plans for `host` probes this machine once."""
    import os

    path = tmp_path_factory.mktemp("host") / "host_profile.json"
    before = os.environ.get("EDGELLAMA_HOST_PROFILE")
    os.environ["EDGELLAMA_HOST_PROFILE"] = str(path)
    yield path
    if before is None:
        os.environ.pop("EDGELLAMA_HOST_PROFILE", None)
    else:
        os.environ["EDGELLAMA_HOST_PROFILE"] = before


@pytest.fixture(scope="session")
def llama_tokenizer_dir() -> Path:
    """The real Llama 3.2 tokenizer (tokenizer.json + tokenizer_config.json, no chat template)."""
    from edgellama.assets import LLAMA32_TOKENIZER, fetch

    return Path(fetch(LLAMA32_TOKENIZER))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, llama_tokenizer_dir) -> Callable[[str], TinyModel]:
    """tiny_llama(name) -> TinyModel for a name in helpers.TINY_CONFIGS, built on first use."""
    cache: dict[str, TinyModel] = {}

    def get(name: str) -> TinyModel:
        if name not in cache:
            spec = TINY_CONFIGS[name]
            folder = tmp_path_factory.mktemp(f"hf-{name}")
            folder, hf = make_tiny_llama(folder, spec, llama_tokenizer_dir)
            cache[name] = TinyModel(name, spec, folder, hf)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def exported(tmp_path_factory, tiny_llama) -> Callable[..., ExportedBundle]:
    """exported(name, form="fast", dtype="fp32") -> ExportedBundle: a verified ONNX bundle (context 256)."""
    from edgellama.export.onnx_export import ExportOptions, export_onnx
    from edgellama.runtime.bundle import read_manifest

    cache: dict[tuple[str, str, str], ExportedBundle] = {}

    def get(name: str, form: str = "fast", dtype: str = "fp32") -> ExportedBundle:
        key = (name, form, dtype)
        if key not in cache:
            model = tiny_llama(name)
            out = tmp_path_factory.mktemp(f"bundle-{name}-{form}-{dtype}") / "bundle"
            log: list[str] = []
            report = export_onnx(model.folder, out, ExportOptions(form=form, dtype=dtype, max_context=256),
                                 log=log.append)
            cache[key] = ExportedBundle(model, out, report, read_manifest(out), log)
        return cache[key]

    return get
