"""The bundle's graph in onnxruntime's ORT format, for ORT Mobile and reduced-size builds.

onnxruntime's own converter does the work (in a child process: it configures the root
logger on import and holds a second copy of the weights while it runs). It writes
model.ort, optimized and serialized as a flatbuffer with the weights inside, and the list
of operators the graph uses, which a custom build takes as `--include_ops_by_config`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from edgellama.errors import EdgeLlamaError
from edgellama.runtime import bundle as B

ORT_MODEL = "model.ort"
REQUIRED_OPERATORS = "required_operators.config"
# "Fixed" bakes in the CPU provider's optimizations: right for onnxruntime-android/ios on the CPU
# (what the device profiles use). "Runtime" style only pays off with NNAPI / Core ML providers.
OPTIMIZATION_STYLE = "Fixed"
OPTIMIZATION_LEVEL = "all"
# Flatbuffers address with 32-bit offsets and ORT format has no external data: the whole model
# must stay under 2 GiB. Leave room for the graph itself and what optimization adds.
MAX_WEIGHT_BYTES = (2 << 30) - (64 << 20)


def graph_bytes(bundle: Path, onnx_file: str = B.ONNX_MODEL) -> int:
    """Size of the ONNX graph and its external data file, if it has one."""
    data = bundle / (onnx_file + ".data")
    return (bundle / onnx_file).stat().st_size + (data.stat().st_size if data.is_file() else 0)


def write_ort_format(bundle: str | os.PathLike, onnx_file: str = B.ONNX_MODEL,
                     log: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    """Convert bundle/onnx_file to bundle/model.ort + required_operators.config; returns the manifest record.

    Call it before the manifest is checksummed, so both files are covered.
    """
    import onnxruntime as ort

    root = Path(bundle)
    size = graph_bytes(root, onnx_file)
    if size > MAX_WEIGHT_BYTES:
        raise EdgeLlamaError(f"the graph holds {size / 1e9:.2f} GB but the ORT format holds under 2 GB "
                             f"(flatbuffers, no external data): quantize it (--quant int4) or leave out --ort-format")
    scratch = root / ".ort-convert"
    scratch.mkdir()
    try:
        # The model path goes first: --optimization_style takes one or more values.
        cmd = [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(root / onnx_file),
               "--output_dir", str(scratch), "--optimization_style", OPTIMIZATION_STYLE]
        log(f"export: converting {onnx_file} to ORT format")
        env = {**os.environ, "ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL": OPTIMIZATION_LEVEL}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        stem = Path(onnx_file).stem
        converted, config = scratch / f"{stem}.ort", scratch / f"{stem}.required_operators.config"
        if proc.returncode != 0 or not converted.is_file() or not config.is_file():
            lines = [l for l in (proc.stderr + proc.stdout).splitlines() if l.strip()]
            why = next((l for l in reversed(lines) if "Error" in l or "error" in l), lines[-1] if lines else "no output")
            raise EdgeLlamaError(f"onnxruntime could not convert {onnx_file} to ORT format: {why.strip()[:300]}")
        os.replace(converted, root / ORT_MODEL)
        (root / REQUIRED_OPERATORS).write_text(_portable_config(config.read_text()))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"file": ORT_MODEL, "required_operators": REQUIRED_OPERATORS, "source": onnx_file,
            "optimization": {"style": OPTIMIZATION_STYLE, "level": OPTIMIZATION_LEVEL},
            "onnxruntime": ort.__version__}


def _portable_config(text: str) -> str:
    """The converter's header names the absolute path it wrote to; name the bundle's file instead."""
    lines = [f"# - {ORT_MODEL}" if line.startswith("# - ") else line for line in text.splitlines()]
    return "\n".join(lines) + "\n"
