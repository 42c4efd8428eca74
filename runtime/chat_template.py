"""Chat templates: Jinja rendered the way Hugging Face renders them, inside a locked-down sandbox.

A bundle's template comes from whoever published the checkpoint, so it is untrusted code:
anything that reaches for Python internals is refused with an EdgeLlamaError instead of
quietly rendering as an empty Undefined.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edgellama.errors import EdgeLlamaError

# The Llama 3 chat format (byte-identical to Meta's template for system/user/assistant turns,
# content trimmed as Meta does). The exporter writes this when a Llama 3 vocabulary ships without one.
LLAMA3_CHAT_TEMPLATE = (
    "{%- for message in messages %}\n"
    "{%- if loop.first %}{{- bos_token }}{% endif %}\n"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}\n"
    "{{- message['content'] | trim }}\n"
    "{{- '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)


class _TemplateRaised(Exception):
    """raise_exception() called by the template itself: its message is the user-facing reason."""


class _GenerationTag(jinja2.ext.Extension):
    # HF templates may wrap assistant turns in {% generation %}...{% endgeneration %} to build
    # training masks; for inference the block is just its body.
    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


class _StrictSandbox(ImmutableSandboxedEnvironment):
    # Jinja's sandbox answers an unsafe attribute with an Undefined, which `{% if x.__class__ %}`
    # silently treats as false; failing loudly makes probing templates visible.
    def unsafe_undefined(self, obj: Any, attribute: Any) -> Any:
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    # One `'a' * 10**9` or `9 ** 10**8` would stall or exhaust the host: bound repetition and powers.
    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > _MAX_REPEAT:
                    raise SecurityError(f"the template builds a sequence of more than {_MAX_REPEAT} items")
        elif isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > _MAX_EXPONENT:
            raise SecurityError(f"the template raises to a power above {_MAX_EXPONENT}")
        return super().call_binop(context, operator, left, right)


_MAX_REPEAT = 1_000_000
_MAX_EXPONENT = 1024


def _raise_exception(message: Any) -> None:
    raise _TemplateRaised(str(message))


def _tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes <>&' which would corrupt tool schemas in a prompt.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _make_dict(*args: Any, **kwargs: Any) -> dict:
    # The builtin `dict` global is a type, and types expose mro() and friends; a plain function does not.
    return dict(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    # Underscore names on a namespace would be a place to stash and smuggle internals.
    def __init__(*args: Any, **kwargs: Any) -> None:
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"namespace attribute {name!r} is not allowed")


def _environment() -> ImmutableSandboxedEnvironment:
    env = _StrictSandbox(trim_blocks=True, lstrip_blocks=True,
                         extensions=[jinja2.ext.loopcontrols, _GenerationTag])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       dict=_make_dict, namespace=_Namespace)
    return env


_ENV = _environment()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    try:
        return _ENV.from_string(template)
    except TemplateSyntaxError as e:
        raise EdgeLlamaError(f"chat template is not valid Jinja (line {e.lineno}): {_one_line(e)}") from None
    except SecurityError as e:
        raise EdgeLlamaError(f"chat template rejected by the sandbox: {_one_line(e)}") from None


def render(template: str, messages: list[dict], *, add_generation_prompt: bool = True, **vars: Any) -> str:
    """Render `template` for `messages`; `vars` (bos_token, tools, ...) become template globals."""
    if not isinstance(template, str):
        raise EdgeLlamaError(f"chat template must be a string, got {type(template).__name__}")
    compiled = _compile(template)
    # HF always passes these, and templates test `tools is not none` rather than `is defined`.
    vars.setdefault("tools", None)
    vars.setdefault("documents", None)
    try:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **vars)
    except SecurityError as e:
        raise EdgeLlamaError(f"chat template rejected by the sandbox: {_one_line(e)}") from None
    except _TemplateRaised as e:
        raise EdgeLlamaError(f"chat template refused the conversation: {_one_line(e)}") from None
    except (TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError,
            OverflowError, RecursionError, MemoryError) as e:
        # The template is input too: its runtime failures are the user's to fix, not our bug.
        raise EdgeLlamaError(f"chat template failed to render: {_one_line(e)}") from None
