"""The HTTP side: a Starlette app speaking the OpenAI API over one bundle, served by uvicorn.

Requests are validated and tokenized on the event loop's threads, then queued for the one
generation Worker; answers come back token by token through an asyncio queue, as one JSON body or
as server-sent events (`data: {...}` chunks, then `data: [DONE]`).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from edgellama.errors import EdgeLlamaError
from edgellama.runtime.generate import GenerationEvent, Model
from edgellama.serve import tools as T
from edgellama.serve.protocol import ApiError, Request, parse_chat, parse_completion
from edgellama.serve.worker import Done, Job, Worker

POLL_S = 0.2  # how often a non-streamed request checks that its client is still there


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    model_name: str | None = None  # the id clients name; default: the bundle folder's name
    max_body_bytes: int = 4 * 1024 * 1024
    reuse_prefix: bool = True


@dataclass
class Result:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


class _SSEResponse(StreamingResponse):
    """A stream whose generation is cancelled however the response ends (done, client gone, error)."""

    def __init__(self, body: AsyncIterator[str], job: Job) -> None:
        super().__init__(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._job.cancel()


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Server:
    def __init__(self, model: Model, config: ServeConfig) -> None:
        self.model = model
        self.config = config
        self.model_id = config.model_name or model.path.name
        self.created = int(time.time())
        self.worker = Worker(model, reuse_prefix=config.reuse_prefix)
        self.grammar = None
        try:  # built once (~0.5 s over 128k tokens), not on the first structured request
            from edgellama.runtime.grammar import GrammarCompiler

            self.grammar = GrammarCompiler.for_model(model)
        except EdgeLlamaError:
            pass  # without llguidance, structured requests get a 400 naming the extra
        self.app = Starlette(
            routes=[Route("/health", self.health, methods=["GET"]),
                    Route("/v1/models", self.models, methods=["GET"]),
                    Route("/v1/chat/completions", self.chat, methods=["POST"]),
                    Route("/v1/completions", self.completions, methods=["POST"])],
            exception_handlers={HTTPException: self._http_error, Exception: self._internal_error},
        )

    # -- plumbing ----------------------------------------------------------------------------
    async def _http_error(self, request: HttpRequest, exc: HTTPException) -> Response:
        return JSONResponse(ApiError(exc.detail or "error", status=exc.status_code,
                                     code="not_found" if exc.status_code == 404 else None).body(),
                            status_code=exc.status_code)

    async def _internal_error(self, request: HttpRequest, exc: Exception) -> Response:
        print(f"edgellama serve: internal error: {exc!r}", file=sys.stderr)
        return JSONResponse(ApiError("internal server error", status=500, type="server_error").body(),
                            status_code=500)

    def _authorize(self, request: HttpRequest) -> None:
        key = self.config.api_key
        if key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not secrets.compare_digest(given.encode(), key.encode()):
            raise ApiError("missing or incorrect API key: send 'Authorization: Bearer KEY'", status=401,
                           code="invalid_api_key")

    async def _body(self, request: HttpRequest) -> Any:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ApiError(f"the request body is over {limit} bytes", status=413, code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(f"the request body is over {limit} bytes", status=413, code="request_too_large")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, RecursionError):
            raise ApiError("the request body is not valid JSON", code="invalid_json") from None

    @staticmethod
    def _guard(handler):
        async def wrapped(self, request: HttpRequest) -> Response:
            try:
                self._authorize(request)
                return await handler(self, request)
            except ApiError as exc:
                return JSONResponse(exc.body(), status_code=exc.status)
        return wrapped

    # -- endpoints ---------------------------------------------------------------------------
    @_guard
    async def health(self, request: HttpRequest) -> Response:
        w = self.worker
        return JSONResponse({"status": "ok", "model": self.model_id, "busy": w.busy, "queued": w.queued,
                             "served": w.served, "cancelled": w.cancelled})

    @_guard
    async def models(self, request: HttpRequest) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "edgellama",
             "context_length": self.model.context}]})

    @_guard
    async def chat(self, request: HttpRequest) -> Response:
        req = parse_chat(await self._body(request), self.model_id)
        use_tools = bool(req.tools) and req.tool_choice != "none"
        schema = req.response_format
        if use_tools and (req.tool_choice == "required" or req.forced_tool):
            schema = T.call_schema(req.tools, req.forced_tool)
        ids = await asyncio.to_thread(self._chat_ids, req, use_tools)
        job = self._job(req, ids, schema)
        if req.stream:
            return _SSEResponse(self._chat_stream(req, job, ids, use_tools), job)
        result = await self._collect(request, job, ids)
        message: dict[str, Any] = {"role": "assistant", "content": result.text}
        calls = T.parse_call(result.text, req.tools) if use_tools else None
        if calls:
            message = {"role": "assistant", "content": None, "tool_calls": calls}
            result.finish_reason = "tool_calls"
        return JSONResponse({"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                             "created": int(time.time()), "model": self.model_id,
                             "choices": [{"index": 0, "message": message, "logprobs": None,
                                          "finish_reason": result.finish_reason}],
                             "usage": result.usage()})

    @_guard
    async def completions(self, request: HttpRequest) -> Response:
        req = parse_completion(await self._body(request), self.model_id)
        try:
            ids = await asyncio.to_thread(self.model.encode_prompt, req.prompt)
        except EdgeLlamaError as exc:
            raise ApiError(str(exc), param="prompt", code="invalid_value") from None
        job = self._job(req, ids, None)
        if req.stream:
            return _SSEResponse(self._completion_stream(req, job, ids), job)
        result = await self._collect(request, job, ids)
        return JSONResponse({"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                             "created": int(time.time()), "model": self.model_id,
                             "choices": [{"index": 0, "text": result.text, "logprobs": None,
                                          "finish_reason": result.finish_reason}],
                             "usage": result.usage()})

    # -- requests into jobs ------------------------------------------------------------------
    def _chat_ids(self, req: Request, use_tools: bool) -> list[int]:
        messages = T.render_messages(req.messages, req.tools if use_tools else None)
        try:
            try:
                return self.model.encode_chat(messages)
            except EdgeLlamaError:
                if not any(m["role"] == "tool" for m in messages):
                    raise
                return self.model.encode_chat(T.tool_role_fallback(messages))
        except EdgeLlamaError as exc:
            raise ApiError(str(exc), param="messages", code="invalid_value") from None

    def _job(self, req: Request, ids: list[int], schema: dict | None) -> Job:
        context = self.model.context
        if len(ids) >= context:
            raise ApiError(f"the prompt is {len(ids)} tokens: over this server's context of {context} tokens "
                           "(shorten it, or restart the server with a larger --max-context)",
                           param="messages" if req.prompt is None else "prompt", code="context_length_exceeded")
        constraint = None
        if schema is not None:
            if self.grammar is None:
                raise ApiError("structured output needs llguidance: pip install 'edgellama[serve]'",
                               param="response_format", code="unsupported")
            try:
                constraint = self.grammar.json_schema(schema)
            except EdgeLlamaError as exc:
                raise ApiError(str(exc), param="response_format", code="invalid_value") from None
        params = req.params
        params.max_new_tokens = req.max_tokens or (context - len(ids))  # the engine stops at the context
        try:
            params.validate()
        except EdgeLlamaError as exc:
            raise ApiError(str(exc), code="invalid_value") from None
        loop = asyncio.get_running_loop()
        channel: asyncio.Queue = asyncio.Queue()

        def emit(item: object) -> None:
            try:
                loop.call_soon_threadsafe(channel.put_nowait, item)
            except RuntimeError:  # the loop is gone (shutdown): nobody is listening
                pass

        job = Job(ids, params, emit, constraint, channel=channel)
        self.worker.submit(job)
        return job

    async def _events(self, job: Job) -> AsyncIterator[GenerationEvent | Done]:
        while True:
            item = await job.channel.get()
            if isinstance(item, Exception):
                raise item
            yield item
            if isinstance(item, Done):
                return

    async def _collect(self, request: HttpRequest, job: Job, ids: list[int]) -> Result:
        """The whole answer of a non-streamed request; its generation stops if the client leaves."""
        text, finish, n, cached = [], "stop", 0, 0
        channel: asyncio.Queue = job.channel
        try:
            while True:
                try:
                    # (a cancelled Queue.get loses no item, so polling is safe)
                    item = await asyncio.wait_for(channel.get(), POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        job.cancel()
                        raise ApiError("client disconnected", status=499) from None
                    continue
                if isinstance(item, EdgeLlamaError):
                    raise ApiError(str(item), status=500, type="server_error")
                if isinstance(item, Exception):
                    raise item
                if isinstance(item, Done):
                    cached = item.cached_tokens
                    break
                text.append(item.text)
                n = item.stats.generated_tokens
                finish = item.finish_reason or finish
        finally:
            job.cancel()
        return Result("".join(text), finish, len(ids), n, cached)

    async def _stream(self, job: Job, ids: list[int], chunk, final, include_usage: bool,
                      buffer: bool = False) -> AsyncIterator[str]:
        """SSE lines: chunk(text) per delta, final(text, finish) at the end, usage, [DONE].

        buffer: hold the text back for final() (a tool call is only known once the answer is whole)."""
        held, finish, n, cached = [], "stop", 0, 0
        try:
            async for item in self._events(job):
                if isinstance(item, Done):
                    cached = item.cached_tokens
                    continue
                n = item.stats.generated_tokens
                finish = item.finish_reason or finish
                if buffer:
                    held.append(item.text)
                elif item.text:
                    yield _sse(chunk(item.text))
        except EdgeLlamaError as exc:
            yield _sse(ApiError(str(exc), status=500, type="server_error").body())
            return
        yield _sse(final("".join(held), finish))
        if include_usage:
            usage = Result("", finish, len(ids), n, cached).usage()
            yield _sse({**chunk(None), "choices": [], "usage": usage})
        yield "data: [DONE]\n\n"

    def _chat_stream(self, req: Request, job: Job, ids: list[int], use_tools: bool) -> AsyncIterator[str]:
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": self.model_id}

        def chunk(text: str | None, delta: dict | None = None, finish: str | None = None) -> dict:
            d = delta if delta is not None else ({"content": text} if text is not None else {})
            return {**base, "choices": [{"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}]}

        def final(held: str, finish: str) -> dict:
            calls = T.parse_call(held, req.tools) if use_tools else None
            if calls:
                delta = {"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]}
                return chunk(None, delta, "tool_calls")
            return chunk(None, {"content": held} if held else {}, finish)

        async def lines() -> AsyncIterator[str]:
            yield _sse(chunk(None, {"role": "assistant", "content": ""}))
            async for line in self._stream(job, ids, chunk, final, req.include_usage, buffer=use_tools):
                yield line
        return lines()

    def _completion_stream(self, req: Request, job: Job, ids: list[int]) -> AsyncIterator[str]:
        base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_id}

        def chunk(text: str | None, finish: str | None = None) -> dict:
            return {**base, "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]}

        return self._stream(job, ids, chunk, lambda held, finish: chunk(held, finish), req.include_usage)


def serve(bundle: str, config: ServeConfig, *, threads: int | None = None, max_context: int | None = None,
          provider: str | None = None) -> None:
    """Load the bundle and serve it until interrupted (the body of `edgellama serve`)."""
    import uvicorn

    from edgellama.runtime.generate import load

    if not 0 <= config.port <= 65535:
        raise EdgeLlamaError(f"--port must be in 0..65535, got {config.port}")
    if config.api_key is not None and not config.api_key.strip():
        raise EdgeLlamaError("--api-key is empty")
    model = load(bundle, threads=threads, max_context=max_context, provider=provider)
    server = Server(model, config)
    print(f"edgellama serve: {server.model_id} (context {model.context}) on http://{config.host}:{config.port}"
          f"{' (API key required)' if config.api_key else ''}", file=sys.stderr, flush=True)
    try:
        uvicorn.run(server.app, host=config.host, port=config.port, log_level="warning",
                    timeout_graceful_shutdown=2)
    finally:
        server.worker.close()
