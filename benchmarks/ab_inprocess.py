"""In-process interleaved A/B of edgellama bundles: finer than ab.py for small differences.

    python benchmarks/ab_inprocess.py BUNDLE_A BUNDLE_B [...] [--rounds 20] [--steps 32] [--prompt 128]

ab.py runs every bundle in its own process, so each run pays its own load and meets the machine in
its own phase. Here every bundle is loaded once into one process, and each round runs, for each
bundle in turn (order reversed every other round), a prefill of the same prompt from an empty cache
and `--steps` greedy decode steps. Ratios to the first bundle are taken round by round and their
median printed: what a 2-5% difference needs on a machine whose bandwidth drifts by more than that.
Needs the memory of all bundles at once.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from edgellama.runtime.generate import load


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", nargs="+")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--steps", type=int, default=32, help="decode steps per bundle per round")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    prompt = [1000 + i for i in range(args.prompt)]
    models = [load(b, threads=args.threads, max_context=args.prompt + args.steps) for b in args.bundles]
    decode: list[list[float]] = [[] for _ in models]
    ttft: list[list[float]] = [[] for _ in models]
    for r in range(args.rounds):
        order = list(range(len(models)))
        if r % 2:
            order.reverse()
        for i in order:
            engine = models[i].engine
            engine.reset()
            t0 = time.perf_counter()
            token = int(np.argmax(engine.forward(prompt)))
            ttft[i].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                token = int(np.argmax(engine.forward([token])))
            decode[i].append(args.steps / (time.perf_counter() - t0))
    print(f"{args.rounds} interleaved rounds, {args.prompt}-token prefill + {args.steps} decode steps each\n")
    print("| bundle | decode tok/s | × first (median of per-round ratios) | TTFT ms | × first |")
    print("|---|---:|---:|---:|---:|")
    for i, b in enumerate(args.bundles):
        d = statistics.median(x / a for a, x in zip(decode[0], decode[i]))
        t = statistics.median(x / a for a, x in zip(ttft[0], ttft[i]))
        print(f"| {b} | {statistics.median(decode[i]):.2f} | {d:.3f} | {statistics.median(ttft[i]) * 1e3:.1f} | {t:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
