"""Does resident memory stay flat over a long generation? 2,000 tokens, RSS sampled every 100.

    python benchmarks/experiments/rss_soak.py [--bundle DIR ...] [--tokens 2000] [--every 100] [--threads N]

Each bundle is measured in its own fresh process (`--one`), which loads it, prefills a short prompt
and generates greedily with stop ids switched off, reading /proc/self/statm every `every` tokens.
Growth is counted from the sample at `every` tokens (allocators and onnxruntime's arenas settle in
the first steps). The fast graph's cache is one buffer for the whole context, so it should stay
flat (< 10 MB); the portable graph concatenates its cache, so it grows by design, by about the KV
bytes per token (reported for comparison). Without --bundle, the fp32 SmolLM2-135M fast and
portable bundles are exported once into EDGELLAMA_CACHE/bench/ by `edgellama export` processes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

FLAT_MB = 10.0
PROMPT = "The history of the Roman Empire begins with"


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def default_bundles() -> list[Path]:
    from edgellama.assets import cache_dir
    from edgellama.runtime import bundle as B

    out = []
    for form in ("fast", "portable"):
        path = cache_dir() / "bench" / f"smollm2-{form}"
        if not (path / B.MANIFEST).exists():
            cmd = [sys.executable, "-m", "edgellama", "export", "smollm2-135m-instruct", "-o", str(path), "--force"]
            subprocess.run(cmd + (["--portable"] if form == "portable" else []), check=True)
        out.append(path)
    return out


def soak(bundle: Path, tokens: int, every: int, threads: int | None) -> dict:
    """Runs in the measuring process: only the runtime is imported here."""
    import numpy as np

    from edgellama.runtime.generate import load, stream_ids
    from edgellama.runtime.sampling import SamplingParams

    model = load(bundle, threads=threads)
    model = replace(model, stop_ids=frozenset())
    prompt = model.encode_prompt(PROMPT)
    if len(prompt) + tokens > model.context:
        raise SystemExit(f"rss_soak: {tokens} tokens do not fit the context of {model.context}")
    samples = [(0, rss_mb())]
    n = 0
    for n, _ in enumerate(stream_ids(model, prompt, SamplingParams(max_new_tokens=tokens)), 1):
        if n % every == 0:
            samples.append((n, rss_mb()))
    e = model.engine
    kv_bytes_per_token = 2 * e.n_layers * e.kv_heads * e.head_dim * np.dtype(e._kv_dtype).itemsize
    return {"bundle": str(bundle), "form": model.manifest.graph.form, "share_buffer": e.share, "context": e.context,
            "generated": n, "samples": samples, "kv_mb_per_1000_tokens": kv_bytes_per_token * 1000 / 2**20}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, action="append", default=None)
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--one", type=Path, default=None, help=argparse.SUPPRESS)  # the measuring child
    args = ap.parse_args()
    if args.one:
        print(json.dumps(soak(args.one, args.tokens, args.every, args.threads)))
        return 0

    flat_ok = True
    for bundle in args.bundle or default_bundles():
        cmd = [sys.executable, __file__, "--one", str(bundle), "--tokens", str(args.tokens), "--every", str(args.every)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        samples = dict(r["samples"])
        settled = samples[args.every]
        growth = samples[r["generated"]] - settled
        print(f"{r['bundle']}: {r['form']} graph (share buffer {r['share_buffer']}), context {r['context']}, "
              f"{r['generated']} tokens")
        print("  tokens  " + " ".join(f"{n:>6}" for n in samples))
        print("  RSS MB  " + " ".join(f"{v:>6.0f}" for v in samples.values()))
        expected = r["kv_mb_per_1000_tokens"] * (r["generated"] - args.every) / 1000
        verdict = ("flat" if growth < FLAT_MB else "NOT flat") if r["share_buffer"] else \
            f"grows by design (concat cache: +{expected:.0f} MB of KV over these tokens)"
        print(f"  growth after {args.every} tokens: {growth:+.1f} MB -> {verdict}")
        if r["share_buffer"] and growth >= FLAT_MB:
            flat_ok = False
    return 0 if flat_ok else 1


if __name__ == "__main__":
    sys.exit(main())
