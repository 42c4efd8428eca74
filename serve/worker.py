"""The one thread that runs the model: a FIFO of jobs, and a KV cache reused across requests.

The engine is single-threaded state, so every generation runs here, one after another, in the order
requests arrived. The cache is kept between jobs: a job whose prompt starts with tokens the cache
already holds (the earlier turns of a continuing conversation) rewinds the engine to the longest
common prefix and prefills only the rest, as ChatSession does across turns.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from edgellama.runtime.generate import Model, common_prefix, stream_ids
from edgellama.runtime.grammar import TokenConstraint
from edgellama.runtime.sampling import SamplingParams


class Done:
    """The last item a job emits: how many prompt tokens came from the cache."""

    def __init__(self, cached_tokens: int) -> None:
        self.cached_tokens = cached_tokens


@dataclass
class Job:
    prompt_ids: list[int]
    params: SamplingParams
    # Called on the worker thread with each GenerationEvent, then a Done or the exception that ended it.
    emit: Callable[[object], None]
    constraint: TokenConstraint | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    channel: Any = None  # where the HTTP side reads what emit() delivers (an asyncio.Queue)

    def cancel(self) -> None:
        self.cancelled.set()


class Worker:
    def __init__(self, model: Model, *, reuse_prefix: bool = True) -> None:
        self.model = model
        self.reuse_prefix = reuse_prefix
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._cached: list[int] = []  # the ids the engine's cache holds, in order (len == engine.pos)
        self.busy = False
        self.served = 0
        self.cancelled = 0
        model.engine.reset()
        self._thread = threading.Thread(target=self._loop, name="edgellama-generate", daemon=True)
        self._thread.start()

    @property
    def queued(self) -> int:
        return self._jobs.qsize()

    def submit(self, job: Job) -> None:
        self._jobs.put(job)

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if job.cancelled.is_set():  # its client left while it waited
                self.cancelled += 1
                continue
            self.busy = True
            try:
                cached = self._run(job)
            except Exception as exc:  # noqa: BLE001 - reported to the job's client; the server goes on
                job.emit(exc)
            else:
                job.emit(Done(cached))
            finally:
                self.busy = False
                self.served += 1

    def _run(self, job: Job) -> int:
        engine = self.model.engine
        ids = job.prompt_ids
        # At least the last prompt token is fed again: its logits choose the first answer token.
        common = min(common_prefix(self._cached, ids), len(ids) - 1) if self.reuse_prefix else 0
        engine.rewind(common)
        self._cached = self._cached[:common]
        new = ids[common:]
        generated: list[int] = []
        events = stream_ids(self.model, new, job.params, history=list(self._cached), constraint=job.constraint)
        try:
            for event in events:
                generated.append(event.token_id)
                if job.cancelled.is_set():  # checked between tokens: a gone client stops its generation
                    self.cancelled += 1
                    break
                job.emit(event)
        finally:
            events.close()
            # The engine's position says how much of prompt + answer its cache holds (the last token
            # sampled is never fed back; a failed step may or may not have landed).
            self._cached = (self._cached + new + generated)[:engine.pos]
        return common
