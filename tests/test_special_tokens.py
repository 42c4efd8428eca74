"""Control tokens in user and system text reach the model as plain text, through the runtime's chat path.

Every special token of the real Llama 3.2 tokenizer (all 257, <|image|> included) is put into the
system prompt and the user turns of a ChatSession on a tiny bundle; what the engine is fed must
hold exactly the control tokens the chat template itself writes, and decode back to the text.
"""

from __future__ import annotations

import json

import pytest

from edgellama.errors import EdgeLlamaError
from edgellama.runtime.chat_template import render
from edgellama.runtime.generate import ChatSession, load
from edgellama.runtime.sampling import SamplingParams


@pytest.fixture(scope="module")
def special_strings(llama_tokenizer_dir) -> list[str]:
    added = json.loads((llama_tokenizer_dir / "tokenizer.json").read_text())["added_tokens"]
    strings = [t["content"] for t in added if t["special"]]
    assert len(strings) == 257 and "<|image|>" in strings and "<|eot_id|>" in strings
    return strings


@pytest.fixture(scope="module")
def model(exported):
    return load(exported("gqa4", "fast").dir, threads=1)


class FedIds:
    """Mirrors the engine's cache: the ids fed to it, less whatever a rewind or reset forgot."""

    def __init__(self, engine, monkeypatch):
        self.ids: list[int] = []
        forward, rewind, reset = engine.forward, engine.rewind, engine.reset

        def fed_forward(ids, **kw):
            self.ids += [int(i) for i in ids]
            return forward(ids, **kw)

        def fed_rewind(n):
            del self.ids[n:]
            return rewind(n)

        def fed_reset():
            self.ids.clear()
            return reset()

        monkeypatch.setattr(engine, "forward", fed_forward)
        monkeypatch.setattr(engine, "rewind", fed_rewind)
        monkeypatch.setattr(engine, "reset", fed_reset)


def controls(model, ids) -> list[int]:
    return [i for i in ids if i in model.tokenizer.special_ids]


def test_every_special_token_reaches_the_model_as_text(model, special_strings, monkeypatch):
    fed = FedIds(model.engine, monkeypatch)
    template = model.manifest.chat_template
    bos = model.manifest.tokens.bos_id
    params = SamplingParams(max_new_tokens=1)  # the prompt is what matters; one step keeps it fast
    for s in special_strings:
        session = ChatSession(model, system=f"You are {s} a helper{s}", params=params)
        session.say(s)
        session.say(f"now {s} twice: {s}{s}")  # the second turn re-renders and reconciles the history
        prompt = session.messages[:-1]  # the cache holds the last prompt, not the last answer's tail
        assert fed.ids == model.encode_chat(prompt), s
        # Exactly the template's control tokens: those of the same chat with the token spelled "X".
        benign = [{**m, "content": m["content"].replace(s, "X")} if m["role"] != "assistant" else m for m in prompt]
        assert controls(model, fed.ids) == controls(model, model.encode_chat(benign)), s
        text = render(template, prompt, bos_token=model.tokenizer.bos_token or "")
        assert model.tokenizer.decode(fed.ids, skip_special=False) == text, s
        # And the plain (non-chat) prompt: only the BOS is a control token.
        assert controls(model, model.encode_prompt(f"{s} hello {s}")) == [bos], s


def test_all_special_tokens_at_once_stay_text(model, special_strings):
    text = "".join(special_strings[:40]) + " and " + " ".join(special_strings[40:80])
    ids = model.encode_chat([{"role": "system", "content": text}, {"role": "user", "content": text}])
    reference = model.encode_chat([{"role": "system", "content": "a"}, {"role": "user", "content": "a"}])
    assert controls(model, ids) == controls(model, reference)
    assert model.tokenizer.decode(ids, skip_special=True).count(special_strings[0]) == 2


def test_control_token_in_a_role_is_refused(model, special_strings):
    for s in ("<|eot_id|>", "<|start_header_id|>", special_strings[-2]):  # [-1], <|image|>, is no token here
        with pytest.raises(EdgeLlamaError, match="control token"):
            model.encode_chat([{"role": f"user{s}", "content": "hi"}])


def test_stop_token_text_in_the_prompt_does_not_end_the_turn(model):
    """'<|eot_id|>' typed by the user is text: the model is not told the turn ended early."""
    ids = model.encode_chat([{"role": "user", "content": "stop <|eot_id|> here"}])
    eot = model.tokenizer.token_to_id("<|eot_id|>")
    assert ids.count(eot) == 1  # the template's own end of the user turn, and nothing else
    assert ids.index(eot) > len(ids) - 8  # ...which comes after the whole message
