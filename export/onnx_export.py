"""Checkpoint -> verified ONNX bundle, written atomically.

source --load_source--> Source --LayerPass (one read: calibration, smoothing, reference logits)
--build_llama_graph--> model.onnx (+ data) --> tokenizer files, config.json, genai_config.json
--> parity check against the reference logits --> edgellama.json --> rename.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgellama import __version__
from edgellama.errors import EdgeLlamaError
from edgellama.export.config import LlamaConfig
from edgellama.export.layer_pass import LayerPass
from edgellama.export.onnx_graph import INLINE_LIMIT, OPSET, FloatWeights, GraphOptions, WeightSink, build_llama_graph, save_graph
from edgellama.export.sources import Source, load_source
from edgellama.export.tokenizer_prep import PreparedTokenizer, prepare_tokenizer
from edgellama.fsutil import atomic_dir, check_output_dir
from edgellama.runtime import bundle as B
from edgellama.runtime.engine import physical_cores

DEFAULT_EXPORT_CONTEXT = 8192


@dataclass
class ExportOptions:
    form: str = "fast"  # fast | portable
    dtype: str = "fp32"  # fp32 | fp16
    max_context: int | None = None
    logits: str = "last"  # last | all
    quant: dict[str, Any] | None = None  # options for edgellama.quantize (bits, block_size, method, ...)
    verify: bool = True
    force: bool = False
    threads: int = 0  # 0: physical cores, detected by the runtime at load
    device: str | None = None  # a device profile to plan for (devices hint); None: every built-in profile
    ort_format: bool = False  # also write model.ort (ORT Mobile) and required_operators.config
    adapter: str | None = None  # a PEFT LoRA adapter folder, merged into the weights
    lora_slots: int = 0  # R > 0: graph inputs for swappable rank-R adapters (edgellama.export.lora_slots)
    lora_targets: list[str] | None = None  # projections given slots; None: all seven


@dataclass
class ExportReport:
    out: str
    seconds: float
    size_bytes: int
    verification: dict[str, Any] | None
    warnings: list[str] = field(default_factory=list)


EXACT_BLOCK = 32  # the largest MatMulNBits block whose one-row and several-row kernels agree bitwise


def _estimate_bytes(cfg: LlamaConfig, dtype: str) -> int:
    return cfg.param_count() * (2 if dtype == "fp16" else 4)


def write_genai_config(out: Path, cfg: LlamaConfig, manifest: B.Manifest) -> None:
    """onnxruntime-genai reads this; with it the bundle also runs in its Android/iOS/C/C# APIs."""
    g = manifest.graph
    # onnxruntime-genai left to itself runs onnxruntime on ONE thread: always write the count
    # (the bundle's own, or this machine's physical cores when the bundle says "detect at load").
    threads = manifest.session_options.get("intra_op_num_threads") or physical_cores()
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": [], "intra_op_num_threads": threads},
        "filename": g.file,
        "head_size": cfg.head_dim,
        "hidden_size": cfg.hidden_size,
        "inputs": {"input_ids": B.INPUT_IDS, "attention_mask": B.ATTENTION_MASK,
                   "past_key_names": B.past_name(0, "key").replace(".0.", ".%d."),
                   "past_value_names": B.past_name(0, "value").replace(".0.", ".%d.")},
        "outputs": {"logits": B.LOGITS, "present_key_names": B.present_name(0, "key").replace(".0.", ".%d."),
                    "present_value_names": B.present_name(0, "value").replace(".0.", ".%d.")},
        "num_attention_heads": cfg.num_attention_heads,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_key_value_heads": cfg.num_key_value_heads,
    }
    if any(s.name == B.POSITION_IDS for s in g.inputs):
        decoder["inputs"]["position_ids"] = B.POSITION_IDS
    conf = {
        "model": {
            "bos_token_id": manifest.tokens.bos_id,
            "context_length": manifest.context_length,
            "decoder": decoder,
            "eos_token_id": manifest.tokens.eos_ids,
            "pad_token_id": manifest.tokens.pad_id if manifest.tokens.pad_id is not None else manifest.tokens.eos_ids[0],
            "type": "llama",
            "vocab_size": cfg.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": manifest.context_length, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": g.past_present_share_buffer,
            "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }
    (out / B.GENAI_CONFIG).write_text(json.dumps(conf, indent=2) + "\n")


def write_tokenizer_files(out: Path, tok: PreparedTokenizer) -> None:
    # Compact separators: the vocabulary and merges are most of a bundle's non-weight bytes.
    (out / "tokenizer.json").write_text(json.dumps(tok.tokenizer_json, ensure_ascii=False, separators=(",", ":")),
                                        encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(tok.tokenizer_config, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
    (out / B.GENERATION_CONFIG).write_text(json.dumps(tok.generation_config, indent=2) + "\n")


def finish_manifest(out: Path, manifest: B.Manifest) -> None:
    """Checksum every file, then write the manifest last: its presence marks a complete bundle."""
    from edgellama.runtime.pack import sealed_manifest

    manifest.files = B.checksum_tree(out)
    (out / B.MANIFEST).write_bytes(sealed_manifest(manifest))  # sealed: a changed manifest byte is caught too


def export_onnx(
    source: str | Source,
    out: str | Path,
    opts: ExportOptions | None = None,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
) -> ExportReport:
    opts = opts or ExportOptions()
    t0 = time.perf_counter()
    if opts.form not in ("fast", "portable"):
        raise EdgeLlamaError(f"unknown graph form {opts.form!r} (fast or portable)")
    if opts.dtype not in ("fp32", "fp16"):
        raise EdgeLlamaError(f"unsupported dtype {opts.dtype!r} (fp32 or fp16)")
    check_output_dir(out, opts.force)  # fail before loading anything; atomic_dir checks again at write time
    slot_targets = None
    if opts.lora_slots or opts.lora_targets:
        from edgellama.export.lora_slots import check_slot_options

        slot_targets = check_slot_options(opts.lora_slots, opts.lora_targets)
    adapter = None
    if opts.adapter:
        from edgellama.export.lora import merge_adapter, read_adapter

        adapter = read_adapter(opts.adapter)  # before the source: a bad adapter fails fast
    src = source if isinstance(source, Source) else load_source(source)
    if adapter is not None:
        src = merge_adapter(src, adapter)
    cfg = src.config
    ctx = opts.max_context if opts.max_context is not None else min(cfg.max_position_embeddings, DEFAULT_EXPORT_CONTEXT)
    if ctx < 1 or ctx > cfg.max_position_embeddings:
        raise EdgeLlamaError(f"--max-context {ctx} is outside the model's range (1..{cfg.max_position_embeddings})")
    warnings: list[str] = []

    def warn(msg: str) -> None:
        warnings.append(msg)
        log(f"edgellama: warning: {msg}")

    _check_tensors(src)  # before the tokenizer, so bad weights fail without warnings about the tokenizer first
    tok = prepare_tokenizer(src, cfg, warn)
    emitter = None
    quant_info = None
    calib_batch = None
    if opts.quant:
        from edgellama.quantize.onnx_weights import make_emitter, planned_summary  # export -> quantize, never the reverse

        quant = dict(opts.quant)
        calib = quant.pop("calib", None)
        emitter, quant_info = make_emitter(cfg, quant, form=opts.form, fallback=FloatWeights())
        calib_batch = _calibration_batch(src, emitter, quant_info, calib, log)  # after make_emitter vetted the options
        if emitter.opts.mixed:
            from edgellama.export.calibration import rank_int8_layers

            rank_int8_layers(src, emitter)
    verify_ids = None
    if opts.verify:
        from edgellama.export.verify import verification_ids

        verify_ids = verification_ids(tok.tokenizer_json, tok.tokens, cfg.vocab_size, ctx)
    # One read of the checkpoint serves calibration, smoothing (under LoRA slots too: the scales go
    # into the bundle, and adapter files fold them into A), the graph and the verification reference.
    tensors = LayerPass(src, emitter, calib=calib_batch, keep_inputs=bool(emitter and emitter.opts.gptq),
                        smooth=bool(emitter and emitter.opts.smooth), verify=verify_ids)
    # Before anything is built: a bundle meant for a device it would not fit fails here.
    devices = devices_hint(cfg.to_hf(), opts.dtype, planned_summary(emitter) if emitter else None, ctx, opts.device)

    graph_emitter = emitter
    if slot_targets:
        from edgellama.export.lora_slots import LoraSlots

        graph_emitter = LoraSlots(emitter or FloatWeights(), opts.lora_slots, slot_targets, opts.form)
    # Exact verification needs linears whose rows do not depend on the run's row count: MatMulNBits'
    # are bitwise M-invariant up to block 32; int4-fast's block 128 is not, so its padding would
    # cost decode speed for nothing.
    exact_linears = emitter is None or emitter.opts.block_size <= EXACT_BLOCK
    gopts = GraphOptions(form=opts.form, dtype=opts.dtype, max_context=ctx, logits=opts.logits, pad_row=exact_linears)
    with atomic_dir(out, force=opts.force) as tmp:
        external = _estimate_bytes(cfg, opts.dtype) > INLINE_LIMIT
        sink = WeightSink(tmp / B.ONNX_DATA if external else None)
        try:
            result = build_llama_graph(cfg, tensors.get, gopts, sink, graph_emitter,
                                       progress=lambda i, n: log(f"export: layer {i}/{n}") if n >= 8 and i % 10 == 0 else None)
        finally:
            sink.close()
        tensors.release()
        save_graph(result, tmp)
        if tensors.groups:
            from edgellama.quantize.smoothing import ALPHA

            quant_info["smoothing"] = {"alpha": ALPHA, "groups": tensors.smoothed}
            log(f"smoothing: {tensors.smoothed}/{tensors.groups} weight groups rescaled (alpha {ALPHA})")
        if emitter is not None:
            quant_info = {**emitter.summary(), **quant_info}
        del result.model
        graph = B.GraphInfo(kind="onnx", file=B.ONNX_MODEL, form=opts.form, attention=result.attention,
                            past_present_share_buffer=result.share_buffer, logits=opts.logits, opset=OPSET,
                            inputs=result.inputs, outputs=result.outputs)
        session = {"intra_op_num_threads": opts.threads}
        if quant_info and quant_info.get("session_config"):
            session["config_entries"] = quant_info.pop("session_config")
        manifest = B.Manifest(
            source=src.description, architecture=cfg.to_hf(), dtype=opts.dtype, graph=graph, context_length=ctx,
            tokens=tok.tokens, chat_template=tok.chat_template, quantization=quant_info, session_options=session,
            created_by=f"edgellama {__version__}", extras={"devices": devices},
        )
        if adapter is not None:
            manifest.extras["adapter"] = adapter.record()
        if slot_targets:
            from edgellama.export.lora_slots import INPUT_SCALES_FILE, input_scales
            from edgellama.export.safetensors_io import save_file

            manifest.extras["lora_slots"] = graph_emitter.record()
            scales = input_scales(tensors, cfg.num_hidden_layers, sorted(graph_emitter.slotted))
            if scales:
                save_file(scales, tmp / INPUT_SCALES_FILE)
                manifest.extras["lora_slots"]["input_scales"] = INPUT_SCALES_FILE
        write_tokenizer_files(tmp, tok)
        (tmp / B.HF_CONFIG).write_text(json.dumps(cfg.to_hf(), indent=2) + "\n")
        write_genai_config(tmp, cfg, manifest)
        verification = None
        if opts.verify:
            from edgellama.export.verify import verify_onnx_bundle

            verification = verify_onnx_bundle(tmp, manifest, verify_ids, tensors.reference_logits, log=log)
            manifest.extras["verification"] = verification
        if opts.ort_format:
            from edgellama.export.ort_format import write_ort_format

            manifest.extras["ort_format"] = write_ort_format(tmp, B.ONNX_MODEL, log=log)
        finish_manifest(tmp, manifest)
        size = sum((tmp / f).stat().st_size for f in manifest.files) + (tmp / B.MANIFEST).stat().st_size
    return ExportReport(out=str(out), seconds=time.perf_counter() - t0, size_bytes=size,
                        verification=verification, warnings=warnings)


def _calibration_batch(src, emitter, quant_info: dict[str, Any], calib, log: Callable[[str], None]) -> np.ndarray | None:
    """The tokens to calibrate on during the build, when the emitter's options or `calib` want statistics.

    GPTQ needs a text (and keeps the inputs themselves); smoothing needs only per-channel
    magnitudes and calibrates on seeded random tokens unless given a text.
    """
    from edgellama.export.calibration import calibration_batch

    o = emitter.opts
    if emitter.act_scales:  # statistics handed in directly
        return None
    if calib is None and o.gptq:
        raise EdgeLlamaError("--method gptq needs a calibration text (--calib FILE): random tokens mislead it")
    if calib is None and not o.smooth:
        return None
    batch, quant_info["calibration"] = calibration_batch(src, calib)
    log(f"calibration: {batch.size} tokens ({quant_info['calibration']}), layer by layer during the build")
    return batch


def devices_hint(architecture: dict[str, Any], dtype: str, quantization: dict[str, Any] | None, context: int,
                 device: str | None = None) -> dict[str, Any]:
    """manifest.extras["devices"]: the profiles a bundle fits and the RSS it needs at its full context.

    Planned with devices/plan.py for the bundle's own precision. With `device`, for that profile
    only, and a bundle that would not fit it is refused (EdgeLlamaError). Otherwise every built-in
    profile is tried (not the measured host: a bundle must not depend on where it was exported).
    """
    from dataclasses import replace

    from edgellama.devices.catalog import HOST, builtin_profiles, get_profile
    from edgellama.devices.plan import ModelShape, WeightFormat, plan

    shape = ModelShape.from_hf_config(architecture)
    weights = WeightFormat.from_record(quantization, dtype) if quantization else None
    if quantization:
        quant, block = f"int{quantization['bits']}", int(quantization["block_size"])
        if quantization.get("preset") == "int4-fast":  # a planner quant of its own (priced by `weights`)
            quant = "int4-fast"
        embed = quantization.get("embeddings", "keep")
        embed_quant = dtype if embed == "keep" else embed
    else:
        quant, block, embed_quant = dtype, 32, dtype
    profiles = [get_profile(device)] if device else [p for name, p in builtin_profiles().items() if name != HOST]
    # An ONNX bundle runs through onnxruntime on every device, Core ML profiles included, so its
    # floats and KV cache keep the bundle's dtype: the estimate is the same for every profile.
    plans = [plan(shape, replace(p, format="onnx"), quant=quant, max_context=context, block_size=block,
                  kv_dtype=dtype, embed_quant=embed_quant, weights=weights) for p in profiles]
    if device and not plans[0].fits:
        raise EdgeLlamaError(f"this bundle would not fit {device}: {plans[0].recommendation}")
    return {"planned_for": [p.device for p in plans if p.fits], "expected_rss_bytes": plans[0].total_bytes,
            "context": context, "quant": quant, "kv_dtype": dtype}


def _check_tensors(src: Source) -> None:
    """Every tensor the graph needs exists with the shape the config implies, before anything is written."""
    cfg = src.config
    H, I, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    want = {"model.embed_tokens.weight": (cfg.vocab_size, H), "model.norm.weight": (H,)}
    if not cfg.tie_word_embeddings:
        want["lm_head.weight"] = (cfg.vocab_size, H)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        want.update({
            f"{p}.input_layernorm.weight": (H,), f"{p}.post_attention_layernorm.weight": (H,),
            f"{p}.self_attn.q_proj.weight": (cfg.num_attention_heads * hd, H),
            f"{p}.self_attn.k_proj.weight": (cfg.num_key_value_heads * hd, H),
            f"{p}.self_attn.v_proj.weight": (cfg.num_key_value_heads * hd, H),
            f"{p}.self_attn.o_proj.weight": (H, cfg.num_attention_heads * hd),
            f"{p}.mlp.gate_proj.weight": (I, H), f"{p}.mlp.up_proj.weight": (I, H), f"{p}.mlp.down_proj.weight": (H, I),
        })
    have = set(src.tensors.names())
    for name, shape in want.items():
        if name not in have:
            raise EdgeLlamaError(f"checkpoint is missing tensor {name!r}")
        got = tuple(src.tensors.shape(name))
        if got != shape:
            raise EdgeLlamaError(f"tensor {name!r} has shape {list(got)} but the config implies {list(shape)}")
