"""Quality of the quantized bundles of de-gridded SmolLM2-135M-Instruct, as a markdown table.

    python benchmarks/quality.py [--work DIR] [--only NAME ...] [--speed] [--max-tokens 1022]

Source: benchmarks/degrid_smollm2.py's folder, exported once as an fp32 fast bundle; every row is
`quantize_bundle` of that bundle. Reference: the fp32 torch model. Text: held-out English prose
(paragraphs of the Python documentation's topic help, shipped with CPython as pydoc_data/topics.py,
that are not code, grammar or lists), 1,022 tokens = two full 512-token windows.
Bundles are kept under --work and reused when their quantization options match.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from degrid_smollm2 import FRANCE, degridded_smollm2  # noqa: E402

# (row name, quantization options); {} is the fp32 bundle itself.
CONFIGS: list[tuple[str, dict]] = [
    ("fp32", {}),
    ("int8 default", {"bits": 8}),
    ("int8 default, --no-smooth", {"bits": 8, "smooth": False}),
    ("int8 rtn b64", {"bits": 8, "method": "rtn", "block_size": 64}),
    ("int4 default", {"bits": 4}),
    ("int4 default, --no-smooth", {"bits": 4, "smooth": False}),
    ("int4 mixed b32 (faster decode)", {"bits": 4, "method": "mixed", "block_size": 32}),
    ("int4 rtn b32, emb/head int4, --no-smooth (~genai RTN)", {"bits": 4, "method": "rtn", "block_size": 32,
                                                               "embeddings": "int4", "lm_head": "int4", "smooth": False}),
    ("int4 hqq b32, emb/head int8 (mixed off)", {"bits": 4, "method": "hqq", "block_size": 32}),
    ("int4 hqq b16, emb/head int8 (mixed off)", {"bits": 4, "method": "hqq", "block_size": 16}),
    ("int4 rtn sym b128, emb/head int4, --no-smooth (~genai tuned)",
     {"bits": 4, "method": "rtn", "block_size": 128, "symmetric": True, "embeddings": "int4", "lm_head": "int4",
      "smooth": False}),
    ("fast: hqq sym b128, emb/head int4 b128", {"bits": 4, "method": "hqq", "block_size": 128, "symmetric": True,
                                                "embeddings": "int4", "lm_head": "int4"}),
    ("fast: hqq sym b128, emb/head int4 b32", {"bits": 4, "method": "hqq", "block_size": 128, "symmetric": True,
                                               "embeddings": "int4", "lm_head": "int4", "embedding_block_size": 32}),
    ("fast: hqq sym b128, emb/head int8 b32", {"bits": 4, "method": "hqq", "block_size": 128, "symmetric": True,
                                               "embedding_block_size": 32}),
    # The int4-fast rows' tied tables are searched with the lm_head's input magnitudes (onnx_weights.py).
    ("fast: hqq sym b128, emb/head int4 asym b16, head-weighted", {"preset": "int4-fast", "embedding_block_size": 16}),
    ("fast: hqq sym b128, emb/head int4 asym b32, head-weighted", {"preset": "int4-fast", "embedding_block_size": 32}),
    ("fast: hqq sym b128, emb/head int4 sym b128, head-weighted", {"preset": "int4-fast", "embedding_block_size": 128,
                                                                   "table_symmetric": True}),
    ("int4-fast preset (emb/head int4 asym b64, head-weighted)", {"preset": "int4-fast"}),
]


def heldout_text(min_words: int = 12) -> str:
    """English prose paragraphs from pydoc_data.topics, in a fixed order (sorted topic names)."""
    from pydoc_data.topics import topics

    paras = []
    for key in sorted(topics):
        for p in re.split(r"\n\s*\n", topics[key]):
            # Indented blocks are code or grammar; bullets and rules are lists and tables.
            if (p and not p.startswith(" ") and not p.lstrip().startswith(("*", "-", "="))
                    and "::=" not in p and ">>>" not in p and len(p.split()) >= min_words):
                paras.append(" ".join(p.split()))
    return "\n\n".join(paras)


def texts_or_heldout(texts: list[Path] | None, work: Path) -> list[Path]:
    """The texts given on the command line, or heldout_text() written under `work`."""
    if texts:
        return texts
    path = work / "heldout.txt"
    path.write_text(heldout_text(), encoding="utf-8")
    return [path]


def _bundle(work: Path, name: str, quant: dict, fp32: Path) -> Path:
    from edgellama.export.requantize import quantize_bundle
    from edgellama.quantize.onnx_weights import QuantOptions

    if not quant:
        return fp32
    out = work / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    stamp = out.with_suffix(".quant.json")  # its options, defaults resolved: a change of default rebuilds it
    want = asdict(QuantOptions.from_dict(quant))
    if (out / "edgellama.json").is_file() and stamp.is_file() and json.loads(stamp.read_text()) == want:
        return out
    t0 = time.perf_counter()
    quantize_bundle(fp32, out, quant, force=True, verify=False, log=lambda m: None)
    stamp.write_text(json.dumps(want))
    print(f"  quantized {name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return out


def decode_speed(bundle: Path, tokens: int = 64) -> float:
    """Greedy decode tokens/s after a short prompt (the session's threads: physical cores)."""
    import numpy as np

    from edgellama.runtime.bundle import read_manifest
    from edgellama.runtime.engine import OnnxEngine

    engine = OnnxEngine(bundle, read_manifest(bundle, verify=False), max_context=tokens + 16)
    logits = engine.forward(list(range(100, 116)))
    for _ in range(4):  # warm up
        logits = engine.forward([int(np.argmax(logits))])
    engine.rewind(16)
    t0 = time.perf_counter()
    for _ in range(tokens):
        logits = engine.forward([int(np.argmax(logits))])
    return tokens / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgellama-quality"))
    ap.add_argument("--only", nargs="*", default=None, help="row names (substrings) to run")
    ap.add_argument("--max-tokens", type=int, default=1022)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--speed", action="store_true", help="also measure greedy decode tokens/s")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args(argv)

    from edgellama.export.evaluate import Reference, evaluate, greedy_reply
    from edgellama.export.onnx_export import ExportOptions, export_onnx

    args.work.mkdir(parents=True, exist_ok=True)
    folder = degridded_smollm2()
    fp32 = args.work / "fp32"
    if not (fp32 / "edgellama.json").is_file():
        export_onnx(folder, fp32, ExportOptions(force=True, verify=False), log=lambda m: None)
    text, = texts_or_heldout(None, args.work)
    ref = Reference(fp32)
    rows = []
    for name, quant in CONFIGS:
        if args.only and not any(o in name for o in args.only):
            continue
        print(f"{name} ...", file=sys.stderr)
        b = _bundle(args.work, name, quant, fp32)
        r = evaluate(b, ref, text, window=args.window, max_tokens=args.max_tokens, progress=False)
        r["name"], r["quant"] = name, quant
        if "default" in name and quant.get("bits") == 4 and "accuracy_level" not in quant:
            r["france"] = greedy_reply(b, FRANCE, max_new_tokens=16)
        if args.speed:
            r["decode_tok_s"] = decode_speed(b)
        rows.append(r)
        print(f"  {json.dumps({k: v for k, v in r.items() if k != 'quant'})}", file=sys.stderr)
    print(f"\nde-gridded SmolLM2-135M-Instruct, {rows[0]['tokens'] if rows else 0} tokens of held-out prose, "
          f"fp32 reference ppl {rows[0]['ref_ppl'] if rows else float('nan'):.2f}\n")
    speed = " decode tok/s |" if args.speed else ""
    print(f"| bundle | file MB | bits/weight | mean KLD | p99 KLD | top-1 | ppl |{speed}")
    print("|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if args.speed else ""))
    for r in rows:
        cells = [r["name"], f"{r['size_bytes'] / 1e6:.1f}", f"{r['bits_per_weight']:.2f}", f"{r['kld_mean']:.4f}",
                 f"{r['kld_p99']:.3f}", f"{r['top1_agreement']:.3f}", f"{r['ppl']:.2f}"]
        if args.speed:
            cells.append(f"{r['decode_tok_s']:.0f}")
        print("| " + " | ".join(cells) + " |")
    for r in rows:
        if "france" in r:
            print(f"\n{r['name']}: {FRANCE!r} -> {r['france']!r}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
