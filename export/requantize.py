"""Quantize an exported float bundle: read its weights back, export them again with quantized linears.

The new bundle keeps everything the float one was exported with (graph form, logits, storage
dtype, context, threads); only the weights change. Calibration (`calib`) runs the torch
reference over a text and hands each linear's per-input-channel mean |activation| to the
quantizer, which then weights its error search by it (AWQ-style, methods.quantize's act_scale).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgellama.errors import EdgeLlamaError
from edgellama.export.bundle_source import load_bundle_source
from edgellama.export.onnx_export import ExportOptions, ExportReport, export_onnx
from edgellama.runtime import bundle as B

CALIB_MAX_TOKENS = 2048  # enough for stable per-channel means; more only costs time


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
        quant["act_scales"] = activation_scales(src, Path(calib), log=log)
    opts = ExportOptions(form=m.graph.form, dtype=m.dtype, max_context=m.context_length, logits=m.graph.logits,
                         quant=quant, verify=verify, force=force,
                         threads=int(m.session_options.get("intra_op_num_threads") or 0))
    return export_onnx(src, out, opts, log=log)


def activation_scales(src, text_file: Path, *, max_tokens: int = CALIB_MAX_TOKENS,
                      log: Callable[[str], None] = lambda m: None) -> dict[str, np.ndarray]:
    """Mean |x| per input channel of every linear's input, over `text_file` run through the torch reference.

    Keys are the HF module names the emitter quantizes (q/k/v and gate/up share their input, so
    each gets the same scales), plus "lm_head".
    """
    import torch

    from edgellama.export.model import Llama
    from edgellama.runtime.tokenizer import Tokenizer

    try:
        text = text_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgeLlamaError(f"cannot read calibration text {text_file}: {exc}") from None
    if src.tokenizer_json is None:
        raise EdgeLlamaError("the source has no tokenizer: cannot calibrate")
    tok = Tokenizer.from_json_str(json.dumps(src.tokenizer_json), src.tokenizer_config)
    ids = tok.encode(text)[:max_tokens]
    if len(ids) < 2:
        raise EdgeLlamaError(f"calibration text {text_file} has fewer than 2 tokens")
    if src.config.bos_token_id is not None:
        ids = [src.config.bos_token_id] + ids
    model = Llama.from_source(src)
    sums: dict[str, torch.Tensor] = {}
    hooks = []

    def hook(name: str):
        def record(module, inputs):
            x = inputs[0].detach().abs().reshape(-1, inputs[0].shape[-1]).double().sum(0)
            sums[name] = sums.get(name, 0) + x
        return record

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            hooks.append(module.register_forward_pre_hook(hook(name)))
    # The tied head is F.linear on the embedding, not a module: hook the final norm's output instead.
    hooks.append(model.model.norm.register_forward_hook(lambda mod, inp, out: hook("lm_head")(mod, (out,))))
    window = min(512, src.config.max_position_embeddings)
    with torch.inference_mode():
        for start in range(0, len(ids), window):
            model(torch.tensor([ids[start:start + window]]))
    for h in hooks:
        h.remove()
    log(f"calibration: {len(ids)} tokens from {text_file.name}")
    return {name: (s / len(ids)).float().numpy() for name, s in sums.items()}
