"""Per-token mask cost of grammar libraries over the 128,256-token Llama 3 vocabulary.

For each candidate (llguidance, outlines-core, xgrammar where installed) and each JSON schema:
compile the schema once, then walk a valid answer token by token, timing "compute the allowed-token
mask for this step" + "advance by the chosen token". Reports compile time and the median / p90 /
max per-token cost in microseconds. Run interleaved rounds (A B C A B C ...) and report medians.
The "edgellama" row is the runtime's own path (llguidance's mask applied to the logits row).

    .venv/bin/python benchmarks/grammar_mask.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

SCHEMAS = {
    "person": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                                "email": {"type": "string"}},
               "required": ["name", "age", "email"], "additionalProperties": False},
    "invoice": {"type": "object", "properties": {
        "number": {"type": "string"}, "total": {"type": "number"},
        "currency": {"type": "string", "enum": ["EUR", "USD", "GBP"]},
        "lines": {"type": "array", "items": {"type": "object", "properties": {
            "sku": {"type": "string"}, "qty": {"type": "integer"}, "price": {"type": "number"}},
            "required": ["sku", "qty", "price"], "additionalProperties": False}}},
        "required": ["number", "total", "currency", "lines"], "additionalProperties": False},
    "tool_call": {"type": "object", "properties": {"name": {"const": "get_weather"}, "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"], "additionalProperties": False}},
        "required": ["name", "parameters"], "additionalProperties": False},
}
ANSWERS = {
    "person": {"name": "Ada Lovelace", "age": 36, "email": "ada@example.org"},
    "invoice": {"number": "INV-2026-0042", "total": 1234.5, "currency": "EUR",
                "lines": [{"sku": "A-1", "qty": 3, "price": 100.5}, {"sku": "B-22", "qty": 1, "price": 933.0}]},
    "tool_call": {"name": "get_weather", "parameters": {"city": "Paris", "unit": "c"}},
}


def tokenizer_json() -> tuple[str, Path]:
    from edgellama.assets import LLAMA32_TOKENIZER, fetch

    folder = Path(fetch(LLAMA32_TOKENIZER))
    return (folder / "tokenizer.json").read_text(encoding="utf-8"), folder


def answer_ids(tok, name: str) -> list[int]:
    # Compact JSON, as a constrained model writes it (whitespace is restricted by all three).
    return tok.encode(json.dumps(ANSWERS[name], separators=(",", ":")), add_special_tokens=False).ids


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok_json: str, vocab: int, eos: int) -> None:
        import llguidance
        import llguidance.numpy as lnp

        self.ll, self.lnp = llguidance, lnp
        self.tok = llguidance.LLTokenizer(tok_json, n_vocab=vocab, eos_token=eos)
        self.mask = lnp.allocate_token_bitmask(1, vocab)

    def compile(self, schema: dict):
        grammar = self.ll.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False})
        m = self.ll.LLMatcher(self.tok, grammar, log_level=0)
        assert not m.is_error(), m.get_error()
        return m

    def step(self, m, token: int) -> None:
        self.lnp.fill_next_token_bitmask(m, self.mask, 0)
        assert (self.mask[0, token >> 5] >> (token & 31)) & 1, "token not allowed"
        assert m.consume_token(token), m.get_error()


class RuntimePath:
    """What the decode loop pays per token: edgellama.runtime.grammar's JsonConstraint (llguidance's
    mask, applied to a 128k float32 logits row, then the token consumed)."""

    name = "edgellama"

    def __init__(self, tok_json: str, vocab: int, eos: int) -> None:
        from edgellama.runtime.grammar import GrammarCompiler

        self.compiler = GrammarCompiler(tok_json, vocab, [eos])
        self.logits = np.random.default_rng(0).standard_normal(vocab).astype(np.float32)

    def compile(self, schema: dict):
        return self.compiler.json_schema(schema)

    def step(self, c, token: int) -> None:
        masked = c.mask(self.logits)
        assert np.isfinite(masked[token]), "token not allowed"
        c.advance(token)


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tok_json: str, vocab: int, eos: int) -> None:
        import outlines_core

        self.oc = outlines_core
        # outlines-core builds its Vocabulary from the HF hub name or a token->ids map; the map
        # is built from the same tokenizer.json so no hub is reached.
        import tokenizers

        t = tokenizers.Tokenizer.from_str(tok_json)
        self.vocabulary = _outlines_vocabulary(outlines_core, t, eos)
        self.mask = np.zeros((vocab + 31) // 32, dtype=np.int32)

    def compile(self, schema: dict):
        from outlines_core.json_schema import build_regex_from_schema

        regex = build_regex_from_schema(json.dumps(schema))
        index = self.oc.Index(regex, self.vocabulary)
        return self.oc.Guide(index)

    def step(self, guide, token: int) -> None:
        guide.write_mask_into(self.mask.ctypes.data, self.mask.size, self.mask.itemsize)
        assert (self.mask[token >> 5] >> (token & 31)) & 1, "token not allowed"
        guide.advance(token, return_tokens=False)


def _outlines_vocabulary(oc, tok, eos: int):
    """outlines-core's Vocabulary keyed by each token's decoded bytes (byte-level BPE: undo the
    GPT-2 byte-to-unicode map, as outlines does for HF tokenizers)."""
    byte_decoder = {c: b for b, c in _bytes_to_unicode().items()}
    vocab: dict[bytes, list[int]] = {}
    for token, tid in tok.get_vocab(with_added_tokens=False).items():
        if tid == eos:
            continue
        try:
            key = bytes(byte_decoder[c] for c in token)
        except KeyError:
            continue
        vocab.setdefault(key, []).append(tid)
    return oc.Vocabulary(eos, vocab)


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class XGrammar:
    name = "xgrammar"

    def __init__(self, tok_json: str, vocab: int, eos: int, folder: Path) -> None:
        import transformers
        import xgrammar as xgr

        self.xgr = xgr
        hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
        info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=[eos])
        self.compiler = xgr.GrammarCompiler(info, max_threads=1)
        self.mask = xgr.allocate_token_bitmask(1, vocab)

    def compile(self, schema: dict):
        compiled = self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":"))
        return self.xgr.GrammarMatcher(compiled)

    def step(self, m, token: int) -> None:
        m.fill_next_token_bitmask(self.mask, 0)
        assert (int(self.mask[0, token >> 5]) >> (token & 31)) & 1, "token not allowed"
        assert m.accept_token(token)


def measure(lib, ids: list[int], schema: dict) -> tuple[float, list[float]]:
    t0 = time.perf_counter()
    state = lib.compile(schema)
    compile_s = time.perf_counter() - t0
    steps = []
    for token in ids:
        t = time.perf_counter()
        lib.step(state, token)
        steps.append(time.perf_counter() - t)
    return compile_s, steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import tokenizers

    tok_json, folder = tokenizer_json()
    tok = tokenizers.Tokenizer.from_str(tok_json)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    eos = tok.token_to_id("<|eot_id|>")
    libs = []
    for make in (lambda: LLGuidance(tok_json, vocab, eos), lambda: RuntimePath(tok_json, vocab, eos),
                 lambda: OutlinesCore(tok_json, vocab, eos),
                 lambda: XGrammar(tok_json, vocab, eos, folder)):
        t0 = time.perf_counter()
        try:
            lib = make()
        except ImportError as exc:
            print(f"skipped: {exc}")
            continue
        print(f"{lib.name}: tokenizer setup {time.perf_counter() - t0:.2f} s")
        libs.append(lib)

    results: dict[str, dict[str, dict[str, list[float]]]] = {}
    for _ in range(args.rounds):
        for schema_name, schema in SCHEMAS.items():
            ids = answer_ids(tok, schema_name)
            for lib in libs:  # interleaved: each round runs every library on every schema
                c, steps = measure(lib, ids, schema)
                r = results.setdefault(lib.name, {}).setdefault(schema_name, {"compile": [], "steps": []})
                r["compile"].append(c)
                r["steps"].extend(steps)

    print(f"vocabulary {vocab} tokens, {args.rounds} rounds; per-token = mask + advance, in microseconds")
    print(f"{'library':<14}{'schema':<11}{'compile ms':>11}{'median us':>11}{'p90 us':>9}{'max us':>9}")
    summary = {}
    for lib_name, per_schema in results.items():
        for schema_name, r in per_schema.items():
            s = sorted(r["steps"])
            row = {"compile_ms": statistics.median(r["compile"]) * 1e3, "median_us": statistics.median(s) * 1e6,
                   "p90_us": s[int(0.9 * (len(s) - 1))] * 1e6, "max_us": s[-1] * 1e6, "tokens": len(s) // args.rounds}
            summary[f"{lib_name}/{schema_name}"] = row
            print(f"{lib_name:<14}{schema_name:<11}{row['compile_ms']:>11.1f}{row['median_us']:>11.1f}"
                  f"{row['p90_us']:>9.1f}{row['max_us']:>9.1f}")
    if args.json:
        print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
