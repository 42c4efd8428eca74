"""Interleaved A/B decode benchmark of edgellama bundles on this machine.

Memory bandwidth on a shared 2-core VM jumps between runs, so one bundle's number against
another's from a different minute means little. This runs every bundle once per round, each in
its own `edgellama bench` subprocess (cold session, same prompt), for several rounds, and prints
medians and each bundle's ratio to the first one, computed round by round.

    python benchmarks/ab.py BUNDLE_A BUNDLE_B [...] --rounds 5 [--prompt-tokens 128 --new-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys


def bench_once(bundle: str, prompt: int, new: int, threads: int | None) -> dict:
    cmd = ["edgellama", "bench", bundle, "--json", "--repeat", "1", "--prompt-tokens", str(prompt),
           "--new-tokens", str(new)]
    if threads:
        cmd += ["--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{bundle}: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else 'bench failed'}")
    return json.loads(out.stdout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", nargs="+")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    rows: dict[str, list[dict]] = {b: [] for b in args.bundles}
    for r in range(args.rounds):
        for b in args.bundles:
            rows[b].append(bench_once(b, args.prompt_tokens, args.new_tokens, args.threads))
        print(f"round {r + 1}: " + "  ".join(f"{rows[b][-1]['decode_tok_s']:.1f}" for b in args.bundles),
              file=sys.stderr, flush=True)
    base = args.bundles[0]
    print(f"| bundle | file MB | TTFT ms | decode tok/s | peak RSS MB | decode × {base} (median of per-round ratios) |")
    print("|---|---:|---:|---:|---:|---:|")
    for b in args.bundles:
        runs = rows[b]
        ratio = statistics.median(x["decode_tok_s"] / y["decode_tok_s"] for x, y in zip(runs, rows[base]))
        print(f"| {b} | {runs[0]['size_bytes'] / 1e6:.1f} | {statistics.median(x['ttft_s'] for x in runs) * 1e3:.0f} | "
              f"{statistics.median(x['decode_tok_s'] for x in runs):.1f} | "
              f"{max(x['peak_rss_mb'] for x in runs):.0f} | {ratio:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
