"""Quality of Core ML bundles of de-gridded SmolLM2-135M-Instruct, scored off macOS.

    python benchmarks/coreml_quality.py [--work DIR] [--text FILE ...] [--max-tokens 1022]

Linux has no Core ML runtime, so each saved program is replayed in numpy (tests/coreml_replay.py:
fp16 ops, float32 matmul accumulation rounded to fp16, the constexpr weight decoding), fed through
the runtime's CoreMLEngine exactly as on a device. Same measure as `edgellama eval` for ONNX: mean
KL divergence from the fp32 torch reference over 512-token windows (BOS first), top-1 agreement.
Bundles: fp16, int8, int4 and int4 `--method rtn` (`--format coreml --quant ...`), context 512, kept
under --work.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / "tests"))

from degrid_smollm2 import degridded_smollm2  # noqa: E402
from quality import texts_or_heldout  # noqa: E402

WINDOW = 512
VARIANTS = {"fp16": None, "int8": {"bits": 8}, "int4": {"bits": 4}, "int4-rtn": {"bits": 4, "method": "rtn"}}


def build(folder: Path, out: Path, quant: dict | None) -> Path:
    from edgellama.export import coreml_export as CE

    if not (out / "edgellama.json").is_file():
        t0 = time.perf_counter()
        CE.export_coreml(folder, out, CE.CoreMLOptions(max_context=WINDOW, quant=quant, force=True, verify=False),
                         log=lambda m: None)
        print(f"  exported {out.name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return out


def score_bundle(bundle: Path, ref, texts: list[Path], max_tokens: int) -> list[dict]:
    from coreml_replay import Replay

    from edgellama.export.evaluate import score_windows, windows
    from edgellama.runtime.bundle import read_manifest
    from edgellama.runtime.coreml_engine import CoreMLEngine
    from edgellama.runtime.tokenizer import Tokenizer

    manifest = read_manifest(bundle)
    engine = CoreMLEngine(bundle, manifest, backend=Replay(bundle / "model.mlpackage"))
    tok = Tokenizer.from_dir(bundle)
    bos = manifest.tokens.bos_id if manifest.tokens.add_bos else None
    out = []
    for text in texts:
        wins = windows(tok.encode(text.read_text(encoding="utf-8"))[:max_tokens], WINDOW, bos)
        s = score_windows(engine, ref, wins)
        out.append({"kld_mean": float(s["kl"].mean()), "top1": float(s["top1"].mean())})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgellama-coreml-quality"))
    ap.add_argument("--text", type=Path, action="append", help="held-out text(s) (default: quality.py's)")
    ap.add_argument("--max-tokens", type=int, default=1022)
    ap.add_argument("--only", nargs="*", default=None, help="variants to run (fp16, int8, int4, int4-rtn)")
    args = ap.parse_args(argv)

    from edgellama.export.evaluate import Reference

    args.work.mkdir(parents=True, exist_ok=True)
    folder = degridded_smollm2()
    texts = texts_or_heldout(args.text, args.work)
    ref = Reference(folder)
    print("| Core ML bundle | model.mlpackage MB | " + " | ".join(f"KLD {t.stem} | top-1 {t.stem}" for t in texts) + " |")
    print("|---|---:|" + "---:|---:|" * len(texts))
    for name, quant in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        bundle = build(folder, args.work / name, quant)
        mb = sum(f.stat().st_size for f in (bundle / "model.mlpackage").rglob("*") if f.is_file()) / 1e6
        res = score_bundle(bundle, ref, texts, args.max_tokens)
        print(f"| {name} | {mb:.1f} | " + " | ".join(f"{r['kld_mean']:.4f} | {r['top1']:.3f}" for r in res) + " |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
