"""`edgellama serve` driven live with the official openai client, on SmolLM2 (real answers matter here:
JSON schemas, tool calls), plus structured output through generate() and `run --json-schema`.

One server subprocess for the module, bound to 127.0.0.1 on a free port, with an API key.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx  # the dev extra installs these: a missing one must fail the suite, not skip it
import jsonschema
import openai
import pytest

KEY = "test-key-123"
MODEL = "smol"
CONTEXT = 1024
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def smol_bundle(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as an fp32 ONNX bundle (context 1024): a few seconds to export."""
    from edgellama.export.onnx_export import ExportOptions, export_onnx

    out = tmp_path_factory.mktemp("serve") / "smol"
    export_onnx("smollm2-135m-instruct", out, ExportOptions(max_context=CONTEXT, verify=False), log=lambda m: None)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(smol_bundle):
    port = _free_port()
    log = open(smol_bundle.parent / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "edgellama", "serve", str(smol_bundle), "--port", str(port),
                             "--api-key", KEY, "--model-name", MODEL, "--max-context", str(CONTEXT),
                             "--max-body-bytes", "65536"],
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            if httpx.get(f"{base}/health", headers=_auth(), timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            log.seek(0)
            proc.kill()
            pytest.fail(f"server did not start: {log.read()[-2000:]}")
        time.sleep(0.2)
    yield base
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _auth(key: str = KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


def _chat(client, content: str, **kw):
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 24)
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kw)


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(f"{server}/health", headers=_auth()).json()
    assert health["status"] == "ok" and health["model"] == MODEL


def test_chat_stream_equals_non_stream(client):
    full = _chat(client, "Name three colors of the rainbow.")
    choice = full.choices[0]
    assert choice.message.content and choice.finish_reason in ("stop", "length")
    assert full.usage.prompt_tokens > 0 and 0 < full.usage.completion_tokens <= 24
    chunks = list(_chat(client, "Name three colors of the rainbow.", stream=True,
                        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [choice.finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_max_tokens_gives_length(client):
    r = _chat(client, "Write a long story about a dragon.", max_completion_tokens=5)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5


def test_stop_string(client):
    r = _chat(client, "What is the capital of France?", stop=["Paris"])
    assert "Paris" not in r.choices[0].message.content and r.choices[0].finish_reason == "stop"


def test_completions_stream_equals_non_stream(client):
    full = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0)
    parts = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0,
                                      stream=True)
    assert "".join(c.choices[0].text for c in parts if c.choices) == full.choices[0].text
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 12


SCHEMAS = {
    "person": ("Describe Ada Lovelace as a person record.", {
        "type": "object", "properties": {"name": {"type": "string", "maxLength": 40}, "birth_year": {"type": "integer"},
                                         "occupations": {"type": "array", "items": {"type": "string"},
                                                         "minItems": 1, "maxItems": 3}},
        "required": ["name", "birth_year", "occupations"], "additionalProperties": False}),
    "enum_bool": ("Is Paris the capital of France? Answer with the verdict and a confidence.", {
        "type": "object", "properties": {"verdict": {"enum": ["yes", "no"]}, "certain": {"type": "boolean"},
                                         "confidence": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["verdict", "certain", "confidence"], "additionalProperties": False}),
    "order": ("Extract the order: 2 apples at 0.5 EUR and 1 bread at 2 EUR, for Bob.", {
        "type": "object", "properties": {
            "customer": {"type": "string", "maxLength": 40},
            "items": {"type": "array", "maxItems": 4, "items": {
                "type": "object", "properties": {"product": {"type": "string", "maxLength": 30},
                                                 "quantity": {"type": "integer", "minimum": 1}},
                "required": ["product", "quantity"], "additionalProperties": False}}},
        "required": ["customer", "items"], "additionalProperties": False}),
}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_answer_validates(client, name):
    prompt, schema = SCHEMAS[name]
    r = _chat(client, prompt, max_tokens=200,
              response_format={"type": "json_schema", "json_schema": {"name": name, "schema": schema}})
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_json_object(client):
    r = _chat(client, "Reply with a JSON object whose key 'capital' is the capital of France.", max_tokens=60,
              response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    assert isinstance(json.loads(r.choices[0].message.content), dict)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 40}},
                   "required": ["zone"], "additionalProperties": False}}}


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_tool_call_and_its_result(client, choice):
    question = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]
    r = client.chat.completions.create(model=MODEL, messages=question, tools=[TIME, WEATHER], tool_choice=choice,
                                       temperature=0, max_tokens=80)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    call = c.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, WEATHER["function"]["parameters"])
    assert "paris" in args["city"].lower()
    # The call and its result go back into the conversation: the model answers from the result.
    # (tool_choice "none": with "auto", SmolLM2-135M repeats the call rather than read the result.)
    follow = question + [c.message.model_dump(exclude_none=True),
                         {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 31, "sky": "clear"}'}]
    r2 = client.chat.completions.create(model=MODEL, messages=follow, tools=[TIME, WEATHER], tool_choice="none",
                                        temperature=0, max_tokens=40)
    assert r2.choices[0].finish_reason == "stop"
    assert "31" in (r2.choices[0].message.content or ""), r2.choices[0].message


def test_tool_call_streamed(client):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Weather in Rome, fahrenheit?"}], tools=[WEATHER],
        tool_choice="required", temperature=0, max_tokens=80, stream=True))
    calls = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == ["tool_calls"]
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER["function"]["parameters"])


def test_four_concurrent_clients(client):
    prompts = ["Count from one to five.", "What is 2+2?", "Name a fruit.", "Say hello in French."]
    expected = [_chat(client, p, max_tokens=8).choices[0].message.content for p in prompts]
    got: dict[int, str] = {}

    def ask(i: int) -> None:
        stream = _chat(client, prompts[i], max_tokens=8, stream=True)
        got[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [got.get(i) for i in range(4)] == expected


def _health(server) -> dict:
    return httpx.get(f"{server}/health", headers=_auth(), timeout=5).json()


def test_disconnect_mid_stream_frees_the_server(client, server):
    before = _health(server)["cancelled"]
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Write a very long essay about the sea."}],
            "temperature": 0, "max_tokens": 900, "stream": True}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, headers=_auth(), timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        seen = [next(lines) for _ in range(6)]
        assert seen[0].startswith("data: {")
        # While it generates, /health and /v1/models answer at once (generation has its own thread).
        t0 = time.perf_counter()
        assert _health(server)["busy"] is True
        assert client.models.list().data[0].id == MODEL
        assert time.perf_counter() - t0 < 2.0
    deadline = time.time() + 20
    while _health(server)["cancelled"] == before and time.time() < deadline:
        time.sleep(0.1)
    h = _health(server)
    assert h["cancelled"] == before + 1 and not h["busy"]
    r = _chat(client, "What is 2+2?", max_tokens=8)
    assert r.choices[0].message.content


def test_second_turn_reuses_the_cache(client):
    first = [{"role": "user", "content": "My name is Ada. Remember it."}]
    r1 = client.chat.completions.create(model=MODEL, messages=first, temperature=0, max_tokens=20)
    turn2 = first + [{"role": "assistant", "content": r1.choices[0].message.content},
                     {"role": "user", "content": "What is my name?"}]
    r2 = client.chat.completions.create(model=MODEL, messages=turn2, temperature=0, max_tokens=10)
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert r1.usage.prompt_tokens <= cached < r2.usage.prompt_tokens


# -- bad requests: OpenAI-style 4xx bodies, and the server lives on ------------------------------
def _error(r) -> dict:
    body = r.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


@pytest.mark.parametrize("headers", [{}, _auth("wrong"), {"Authorization": KEY}])
def test_api_key_required(server, headers):
    for method, path in (("GET", "/health"), ("GET", "/v1/models"), ("POST", "/v1/chat/completions")):
        r = httpx.request(method, f"{server}{path}", headers=headers, json={})
        assert r.status_code == 401 and _error(r)["code"] == "invalid_api_key"


def test_openai_client_without_key_gets_401(server):
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


LONG = "word " * (CONTEXT + 50)
BAD = {
    "missing messages": ({"model": MODEL}, "messages"),
    "empty messages": ({"model": MODEL, "messages": []}, "messages"),
    "unknown model": ({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, "model"),
    "missing model": ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
    "over the context": ({"model": MODEL, "messages": [{"role": "user", "content": LONG}]}, "messages"),
    "negative max_tokens": ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1},
                            "max_tokens"),
    "negative temperature": ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": -0.5},
                             "temperature"),
    "n=2": ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
    "bad role": ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    "bad schema": ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                    "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 5}}},
                   "response_format.json_schema"),
    "unknown tool": ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER],
                      "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_request_gets_400(server, case):
    body, param = BAD[case]
    r = httpx.post(f"{server}/v1/chat/completions", json=body, headers=_auth(), timeout=30)
    assert r.status_code == 400, r.text
    err = _error(r)
    assert err["param"] == param and err["type"] == "invalid_request_error"


def test_bad_request_through_the_openai_client(client):
    with pytest.raises(openai.BadRequestError) as info:
        _chat(client, "hi", temperature=-1)
    assert info.value.body["param"] == "temperature"


@pytest.mark.parametrize("raw", [b"{bad json", b"[1, 2]", b"", "\"caf\xe9\"".encode("latin-1")])
def test_malformed_body_gets_400(server, raw):
    r = httpx.post(f"{server}/v1/chat/completions", content=raw, headers=_auth(), timeout=30)
    assert r.status_code == 400 and _error(r)["type"] == "invalid_request_error"


def test_body_size_limit(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 70000}]}
    r = httpx.post(f"{server}/v1/chat/completions", json=body, headers=_auth(), timeout=30)
    assert r.status_code == 413 and _error(r)["code"] == "request_too_large"
    assert _health(server)["status"] == "ok"


def test_unknown_route_gets_an_openai_error(server):
    r = httpx.get(f"{server}/v1/nothing", headers=_auth())
    assert r.status_code == 404 and _error(r)["code"] == "not_found"


# -- structured output without the server ---------------------------------------------------------
@pytest.fixture(scope="module")
def smol_model(smol_bundle):
    from edgellama.runtime.generate import load

    return load(smol_bundle, max_context=256)


def test_generate_with_json_schema(smol_model):
    from edgellama.runtime.generate import generate

    _, schema = SCHEMAS["enum_bool"]
    model = smol_model
    out = generate(model, "Is water wet? Give a verdict.", chat=True, json_schema=schema, max_new_tokens=60)
    jsonschema.validate(json.loads(out), schema)


def test_run_json_schema_cli(smol_bundle, tmp_path, capsys):
    from edgellama.cli import main

    _, schema = SCHEMAS["enum_bool"]
    path = tmp_path / "verdict.json"
    path.write_text(json.dumps(schema))
    assert main(["run", str(smol_bundle), "--chat", "-p", "Is the sky green?", "--json-schema", str(path),
                 "-n", "60"]) == 0
    jsonschema.validate(json.loads(capsys.readouterr().out), schema)
    path.write_text("[1]")
    assert main(["run", str(smol_bundle), "-p", "x", "--json-schema", str(path)]) == 2
    assert "must be a JSON object" in capsys.readouterr().err


def test_structured_output_without_llguidance_names_the_extra(smol_bundle, monkeypatch):
    from edgellama.errors import EdgeLlamaError
    from edgellama.runtime.generate import generate, load

    monkeypatch.setitem(sys.modules, "llguidance", None)  # as if the serve extra were not installed
    model = load(smol_bundle, max_context=64)  # a fresh model: no grammar compiler cached on it
    with pytest.raises(EdgeLlamaError, match=r"edgellama\[serve\]"):
        generate(model, "hi", json_schema={"type": "object"})


# -- tool-call format and request checks, without a model -----------------------------------------
def test_parse_call_accepts_the_llama31_format_only_for_given_tools():
    from edgellama.serve.tools import parse_call

    tools = [WEATHER, TIME]
    call = parse_call('  {"name": "get_time", "parameters": {"zone": "UTC"}}\n', tools)
    assert call[0]["function"] == {"name": "get_time", "arguments": '{"zone": "UTC"}'}
    assert call[0]["id"].startswith("call_") and call[0]["type"] == "function"
    fenced = parse_call('```json\n{"name": "get_time", "arguments": {"zone": "CET"}}\n```', tools)
    assert json.loads(fenced[0]["function"]["arguments"]) == {"zone": "CET"}
    for text in ('{"name": "rm_rf", "parameters": {}}', "It is sunny.", '{"name": "get_time", "parameters": 3}',
                 '{"name": "get_time"', "[]"):
        assert parse_call(text, tools) is None, text


def test_call_schema_and_rendering():
    from edgellama.serve.tools import call_schema, render_messages, tool_role_fallback

    one = call_schema([WEATHER, TIME], "get_time")
    assert one["properties"]["name"] == {"const": "get_time"}
    both = call_schema([WEATHER, TIME])
    jsonschema.validate({"name": "get_time", "parameters": {"zone": "UTC"}}, both)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "get_time", "parameters": {"city": "Paris"}}, both)
    msgs = render_messages([{"role": "developer", "content": "Be brief."},
                            {"role": "user", "content": [{"type": "text", "text": "Time?"}]},
                            {"role": "assistant", "content": None, "tool_calls": [
                                {"id": "c", "type": "function",
                                 "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}}]},
                            {"role": "tool", "tool_call_id": "c", "content": "12:00"}], [TIME])
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "tool"]
    assert msgs[0]["content"].startswith("Be brief.") and '"name": "get_time"' in msgs[0]["content"]
    assert msgs[1]["content"] == "Time?"
    assert json.loads(msgs[2]["content"]) == {"name": "get_time", "parameters": {"zone": "UTC"}}
    assert tool_role_fallback(msgs)[3] == {"role": "user", "content": "Tool result: 12:00"}


def test_request_checks_map_to_params():
    from edgellama.serve.protocol import ApiError, parse_chat

    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 7,
            "max_tokens": 99, "temperature": 0.5, "top_p": 0.9, "seed": 3, "stop": "END",
            "stream": True, "stream_options": {"include_usage": True}}
    req = parse_chat(body, "m")
    p = req.params
    assert (req.max_tokens, p.temperature, p.top_p, p.seed, p.stop, req.stream, req.include_usage) == \
        (7, 0.5, 0.9, 3, ["END"], True, True)
    for bad, param in (({"temperature": True}, "temperature"), ({"top_p": 0}, "top_p"),
                       ({"stop": ["a"] * 5}, "stop"), ({"seed": 1.5}, "seed"), ({"stream": "yes"}, "stream"),
                       ({"max_tokens": 0}, "max_tokens"), ({"tool_choice": "required"}, "tool_choice")):
        with pytest.raises(ApiError) as info:
            parse_chat({**body, **bad}, "m")
        assert info.value.param == param and info.value.status == 400


def test_serve_cli_defaults_and_bad_input(tmp_path, capsys):
    from edgellama.cli import build_parser, main

    args = build_parser().parse_args(["serve", "bundle"])
    assert (args.host, args.port, args.api_key) == ("127.0.0.1", 8080, None)  # this machine only, no key
    assert main(["serve", str(tmp_path / "missing")]) == 2
    assert main(["serve", str(tmp_path), "--api-key", " "]) == 2
    assert main(["serve", str(tmp_path), "--port", "70000"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("edgellama: error: ") for line in err), err


def test_constraint_hook_forces_tokens_and_ends_the_answer(smol_model):
    """Any object with mask/advance/is_done steers the decode loop: here, a fixed token sequence."""
    import numpy as np

    from edgellama.runtime.generate import stream_ids
    from edgellama.runtime.sampling import SamplingParams

    model = smol_model
    forced = model.tokenizer.encode(" Lyon, of course")

    class Script:
        def __init__(self):
            self.seen: list[int] = []

        def mask(self, logits):
            out = np.full_like(logits, -np.inf)
            out[forced[len(self.seen)]] = 0.0
            return out

        def advance(self, token):
            self.seen.append(token)

        def is_done(self):
            return len(self.seen) == len(forced)

    script = Script()
    model.engine.reset()
    events = list(stream_ids(model, model.encode_prompt("The capital of France is"),
                             SamplingParams(temperature=0.8, seed=1, max_new_tokens=50), constraint=script))
    assert script.seen == forced and [e.token_id for e in events] == forced
    assert "".join(e.text for e in events) == " Lyon, of course"
    assert [e.finish_reason for e in events][-1] == "stop" and all(e.finish_reason is None for e in events[:-1])
