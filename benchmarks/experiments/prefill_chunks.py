"""Does prefilling a prompt in chunks beat one whole-prompt run? And what does greedy's argmax cost?

    python benchmarks/experiments/prefill_chunks.py BUNDLE [BUNDLE ...] [--prompt 128] [--chunks 16,32,64] [--rounds 5]

For each bundle: time to first token (prefill plus the argmax that picks the token) with the
prompt fed whole and in chunks of each size, every variant once per round (interleaved, as the
machine's bandwidth drifts), medians. Then the cost of `np.argmax` over the bundle's vocabulary,
the only per-step work greedy decoding adds to the engine's call (the logits are already written
into a preallocated buffer bound through IO binding; benchmarks/experiments/runtime_overhead.py measures the
rest of the Python runtime). docs/performance.md reads the table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from edgellama.runtime.generate import load


def ttft_ms(engine, prompt: list[int], chunk: int) -> float:
    engine.reset()
    t0 = time.perf_counter()
    for i in range(0, len(prompt), chunk):
        logits = engine.forward(prompt[i:i + chunk])
    int(np.argmax(logits))
    return (time.perf_counter() - t0) * 1e3


def argmax_us(vocab: int, calls: int = 2000) -> float:
    logits = np.random.default_rng(0).standard_normal(vocab).astype(np.float32)
    t0 = time.perf_counter()
    for _ in range(calls):
        int(np.argmax(logits))
    return (time.perf_counter() - t0) / calls * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", nargs="+")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    ap.add_argument("--chunks", default="16,32,64", help="chunk sizes to compare with the whole prompt")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    sizes = sorted({int(c) for c in args.chunks.split(",")} | {args.prompt})
    print(f"{args.prompt}-token prompt, medians of {args.rounds} interleaved rounds\n")
    print("| bundle | chunk | TTFT ms | × whole prompt (median of per-round ratios) |")
    print("|---|---:|---:|---:|")
    vocabs = {}
    for path in args.bundles:
        model = load(path, max_context=args.prompt)
        prompt = [1000 + i for i in range(args.prompt)]
        ttft_ms(model.engine, prompt, args.prompt)  # warm-up: first-run allocations
        times: dict[int, list[float]] = {c: [] for c in sizes}
        for _ in range(args.rounds):
            for c in sizes:
                times[c].append(ttft_ms(model.engine, prompt, c))
        for c in sizes:
            ratio = statistics.median(t / w for t, w in zip(times[c], times[args.prompt]))
            print(f"| {path} | {c} | {statistics.median(times[c]):.1f} | {ratio:.3f} |")
        vocabs[path] = model.engine.vocab_size
        del model
    print()
    for path, vocab in vocabs.items():
        print(f"argmax over {vocab} logits ({path}): {argmax_us(vocab):.1f} µs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
