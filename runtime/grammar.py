"""Structured output: token masks that keep generation inside a JSON schema.

The decode loop accepts any object with the TokenConstraint shape; JsonConstraint is the one we ship,
backed by llguidance (installed by the `serve` extra). llguidance was chosen over outlines-core and
xgrammar by benchmarks/grammar_mask.py over the 128k Llama 3 vocabulary: schemas compile in ~1 ms
(outlines-core builds a regex automaton over the vocabulary: 130-800 ms a schema), a mask costs
~10-30 us median (~100 us once applied to the logits row), and it depends on nothing (xgrammar, about as fast per token, requires torch,
transformers and triton: not something an edge box installs). The import is lazy, so a runtime
without the extra still runs everything except structured output.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

import numpy as np

from edgellama.errors import EdgeLlamaError

_EXTRA_HINT = "structured output needs llguidance: pip install 'edgellama[serve]'"


class TokenConstraint(Protocol):
    """What the decode loop asks of a constraint, once per generated token."""

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """The logits with every token the constraint forbids set to -inf (a copy or in place)."""

    def advance(self, token: int) -> None:
        """The sampled token, which the constraint must now account for."""

    def is_done(self) -> bool:
        """True once nothing more may be generated (the structure is complete)."""


def _llguidance():
    try:
        import llguidance
        import llguidance.numpy  # noqa: F401  (the bitmask helpers)
    except ImportError:
        raise EdgeLlamaError(_EXTRA_HINT) from None
    return llguidance


def load_schema(value: Any, what: str = "the JSON schema") -> dict:
    """A schema given as a dict, a JSON string, or a path to a .json file -> dict (EdgeLlamaError if not)."""
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        try:
            schema = json.loads(value)
        except ValueError as exc:
            raise EdgeLlamaError(f"{what} is not valid JSON: {exc}") from None
        if isinstance(schema, dict):
            return schema
    raise EdgeLlamaError(f"{what} must be a JSON object")


def schema_file(path: str) -> dict:
    try:
        text = open(path, encoding="utf-8").read()
    except OSError as exc:
        raise EdgeLlamaError(f"cannot read the JSON schema {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise EdgeLlamaError(f"the JSON schema {path} is not UTF-8 text") from None
    return load_schema(text, f"the JSON schema {path}")


# Any JSON object: what response_format {"type": "json_object"} asks for.
ANY_JSON_OBJECT: dict = {"type": "object"}


class GrammarCompiler:
    """One per model: llguidance's view of the vocabulary (built once, ~0.5 s for 128k tokens)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, stop_ids: list[int]) -> None:
        ll = _llguidance()
        self._ll = ll
        self.vocab_size = vocab_size
        # The stop ids are the grammar's "end of sequence": allowed exactly when the JSON is complete.
        self._tok = ll.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=sorted(stop_ids))

    @classmethod
    def for_model(cls, model) -> GrammarCompiler:
        """The compiler of a loaded runtime Model, cached on it."""
        cached = getattr(model, "_grammar_compiler", None)
        if cached is None:
            vocab = int(model.manifest.architecture["vocab_size"])
            cached = cls(model.tokenizer.backend_json(), vocab, sorted(model.stop_ids))
            model._grammar_compiler = cached
        return cached

    def json_schema(self, schema: dict) -> JsonConstraint:
        """A fresh constraint for one generation (EdgeLlamaError if the schema cannot be compiled)."""
        ll = self._ll
        try:
            # Compact separators: the model cannot pad the answer with whitespace runs.
            grammar = ll.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        except (ValueError, TypeError) as exc:
            raise EdgeLlamaError(f"unusable JSON schema: {exc}") from None
        matcher = ll.LLMatcher(self._tok, grammar, log_level=0)
        if matcher.is_error():
            raise EdgeLlamaError(f"unusable JSON schema: {' '.join(matcher.get_error().split())[:300]}")
        return JsonConstraint(matcher, self.vocab_size)


class JsonConstraint:
    """An llguidance matcher behind the TokenConstraint interface."""

    def __init__(self, matcher, vocab_size: int) -> None:
        import llguidance.numpy as lnp

        self._m = matcher
        self._fill = lnp.fill_next_token_bitmask
        self._bits = lnp.allocate_token_bitmask(1, vocab_size)
        self._vocab = vocab_size

    def mask(self, logits: np.ndarray) -> np.ndarray:
        self._fill(self._m, self._bits, 0)
        if self._m.is_error():
            raise EdgeLlamaError(f"structured output failed: {self._m.get_error()}")
        # Bit i of the little-endian bitmask is token i; unpackbits is ~10x cheaper than llguidance's
        # numpy reference kernel (repeat + tile over the whole vocabulary).
        allowed = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[: logits.shape[-1]].view(bool)
        return np.where(allowed, logits, np.float32(-np.inf)).astype(np.float32, copy=False)

    def advance(self, token: int) -> None:
        if not self._m.consume_token(int(token)):
            raise EdgeLlamaError(f"structured output failed: {self._m.get_error()}")

    def is_done(self) -> bool:
        return self._m.is_stopped()
