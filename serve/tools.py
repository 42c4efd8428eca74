"""Tool calling in Llama 3.1's JSON format: tool definitions into the prompt, the answer into tool_calls.

The model is told to answer a call as one JSON object {"name": ..., "parameters": {...}}, as Meta's
Llama 3.1 JSON tool-calling prompt does. The definitions are written into the system message by us,
whatever the bundle's template, so every template (SmolLM2's ChatML included) gets the same prompt.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

# Our own wording of Llama 3.1's JSON tool-calling instruction.
_INSTRUCTION = (
    "You can call the functions below. To call one, answer with only a JSON object of the form "
    '{"name": function name, "parameters": object of argument names and values}, and nothing else. '
    "Do not use variables. If no function fits the request, answer normally.\n\nFunctions:\n"
)


def tool_names(tools: list[dict]) -> list[str]:
    return [t["function"]["name"] for t in tools]


def system_prompt(tools: list[dict]) -> str:
    lines = []
    for t in tools:
        f = t["function"]
        lines.append(json.dumps({"name": f["name"], "description": f.get("description", ""),
                                 "parameters": f.get("parameters") or {"type": "object", "properties": {}}},
                                ensure_ascii=False))
    return _INSTRUCTION + "\n".join(lines)


def call_schema(tools: list[dict], only: str | None = None) -> dict:
    """The JSON schema of a call to any of `tools` (or to the one named `only`): what a forced
    tool_choice constrains the answer to."""
    options = []
    for t in tools:
        f = t["function"]
        if only is not None and f["name"] != only:
            continue
        options.append({"type": "object",
                        "properties": {"name": {"const": f["name"]},
                                       "parameters": f.get("parameters") or {"type": "object"}},
                        "required": ["name", "parameters"], "additionalProperties": False})
    return options[0] if len(options) == 1 else {"anyOf": options}


def render_messages(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """OpenAI chat messages -> plain {role, content} messages for the bundle's template.

    Tool definitions join the system message (one is added when absent); an assistant turn that
    called tools shows the call as the JSON the model wrote; `role: tool` results keep their role
    (see tool_role_fallback for templates that refuse it)."""
    out: list[dict] = []
    for m in messages:
        role, content = m["role"], _text(m.get("content"))
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role == "assistant" and m.get("tool_calls"):
            calls = [{"name": c["function"]["name"], "parameters": _arguments(c["function"].get("arguments"))}
                     for c in m["tool_calls"]]
            content = "\n".join(json.dumps(c, ensure_ascii=False) for c in calls)
        out.append({"role": role, "content": content})
    if tools:
        prompt = system_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def tool_role_fallback(messages: list[dict]) -> list[dict]:
    """For a template that raises on a `tool` role: the result as a user turn, labelled."""
    return [{"role": "user", "content": f"Tool result: {m['content']}"} if m["role"] == "tool" else m
            for m in messages]


def parse_call(text: str, tools: list[dict]) -> list[dict] | None:
    """tool_calls entries if `text` is a call to one of `tools` in the JSON format, else None."""
    body = text.strip()
    if body.startswith("```"):  # a model may fence its JSON
        body = body.strip("`").removeprefix("json").strip()
    if not body.startswith("{"):
        return None
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or value.get("name") not in tool_names(tools):
        return None
    args = value.get("parameters", value.get("arguments", {}))
    if not isinstance(args, dict):
        return None
    return [{"id": f"call_{secrets.token_hex(12)}", "type": "function",
             "function": {"name": value["name"], "arguments": json.dumps(args, ensure_ascii=False)}}]


def _arguments(raw: Any) -> Any:
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    return raw if raw is not None else {}


def _text(content: Any) -> str:
    """Message content as text: a string, None (an assistant turn that only called tools), or a
    list of parts of which the text parts are kept."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
