"""What the HTTP server costs: TTFT and decode tok/s through `edgellama serve` vs `edgellama bench`,
and the TTFT of a conversation's second turn with and without the server's KV prefix reuse.

    .venv/bin/python benchmarks/serve_overhead.py BUNDLE --rounds 3

Rounds interleave: bench (a fresh `edgellama bench --repeat 1` process), then the same prompt length
and token count streamed through /v1/completions, timing the SSE chunks as a client sees them. The
overhead server runs with --no-prefix-reuse so a repeated prompt is prefilled in full, as bench does.
TTFT through the server is request sent -> first text chunk received (tokenizing, queueing, HTTP
included); decode tok/s is (tokens - 1) / (last chunk - first chunk). bench drives argmax with no stop
ids; the server stops at a stop id, so the tokens it actually generated (usage) are what is counted.

Second turn: a ~400-token first message and its answer, then a follow-up question, streamed; TTFT of
the follow-up on a server that reuses the cached prefix vs one started with --no-prefix-reuse.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

MODEL = "bench"
# One client for the whole run, as an app keeps one: a fresh httpx client per request spends ~40 ms
# building its TLS context before it sends anything, which is not the server's time.
HTTP = httpx.Client(timeout=600)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server(bundle: str, context: int, threads: int | None, *extra: str):
    port = _free_port()
    cmd = [sys.executable, "-m", "edgellama", "serve", bundle, "--port", str(port), "--model-name", MODEL,
           "--max-context", str(context), *extra] + (["--threads", str(threads)] if threads else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if HTTP.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            raise SystemExit("the server did not start")
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def stream_timed(base: str, path: str, body: dict) -> dict:
    """Send a streamed request; times of the first and last text chunk, and the usage."""
    body = {**body, "model": MODEL, "stream": True, "stream_options": {"include_usage": True}, "temperature": 0}
    t0 = time.perf_counter()
    first = last = None
    usage = None
    with HTTP.stream("POST", f"{base}{path}", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk.get("choices", []):
                text = c.get("text") or (c.get("delta") or {}).get("content")
                if text:
                    now = time.perf_counter()
                    first = first if first is not None else now
                    last = now
    n = usage["completion_tokens"]
    return {"ttft_s": first - t0, "decode_tok_s": (n - 1) / (last - first) if n > 1 and last > first else 0.0,
            "tokens": n, "prompt_tokens": usage["prompt_tokens"],
            "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]}


def bench_once(bundle: str, prompt_tokens: int, new_tokens: int, threads: int | None, context: int) -> dict:
    cmd = [sys.executable, "-m", "edgellama", "bench", bundle, "--prompt-tokens", str(prompt_tokens),
           "--new-tokens", str(new_tokens), "--repeat", "1", "--json", "--max-context", str(context)] + (["--threads", str(threads)] if threads else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def prompt_text(bundle: str, n: int) -> str:
    """bench's own synthetic prompt, as text (the server re-tokenizes it; usage says how many tokens)."""
    from edgellama.runtime.bench import synthetic_prompt
    from edgellama.runtime.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(bundle)
    return tok.decode(synthetic_prompt(tok.encode, n, None))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    prompt = prompt_text(args.bundle, args.prompt_tokens)
    rows: dict[str, list[dict]] = {"bench": [], "server": [], "turn2_reuse": [], "turn2_full": []}
    with server(args.bundle, args.context, args.threads, "--no-prefix-reuse") as full, \
            server(args.bundle, args.context, args.threads) as reuse:
        stream_timed(full, "/v1/completions", {"prompt": prompt, "max_tokens": 8})  # warm-up, as bench warms up
        stream_timed(reuse, "/v1/completions", {"prompt": prompt, "max_tokens": 8})
        for r in range(args.rounds):
            b = bench_once(args.bundle, args.prompt_tokens, args.new_tokens, args.threads, args.context)
            rows["bench"].append({"ttft_s": b["ttft_s"], "decode_tok_s": b["decode_tok_s"], "tokens": args.new_tokens})
            rows["server"].append(stream_timed(full, "/v1/completions", {"prompt": prompt, "max_tokens": args.new_tokens}))
            # A new conversation each round, so turn 1 itself never hits the cache.
            first = [{"role": "user", "content": f"Round {r}. Read this and remember it. " + prompt * 3}]
            for name, base in (("turn2_reuse", reuse), ("turn2_full", full)):
                body = {"messages": first, "max_tokens": 24, "temperature": 0, "model": MODEL}
                answer = HTTP.post(f"{base}/v1/chat/completions", json=body).json()
                turn2 = first + [answer["choices"][0]["message"], {"role": "user", "content": "Summarize it in one line."}]
                rows[name].append(stream_timed(base, "/v1/chat/completions", {"messages": turn2, "max_tokens": 8}))
            print(f"round {r + 1}: bench ttft {b['ttft_s'] * 1e3:.0f} ms decode {b['decode_tok_s']:.1f} tok/s | "
                  f"server ttft {rows['server'][-1]['ttft_s'] * 1e3:.0f} ms decode {rows['server'][-1]['decode_tok_s']:.1f} tok/s "
                  f"({rows['server'][-1]['tokens']} tok) | turn 2 ttft reuse {rows['turn2_reuse'][-1]['ttft_s'] * 1e3:.0f} ms "
                  f"(cached {rows['turn2_reuse'][-1]['cached_tokens']}/{rows['turn2_reuse'][-1]['prompt_tokens']}) "
                  f"vs full {rows['turn2_full'][-1]['ttft_s'] * 1e3:.0f} ms", flush=True)

    med = {k: {m: statistics.median(x[m] for x in v) for m in ("ttft_s", "decode_tok_s")} for k, v in rows.items()}
    print(f"medians over {args.rounds} rounds ({args.prompt_tokens} prompt tokens, {args.new_tokens} new):")
    print(f"  bench : TTFT {med['bench']['ttft_s'] * 1e3:.0f} ms, decode {med['bench']['decode_tok_s']:.1f} tok/s")
    print(f"  server: TTFT {med['server']['ttft_s'] * 1e3:.0f} ms, decode {med['server']['decode_tok_s']:.1f} tok/s")
    # The machine is shared, so each round's pair (run back to back) is compared, then the median taken.
    ratios = [s["decode_tok_s"] / b["decode_tok_s"] for s, b in zip(rows["server"], rows["bench"])]
    extra = [(s["ttft_s"] - b["ttft_s"]) * 1e3 for s, b in zip(rows["server"], rows["bench"])]
    print(f"  server/bench decode: median of per-round ratios {statistics.median(ratios):.3f} "
          f"({', '.join(f'{r:.3f}' for r in ratios)}); TTFT server - bench, median {statistics.median(extra):+.0f} ms")
    print(f"  second-turn TTFT: prefix reuse {med['turn2_reuse']['ttft_s'] * 1e3:.0f} ms vs full prefill "
          f"{med['turn2_full']['ttft_s'] * 1e3:.0f} ms (x{med['turn2_full']['ttft_s'] / med['turn2_reuse']['ttft_s']:.1f})")
    if args.json:
        print(json.dumps({"rounds": rows, "medians": med}, indent=2))


if __name__ == "__main__":
    main()
