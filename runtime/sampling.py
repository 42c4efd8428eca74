"""Choosing the next token from logits, and cutting generated text at stop strings.

Runs once per generated token over vocabularies of up to ~128k entries, so every step avoids
full-vocabulary sorts and copies unless a setting really needs them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from edgellama.errors import EdgeLlamaError

# Top-p first looks for the nucleus among this many most likely tokens; flatter distributions
# are bucketed by log-probability at this resolution instead of sorted.
_NUCLEUS_PROBE = 1024
_BUCKETS_PER_NAT = 16
_MAX_BUCKET = 100 * _BUCKETS_PER_NAT  # probabilities below e^-100 share the last bucket
_CDF_BLOCK = 1024


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop; `validate()` turns bad values into EdgeLlamaError."""

    temperature: float = 0.0          # 0 = greedy
    top_k: int = 0                    # 0 = off
    top_p: float = 1.0                # 1 = off
    min_p: float = 0.0                # 0 = off; keep tokens with p >= min_p * p_max
    repetition_penalty: float = 1.0   # 1 = off; CTRL-style, over every id already seen
    seed: int | None = None
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=list)

    def validate(self) -> SamplingParams:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise EdgeLlamaError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise EdgeLlamaError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise EdgeLlamaError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise EdgeLlamaError(f"min_p must be in [0, 1], got {self.min_p}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise EdgeLlamaError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise EdgeLlamaError(f"seed must be a non-negative integer, got {self.seed}")
        if self.max_new_tokens < 1:
            raise EdgeLlamaError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if isinstance(self.stop, str) or any(not isinstance(s, str) or not s for s in self.stop):
            raise EdgeLlamaError("stop must be a list of non-empty strings")
        return self


def apply_repetition_penalty(logits: np.ndarray, history: Sequence[int] | np.ndarray, penalty: float) -> np.ndarray:
    """A penalized copy of `logits`: seen ids' positive logits divided, negative ones multiplied."""
    out = np.array(logits, dtype=np.float32)
    _penalize(out, history, penalty)
    return out


def _penalize(scores: np.ndarray, history: Sequence[int] | np.ndarray, penalty: float) -> None:
    seen = np.unique(np.asarray(history, dtype=np.int64))
    seen = seen[(seen >= 0) & (seen < scores.shape[-1])]
    vals = scores[seen]
    scores[seen] = np.where(vals > 0, vals / penalty, vals * penalty)


class Sampler:
    """Seeded, reproducible next-token choice: `sampler(logits, history) -> token id`."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params.validate()
        self.rng = np.random.default_rng(params.seed)

    def distribution(self, logits: np.ndarray,
                     history: Sequence[int] | np.ndarray = ()) -> tuple[np.ndarray, np.ndarray]:
        """(candidate ids, their probabilities summing to 1) that a non-greedy draw picks from."""
        ids, probs = self._distribution(np.asarray(logits), history)
        return (np.arange(probs.shape[0]) if ids is None else ids), probs

    def _distribution(self, logits: np.ndarray,
                      history: Sequence[int] | np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        # ids None means "all of the vocabulary, in order": spares a vocab-sized arange per token.
        p = self.params
        scores = logits.astype(np.float32)  # our own copy, edited in place; float32 exp is ~10x faster
        if p.repetition_penalty != 1.0 and len(history):
            _penalize(scores, history, p.repetition_penalty)
        ids = None
        if p.top_k and p.top_k < scores.shape[0]:
            ids = np.argpartition(scores, -p.top_k)[-p.top_k:]
            scores = scores[ids]
        scores *= 1.0 / max(p.temperature, 1e-6)  # greedy callers still get a (peaked) distribution
        scores -= scores.max()
        probs = np.exp(scores, out=scores)
        probs /= probs.sum()
        if p.min_p > 0:
            keep = np.flatnonzero(probs >= p.min_p * probs.max())
            ids = keep if ids is None else ids[keep]
            probs = probs[keep]
        if p.top_p < 1:
            # The nucleus is computed on the distribution before min-p (as HF orders its warpers);
            # min-p only removes the tail, so probs still carry their pre-min-p mass.
            ids, probs = _nucleus(ids, probs, p.top_p)
        probs /= probs.sum()
        return ids, probs

    def __call__(self, logits: np.ndarray, history: Sequence[int] | np.ndarray = ()) -> int:
        logits = np.asarray(logits)
        if logits.ndim != 1:
            raise ValueError(f"expected 1-D logits, got shape {logits.shape}")
        if self.params.temperature == 0:
            return int(np.argmax(self._penalized(logits, history)))
        ids, probs = self._distribution(logits, history)
        j = _inverse_cdf(probs, self.rng.random())
        return j if ids is None else int(ids[j])

    def _penalized(self, logits: np.ndarray, history: Sequence[int] | np.ndarray) -> np.ndarray:
        penalty = self.params.repetition_penalty
        if penalty == 1.0 or len(history) == 0:
            return logits
        return apply_repetition_penalty(logits, history, penalty)


def _inverse_cdf(probs: np.ndarray, u: float) -> int:
    """The index whose slice of the cumulative distribution holds u * total (u in [0, 1))."""
    n = probs.shape[0]
    if n <= _CDF_BLOCK:
        cdf = np.cumsum(probs, dtype=np.float64)
        return min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), n - 1)
    # Two levels (block sums, then one block) instead of a vocab-long float64 cumsum: ~20x cheaper.
    # (float32 block sums: a float64 reduceat casts through a buffer and costs ~10x more.)
    block_cdf = np.cumsum(np.add.reduceat(probs, np.arange(0, n, _CDF_BLOCK)), dtype=np.float64)
    target = u * block_cdf[-1]
    b = min(int(np.searchsorted(block_cdf, target, side="right")), block_cdf.shape[0] - 1)
    before = block_cdf[b - 1] if b else 0.0
    within = (target - before) / max(block_cdf[b] - before, 1e-300)
    start = b * _CDF_BLOCK
    return start + _inverse_cdf(probs[start:start + _CDF_BLOCK], min(within, 1.0))


def _nucleus(ids: np.ndarray | None, probs: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """The smallest most-likely set whose mass reaches top_p (mass measured before min-p pruning)."""
    n = probs.shape[0]
    if n <= _NUCLEUS_PROBE:
        keep = _cut(np.arange(n), probs, top_p, 0.0)
    else:
        probe = np.argpartition(probs, -_NUCLEUS_PROBE)[-_NUCLEUS_PROBE:]
        if probs[probe].sum() >= top_p:
            keep = _cut(probe, probs, top_p, 0.0)
        else:
            # A flat distribution: bucket by log-probability instead of sorting the vocabulary.
            # Buckets wholly above the one where the mass crosses top_p are in; only that one is sorted.
            with np.errstate(divide="ignore"):  # p = 0 -> inf -> the last bucket
                nats = np.log(probs)
            nats *= -_BUCKETS_PER_NAT
            bucket = np.minimum(nats, _MAX_BUCKET, out=nats).astype(np.intp)  # intp: bincount's fast path
            above = np.cumsum(np.bincount(bucket, weights=probs))
            b = min(int(np.searchsorted(above, top_p, side="left")), above.shape[0] - 1)
            crossing = _cut(np.flatnonzero(bucket == b), probs, top_p, above[b - 1] if b else 0.0)
            keep = np.concatenate([np.flatnonzero(bucket < b), crossing])
    return (keep if ids is None else ids[keep]), probs[keep]


def _cut(candidates: np.ndarray, probs: np.ndarray, top_p: float, mass_before: float) -> np.ndarray:
    """The most likely candidates, in order, until mass_before plus their mass reaches top_p."""
    order = candidates[np.argsort(-probs[candidates], kind="stable")]
    cum = mass_before + np.cumsum(probs[order], dtype=np.float64)
    return order[:min(int(np.searchsorted(cum, top_p, side="left")) + 1, order.shape[0])]


class StopStringMatcher:
    """Cuts streamed text at the first stop string, holding back any tail that might begin one.

    `feed(delta)` returns (text safe to emit, stopped); the stop string itself is never emitted.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._longest = max((len(s) for s in self.stops), default=0)
        self._held = ""
        self.stopped = False

    def feed(self, delta: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        text = self._held + delta
        # The stop that completes first wins (ties: the longer one), which is what a token-by-token
        # check would see, so the result does not depend on how the text was chunked.
        hits = [(i + len(s), i) for s, i in ((s, text.find(s)) for s in self.stops) if i >= 0]
        if hits:
            self._held, self.stopped = "", True
            return text[:min(hits)[1]], True
        keep = 0
        for k in range(min(len(text), self._longest - 1), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                keep = k
                break
        self._held = text[len(text) - keep:]
        return text[:len(text) - keep], False

    def flush(self) -> str:
        """At the end of generation the held tail was not a stop after all."""
        held, self._held = ("" if self.stopped else self._held), ""
        return held
