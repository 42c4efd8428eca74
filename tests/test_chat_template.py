"""Chat template rendering: the Llama 3 format, HF-compatible semantics, and the sandbox."""

from datetime import datetime

import pytest

from edgellama.errors import EdgeLlamaError
from edgellama.runtime.chat_template import LLAMA3_CHAT_TEMPLATE, render

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "What is 2+2?"},
]


def _llama3_turn(role: str, content: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>"


def test_llama3_format_byte_for_byte():
    got = render(LLAMA3_CHAT_TEMPLATE, CHAT, bos_token="<|begin_of_text|>")
    want = ("<|begin_of_text|>" + "".join(_llama3_turn(m["role"], m["content"]) for m in CHAT)
            + "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert got == want
    no_prompt = render(LLAMA3_CHAT_TEMPLATE, CHAT, add_generation_prompt=False, bos_token="<|begin_of_text|>")
    assert no_prompt == want[: -len("<|start_header_id|>assistant<|end_header_id|>\n\n")]


def test_llama3_trims_content_like_meta():
    got = render(LLAMA3_CHAT_TEMPLATE, [{"role": "user", "content": "\n  padded \n\n"}], bos_token="B",
                 add_generation_prompt=False)
    assert got == "B" + _llama3_turn("user", "padded")


# Templates exercising the Jinja features chat templates lean on, checked against transformers' own renderer.
HF_FEATURE_TEMPLATES = [
    LLAMA3_CHAT_TEMPLATE,
    # whitespace control as HF configures it: trim_blocks + lstrip_blocks
    "{% for m in messages %}\n    {% if m.role == 'system' %}\n[SYS] {{ m.content }}\n    {% else %}\n"
    "<{{ m.role }}>{{ m.content }}</{{ m.role }}>\n    {% endif %}\n{% endfor %}\n"
    "{% if add_generation_prompt %}<assistant>{% endif %}",
    # loop controls, namespace, tojson without HTML escaping, tools defaulting to none
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'assistant' %}{% continue %}{% endif %}"
    "{% set ns.n = ns.n + 1 %}{{ ns.n }}:{{ m | tojson }};{% endfor %}{{ tools is none }}{{ {'k': '<&>é'} | tojson }}",
    "{{ bos_token }}{% for m in messages %}{{ m['content'] | trim | upper }}{% if not loop.last %}|{% endif %}"
    "{% endfor %}{{ eos_token }}",
]


@pytest.mark.parametrize("template", HF_FEATURE_TEMPLATES)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_matches_transformers_renderer(template, add_generation_prompt):
    import transformers.utils.chat_template_utils as chat_template_utils  # dev extra: fail, never skip
    messages = CHAT + [{"role": "user", "content": "  <b>&'quote' ünï  "}]
    extra = {"bos_token": "<s>", "eos_token": "</s>"}
    (want,), _ = chat_template_utils.render_jinja_template(
        conversations=[messages], chat_template=template, add_generation_prompt=add_generation_prompt, **extra)
    assert render(template, messages, add_generation_prompt=add_generation_prompt, **extra) == want


def test_helpers():
    assert render("{{ strftime_now('%Y-%m-%d') }}", []) == datetime.now().strftime("%Y-%m-%d")
    assert render("{% generation %}{{ messages[0].content }}{% endgeneration %}!", CHAT) == "You are terse.!"
    assert render("{{ dict(a=1)['a'] }}", []) == "1"


def test_raise_exception_becomes_one_line_error():
    template = "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation must start\nwith user') }}{% endif %}"
    with pytest.raises(EdgeLlamaError) as info:
        render(template, CHAT)
    assert "Conversation must start with user" in str(info.value)
    assert "\n" not in str(info.value)
    assert render(template, CHAT[1:]) == ""


@pytest.mark.parametrize("template, fragment", [
    ("{% for m in messages %}", "not valid Jinja"),
    ("{{ missing.attr }}", "failed to render"),
    ("{{ 1 + 'a' }}", "failed to render"),
])
def test_broken_templates_raise_edgellama_error(template, fragment):
    with pytest.raises(EdgeLlamaError, match=fragment):
        render(template, CHAT)


ESCAPES = [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ joiner.__init__.__globals__['os'] }}",
    "{{ lipsum.__globals__ }}",
    "{{ raise_exception.__globals__ }}",
    "{{ messages.__class__ }}",
    "{{ ''['__class__'] }}",
    "{{ '{0.__class__}'.format(1) }}",
    "{% if ''.__class__ %}leak{% endif %}",          # would silently render '' with a lax sandbox
    "{{ messages.append({'role': 'x'}) }}",         # templates must not mutate the caller's data
    "{{ messages[0].update({'content': 'x'}) }}",
    "{{ messages[0].pop('content') }}",
    "{% set ns = namespace(__class__=1) %}",
]


@pytest.mark.parametrize("template", ESCAPES)
def test_sandbox_rejects_reaching_internals(template):
    messages = [dict(m) for m in CHAT]
    with pytest.raises(EdgeLlamaError) as info:
        render(template, messages)
    message = str(info.value)
    assert message.startswith("chat template rejected by the sandbox: ")
    assert "\n" not in message and "<class" not in message
    assert messages == CHAT


def test_non_string_template_rejected():
    with pytest.raises(EdgeLlamaError):
        render(None, CHAT)
