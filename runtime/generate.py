"""load / generate / stream_generate / ChatSession: the runtime's public API.

    model = load("bundle_dir")
    for event in stream_generate(model, "Tell me a joke", chat=True):
        print(event.text, end="")

For one generation, `model, ids = load_for_prompt(dir, prompt, max_new_tokens=n)` then
`stream_ids(model, ids, params)` holds a KV cache of prompt + n positions instead of 4096.

Only numpy, onnxruntime, tokenizers and jinja2 are imported here: this is what ships to devices.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from contextlib import closing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from edgellama.errors import EdgeLlamaError
from edgellama.runtime import bundle as B
from edgellama.runtime.sampling import Sampler, SamplingParams, StopStringMatcher
from edgellama.runtime.speculative import SpeculateArg, Speculation, Speculator, as_speculation
from edgellama.runtime.tokenizer import IncrementalDecoder, Tokenizer

if TYPE_CHECKING:
    from edgellama.runtime.grammar import TokenConstraint


def peak_rss_mb() -> float:
    """Peak resident set size of this process, in MB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


@dataclass
class Stats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    ttft_s: float = 0.0
    prefill_tok_s: float = 0.0
    decode_tok_s: float = 0.0
    peak_rss_mb: float = 0.0
    # Speculative decoding: tokens drafted, and how many of them the model kept (0 when off).
    draft_tokens: int = 0
    accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0


@dataclass
class GenerationEvent:
    """One generated token: its text delta (possibly empty while a character is incomplete) and running stats."""

    text: str
    token_id: int
    stats: Stats
    finish_reason: str | None = None  # "stop" (stop id or string) | "length" | None while generating


@dataclass
class Model:
    """A loaded bundle: its manifest, tokenizer and engine (ONNX or Core ML)."""

    path: Path
    manifest: B.Manifest
    tokenizer: Tokenizer
    engine: object
    stop_ids: frozenset[int] = field(default_factory=frozenset)
    adapter: str | None = None  # the name of the LoRA adapter applied, if any

    @property
    def context(self) -> int:
        return self.engine.context

    def set_adapter(self, adapter: str | os.PathLike | None) -> None:
        """Swap the LoRA adapter of a LoRA-slots bundle (None: the base model) without reloading it.

        A different adapter is a different model, so the engine's cache is cleared."""
        from edgellama.runtime.adapters import load_adapter

        bind = getattr(self.engine, "set_adapter_inputs", None)
        if bind is None and adapter is not None:
            raise EdgeLlamaError("adapters need an ONNX bundle exported with --lora-slots")
        loaded, feeds = load_adapter(adapter, self.manifest) if adapter is not None else (None, None)
        if bind is not None:
            bind(feeds)
        self.engine.reset()
        self.adapter = loaded.name if loaded else None

    def encode_prompt(self, prompt: str, *, chat: bool = False, system: str | None = None) -> list[int]:
        if not isinstance(prompt, str) or not prompt.strip():
            raise EdgeLlamaError("the prompt is empty")
        if chat:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            return self.encode_chat(messages)
        ids = self.tokenizer.encode(prompt)
        t = self.manifest.tokens
        if t.add_bos and t.bos_id is not None:
            ids = [t.bos_id] + ids
        return ids

    @property
    def chat_template(self) -> str | None:
        return self.manifest.chat_template or self.tokenizer.chat_template

    def encode_chat(self, messages: Sequence[dict], *, add_generation_prompt: bool = True,
                    **template_vars: Any) -> list[int]:
        """template_vars reach the template as variables (e.g. `tools` for a template that renders them)."""
        template = self.chat_template
        if not template:
            raise EdgeLlamaError("this bundle has no chat template: run without --chat")
        return self.tokenizer.encode_chat(messages, template, add_generation_prompt=add_generation_prompt,
                                          **template_vars)


def load(bundle_dir: str | os.PathLike, *, provider: str | None = None, threads: int | None = None,
         max_context: int | None = None, verify: bool = True, adapter: str | os.PathLike | None = None) -> Model:
    """Open a bundle: checksums first (nothing unverified is loaded), then tokenizer and session.

    adapter: a file from `edgellama adapter`, applied to a bundle exported with --lora-slots."""
    model = _open(bundle_dir, verify, threads)
    _start(model, provider, threads, max_context, adapter)
    return model


def load_for_prompt(bundle_dir: str | os.PathLike, prompt: str, *, chat: bool = False, system: str | None = None,
                    max_new_tokens: int = 256, max_context: int | None = None, provider: str | None = None,
                    threads: int | None = None, verify: bool = True,
                    adapter: str | os.PathLike | None = None) -> tuple[Model, list[int]]:
    """load() for one generation, with the prompt's ids: the KV cache holds prompt + max_new_tokens.

    The engine allocates (and touches) its whole cache at load, so a one-shot run of a short prompt
    would otherwise hold the default 4096 positions: 180 MB on SmolLM2, ~1 GB on a 3B model. Never
    more than load() would take; max_context, when given, wins."""
    model = _open(bundle_dir, verify, threads)
    ids = model.encode_prompt(prompt, chat=chat, system=system)
    if max_context is None and model.manifest.graph.kind == "onnx":
        from edgellama.runtime.engine import DEFAULT_CONTEXT

        # The last token sampled is never fed back: prompt + max_new_tokens - 1 positions suffice.
        need = len(ids) + max(max_new_tokens - 1, 0)
        max_context = min(need, DEFAULT_CONTEXT, model.manifest.context_length)
    _start(model, provider, threads, max_context, adapter)
    return model, ids


def _open(bundle_dir: str | os.PathLike, verify: bool, threads: int | None) -> Model:
    """Manifest, tokenizer and stop ids; the engine comes with _start."""
    path = Path(bundle_dir)
    manifest = B.read_manifest(path, verify=verify)
    if threads is not None and threads < 1:
        raise EdgeLlamaError(f"threads must be >= 1, got {threads}")
    tokenizer = Tokenizer.from_dir(path)
    stops = set(manifest.tokens.eos_ids)
    for name in B.LLAMA3_STOP_TOKENS:  # the manifest lists them; the tokenizer may know more aliases
        tid = tokenizer.token_to_id(name)
        if tid is not None and tid < int(manifest.architecture["vocab_size"]):
            stops.add(tid)
    return Model(path, manifest, tokenizer, None, frozenset(stops))


def _start(model: Model, provider: str | None, threads: int | None, max_context: int | None,
           adapter: str | os.PathLike | None) -> None:
    path, manifest = model.path, model.manifest
    if manifest.graph.kind == "onnx":
        from edgellama.runtime.engine import OnnxEngine

        model.engine = OnnxEngine(path, manifest, provider=provider, threads=threads, max_context=max_context)
    elif manifest.graph.kind == "coreml":
        from edgellama.runtime.coreml_engine import CoreMLEngine

        model.engine = CoreMLEngine(path, manifest, max_context=max_context)
    else:
        raise EdgeLlamaError(f"unknown graph kind {manifest.graph.kind!r} in the manifest")
    if adapter is not None:
        model.set_adapter(adapter)


def _generate_ids(model: Model, new_ids: list[int], params: SamplingParams, history: list[int],
                  speculation: Speculation | None = None,
                  constraint: TokenConstraint | None = None) -> Iterator[tuple[int, Stats, str | None]]:
    # Speculation runs every step with the padding row (engine.exact_rows), so a verified row is the
    # step's very number; plain decode skips it unless the caller turned it on for a bitwise comparison.
    engine = model.engine
    exact = getattr(engine, "exact_rows", False)  # Core ML's engine has no padding row
    if speculation is not None:
        engine.exact_rows = True
    try:
        yield from _decode_ids(model, new_ids, params, history, speculation, constraint)
    finally:
        if speculation is not None:
            engine.exact_rows = exact


def _decode_ids(model: Model, new_ids: list[int], params: SamplingParams, history: list[int],
                speculation: Speculation | None, constraint: TokenConstraint | None) -> Iterator[tuple[int, Stats, str | None]]:
    """The decode loop: prefill new_ids on top of the cache, then take tokens until a stop.

    constraint (e.g. a JSON schema's grammar) masks the logits before each sample, is told each
    token sampled, and ends generation when its structure is complete."""
    engine = model.engine
    if constraint is not None and speculation is not None:
        raise EdgeLlamaError("structured output (a JSON schema or forced tool call) and speculative decoding "
                             "cannot be combined: drop one of them")
    if engine.pos + len(new_ids) > engine.context:
        raise EdgeLlamaError(f"the prompt ({engine.pos + len(new_ids)} tokens) does not fit the context of "
                             f"{engine.context} tokens (raise --max-context, or shorten it)")
    sampler = Sampler(params)
    speculator = Speculator(model, speculation, params) if speculation is not None else None
    stats = Stats(prompt_tokens=len(new_ids))
    t0 = time.perf_counter()
    logits = engine.forward(new_ids)
    history.extend(new_ids)
    if speculator is not None:
        speculator.prefill(history)  # a draft model's prompt counts toward time to first token
    stats.ttft_s = time.perf_counter() - t0
    stats.prefill_tok_s = len(new_ids) / stats.ttft_s if stats.ttft_s > 0 else 0.0
    source = _plain_tokens(engine, logits, sampler, history, constraint) if speculator is None else \
        speculator.tokens(logits, sampler, history)
    t_decode = time.perf_counter()
    with closing(source):
        # pos: the cache length once this token is taken (it is fed back with the next step)
        for n, (token, pos) in enumerate(source):
            stats.generated_tokens = n + 1
            if n:
                stats.decode_tok_s = n / (time.perf_counter() - t_decode)
            if speculator is not None:
                stats.draft_tokens = speculator.stats.draft_tokens
                stats.accepted_tokens = speculator.stats.accepted_tokens
            stats.peak_rss_mb = peak_rss_mb()
            finish = None
            if token in model.stop_ids or (constraint is not None and constraint.is_done()):
                finish = "stop"
            elif n + 1 == params.max_new_tokens or pos >= engine.context:  # no room to feed it back
                finish = "length"
            # A snapshot per event: a consumer that keeps events must not see later numbers in earlier ones.
            yield token, replace(stats), finish
            if finish:
                return
            if n == 0:
                t_decode = time.perf_counter()  # decode speed counts steps after the first token


def _plain_tokens(engine, logits: np.ndarray, sampler: Sampler, history: list[int],
                  constraint: TokenConstraint | None = None) -> Iterator[tuple[int, int]]:
    """One token per run: sample, and feed it back when the next one is asked for."""
    while True:
        if constraint is not None:
            logits = constraint.mask(logits)
        token = sampler(logits, history)
        history.append(token)
        if constraint is not None:
            constraint.advance(token)
        yield token, engine.pos
        logits = engine.forward([token])


def stream_ids(model: Model, prompt_ids: list[int], params: SamplingParams | None = None, *,
               history: list[int] | None = None, speculate: SpeculateArg = None,
               draft_tokens: int | None = None, constraint: TokenConstraint | None = None) -> Iterator[GenerationEvent]:
    """Stream from already-tokenized input, appended to whatever the cache holds.

    speculate: "lookup", a draft bundle's directory, a loaded draft Model, or a Speculation
    (docs/speculative.md); draft_tokens: the most tokens drafted per run; constraint: a token mask
    (json_constraint) applied before each sample."""
    params = (params or SamplingParams()).validate()
    speculation = as_speculation(speculate, draft_tokens)
    decoder = IncrementalDecoder(model.tokenizer)
    matcher = StopStringMatcher(params.stop)
    history = history if history is not None else []
    with closing(_generate_ids(model, list(prompt_ids), params, history, speculation, constraint)) as steps:
        for token, stats, finish in steps:
            is_stop_id = token in model.stop_ids  # a finished grammar ends on a real token: keep its text
            delta = "" if is_stop_id else decoder.add(token)
            if finish and not is_stop_id:
                delta += decoder.flush()
            if params.stop:
                delta, hit = matcher.feed(delta)
                if finish and not hit:
                    delta += matcher.flush()
                if hit:
                    yield GenerationEvent(delta, token, stats, "stop")
                    return
            yield GenerationEvent(delta, token, stats, finish)


def json_constraint(model: Model, json_schema: dict | str | None) -> TokenConstraint | None:
    """The grammar constraint of a JSON schema (a dict or JSON text), None for None.

    Needs the `serve` extra (llguidance); without it, an EdgeLlamaError says so."""
    if json_schema is None:
        return None
    from edgellama.runtime.grammar import GrammarCompiler, load_schema

    return GrammarCompiler.for_model(model).json_schema(load_schema(json_schema))


def stream_generate(model: Model, prompt: str, params: SamplingParams | None = None, *, chat: bool = False,
                    system: str | None = None, speculate: SpeculateArg = None, draft_tokens: int | None = None,
                    json_schema: dict | str | None = None, **sampling) -> Iterator[GenerationEvent]:
    """Yield one GenerationEvent per token. Keyword sampling options (temperature=..., ...) build the params.

    json_schema: the answer is constrained to JSON that validates against it."""
    if sampling:
        params = replace(params or SamplingParams(), **sampling)
    constraint = json_constraint(model, json_schema)
    model.engine.reset()
    yield from stream_ids(model, model.encode_prompt(prompt, chat=chat, system=system), params,
                          speculate=speculate, draft_tokens=draft_tokens, constraint=constraint)


def generate(model: Model, prompt: str, params: SamplingParams | None = None, *, chat: bool = False,
             system: str | None = None, speculate: SpeculateArg = None, draft_tokens: int | None = None,
             json_schema: dict | str | None = None, **sampling) -> str:
    return "".join(e.text for e in stream_generate(model, prompt, params, chat=chat, system=system,
                                                   speculate=speculate, draft_tokens=draft_tokens,
                                                   json_schema=json_schema, **sampling))


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids two token sequences share: what a kept KV cache can serve of a new prompt."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ChatSession:
    """A conversation whose KV cache persists across turns: each turn prefills only its new tokens."""

    def __init__(self, model: Model, *, system: str | None = None, params: SamplingParams | None = None,
                 truncate: bool = False, speculate: SpeculateArg = None, draft_tokens: int | None = None):
        self.model = model
        self.params = params or SamplingParams()
        self.truncate = truncate
        # One Speculation for the session: a draft bundle is loaded at the first turn and kept.
        self.speculation = as_speculation(speculate, draft_tokens)
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self._cached: list[int] = []  # token ids the engine's cache holds, in order
        self._turn_marks: list[tuple[int, int]] = []  # (message count, cached tokens) before each turn
        model.engine.reset()

    def reset(self) -> None:
        self.messages = [m for m in self.messages if m["role"] == "system"][:1]
        self._cached, self._turn_marks = [], []
        self.model.engine.reset()

    def set_adapter(self, adapter: str | os.PathLike | None) -> None:
        """Switch adapters between turns. The conversation is kept but its cache was computed by the
        old adapter's model, so the next turn prefills the whole conversation again."""
        self.model.set_adapter(adapter)
        self._cached = []

    def rewind(self, turns: int = 1) -> None:
        """Drop the last `turns` user/assistant exchanges, and their cache."""
        if turns < 1 or turns > len(self._turn_marks):
            raise EdgeLlamaError(f"cannot rewind {turns} turn(s): the session has {len(self._turn_marks)}")
        n_msgs, n_tokens = self._turn_marks[-turns]
        del self._turn_marks[-turns:]
        self.messages = self.messages[:n_msgs]
        n_tokens = min(n_tokens, len(self._cached))  # a later turn may have re-prefilled from further back
        self._cached = self._cached[:n_tokens]
        self.model.engine.rewind(n_tokens)

    def _prompt_ids(self) -> list[int]:
        full = self.model.encode_chat(self.messages)
        common = common_prefix(full, self._cached)
        if common < len(self._cached):  # the template re-rendered history differently: re-prefill from there
            self.model.engine.rewind(common)
            self._cached = self._cached[:common]
        return full[common:]

    def send(self, text: str, params: SamplingParams | None = None) -> Iterator[GenerationEvent]:
        """Add a user turn and stream the assistant's answer."""
        if not isinstance(text, str) or not text.strip():
            raise EdgeLlamaError("the message is empty")
        params = (params or self.params).validate()
        n_msgs = len(self.messages)
        self.messages.append({"role": "user", "content": text})
        new = self._prompt_ids()
        # The mark is taken after _prompt_ids reconciled the cache: what it holds then is shared
        # history, so a rewind to here keeps it.
        self._turn_marks.append((n_msgs, len(self._cached)))
        engine = self.model.engine
        while engine.pos + len(new) + 1 >= engine.context:
            if not self.truncate or len(self._turn_marks) < 2:
                self.messages.pop()
                self._turn_marks.pop()
                raise EdgeLlamaError(f"the conversation no longer fits the context of {engine.context} tokens: "
                                     "reset it, or enable truncation of the oldest turns")
            self._drop_oldest_turn()
            new = self._prompt_ids()
        reply: list[str] = []
        generated: list[int] = []
        events = stream_ids(self.model, new, params, history=list(self._cached), speculate=self.speculation)
        try:
            for event in events:
                generated.append(event.token_id)
                reply.append(event.text)
                yield event
        finally:
            events.close()  # a speculative step cuts the cache back to the tokens handed out
            # However the answer ended (a stop, the consumer breaking off, Ctrl-C, an error), the
            # engine's position says how much of prompt + answer its cache holds: the last token
            # of an answer is never fed back, and an interrupted step may or may not have landed.
            self._cached = (self._cached + new + generated)[:engine.pos]
            if generated:
                self.messages.append({"role": "assistant", "content": "".join(reply)})
            else:  # interrupted before the first token: the turn did not happen
                self.messages.pop()
                self._turn_marks.pop()
            # The next turn's _prompt_ids reconciles the cache with how the template renders this one.

    def say(self, text: str, params: SamplingParams | None = None) -> str:
        return "".join(e.text for e in self.send(text, params))

    def _drop_oldest_turn(self) -> None:
        first, second = self._turn_marks[0][0], self._turn_marks[1][0]
        del self.messages[first:second]
        shift = second - first
        self._turn_marks = [(m - shift, 0) for m, _ in self._turn_marks[1:]]
        self._cached = []
        self.model.engine.reset()
