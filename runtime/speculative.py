"""Speculative decoding: draft a few tokens cheaply, verify them all in one run of the model.

Decode on a CPU or phone is bound by reading the weights once per token; a run over K+1 tokens
reads them once for all of them. A drafter proposes K tokens, the model runs [last token, d1..dK]
through its KV cache with logits_to_keep = K+1, and the accept rule keeps a prefix of the draft
plus one token of the model's own; the cache is cut back to what was kept (the share-buffer cache
only moves its position).

Drafters: `PromptLookup` (an n-gram of the text so far found earlier in it: what follows is the
guess; no second model) and `DraftModel` (a smaller bundle with the same vocabulary, its own
engine kept in step with the target's tokens).

Exactness: greedy output equals plain greedy token for token (each kept token is the model's own
argmax given everything before it). With sampling, the standard rule (accept d with probability
min(1, p(d)/q(d)), else draw from max(0, p - q) renormalized; a lookup draft has q = one-hot)
leaves the output distribution unchanged, though a seed gives a different sequence than plain
sampling does.

Only numpy and the runtime's own modules are imported here: this ships to devices.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Iterator, Union

import numpy as np

from edgellama.errors import EdgeLlamaError
from edgellama.runtime.sampling import Sampler, SamplingParams

if TYPE_CHECKING:
    from edgellama.runtime.generate import Model

LOOKUP = "lookup"
# Chosen by benchmarks/speculative.py on SmolLM2 int4 (docs/speculative.md has the sweep).
DEFAULT_DRAFT_TOKENS = 8
MAX_DRAFT_TOKENS = 64


@dataclass
class Speculation:
    """How to speculate: `draft` is "lookup", a draft bundle's directory, or a loaded draft Model.

    draft_tokens is the most tokens drafted per run; with adaptive, fewer while drafts are rejected."""

    draft: Union[str, os.PathLike, "Model"] = LOOKUP
    draft_tokens: int = DEFAULT_DRAFT_TOKENS
    adaptive: bool = True
    ngram_max: int = 3  # lookup: the longest tail n-gram searched for
    ngram_min: int = 2  # lookup: the shortest; a lone token matches too often to be worth a run

    def validate(self) -> Speculation:
        if not isinstance(self.draft_tokens, int) or not 1 <= self.draft_tokens <= MAX_DRAFT_TOKENS:
            raise EdgeLlamaError(f"draft tokens must be an integer in 1..{MAX_DRAFT_TOKENS}, got {self.draft_tokens!r}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise EdgeLlamaError(f"lookup n-gram sizes must satisfy 1 <= min <= max, got {self.ngram_min}, {self.ngram_max}")
        return self


SpeculateArg = Union[Speculation, str, os.PathLike, "Model", None]


def as_speculation(spec: SpeculateArg, draft_tokens: int | None = None) -> Speculation | None:
    """What the public functions accept (a Speculation, "lookup", a bundle path, a Model) as a Speculation."""
    if spec is None:
        if draft_tokens is not None:
            raise EdgeLlamaError("draft tokens need speculation (--speculate lookup or a draft bundle)")
        return None
    if not isinstance(spec, Speculation):
        spec = Speculation(draft=spec)
    if draft_tokens is not None:
        spec = replace(spec, draft_tokens=draft_tokens)
    return spec.validate()


def check_speculation_support(model: "Model") -> None:
    engine = model.engine
    if not getattr(engine, "multi_logits", False):
        if not hasattr(engine, "multi_logits"):
            raise EdgeLlamaError("speculative decoding needs an ONNX bundle (this engine runs one token's logits per step)")
        raise EdgeLlamaError("this bundle returns one position's logits per run (exported before logits_to_keep): "
                             "re-export it to use speculative decoding")


# -- drafters -----------------------------------------------------------------------------------

class PromptLookup:
    """Drafts by copying: the longest tail n-gram of the context found earlier in it, and what followed.

    The index maps each n-gram to where its latest earlier occurrence ended; it is extended as the
    context grows, so a lookup costs a few dict probes however long the context is."""

    def __init__(self, ngram_max: int = 3, ngram_min: int = 2) -> None:
        self.ngram_max, self.ngram_min = ngram_max, ngram_min
        self._index: dict[tuple[int, ...], int] = {}
        self._indexed = 0  # n-grams ending before this position are in the index

    def propose(self, context: list[int], k: int) -> tuple[list[int], None]:
        last = len(context) - 1
        # Index every n-gram that ends before the tail's last token, so a tail never finds itself.
        for end in range(self._indexed, last):
            for n in range(self.ngram_min, self.ngram_max + 1):
                if end - n + 1 >= 0:
                    self._index[tuple(context[end - n + 1:end + 1])] = end
        self._indexed = max(self._indexed, last)
        for n in range(self.ngram_max, self.ngram_min - 1, -1):
            if n > len(context):
                continue
            end = self._index.get(tuple(context[-n:]))
            if end is not None:
                return context[end + 1:end + 1 + k], None
        return [], None


class DraftModel:
    """A second, smaller bundle with the same vocabulary; its cache follows the target's tokens.

    Each proposal first brings the draft's cache to the context's common prefix (rewinding what the
    target rejected), feeds the rest, then runs k - 1 single steps. With sampling it draws from its
    own distribution q and returns it for the accept rule."""

    def __init__(self, draft: "Model", target: "Model", params: SamplingParams) -> None:
        check_same_vocabulary(target, draft)
        self.model = draft
        self.engine = draft.engine
        self.tokens: list[int] = []  # what the draft's cache holds, in order
        self.greedy = params.temperature == 0
        seed = None if params.seed is None else params.seed + 1  # its own stream: the target's draws stay independent
        self.sampler = Sampler(SamplingParams(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p,
                                              min_p=params.min_p, repetition_penalty=params.repetition_penalty,
                                              seed=seed))

    def _sync(self, context: list[int]) -> np.ndarray:
        held = self.tokens[:self.engine.pos]
        common = 0
        for a, b in zip(held, context):
            if a != b:
                break
            common += 1
        common = min(common, len(context) - 1)  # at least the last token is fed, for its logits
        if len(context) > self.engine.context:
            raise EdgeLlamaError(f"the draft bundle's context ({self.engine.context}) is shorter than the generation")
        self.engine.rewind(common)
        self.tokens = held[:common]
        logits = self.engine.forward(context[common:])
        self.tokens = list(context)
        return logits

    def prefill(self, context: list[int]) -> None:
        if len(context) > 1:
            self._sync(context[:-1])

    def propose(self, context: list[int], k: int) -> tuple[list[int], list[tuple[np.ndarray, np.ndarray]] | None]:
        k = min(k, self.engine.context - len(context))
        if k < 1:
            return [], None
        logits = self._sync(context)
        history = list(context)
        out: list[int] = []
        dists: list[tuple[np.ndarray, np.ndarray]] = []
        for i in range(k):
            if self.greedy:
                token = self.sampler(logits, history)
            else:
                ids, probs = self.sampler.distribution(logits, history)
                token = int(ids[_draw(probs, self.sampler.rng)])
                dists.append((ids, probs))
            out.append(token)
            history.append(token)
            if i + 1 < k:
                logits = self.engine.forward([token])
                self.tokens.append(token)
        return out, (None if self.greedy else dists)


def check_same_vocabulary(target: "Model", draft: "Model") -> None:
    """A draft's token ids must mean the target's: same vocabulary, same logits size."""
    tv, dv = int(target.manifest.architecture["vocab_size"]), int(draft.manifest.architecture["vocab_size"])
    if tv != dv or target.tokenizer.vocab_digest != draft.tokenizer.vocab_digest:
        raise EdgeLlamaError(f"the draft bundle {draft.path} has a different tokenizer than {target.path} "
                             f"(vocab sizes {dv} and {tv}): a draft must share the target's vocabulary")


def make_drafter(model: "Model", spec: Speculation, params: SamplingParams):
    if isinstance(spec.draft, str) and spec.draft == LOOKUP:
        return PromptLookup(spec.ngram_max, spec.ngram_min)
    from edgellama.runtime.generate import Model, load

    draft = spec.draft
    if not isinstance(draft, Model):
        if not os.path.isdir(draft):
            raise EdgeLlamaError(f"--speculate takes 'lookup' or a draft bundle directory; {str(draft)!r} is neither")
        from edgellama.runtime import bundle as B

        limit = B.read_manifest(draft, verify=False).context_length  # load() verifies it
        draft = load(draft, max_context=min(model.engine.context, limit), threads=getattr(model.engine, "threads", None))
        spec.draft = draft  # loaded once: a ChatSession's later turns reuse it
    if draft.manifest.graph.kind != "onnx":  # it drafts one token per run, so any ONNX bundle will do
        raise EdgeLlamaError("a draft bundle must be an ONNX bundle")
    return DraftModel(draft, model, params)


# -- verification -------------------------------------------------------------------------------

def _draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    cdf = np.cumsum(probs, dtype=np.float64)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(probs) - 1))


def _dense(ids: np.ndarray, probs: np.ndarray, vocab: int) -> np.ndarray:
    out = np.zeros(vocab, dtype=np.float64)
    out[ids] = probs
    return out


def accept(sampler: Sampler, logits: np.ndarray, draft: list[int],
           draft_dists: list[tuple[np.ndarray, np.ndarray]] | None, history: list[int]) -> list[int]:
    """The tokens kept from one verification run: a prefix of `draft`, then one token of the model's own.

    logits[i] are the model's logits after the context plus draft[:i] (len(draft) + 1 rows).
    Appends each kept token to history as it goes (the repetition penalty of the next one sees it)."""
    kept: list[int] = []
    greedy = sampler.params.temperature == 0
    vocab = logits.shape[-1]
    for i, d in enumerate(draft):
        if greedy:
            token = sampler(logits[i], history)
            kept.append(token)
            history.append(token)
            if token != d:
                return kept
            continue
        ids, probs = sampler.distribution(logits[i], history)
        p = _dense(ids, probs, vocab)
        q = _dense(*draft_dists[i], vocab) if draft_dists is not None else None
        q_d = 1.0 if q is None else q[d]
        if q_d > 0 and sampler.rng.random() * q_d < p[d]:  # accept with probability min(1, p(d) / q(d))
            kept.append(d)
            history.append(d)
            continue
        residual = np.maximum(p - q, 0.0) if q is not None else p.copy()
        if q is None:
            residual[d] = 0.0
        if residual.sum() <= 0:  # p == q: a rejection cannot happen, but never divide by zero
            residual = p
        token = _draw(residual / residual.sum(), sampler.rng)
        kept.append(token)
        history.append(token)
        return kept
    token = sampler(logits[len(draft)], history)  # every draft token kept: the model's next one is free
    kept.append(token)
    history.append(token)
    return kept


@dataclass
class SpecStats:
    draft_tokens: int = 0
    accepted_tokens: int = 0


class Speculator:
    """One generation's speculative token source: yields (token, cache position plain decode would have)."""

    def __init__(self, model: "Model", spec: Speculation, params: SamplingParams) -> None:
        check_speculation_support(model)
        self.model, self.spec, self.params = model, spec, params
        self.drafter = make_drafter(model, spec, params)
        self.stats = SpecStats()
        self.k = spec.draft_tokens
        self._skip = 0  # plain steps left before drafting again, after drafts that all failed
        self._backoff = 0

    def prefill(self, history: list[int]) -> None:
        prefill = getattr(self.drafter, "prefill", None)
        if prefill is not None:
            prefill(history)

    def _adapt(self, drafted: int, accepted: int) -> None:
        if not self.spec.adaptive:
            return
        # As transformers' "heuristic" schedule: grow while whole drafts pass, shrink on a miss.
        self.k = min(self.spec.draft_tokens, self.k + 2) if accepted == drafted else max(1, self.k - 1)
        if accepted == 0:
            # Nothing to copy here: stop paying for verification runs for a while, longer each time.
            self._backoff = min(max(1, 2 * self._backoff), 32)
            self._skip = self._backoff
        else:
            self._backoff = 0

    def tokens(self, logits: np.ndarray, sampler: Sampler, history: list[int]) -> Iterator[tuple[int, int]]:
        engine = self.model.engine
        budget = self.params.max_new_tokens
        base_history = len(history)
        yielded_pos = engine.pos
        emitted = 0
        try:
            token = sampler(logits, history)
            history.append(token)
            emitted = 1
            yielded_pos = engine.pos
            yield token, yielded_pos
            while True:
                p0 = engine.pos  # `token` is sampled but not yet in the cache
                room = min(budget - emitted - 1, engine.context - p0 - 1)
                k = min(self.k, room)
                draft, dists = ([], None)
                if k >= 1 and self._skip == 0:
                    draft, dists = self.drafter.propose(history, k)
                elif self._skip:
                    self._skip -= 1
                if not draft:
                    logits = engine.forward([token])
                    token = sampler(logits, history)
                    history.append(token)
                    emitted += 1
                    yielded_pos = engine.pos
                    yield token, yielded_pos
                    continue
                rows = engine.forward([token, *draft], last=len(draft) + 1)
                kept = accept(sampler, rows, draft, dists, history)
                accepted = len(kept) - 1  # a prefix of the draft, then the model's own token
                self.stats.draft_tokens += len(draft)
                self.stats.accepted_tokens += accepted
                self._adapt(len(draft), accepted)
                # The cache keeps `token` and the accepted drafts; the last kept token is not fed yet.
                engine.rewind(p0 + 1 + accepted)
                for i, t in enumerate(kept):
                    emitted += 1
                    yielded_pos = p0 + 1 + i
                    yield t, yielded_pos
                token = kept[-1]
        finally:
            # Stopped mid-batch (a stop id, max tokens, the consumer breaking off): leave the cache
            # and history as plain decode would, holding every yielded token but the last.
            if engine.pos > yielded_pos:
                engine.rewind(yielded_pos)
            del history[base_history + emitted:]
