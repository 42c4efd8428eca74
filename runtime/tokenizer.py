"""The bundle's tokenizer: text <-> ids, chat prompts that user text cannot hijack, streaming decode."""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import re
import secrets
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tokenizers

from edgellama.errors import EdgeLlamaError
from edgellama.runtime.chat_template import render

# Tokens that end a turn or a document in the vocabularies we meet (Llama 3, ChatML, GPT-2 style).
EOS_TOKEN_NAMES = ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>", "<|im_end|>", "<|endoftext|>", "</s>")

# Sentinels standing in for message content while the template renders: characters from the
# supplementary private use area, which real prompts do not contain, plus a per-call random nonce
# so content cannot forge one.
_PUA_LO, _PUA_HI = 0xF0000, 0xFFFFD
_OPEN, _CLOSE = chr(_PUA_LO), chr(_PUA_LO + 1)
_INDEX_BASE = _PUA_LO + 0x1000
_PUA_RE = re.compile(f"[{chr(_PUA_LO)}-{chr(_PUA_HI)}]")


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json spells special tokens either as a string or as an AddedToken dict.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _config_template(config: dict) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    return template if isinstance(template, str) else None


class Tokenizer:
    """A `tokenizers` tokenizer plus the bits of tokenizer_config.json the runtime needs."""

    def __init__(self, backend: tokenizers.Tokenizer, config: dict | None = None,
                 chat_template: str | None = None) -> None:
        config = config or {}
        self._tok = backend
        # encode_special_tokens is a mutable switch on the shared backend; the lock makes
        # flip-encode atomic so concurrent callers never see each other's setting.
        self._lock = threading.Lock()
        self.bos_token: str | None = _token_content(config.get("bos_token"))
        self.eos_token: str | None = _token_content(config.get("eos_token"))
        self.chat_template: str | None = chat_template or _config_template(config)
        added = backend.get_added_tokens_decoder()
        self.special_ids: frozenset[int] = frozenset(i for i, t in added.items() if t.special)
        self._special_strings = tuple(added[i].content for i in sorted(self.special_ids))

    @classmethod
    def from_json_str(cls, json_str: str, config: dict | None = None, chat_template: str | None = None) -> Tokenizer:
        try:
            backend = tokenizers.Tokenizer.from_str(json_str)
        except Exception as e:  # the Rust side raises plain Exception for any parse failure
            raise EdgeLlamaError(f"malformed tokenizer.json: {' '.join(str(e).split())}") from None
        return cls(backend, config, chat_template)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load `path`/tokenizer.json, plus tokenizer_config.json and chat_template.jinja when present."""
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise EdgeLlamaError(f"no tokenizer.json in {path}")
        config: dict = {}
        cfg_file = path / "tokenizer_config.json"
        if cfg_file.is_file():
            try:
                config = json.loads(cfg_file.read_text(encoding="utf-8"))
            except (ValueError, RecursionError) as e:
                raise EdgeLlamaError(f"malformed {cfg_file}: {' '.join(str(e).split())[:200]}") from None
            if not isinstance(config, dict):
                raise EdgeLlamaError(f"malformed {cfg_file}: expected a JSON object")
        # transformers now saves the template as its own file, which wins over the config entry.
        jinja_file = path / "chat_template.jinja"
        template = jinja_file.read_text(encoding="utf-8") if jinja_file.is_file() else None
        try:
            text = tok_file.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise EdgeLlamaError(f"malformed {tok_file}: not UTF-8 text") from None
        try:
            return cls.from_json_str(text, config, template)
        except EdgeLlamaError as e:
            raise EdgeLlamaError(str(e).replace("tokenizer.json", str(tok_file), 1)) from None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def backend_json(self) -> str:
        """The tokenizer as tokenizer.json text (what grammar libraries build their vocabulary from)."""
        return self._tok.to_str()

    @functools.cached_property
    def vocab_digest(self) -> str:
        """sha256 of every (token string, id) pair, added tokens included: equal digests, equal vocabularies."""
        pairs = sorted(self._tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
        return hashlib.sha256(json.dumps(pairs, ensure_ascii=False).encode("utf-8")).hexdigest()

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def eos_candidates(self) -> list[int]:
        """Ids that should end generation: the turn/document terminators this vocabulary has."""
        names = EOS_TOKEN_NAMES + ((self.eos_token,) if self.eos_token else ())
        ids = (self._tok.token_to_id(n) for n in names)
        return sorted({i for i in ids if i is not None})

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Token ids of `text`, no BOS. Unless `allow_special`, control-token strings are plain text."""
        with self._lock:
            self._tok.encode_special_tokens = not allow_special
            return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def encode_chat(self, messages: Sequence[dict], template: str | None = None, *,
                    add_generation_prompt: bool = True, bos_token: str | None = None,
                    **template_vars: Any) -> list[int]:
        """Render a chat and tokenize it so only the template, never message content, yields control tokens.

        `template` defaults to the tokenizer's own; `bos_token`/`eos_token` default to its own tokens.
        """
        template = template if template is not None else self.chat_template
        if template is None:
            raise EdgeLlamaError("this tokenizer has no chat template; pass one explicitly")
        self._check_messages(messages)
        template_vars.setdefault("eos_token", self.eos_token or "")
        template_vars["bos_token"] = (self.bos_token or "") if bos_token is None else bos_token
        template_vars["add_generation_prompt"] = add_generation_prompt

        nonce = "".join(chr(_PUA_LO + 16 + secrets.randbelow(0xF00)) for _ in range(8))
        contents: list[str] = []
        masked = [self._mask(m, contents, nonce) for m in messages]
        skeleton = render(template, masked, **template_vars)
        parts = re.split(f"{_OPEN}{nonce}(.){_CLOSE}", skeleton, flags=re.DOTALL)
        pieces, order = parts[0::2], [ord(c) - _INDEX_BASE for c in parts[1::2]]
        if any(_PUA_RE.search(p) for p in pieces):
            raise EdgeLlamaError("chat template rewrites message content in a way that cannot be tokenized safely")
        rendered = render(template, list(messages), **template_vars)
        shown = _align(pieces, [contents[i] for i in order], rendered)
        if shown is None:
            # The template transforms content beyond trimming (e.g. drops reasoning): keep the
            # template's structure and the content verbatim rather than trust a guessed split.
            shown = [contents[i] for i in order]
        return self._encode_layout(pieces, shown)

    def _encode_layout(self, pieces: list[str], shown: list[str]) -> list[int]:
        """Ids for pieces[0] + shown[0] + pieces[1] + ...: control tokens only from `pieces`."""
        text = pieces[0]
        spans: list[tuple[int, int]] = []
        for content, piece in zip(shown, pieces[1:]):
            if content:
                spans.append((len(text), len(text) + len(content)))
            text += content + piece
        # Usually no control token touches content, and then encoding the whole text is safe and
        # keeps the ids identical to a plain encode (BPE can merge across piece boundaries).
        with self._lock:
            self._tok.encode_special_tokens = False
            whole = self._tok.encode(text, add_special_tokens=False)
        starts = [start for start, _ in spans]
        if not any(_overlaps(a, b, spans, starts) for i, (a, b) in zip(whole.ids, whole.offsets)
                   if i in self.special_ids):
            return whole.ids
        ids = self.encode(pieces[0], allow_special=True)
        for content, piece in zip(shown, pieces[1:]):
            ids += self.encode(content, allow_special=False)
            ids += self.encode(piece, allow_special=True)
        return ids

    def _check_messages(self, messages: Sequence[dict]) -> None:
        if not isinstance(messages, (list, tuple)):
            raise EdgeLlamaError("messages must be a list of {'role': ..., 'content': ...} objects")
        for n, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"]:
                raise EdgeLlamaError(f"message {n} must be an object with a non-empty string 'role'")
            # Roles go into the template's own text, so they must not smuggle control tokens either.
            if any(s in m["role"] for s in self._special_strings):
                raise EdgeLlamaError(f"message {n} role {m['role']!r} contains a control token")
            content = m.get("content")
            if content is not None and not isinstance(content, (str, list)):
                raise EdgeLlamaError(f"message {n} content must be a string or a list of parts")

    @staticmethod
    def _mask(message: dict, contents: list[str], nonce: str) -> dict:
        def sentinel(text: str) -> str:
            if _INDEX_BASE + len(contents) > _PUA_HI:
                raise EdgeLlamaError("too many message parts in one conversation")
            contents.append(text)
            return f"{_OPEN}{nonce}{chr(_INDEX_BASE + len(contents) - 1)}{_CLOSE}"

        content = message.get("content")
        if isinstance(content, str):
            return {**message, "content": sentinel(content)}
        if isinstance(content, list):  # multimodal-style parts: [{"type": "text", "text": ...}, ...]
            parts = [{**p, "text": sentinel(p["text"])} if isinstance(p, dict) and isinstance(p.get("text"), str)
                     else p for p in content]
            return {**message, "content": parts}
        return message  # no content key at all stays absent: templates test `'content' in message`


def _align(pieces: list[str], contents: list[str], rendered: str) -> list[str] | None:
    """How each content appears in `rendered` (verbatim or trimmed, as templates do), or None.

    `rendered` must be exactly pieces[0] + shown[0] + pieces[1] + ... + pieces[-1].
    """
    shown: list[str] = []
    pos = 0
    for k, content in enumerate(contents):
        if not rendered.startswith(pieces[k], pos):
            return None
        pos += len(pieces[k])
        following = pieces[k + 1]
        for candidate in dict.fromkeys((content, content.strip(), content.lstrip(), content.rstrip())):
            if rendered.startswith(candidate + following, pos):
                break
        else:
            return None
        shown.append(candidate)
        pos += len(candidate)
    return shown if rendered[pos:] == pieces[-1] else None


def _overlaps(a: int, b: int, spans: list[tuple[int, int]], starts: list[int]) -> bool:
    """Does [a, b) share a character with one of the sorted, disjoint, non-empty `spans`?"""
    k = bisect.bisect_left(starts, b) - 1  # the last span starting before b
    return k >= 0 and spans[k][1] > a


class IncrementalDecoder:
    """Turns a stream of token ids into text deltas that never split a character.

    Each step decodes only a short window: the tokens since the previous emission plus the chunk
    emitted before that, whose text is known. Context matters because some decoders (SentencePiece
    style) strip a leading space only at the start of a decode.
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special
        self._window: list[int] = []   # ids from the context chunk onwards
        self._read = 0                  # window[:read] is the already-emitted context chunk
        self._context_text = ""         # decode(window[:read])

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special=self._skip)

    def add(self, token_id: int) -> str:
        """Feed one id; return the text it completes (often "", when a character is still partial)."""
        self._window.append(int(token_id))
        text = self._decode(self._window)
        # A trailing U+FFFD means the bytes of the last character have not all arrived yet.
        if len(text) <= len(self._context_text) or text.endswith("\ufffd"):
            return ""
        delta = text[len(self._context_text):]
        self._window = self._window[self._read:]
        self._read = len(self._window)
        self._context_text = self._decode(self._window)
        return delta

    def flush(self) -> str:
        """Whatever is held back at the end of generation (possibly an incomplete character)."""
        text = self._decode(self._window)
        delta = text[len(self._context_text):] if len(text) > len(self._context_text) else ""
        self._window, self._read, self._context_text = [], 0, ""
        return delta
