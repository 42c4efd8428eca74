"""CLI verbs of edgellama.export: export, inspect, adapter."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a checkpoint to a verified bundle")
    p.add_argument("source", help="HF folder, hub id (owner/name), .gguf file, or alias (smollm2-135m-instruct)")
    p.add_argument("-o", "--output", required=True, help="bundle directory to write")
    p.add_argument("--format", choices=["onnx", "coreml"], default="onnx")
    p.add_argument("--dtype", choices=["fp32", "fp16"], default=None)
    p.add_argument("--max-context", type=int, default=None, help="longest context the bundle serves")
    p.add_argument("--portable", action="store_true", help="standard ONNX ops only (any ONNX runtime)")
    p.add_argument("--all-logits", action="store_true", help="logits for every position, not only the last")
    p.add_argument("--stateless", action="store_true", help="Core ML: KV cache in/out (iOS 17) instead of states (iOS 18)")
    p.add_argument("--quant", default=None, metavar="PRESET", help=QUANT_HELP)
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--method", default=None, help="quantization method (see `edgellama quantize --help`)")
    p.add_argument("--embeddings", choices=["keep", "int8", "int4"], default=None)
    p.add_argument("--lm-head", choices=["keep", "int8", "int4"], default=None)
    p.add_argument("--scale-dtype", choices=["float16", "float32"], default=None, help=SCALE_DTYPE_HELP)
    add_calibration_flags(p)
    p.add_argument("--threads", type=int, default=0, help="intra-op threads written into the bundle (0: cores at load)")
    p.add_argument("--no-verify", action="store_true", help="skip the parity check against the torch model")
    p.add_argument("--ort-format", action="store_true",
                   help="also write model.ort (onnxruntime's ORT format, for ORT Mobile) and required_operators.config")
    p.add_argument("--device", default=None,
                   help="device profile the bundle is for (see `edgellama devices`): refused if it would not fit; "
                        "default: record every built-in profile it fits")
    p.add_argument("--adapter", default=None, metavar="DIR", help="PEFT LoRA adapter folder to merge into the weights")
    p.add_argument("--lora-slots", type=int, default=0, metavar="R",
                   help="give the graph rank-R LoRA inputs, for adapters swapped at run time (`edgellama adapter`)")
    p.add_argument("--lora-targets", default=None, metavar="LIST",
                   help="projections that get LoRA slots, comma-separated (default: q,k,v,o,gate,up,down)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=_export)

    p = sub.add_parser("adapter", help="turn a PEFT LoRA adapter into a file a --lora-slots bundle swaps in")
    p.add_argument("adapter_dir", help="PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--base", required=True, help="the base bundle, exported with --lora-slots")
    p.add_argument("-o", "--output", required=True, help="adapter file to write")
    p.add_argument("--format", choices=["edgellama", "onnx_adapter"], default="edgellama",
                   help="edgellama (for edgellama run/load) or onnx_adapter (onnxruntime / onnxruntime-genai)")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.set_defaults(func=_adapter)

    p = sub.add_parser("inspect", help="print a bundle's manifest")
    p.add_argument("bundle")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_inspect)
    register_quality(sub)


QUANT_HELP = ("weight quantization preset: int4 (balanced default, >= llama.cpp Q4_K_M quality; alias q4_k_m), "
              "int4-fast (onnxruntime's fastest int4 format, symmetric block 128; aliases fast, q4, q4_0), "
              "int8 (alias q8_0); other flags override the preset's options")
SCALE_DTYPE_HELP = ("how the int4/int8 scales are stored: float16 (default, half a bit per weight smaller on disk) "
                    "or float32 (onnxruntime then keeps no widened copy of them in memory: 1B shape -160 MB RSS, "
                    "+79 MB file)")


def add_calibration_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", default=None, metavar="FILE",
                   help="text to calibrate on (default: seeded random tokens); needed by --method gptq")
    p.add_argument("--no-smooth", action="store_true",
                   help="skip the per-channel input scaling searched on calibration inputs")


def quant_options(args: argparse.Namespace) -> dict | None:
    if not args.quant:
        for flag in ("block_size", "method", "embeddings", "lm_head", "scale_dtype", "calib"):
            if getattr(args, flag, None) is not None:
                from edgellama.errors import EdgeLlamaError

                raise EdgeLlamaError(f"--{flag.replace('_', '-')} needs --quant")
        return None
    from edgellama.quantize.presets import resolve

    preset = resolve(args.quant)
    q = {"preset": preset.name, "bits": preset.options["bits"]}
    for key in ("block_size", "method", "embeddings", "lm_head", "scale_dtype", "calib"):
        if getattr(args, key, None) is not None:
            q[key] = getattr(args, key)
    if getattr(args, "no_smooth", False):
        q["smooth"] = False
    return q


def _export(args: argparse.Namespace) -> int:
    from edgellama.errors import EdgeLlamaError

    if args.threads < 0:
        raise EdgeLlamaError("--threads must be >= 0")
    if args.format == "coreml" and args.ort_format:
        raise EdgeLlamaError("--ort-format converts an ONNX graph: it does not apply to --format coreml")
    if args.format == "coreml":
        from edgellama.export.coreml_export import export_coreml_cli

        if args.lora_slots or args.lora_targets:
            raise EdgeLlamaError("--lora-slots applies to --format onnx only (Core ML takes merged adapters: --adapter)")
        if args.adapter:
            from edgellama.export.lora import merge_adapter
            from edgellama.export.sources import load_source

            args.source = merge_adapter(load_source(args.source), args.adapter)
        return export_coreml_cli(args)
    if args.stateless:
        raise EdgeLlamaError("--stateless applies to --format coreml only (ONNX bundles always take the KV cache "
                             "as inputs and outputs)")
    from edgellama.export.onnx_export import ExportOptions, export_onnx

    opts = ExportOptions(form="portable" if args.portable else "fast", dtype=args.dtype or "fp32",
                         max_context=args.max_context, logits="all" if args.all_logits else "last",
                         quant=quant_options(args), verify=not args.no_verify, force=args.force, threads=args.threads,
                         device=args.device, ort_format=args.ort_format, adapter=args.adapter,
                         lora_slots=args.lora_slots,
                         lora_targets=args.lora_targets.split(",") if args.lora_targets else None)
    report = export_onnx(args.source, args.output, opts)
    print(f"wrote {report.out} ({report.size_bytes / 1e6:.1f} MB) in {report.seconds:.1f} s", file=sys.stderr)
    return 0


def _adapter(args: argparse.Namespace) -> int:
    from edgellama.export.lora import write_adapter_file

    r = write_adapter_file(args.adapter_dir, args.base, args.output, fmt=args.format, force=args.force)
    print(f"wrote {r.out} ({r.size_bytes / 1e6:.2f} MB): rank {r.rank} in {r.slots} slots, "
          f"{', '.join(r.targets)}", file=sys.stderr)
    return 0


def quant_summary(q: dict | None) -> str:
    """One readable line of the manifest's quantization record (`inspect --json` has all of it)."""
    if not q:
        return "none"
    block = f"block {q['block_size']}"
    if q.get("qk_block_size") and q["qk_block_size"] != q["block_size"]:
        block += f", q/k {q['qk_block_size']}"
    parts = [f"int{q['bits']} {q.get('method', '')} ({block})".replace("  ", " ")]
    if q.get("preset"):
        over = q.get("preset_overrides") or []
        parts.insert(0, f"preset {q['preset']}" + (f" (overridden: {', '.join(over)})" if over else ""))
    if q.get("symmetric"):
        parts[-1] += ", symmetric"
    int8 = q.get("int8_tensors") or []
    if int8:
        kinds: dict[str, int] = {}
        for name in int8:  # "model.layers.3.mlp.down_proj" -> down_proj; packed parts keep their own leaf
            leaf = name.rsplit(".", 1)[-1].replace("embed_tokens", "embedding")
            kinds[leaf] = kinds.get(leaf, 0) + 1
        parts.append("int8 " + ", ".join(f"{k} x{c}" if c > 1 else k for k, c in kinds.items()))
    parts.append(f"embeddings {q.get('embeddings')}, lm_head {q.get('lm_head')}"
                 + (f" (block {q['embedding_block_size']})" if q.get("embedding_block_size") else ""))
    parts.append(f"scales {q.get('scale_dtype', 'float32')}, activations {q.get('activation', 'int8')}")
    if q.get("smoothing"):
        parts.append(f"smoothed (alpha {q['smoothing']['alpha']}, {q['smoothing']['groups']} groups)")
    if q.get("calibration"):
        parts.append(f"calibrated on {q['calibration']}")
    return "; ".join(parts)


def _inspect(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from edgellama.runtime.bundle import read_manifest

    m = read_manifest(args.bundle, verify=False)
    if args.json:
        print(m.to_json(), end="")
        return 0
    a = m.architecture
    rows = [
        ("source", m.source), ("format", f"{m.format} v{m.format_version} ({m.created_by})"),
        ("graph", f"{m.graph.kind} {m.graph.form} ({m.graph.file}), attention {m.graph.attention}, "
                  f"share buffer {m.graph.past_present_share_buffer}, logits {m.graph.logits}"),
        ("architecture", f"{a['num_hidden_layers']} layers, hidden {a['hidden_size']}, heads "
                         f"{a['num_attention_heads']}/{a['num_key_value_heads']}, head_dim {a['head_dim']}, "
                         f"vocab {a['vocab_size']}, tied {a['tie_word_embeddings']}"),
        ("dtype", m.dtype), ("quantization", quant_summary(m.quantization)),
        ("context", str(m.context_length)),
        ("tokens", f"bos {m.tokens.bos_id}, stop {m.tokens.eos_ids}, pad {m.tokens.pad_id}"),
        ("chat template", "yes" if m.chat_template else "no"),
        ("inputs", ", ".join(s.name for s in m.graph.inputs[:4]) + (" ..." if len(m.graph.inputs) > 4 else "")),
        ("files", ", ".join(f"{k} ({v[:12]})" for k, v in sorted(m.files.items()))),
    ]
    if "verification" in m.extras:
        v = m.extras["verification"]
        rows.append(("verification", f"max |Δlogit| {v['max_abs_logit_diff']:.2e}, greedy {v['greedy_agreement']:.2f}"))
    if "adapter" in m.extras:
        ad = m.extras["adapter"]
        rows.append(("adapter", f"{ad['name']} merged (r {ad['r']}, alpha {ad['lora_alpha']}, {', '.join(ad['targets'])})"))
    if "lora_slots" in m.extras:
        sl = m.extras["lora_slots"]
        rows.append(("lora slots", f"rank <= {sl['rank']} on {', '.join(sl['targets'])}"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def register_quality(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantize an exported float bundle to int4/int8 weights")
    p.add_argument("bundle", help="a float (fp32/fp16) ONNX bundle")
    p.add_argument("-o", "--output", required=True, help="bundle directory to write")
    p.add_argument("--quant", default=None, metavar="PRESET", help=QUANT_HELP)
    p.add_argument("--bits", type=int, choices=[4, 8], default=None, help="4 or 8: the int4 or int8 preset")
    p.add_argument("--block-size", type=int, default=None, help="weights per scale (power of two >= 16; default 32)")
    p.add_argument("--method", default=None, help="rtn | mse | hqq | gptq (needs --calib) | mixed (hqq, with the most "
                                                  "sensitive projections at int8; the int4 default)")
    p.add_argument("--embeddings", choices=["keep", "int8", "int4"], default=None)
    p.add_argument("--lm-head", choices=["keep", "int8", "int4"], default=None)
    p.add_argument("--scale-dtype", choices=["float16", "float32"], default=None, help=SCALE_DTYPE_HELP)
    p.add_argument("--accuracy-level", type=int, choices=[1, 4], default=None,
                   help="MatMulNBits compute: 4 = int8 activations (default, faster), 1 = fp32 activations")
    add_calibration_flags(p)
    p.add_argument("--no-verify", action="store_true", help="skip the check against the torch model")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=_quantize)

    p = sub.add_parser("eval", help="perplexity, KL divergence and top-1 agreement of a bundle against the fp32 reference")
    p.add_argument("bundle")
    p.add_argument("--reference", required=True, help="the float checkpoint (any export source, or a float bundle)")
    p.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text to score")
    p.add_argument("--window", type=int, default=512, help="tokens per teacher-forced window")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of the text")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_eval)


def _quantize(args: argparse.Namespace) -> int:
    from edgellama.export.requantize import quantize_bundle

    from edgellama.errors import EdgeLlamaError
    from edgellama.quantize.presets import resolve

    if args.quant is None and args.bits is None:
        raise EdgeLlamaError("give --quant PRESET (int4, int4-fast, int8) or --bits 4|8")
    if args.quant is not None and args.bits is not None and resolve(args.quant).options["bits"] != args.bits:
        raise EdgeLlamaError(f"--quant {resolve(args.quant).name} is {resolve(args.quant).options['bits']}-bit: "
                             f"it cannot take --bits {args.bits}")
    args.quant = args.quant or f"int{args.bits}"
    quant = quant_options(args)
    calib = quant.pop("calib", None)
    if args.accuracy_level is not None:
        quant["accuracy_level"] = args.accuracy_level
    report = quantize_bundle(args.bundle, args.output, quant, force=args.force, verify=not args.no_verify,
                             calib=calib)
    print(f"wrote {report.out} ({report.size_bytes / 1e6:.1f} MB) in {report.seconds:.1f} s", file=sys.stderr)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from edgellama.export.evaluate import evaluate, format_report, to_json

    result = evaluate(args.bundle, args.reference, args.text, window=args.window, max_tokens=args.max_tokens,
                      progress=True)
    print(to_json(result) if args.json else format_report(result))
    return 0
