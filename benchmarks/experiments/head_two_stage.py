"""Could the lm_head read int4 and rescore only the top candidates at int8 precision?

    python benchmarks/experiments/head_two_stage.py [--text FILE ...] [--max-tokens 1022]

The int8 tied table is the largest single read of a decode step (SmolLM2: a quarter of the packed
weights; the Llama-3.2-1B shape: 328 of ~1,160 MB as MLAS packs it). A two-stage head would read a
coarse int4 table for every logit, take the top k, and recompute those k from the coarse codes plus
an int4 residual (together about int8's precision and size, so the tied embedding keeps its
quality). Greedy would pick the same token as int8 almost always; the question is what the
coarse logits of the other tokens cost the distribution.

This measures only the head, in numpy: de-gridded SmolLM2's fp32 final hidden states on the text
(torch), logits against the fp32 table, and mean KLD for the int8 table (block 32, the default),
the coarse int4 table alone, coarse + residual everywhere, and the two-stage mix for several k.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]  # benchmarks/: the shared helpers live there
sys.path.insert(0, str(ROOT))

from degrid_smollm2 import degridded_smollm2  # noqa: E402
from quality import heldout_text  # noqa: E402

COARSE = {"int4 b32 asymmetric hqq": (32, False), "int4 b32 symmetric hqq": (32, True),
          "int4 b128 symmetric hqq": (128, True)}
TOP_K = (16, 64, 256)


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def kld(ref: np.ndarray, got: np.ndarray) -> float:
    lp, lq = log_softmax(ref), log_softmax(got)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", type=Path, action="append", help="text file(s) (default: quality.py's held-out prose)")
    ap.add_argument("--max-tokens", type=int, default=1022)
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgellama.quantize.methods import quantize

    folder = degridded_smollm2()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    w = model.lm_head.weight.detach().numpy()
    texts = {t.stem: t.read_text(encoding="utf-8") for t in args.text} if args.text else {"heldout": heldout_text()}
    w8 = quantize(w, 8, 32, "rtn", symmetric=True).dequantize()
    tables = {}
    for name, (block, sym) in COARSE.items():
        coarse = quantize(w, 4, block, "hqq", symmetric=sym).dequantize()
        tables[name] = (coarse, coarse + quantize(w - coarse, 4, 32, "rtn", symmetric=True).dequantize())
    print("| text | head | " + " | ".join(["KLD"] + [f"KLD top-{k} rescored" for k in TOP_K]) + " |")
    print("|---|---|" + "---:|" * (1 + len(TOP_K)))
    for label, text in texts.items():
        ids = tok(text, return_tensors="pt").input_ids[:, :args.max_tokens]
        with torch.no_grad():
            h = model.model(ids).last_hidden_state[0].numpy()
        ref = h @ w.T
        print(f"| {label} | int8 b32 (default) | {kld(ref, h @ w8.T):.5f} |" + " |" * len(TOP_K))
        for name, (coarse, fine) in tables.items():
            lc, lf = h @ coarse.T, h @ fine.T
            cells = [f"{kld(ref, lc):.4f}"]
            for k in TOP_K:
                top = np.argpartition(-lc, k, axis=-1)[:, :k]
                mixed = lc.copy()
                np.put_along_axis(mixed, top, np.take_along_axis(lf, top, -1), -1)
                cells.append(f"{kld(ref, mixed):.4f}")
            print(f"| {label} | {name} | " + " | ".join(cells) + " |")
        print(f"| {label} | coarse + residual everywhere | {kld(ref, h @ tables[next(iter(COARSE))][1].T):.5f} |"
              + " |" * len(TOP_K), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
