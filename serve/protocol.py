"""OpenAI request bodies -> validated requests, and OpenAI-style errors.

Every check raises ApiError, which the app answers as {"error": {"message", "type", "param", "code"}}
with its status (400 unless said otherwise), the body the OpenAI API itself sends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from edgellama.runtime.sampling import SamplingParams

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOPS = 4  # the OpenAI API's limit


class ApiError(Exception):
    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.param, self.code, self.type = status, param, code, type

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Request:
    """What both endpoints share once validated."""

    model: str
    stream: bool
    include_usage: bool
    max_tokens: int | None
    params: SamplingParams
    # chat
    messages: list[dict] = field(default_factory=list)
    response_format: dict | None = None  # None, or the JSON schema the answer must validate against
    tools: list[dict] = field(default_factory=list)
    tool_choice: str | dict = "auto"  # "none" | "auto" | "required" | function name (str via forced_tool)
    forced_tool: str | None = None
    # completions
    prompt: str | None = None


def _number(body: dict, key: str, lo: float, hi: float, *, lo_open: bool = False) -> float | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ApiError(f"'{key}' must be a number", param=key, code="invalid_type")
    if v < lo or v > hi or (lo_open and v == lo):
        raise ApiError(f"'{key}' must be {'>' if lo_open else '>='} {lo} and <= {hi}, got {v}", param=key,
                       code="invalid_value")
    return float(v)


def _int(body: dict, key: str, lo: int) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(f"'{key}' must be an integer", param=key, code="invalid_type")
    if v < lo:
        raise ApiError(f"'{key}' must be >= {lo}, got {v}", param=key, code="invalid_value")
    return v


def _common(body: Any, served: str) -> dict:
    if not isinstance(body, dict):
        raise ApiError("the request body must be a JSON object", code="invalid_json")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError("'model' is required: the id from GET /v1/models", param="model", code="missing_required_parameter")
    if model != served:
        raise ApiError(f"the model '{model}' does not exist: this server serves '{served}'", param="model",
                       code="model_not_found")
    n = _int(body, "n", 1)
    if n not in (None, 1):
        raise ApiError("only n=1 is supported", param="n", code="invalid_value")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError("'stream' must be a boolean", param="stream", code="invalid_type")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise ApiError("'stream_options' must be an object", param="stream_options", code="invalid_type")
    include_usage = bool((opts or {}).get("include_usage", False))
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is None:
        stop = []
    if (not isinstance(stop, list) or len(stop) > MAX_STOPS
            or any(not isinstance(s, str) or not s for s in stop)):
        raise ApiError(f"'stop' must be a non-empty string or a list of at most {MAX_STOPS} of them", param="stop",
                       code="invalid_value")
    max_tokens = _int(body, "max_tokens", 1)  # both are checked; the newer name wins
    newer = _int(body, "max_completion_tokens", 1)
    max_tokens = newer if newer is not None else max_tokens
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0, lo_open=True)
    seed = _int(body, "seed", 0)
    params = SamplingParams(temperature=1.0 if temperature is None else temperature,
                            top_p=1.0 if top_p is None else top_p, seed=seed, stop=stop)
    return {"model": model, "stream": stream, "include_usage": include_usage, "max_tokens": max_tokens,
            "params": params}


def parse_chat(body: Any, served: str) -> Request:
    req = Request(**_common(body, served))
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError("'messages' must be a non-empty list", param="messages",
                       code="missing_required_parameter" if messages is None else "invalid_value")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(f"messages[{i}] must be an object with 'role' one of {', '.join(ROLES)}",
                           param=f"messages[{i}].role", code="invalid_value")
        content = m.get("content")
        if content is None and not (m["role"] == "assistant" and m.get("tool_calls")):
            raise ApiError(f"messages[{i}] has no 'content'", param=f"messages[{i}].content",
                           code="missing_required_parameter")
        if content is not None and not isinstance(content, (str, list)):
            raise ApiError(f"messages[{i}].content must be a string or a list of parts",
                           param=f"messages[{i}].content", code="invalid_type")
        if m.get("tool_calls") is not None:
            _check_tool_calls(m["tool_calls"], i)
    req.messages = messages
    req.response_format = _response_format(body.get("response_format"))
    req.tools, req.tool_choice, req.forced_tool = _tools(body.get("tools"), body.get("tool_choice"))
    return req


def parse_completion(body: Any, served: str) -> Request:
    req = Request(**_common(body, served))
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise ApiError("'prompt' must be a non-empty string", param="prompt",
                       code="missing_required_parameter" if prompt is None else "invalid_value")
    req.prompt = prompt
    return req


def _check_tool_calls(calls: Any, i: int) -> None:
    ok = isinstance(calls, list) and all(
        isinstance(c, dict) and isinstance(c.get("function"), dict) and isinstance(c["function"].get("name"), str)
        for c in calls)
    if not ok:
        raise ApiError(f"messages[{i}].tool_calls must be a list of {{'function': {{'name', 'arguments'}}}}",
                       param=f"messages[{i}].tool_calls", code="invalid_value")


def _response_format(rf: Any) -> dict | None:
    if rf is None:
        return None
    if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
        raise ApiError("'response_format.type' must be 'text', 'json_object' or 'json_schema'",
                       param="response_format", code="invalid_value")
    if rf["type"] == "text":
        return None
    if rf["type"] == "json_object":
        from edgellama.runtime.grammar import ANY_JSON_OBJECT

        return ANY_JSON_OBJECT
    spec = rf.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise ApiError("'response_format.json_schema.schema' must be a JSON schema object",
                       param="response_format.json_schema", code="invalid_value")
    return schema


def _tools(tools: Any, choice: Any) -> tuple[list[dict], str | dict, str | None]:
    if tools is None:
        tools = []
    if not isinstance(tools, list):
        raise ApiError("'tools' must be a list", param="tools", code="invalid_type")
    names = []
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) and t.get("type", "function") == "function" else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not f["name"]:
            raise ApiError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}",
                           param=f"tools[{i}]", code="invalid_value")
        if f.get("parameters") is not None and not isinstance(f["parameters"], dict):
            raise ApiError(f"tools[{i}].function.parameters must be a JSON schema object",
                           param=f"tools[{i}].function.parameters", code="invalid_value")
        names.append(f["name"])
    if choice is None:
        choice = "auto" if tools else "none"
    forced = None
    if isinstance(choice, dict):
        fn = choice.get("function")
        forced = fn.get("name") if isinstance(fn, dict) else None
        if forced not in names:
            raise ApiError(f"tool_choice names a function that is not in 'tools': {forced!r}", param="tool_choice",
                           code="invalid_value")
    elif choice not in ("none", "auto", "required"):
        raise ApiError("'tool_choice' must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name'}}",
                       param="tool_choice", code="invalid_value")
    if choice == "required" and not tools:
        raise ApiError("tool_choice 'required' needs 'tools'", param="tool_choice", code="invalid_value")
    return tools, choice, forced
