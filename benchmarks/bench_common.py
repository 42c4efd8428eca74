"""The greedy timing loop every non-edgellama runner shares, and the runners' one-line JSON protocol.

Stdlib + numpy only: the llama.cpp runner imports this from its own venv. The loop matches
edgellama.runtime.bench.measure: TTFT is prefill plus picking the first token, decode speed
counts the new_tokens - 1 forward steps after it, stop ids are ignored.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Callable, Sequence


def greedy_run(prefill: Callable[[Sequence[int]], int], step: Callable[[int], int], prompt: Sequence[int],
               new_tokens: int) -> dict:
    """prefill(prompt) -> first token id; step(token) -> next token id (the cache was reset before)."""
    t0 = time.perf_counter()
    token = prefill(prompt)
    ttft = time.perf_counter() - t0
    ids = [token]
    t1 = time.perf_counter()
    for _ in range(new_tokens - 1):
        token = step(token)
        ids.append(token)
    decode = time.perf_counter() - t1
    return {"ttft_s": ttft, "prefill_tok_s": len(prompt) / ttft, "decode_tok_s": (new_tokens - 1) / decode,
            "token_ids": ids}


def emit(result: dict) -> None:
    """The runner's answer: one JSON line, last on stdout."""
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


def read_prompt(path: str) -> list[int]:
    with open(path) as f:
        ids = json.load(f)
    if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
        raise SystemExit(f"{path}: expected a JSON list of token ids")
    return ids
