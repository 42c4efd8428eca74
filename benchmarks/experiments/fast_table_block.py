"""Would int4-fast catch onnxruntime-genai's tuned build with a coarser embedding/lm_head table?

    python benchmarks/experiments/fast_table_block.py [--block 64] [--asymmetric] [--rounds 4]

MatMulNBits packs a table to ~8.25 bits per weight at asymmetric block 16, ~6.1 at block 32, ~5.1 at
64, 4.5 at symmetric 128 (genai's head). This exports the Llama-3.2-1B shape with int4-fast's
table changed (the preset's options overridden in this process only) and benches it interleaved
with the int4-fast and genai-tuned artifacts the harness built (`python benchmarks/harness.py
--workloads 1b --prepare-only`): decode, TTFT and peak RSS per round, each run its own process,
and the median per-round ratio to genai tuned. Quality of the variant: `benchmarks/quality.py` on
de-gridded SmolLM2 with the same override (docs/quantization.md, Presets).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import harness  # noqa: E402  (benchmarks/harness.py: the measuring subprocess protocol)

from edgellama.cli import main as edgellama_main  # noqa: E402
from edgellama.quantize.presets import PRESETS  # noqa: E402

WORK = HERE.parent / "work" / "1b"


def export_variant(block: int, symmetric: bool, out: Path) -> Path:
    if not (out / "edgellama.json").is_file():
        fast = PRESETS["int4-fast"]
        fast.options.update(embedding_block_size=block, table_symmetric=symmetric)
        fast.plan.update(embed_block_size=block, embed_symmetric=symmetric)
        rc = edgellama_main(["export", str(HERE.parent / "work" / "llama-3.2-1b-shape"), "-o", str(out),
                             "--quant", "int4-fast", "--force"])
        if rc:
            raise SystemExit(f"export failed ({rc})")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--asymmetric", action="store_true", help="keep zero points (default: symmetric)")
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    for need in ("edgellama-int4-fast", "genai-int4-tuned", "prompt-128.json"):
        if not (WORK / need).exists():
            raise SystemExit(f"missing {WORK / need}: run python benchmarks/harness.py --workloads 1b --prepare-only")
    sym = not args.asymmetric
    variant = export_variant(args.block, sym, WORK / f"edgellama-int4-fast-table{args.block}{'s' if sym else 'a'}")

    cfg, prompt = harness.Config(), WORK / "prompt-128.json"  # the harness's defaults: 128 + 128 tokens, 2 threads
    cmds = {"int4-fast": harness.edgellama_command(WORK / "edgellama-int4-fast", prompt, cfg),
            variant.name: harness.edgellama_command(variant, prompt, cfg),
            "genai tuned": harness.genai_command(WORK / "genai-int4-tuned", prompt, cfg)}
    runs: dict[str, list[dict]] = {k: [] for k in cmds}
    for r in range(args.rounds):
        for name, cmd in cmds.items():
            x = harness.measure(cmd)
            runs[name].append(x)
            print(f"round {r + 1} {name}: {x['decode_tok_s']:.2f} tok/s, TTFT {1000 * x['ttft_s']:.0f} ms, "
                  f"{x['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
    base = runs["genai tuned"]
    print("| system | decode / genai tuned, per round | median | TTFT / genai tuned | peak RSS MB |")
    print("|---|---|---:|---:|---:|")
    for name, xs in runs.items():
        dec = [a["decode_tok_s"] / b["decode_tok_s"] for a, b in zip(xs, base)]
        ttft = [a["ttft_s"] / b["ttft_s"] for a, b in zip(xs, base)]
        print(f"| {name} | {', '.join(f'{d:.2f}' for d in dec)} | {statistics.median(dec):.2f} | "
              f"{statistics.median(ttft):.2f} | {statistics.median(x['peak_rss_mb'] for x in xs):.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
