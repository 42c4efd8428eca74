"""How right is `edgellama plan` on this machine? Predicted against measured decode and peak RSS.

    python benchmarks/planner_check.py BUNDLE [BUNDLE ...] [--rounds 3] [--fit] [--write]

Each bundle is measured by `edgellama bench --json` in its own process (clean peak RSS), rounds
interleaved A B C A B C, medians taken. The prediction is `plan` on device `host` with the bundle's
own quantization record at the bench's context. --fit solves the speed model's two constants from
the measurements (least squares on 1/tok_s = bytes read / (efficiency x bandwidth) + layers x
layer cost); --write stores them in the host profile. Prints a table to paste into an issue.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from edgellama.devices.catalog import HOST, get_profile
from edgellama.devices.plan import ModelShape, WeightFormat, plan
from edgellama.devices.probe import write_host_profile
from edgellama.runtime.bench import markdown_table
from edgellama.runtime.bundle import read_manifest


def measure(bundle: Path, prompt: int, new: int, threads: int | None) -> dict:
    cmd = [sys.executable, "-m", "edgellama", "bench", str(bundle), "--json", "--repeat", "1",
           "--prompt-tokens", str(prompt), "--new-tokens", str(new)] + (["--threads", str(threads)] if threads else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def predict(bundle: Path, host, context: int):
    m = read_manifest(bundle, verify=False)
    shape = ModelShape.from_hf_config(m.architecture)
    quant = f"int{m.quantization['bits']}" if m.quantization else m.dtype
    weights = WeightFormat.from_record(m.quantization, m.dtype) if m.quantization else None
    p = plan(shape, host, quant=quant, max_context=context, kv_dtype=m.dtype if m.dtype in ("fp16", "fp32") else None,
             weights=weights)
    return p, shape.num_hidden_layers


def label(bundle: Path) -> str:
    """The bundle's folder with its parent: harness bundles share names across workloads (1b/edgellama-int4)."""
    return f"{bundle.parent.name}/{bundle.name}"


def fit(points: list[tuple[int, int, float]], bandwidth_gbs: float) -> tuple[float, float]:
    """(efficiency, layer cost in us) from (bytes read, layers, measured tok/s) by least squares on relative error.

    Each row is divided by its measured seconds per token: plain least squares on seconds lets an 8B
    bundle's 0.35 s outweigh SmolLM2's 0.01 s, and the fit then misses the small model by 20-40%.
    """
    a = np.array([[r / (bandwidth_gbs * 1e9), layers] for r, layers, _ in points])
    b = np.array([1.0 / tok_s for _, _, tok_s in points])
    (inv_eff, cost), *_ = np.linalg.lstsq(a / b[:, None], np.ones_like(b), rcond=None)
    return float(min(1.0, 1.0 / inv_eff)), float(max(cost, 0.0) * 1e6)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundles", nargs="+", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--fit", action="store_true", help="fit efficiency and the per-layer cost to these measurements")
    ap.add_argument("--write", action="store_true", help="with --fit: store the fit in the host profile")
    args = ap.parse_args(argv)

    host = get_profile(HOST)  # probes once if this machine was never measured
    context = args.prompt_tokens + args.new_tokens - 1  # what bench sizes its cache to
    runs: dict[Path, list[dict]] = {b: [] for b in args.bundles}
    for r in range(args.rounds):
        for b in args.bundles:
            res = measure(b, args.prompt_tokens, args.new_tokens, args.threads)
            runs[b].append(res)
            print(f"round {r + 1}: {label(b)}: {res['decode_tok_s']:.1f} tok/s, {res['peak_rss_mb']:.0f} MB",
                  file=sys.stderr, flush=True)
    measured = {b: (statistics.median(x["decode_tok_s"] for x in rs), statistics.median(x["peak_rss_mb"] for x in rs))
                for b, rs in runs.items()}
    def table(host) -> str:
        rows = []
        for b in args.bundles:
            p, _ = predict(b, host, context)
            tok_s, rss = measured[b]
            rss_pred = p.total_bytes / 2**20
            rows.append([label(b), f"{p.predicted_decode_tok_s:.1f}", f"{tok_s:.1f}",
                         f"{100 * (p.predicted_decode_tok_s / tok_s - 1):+.0f}%",
                         f"{rss_pred:.0f}", f"{rss:.0f}", f"{100 * (rss_pred / rss - 1):+.0f}%"])
        return (f"host: {host.memory_bandwidth_gbs:.1f} GB/s, efficiency {host.efficiency:.3f}, "
                f"{host.layer_cost_us:.1f} us per layer; {args.prompt_tokens}-token prompt, {args.new_tokens} new, "
                f"medians of {args.rounds} interleaved rounds\n"
                + markdown_table(["bundle", "predicted tok/s", "measured tok/s", "error", "predicted peak RSS MB",
                                  "measured peak RSS MB", "error"], rows))

    # The profile as a user has it first: its error is what `plan` tells someone who never calibrated.
    print("as profiled (" + host.sources.get("efficiency", "") + ")")
    print(table(host))
    if args.fit:
        points = []
        for b in args.bundles:
            p, layers = predict(b, host, context)
            points.append((p.read_bytes_per_token, layers, measured[b][0]))
        eff, cost = fit(points, host.memory_bandwidth_gbs)
        note = (f"fitted by benchmarks/planner_check.py on {time.strftime('%Y-%m-%d')} over "
                + ", ".join(label(b) for b in args.bundles) + f" at {host.memory_bandwidth_gbs:.1f} GB/s")
        host = replace(host, efficiency=round(eff, 3), layer_cost_us=round(cost, 1),
                       sources={**host.sources, "efficiency": note, "layer_cost_us": note})
        print(f"fit: efficiency {eff:.3f}, {cost:.1f} us per layer per token", file=sys.stderr)
        if args.write:
            print(f"stored in {write_host_profile(host)}", file=sys.stderr)
        print("\nfitted")
        print(table(host))
    return 0


if __name__ == "__main__":
    sys.exit(main())
