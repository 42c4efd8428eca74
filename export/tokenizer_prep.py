"""Prepare the tokenizer files a bundle ships: fix what Llama 3 checkpoints get wrong, find the stop ids."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any, Callable

from edgellama.errors import EdgeLlamaError
from edgellama.export.config import LlamaConfig
from edgellama.runtime.bundle import LLAMA3_STOP_TOKENS, TokenInfo


@dataclass
class PreparedTokenizer:
    tokenizer_json: dict[str, Any]
    tokenizer_config: dict[str, Any]
    generation_config: dict[str, Any]
    chat_template: str | None
    tokens: TokenInfo


def prepare_tokenizer(source, cfg: LlamaConfig, warn: Callable[[str], None] = lambda m: None) -> PreparedTokenizer:
    from edgellama.runtime.chat_template import LLAMA3_CHAT_TEMPLATE

    if source.tokenizer_json is None:
        raise EdgeLlamaError("the source has no tokenizer.json: a bundle needs its tokenizer")
    tok = copy.deepcopy(source.tokenizer_json)
    try:
        added = tok.get("added_tokens") or []
        vocab = tok["model"]["vocab"]
    except (TypeError, KeyError, AttributeError):
        raise EdgeLlamaError("tokenizer.json is malformed (no model vocab)") from None

    # Llama 3.2's tokenizer lists <|image|> at 128256, one past the 128,256-row embedding: such ids
    # could never be embedded, so drop them rather than let a prompt index out of range.
    beyond = [a for a in added if int(a.get("id", -1)) >= cfg.vocab_size]
    if beyond:
        names = ", ".join(a.get("content", "?") for a in beyond)
        warn(f"dropping {len(beyond)} tokenizer token(s) beyond the model's vocabulary of {cfg.vocab_size}: {names}")
        tok["added_tokens"] = [a for a in added if int(a.get("id", -1)) < cfg.vocab_size]
        drop = {a.get("content") for a in beyond}
        if isinstance(vocab, dict):
            tok["model"]["vocab"] = {k: v for k, v in vocab.items() if not (k in drop or v >= cfg.vocab_size)}
    if isinstance(vocab, dict) and vocab and max(vocab.values()) >= cfg.vocab_size:
        raise EdgeLlamaError(f"tokenizer.json has ids up to {max(vocab.values())}, beyond the model's vocabulary "
                             f"of {cfg.vocab_size}")

    ids = {a["content"]: int(a["id"]) for a in tok.get("added_tokens", [])}
    if isinstance(vocab, dict):
        ids = {**{k: v for k, v in vocab.items() if k.startswith("<|")}, **ids}

    tcfg = dict(source.tokenizer_config or {})
    template = source.chat_template or tcfg.get("chat_template")
    if not template and "<|start_header_id|>" in ids and "<|eot_id|>" in ids:
        warn("the tokenizer has no chat_template: writing the standard Llama 3 template")
        template = LLAMA3_CHAT_TEMPLATE

    def token_id(value) -> int | None:
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            return ids.get(value)
        return None

    gen = dict(source.generation_config or {})
    eos: list[int] = []
    for cand in (cfg.eos_token_id, gen.get("eos_token_id"), token_id(tcfg.get("eos_token"))):
        for e in [cand] if isinstance(cand, int) else (cand or []):
            if isinstance(e, int) and e not in eos:
                eos.append(e)
    for name in LLAMA3_STOP_TOKENS:  # every Llama 3 stop token the vocabulary has
        if name in ids and ids[name] not in eos:
            eos.append(ids[name])
    eos = [e for e in eos if 0 <= e < cfg.vocab_size]
    if not eos:
        raise EdgeLlamaError("cannot tell the end-of-sequence token: no eos_token_id in the config or tokenizer")
    bos = cfg.bos_token_id if cfg.bos_token_id is not None else gen.get("bos_token_id")
    if bos is None:
        bos = token_id(tcfg.get("bos_token"))
    pad = gen.get("pad_token_id", token_id(tcfg.get("pad_token")))
    add_bos = bool(tcfg.get("add_bos_token", bos is not None))

    tcfg.pop("added_tokens_decoder", None)
    if template:
        tcfg["chat_template"] = template
    gen.update({"eos_token_id": eos, "bos_token_id": bos})
    if pad is not None:
        gen["pad_token_id"] = pad
    json.dumps(tok)  # fail here, not half-way through writing, if something is not serialisable
    return PreparedTokenizer(tok, tcfg, gen, template,
                             TokenInfo(bos_id=bos, eos_ids=eos, pad_id=pad if isinstance(pad, int) else None, add_bos=add_bos))
