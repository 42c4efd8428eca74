"""Quantize an exported float bundle: read its weights back, export them again with quantized linears.

The new bundle keeps everything the float one was exported with (graph form, logits, storage
dtype, context, threads); only the weights change. Calibration (`calib`, or random tokens for
GPTQ) is export/calibration.py's, as for `export --quant`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable


from edgellama.errors import EdgeLlamaError
from edgellama.export.bundle_source import load_bundle_source
from edgellama.export.onnx_export import ExportOptions, ExportReport, export_onnx
from edgellama.runtime import bundle as B



def quantize_bundle(
    src_dir: str | os.PathLike,
    out: str | os.PathLike,
    quant: dict[str, Any],
    *,
    force: bool = False,
    verify: bool = True,
    calib: str | os.PathLike | None = None,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
) -> ExportReport:
    """Write a quantized copy of the float bundle `src_dir` to `out`. Same input, same bytes."""
    if Path(out).resolve() == Path(src_dir).resolve():
        raise EdgeLlamaError("the output directory is the source bundle: write the quantized bundle elsewhere")
    src = load_bundle_source(src_dir)
    m = B.read_manifest(src_dir, verify=False)  # load_bundle_source has just verified it
    quant = dict(quant)
    if calib is not None:
        quant["calib"] = Path(calib)  # export_onnx calibrates (export/calibration.py)
    opts = ExportOptions(form=m.graph.form, dtype=m.dtype, max_context=m.context_length, logits=m.graph.logits,
                         quant=quant, verify=verify, force=force,
                         threads=int(m.session_options.get("intra_op_num_threads") or 0))
    return export_onnx(src, out, opts, log=log)
