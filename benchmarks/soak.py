"""Soak: 10,000 tokens over 50 chat turns with RSS sampled, then four threads on one bundle.

    python benchmarks/soak.py [--bundle DIR] [--turns 50] [--tokens-per-turn 200] [--max-context 2048]

1. Chat: one ChatSession with truncate=True (the oldest turns are dropped as the context fills, so
   the cache is reset and re-prefilled again and again) answers `turns` user messages. Each answer
   is sampled (temperature 0.7, top-p 0.9, seeded per turn) for tokens-per-turn tokens, stop ids
   switched off (an answer cut short by the end of the context is made up by extra turns). RSS
   (/proc/self/statm) is read after every turn; growth counts from the end of the warm-up turns,
   when allocators and onnxruntime's arenas have settled. Bar: < 20 MB.
2. Threads: four threads each load() the bundle (one intra-op thread each) and greedily answer
   their own prompt, twice; every answer must equal the one that prompt gets alone.

Without --bundle, SmolLM2-135M-Instruct is exported once, int4 fast graph, into
EDGELLAMA_CACHE/bench/smollm2-int4 by an `edgellama export` process. Exits 1 if a bar is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

GROWTH_BAR_MB = 20.0
WARMUP_TURNS = 5
QUESTIONS = [
    "Tell me a long story about a lighthouse keeper.",
    "Explain how a steam engine works, step by step.",
    "Write a detailed recipe for bread.",
    "Describe the water cycle to a child.",
    "What should I pack for a week of hiking?",
]
THREAD_PROMPTS = ["What is the capital of France?", "Name three primary colors.", "Count from one to ten.",
                  "Write a haiku about rain."]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def default_bundle() -> Path:
    from edgellama.assets import cache_dir
    from edgellama.runtime import bundle as B

    path = cache_dir() / "bench" / "smollm2-int4"
    if not (path / B.MANIFEST).exists():
        subprocess.run([sys.executable, "-m", "edgellama", "export", "smollm2-135m-instruct", "--quant", "int4",
                        "-o", str(path), "--force"], check=True)
    return path


def chat_soak(bundle: Path, turns: int, per_turn: int, max_context: int, threads: int | None) -> dict:
    from edgellama.runtime.generate import ChatSession, load
    from edgellama.runtime.sampling import SamplingParams

    model = replace(load(bundle, threads=threads, max_context=max_context), stop_ids=frozenset())
    session = ChatSession(model, system="You are a helpful assistant.", truncate=True)
    rss, tokens, resets = [rss_mb()], 0, 0
    t0 = time.perf_counter()
    turn = 0
    # An answer that meets the end of the context stops short; extra turns then make up the tokens.
    while turn < turns or tokens < turns * per_turn:
        params = SamplingParams(temperature=0.7, top_p=0.9, seed=turn, max_new_tokens=per_turn)
        before = len(session.messages)
        n = sum(1 for _ in session.send(QUESTIONS[turn % len(QUESTIONS)], params))
        resets += len(session.messages) < before + 2  # older turns were dropped to make room
        tokens += n
        rss.append(rss_mb())
        turn += 1
        print(f"turn {turn}: {n} tokens ({tokens} in all, {tokens / (time.perf_counter() - t0):.1f} tok/s), "
              f"RSS {rss[-1]:.1f} MB", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - t0
    settled = rss[WARMUP_TURNS]
    return {"turns": turn, "tokens": tokens, "seconds": round(seconds, 1), "tok_s": round(tokens / seconds, 1),
            "context": model.context, "turns_with_truncation": resets, "rss_start_mb": round(rss[0], 1),
            "rss_after_warmup_mb": round(settled, 1), "rss_end_mb": round(rss[-1], 1),
            "rss_max_mb": round(max(rss), 1), "growth_after_warmup_mb": round(max(rss[WARMUP_TURNS:]) - settled, 1)}


def thread_check(bundle: Path, new_tokens: int = 64) -> dict:
    from edgellama.runtime.generate import generate, load

    def answer(model, prompt: str) -> str:
        return generate(model, prompt, chat=True, max_new_tokens=new_tokens)

    models = [load(bundle, threads=1, max_context=512) for _ in THREAD_PROMPTS]
    alone = [answer(models[0], p) for p in THREAD_PROMPTS]
    got: dict[int, list[str]] = {i: [] for i in range(len(models))}
    barrier = threading.Barrier(len(models))

    def worker(i: int) -> None:
        barrier.wait()
        for _ in range(2):
            got[i].append(answer(models[i], THREAD_PROMPTS[i]))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(models))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    same = all(got[i] == [alone[i]] * 2 for i in range(len(models)))
    return {"threads": len(models), "same_as_alone": same, "seconds": round(time.perf_counter() - t0, 1),
            "answers": alone}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--turns", type=int, default=50)
    ap.add_argument("--tokens-per-turn", type=int, default=200)
    ap.add_argument("--max-context", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads of the chat model")
    args = ap.parse_args()
    bundle = args.bundle or default_bundle()

    chat = chat_soak(bundle, args.turns, args.tokens_per_turn, args.max_context, args.threads)
    print(f"chat: {chat['tokens']} tokens over {chat['turns']} turns in {chat['seconds']} s ({chat['tok_s']} tok/s), "
          f"context {chat['context']}, {chat['turns_with_truncation']} turns truncated the history")
    print(f"  RSS MB: start {chat['rss_start_mb']}, after {WARMUP_TURNS} warm-up turns {chat['rss_after_warmup_mb']}, "
          f"end {chat['rss_end_mb']}, max {chat['rss_max_mb']} -> growth {chat['growth_after_warmup_mb']:+} MB "
          f"(bar < {GROWTH_BAR_MB})")
    threads = thread_check(bundle)
    print(f"threads: {threads['threads']} models from one bundle, two greedy answers each in {threads['seconds']} s: "
          f"{'same as alone' if threads['same_as_alone'] else 'DIFFERENT from alone'}")
    print(json.dumps({"bundle": str(bundle), "chat": chat, "threads": threads}))
    ok = chat["growth_after_warmup_mb"] < GROWTH_BAR_MB and chat["tokens"] >= args.turns * args.tokens_per_turn \
        and threads["same_as_alone"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
