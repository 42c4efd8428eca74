"""CLI verbs of edgellama.export: export, inspect."""

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
    p.add_argument("--quant", choices=["int4", "int8"], default=None, help="weight quantization")
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--method", default=None, help="quantization method (see `edgellama quantize --help`)")
    p.add_argument("--embeddings", choices=["keep", "int8", "int4"], default=None)
    p.add_argument("--lm-head", choices=["keep", "int8", "int4"], default=None)
    p.add_argument("--threads", type=int, default=0, help="intra-op threads written into the bundle (0: cores at load)")
    p.add_argument("--no-verify", action="store_true", help="skip the parity check against the torch model")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=_export)

    p = sub.add_parser("inspect", help="print a bundle's manifest")
    p.add_argument("bundle")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_inspect)


def quant_options(args: argparse.Namespace) -> dict | None:
    if not args.quant:
        for flag in ("block_size", "method", "embeddings", "lm_head"):
            if getattr(args, flag, None) is not None:
                from edgellama.errors import EdgeLlamaError

                raise EdgeLlamaError(f"--{flag.replace('_', '-')} needs --quant")
        return None
    q = {"bits": 4 if args.quant == "int4" else 8}
    for key in ("block_size", "method", "embeddings", "lm_head"):
        if getattr(args, key, None) is not None:
            q[key] = getattr(args, key)
    return q


def _export(args: argparse.Namespace) -> int:
    from edgellama.errors import EdgeLlamaError

    if args.threads < 0:
        raise EdgeLlamaError("--threads must be >= 0")
    if args.format == "coreml":
        from edgellama.export.coreml_export import export_coreml_cli

        return export_coreml_cli(args)
    from edgellama.export.onnx_export import ExportOptions, export_onnx

    opts = ExportOptions(form="portable" if args.portable else "fast", dtype=args.dtype or "fp32",
                         max_context=args.max_context, logits="all" if args.all_logits else "last",
                         quant=quant_options(args), verify=not args.no_verify, force=args.force, threads=args.threads)
    report = export_onnx(args.source, args.output, opts)
    print(f"wrote {report.out} ({report.size_bytes / 1e6:.1f} MB) in {report.seconds:.1f} s", file=sys.stderr)
    return 0


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
        ("dtype", m.dtype), ("quantization", json.dumps(m.quantization) if m.quantization else "none"),
        ("context", str(m.context_length)),
        ("tokens", f"bos {m.tokens.bos_id}, stop {m.tokens.eos_ids}, pad {m.tokens.pad_id}"),
        ("chat template", "yes" if m.chat_template else "no"),
        ("inputs", ", ".join(s.name for s in m.graph.inputs[:4]) + (" ..." if len(m.graph.inputs) > 4 else "")),
        ("files", ", ".join(f"{k} ({v[:12]})" for k, v in sorted(m.files.items()))),
    ]
    if "verification" in m.extras:
        v = m.extras["verification"]
        rows.append(("verification", f"max |Δlogit| {v['max_abs_logit_diff']:.2e}, greedy {v['greedy_agreement']:.2f}"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0
