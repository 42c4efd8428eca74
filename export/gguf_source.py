"""A llama.cpp GGUF file as a model source: HF config, HF-named float32 tensors, HF tokenizer.json.

llama.cpp's converter reorders the rows of every Q and K head from HF's rotate-half
layout into interleaved (even, odd) pairs; the store undoes that so the tensors are
interchangeable with a Hugging Face checkpoint. Llama 3 RoPE scaling survives in a
GGUF only as per-frequency factors (`rope_freqs.weight`); we solve those back for
the llama3 parameters, and refuse factors that no llama3 setting reproduces.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from edgellama.errors import EdgeLlamaError
from edgellama.export.config import LlamaConfig, rope_inv_freq
from edgellama.export.gguf_reader import GGUFFile
from edgellama.export.sources import Source

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER_TENSOR = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")
_IGNORED = re.compile(r"^blk\.\d+\.attn_rot_embd$")  # old converters' precomputed RoPE tables: recomputed anyway
ROPE_FREQS = "rope_freqs.weight"

# llama.cpp token types (llama_token_type)
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level(use_regex: bool) -> dict[str, Any]:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


# tokenizer.ggml.pre -> (HF pre_tokenizer, is Llama 3). llama.cpp's pre-tokenizer regexes, in HF's spelling.
# Llama 3 (tiktoken-born) looks whole words up before merging and adds BOS, as llama.cpp does for these names.
_PRE_TOKENIZERS: dict[str, tuple[dict[str, Any], bool]] = {
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3"), ({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": _LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
        _byte_level(False)]}, True)),
    "smollm": ({"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, _byte_level(True)]}, False),
    "gpt2": (_byte_level(True), False),
}


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order: per head, rows (0, d/2, 1, d/2+1, ...) back to (0, 1, ..., d-1)."""
    rows, cols = w.shape
    half = rows // n_heads // 2
    return np.ascontiguousarray(w.reshape(n_heads, half, 2, cols).swapaxes(1, 2).reshape(rows, cols))


def _expected_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    h, q, kv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    per_layer = {
        "self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, q), "mlp.gate_proj": (cfg.intermediate_size, h),
        "mlp.up_proj": (cfg.intermediate_size, h), "mlp.down_proj": (h, cfg.intermediate_size),
        "input_layernorm": (h,), "post_attention_layernorm": (h,),
    }
    out = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, h)
    for i in range(cfg.num_hidden_layers):
        out.update({f"model.layers.{i}.{k}.weight": v for k, v in per_layer.items()})
    return out


class GGUFStore:
    """HF-named tensors of a GGUF file, dequantized to float32 one at a time."""

    fresh_arrays = True  # every get() dequantizes into a new array

    def __init__(self, gguf: GGUFFile, hf_to_gguf: dict[str, str], config: LlamaConfig):
        self._file, self._names, self._config = gguf, hf_to_gguf, config

    def names(self) -> list[str]:
        return list(self._names)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file.tensors[self._names[name]].shape

    def get(self, name: str) -> np.ndarray:
        w = self._file.get(self._names[name])
        if name.endswith("q_proj.weight"):
            return unpermute_qk(w, self._config.num_attention_heads)
        if name.endswith("k_proj.weight"):
            return unpermute_qk(w, self._config.num_key_value_heads)
        return w


def _map_tensor_names(gguf: GGUFFile, n_layers: int) -> dict[str, str]:
    label = gguf.path.name
    out: dict[str, str] = {}
    for name in gguf.tensors:
        if name == ROPE_FREQS or _IGNORED.match(name):
            continue
        if name in _GLOBAL_NAMES:
            out[_GLOBAL_NAMES[name]] = name
            continue
        m = _LAYER_TENSOR.match(name)
        if not m or m.group(2) not in _LAYER_NAMES:
            raise EdgeLlamaError(f"{label}: unexpected tensor {name!r} for a Llama model")
        layer = int(m.group(1))
        if layer >= n_layers:
            raise EdgeLlamaError(f"{label}: tensor {name!r} is beyond llama.block_count ({n_layers})")
        out[f"model.layers.{layer}.{_LAYER_NAMES[m.group(2)]}.weight"] = name
    return out


def _llama3_rope(factors: np.ndarray, theta: float, head_dim: int, label: str) -> dict[str, Any] | None:
    """Solve rope_freqs factors for llama3 scaling parameters (None when they are all 1).

    Factors are 1 for short wavelengths, `factor` for long ones, and 1 / ((1 - s) / factor + s) in
    between, with s linear in 1 / wavelength. The fit fixes only the two boundary wavelengths
    (original_max_position_embeddings / {low,high}_freq_factor); we pick the integer
    original_max_position_embeddings that makes low_freq_factor ~ 1, Llama 3's own choice.
    """
    f = factors.astype(np.float64)
    if f.shape != (head_dim // 2,):
        raise EdgeLlamaError(f"{label}: {ROPE_FREQS} has shape {list(f.shape)}, expected [{head_dim // 2}]")
    if np.allclose(f, 1.0, rtol=0, atol=1e-6):
        return None
    factor = float(f.max())
    wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    mid = (f > 1 + 1e-6) & (f < factor * (1 - 1e-6))
    if factor <= 1 or mid.sum() < 2:
        raise EdgeLlamaError(f"{label}: {ROPE_FREQS} holds frequency factors edgellama cannot express as "
                             "llama3 rope scaling (too few transition frequencies to solve for its parameters)")
    smooth = (1 / f[mid] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(1 / wavelen[mid], smooth, 1)  # smooth = L/(hi-lo) / wavelen - lo/(hi-lo)
    if slope <= 0 or intercept >= 0:
        raise EdgeLlamaError(f"{label}: {ROPE_FREQS} does not follow llama3 rope scaling")
    low_wavelen, high_wavelen = -slope / intercept, slope / (1 - intercept)
    original = max(1, round(low_wavelen))
    return {
        "rope_type": "llama3",
        "factor": float(f"{factor:.6g}"),
        "low_freq_factor": float(f"{original / low_wavelen:.6g}"),
        "high_freq_factor": float(f"{original / high_wavelen:.6g}"),
        "original_max_position_embeddings": original,
    }


def _hf_config(gguf: GGUFFile) -> dict[str, Any]:
    meta, label = gguf.metadata, gguf.path.name
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise EdgeLlamaError(f"unsupported architecture {arch!r}: edgellama exports Llama models only")
    if meta.get("llama.expert_count", 0):
        raise EdgeLlamaError(f"{label}: mixture-of-experts Llama variants are not supported")

    def need(key: str) -> Any:
        if f"llama.{key}" not in meta:
            raise EdgeLlamaError(f"{label}: GGUF metadata is missing 'llama.{key}'")
        return meta[f"llama.{key}"]

    heads = need("attention.head_count")
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": need("embedding_length"),
        "intermediate_size": need("feed_forward_length"),
        "num_hidden_layers": need("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": meta.get("llama.attention.head_count_kv", heads),
        "rms_norm_eps": meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": meta.get("llama.rope.freq_base", 10000.0),
        "max_position_embeddings": meta.get("llama.context_length", 2048),
        "tie_word_embeddings": "output.weight" not in gguf.tensors,
        "hidden_act": "silu",
    }
    if "llama.attention.key_length" in meta:
        cfg["head_dim"] = meta["llama.attention.key_length"]
    if meta.get("llama.attention.value_length", cfg.get("head_dim")) != cfg.get("head_dim"):
        raise EdgeLlamaError(f"{label}: attention key and value lengths differ; Llama uses one head_dim")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = meta.get("llama.vocab_size", len(tokens) if isinstance(tokens, list) else None)
    if vocab is None and "token_embd.weight" in gguf.tensors:
        vocab = gguf.tensors["token_embd.weight"].shape[0]
    cfg["vocab_size"] = vocab
    if isinstance(tokens, list) and isinstance(vocab, int) and len(tokens) > vocab:
        raise EdgeLlamaError(f"{label}: the tokenizer has {len(tokens)} tokens but the model only {vocab}")
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling != "none":  # linear / yarn: LlamaConfig.from_hf names what it cannot take
        cfg["rope_scaling"] = {"rope_type": scaling, "factor": meta.get("llama.rope.scaling.factor")}
    for key, name in (("bos_token_id", "bos"), ("eos_token_id", "eos")):
        if f"tokenizer.ggml.{name}_token_id" in meta:
            cfg[key] = meta[f"tokenizer.ggml.{name}_token_id"]
    return cfg


def _special_ids(meta: dict[str, Any], n_tokens: int, label: str) -> dict[str, int]:
    out = {}
    for name in ("bos", "eos", "eot", "eom", "unknown", "padding"):
        key = f"tokenizer.ggml.{name}_token_id"
        if key in meta:
            value = meta[key]
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n_tokens:
                raise EdgeLlamaError(f"{label}: {key} = {value!r} is not a token id (vocabulary of {n_tokens})")
            out[name] = value
    return out


def tokenizer_from_metadata(
    meta: dict[str, Any], label: str = "gguf"
) -> tuple[dict[str, Any] | None, dict[str, Any], dict[str, int]]:
    """(tokenizer.json, tokenizer_config, special token ids) rebuilt from tokenizer.ggml.* metadata."""
    model = meta.get("tokenizer.ggml.model")
    if model in (None, "none", "no_vocab"):
        return None, {}, {}
    if model == "llama":
        raise EdgeLlamaError(f"{label}: SentencePiece (Llama 2 style) tokenizers are not supported; "
                             "edgellama exports Llama 3 models with byte-level BPE tokenizers")
    if model != "gpt2":
        raise EdgeLlamaError(f"{label}: unsupported tokenizer model {model!r} (edgellama reads byte-level BPE, 'gpt2')")
    pre = meta.get("tokenizer.ggml.pre")
    if pre not in _PRE_TOKENIZERS:
        known = ", ".join(sorted(_PRE_TOKENIZERS))
        raise EdgeLlamaError(f"{label}: unsupported tokenizer.ggml.pre {pre!r} (supported: {known})")
    pre_tokenizer, llama3 = _PRE_TOKENIZERS[pre]
    tokens, merges = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.merges")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise EdgeLlamaError(f"{label}: tokenizer.ggml.tokens is missing or not a list of strings")
    if not isinstance(merges, list) or not all(isinstance(m, str) and m.count(" ") == 1 for m in merges):
        raise EdgeLlamaError(f"{label}: tokenizer.ggml.merges is missing or not a list of 'left right' pairs")
    types = meta.get("tokenizer.ggml.token_type")
    if types is None:
        types = np.ones(len(tokens), dtype=np.int32)
    if not isinstance(types, np.ndarray) or types.shape != (len(tokens),) or types.dtype.kind not in "iu":
        raise EdgeLlamaError(f"{label}: tokenizer.ggml.token_type does not give one integer type per token")
    ids = _special_ids(meta, len(tokens), label)

    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)  # a repeated string keeps its first id, as a dict must
    added = [
        {"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": bool(types[i] != _USER_DEFINED)}
        for i in np.flatnonzero(np.isin(types, (_UNKNOWN, _CONTROL, _USER_DEFINED))).tolist()
    ]
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", llama3))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    post: dict[str, Any] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    if add_bos and "bos" not in ids:
        raise EdgeLlamaError(f"{label}: tokenizer.ggml.add_bos_token is set but there is no bos_token_id")
    if add_eos and "eos" not in ids:
        raise EdgeLlamaError(f"{label}: tokenizer.ggml.add_eos_token is set but there is no eos_token_id")
    if add_bos or add_eos:
        specials = [tokens[ids[n]] for n, on in (("bos", add_bos), ("eos", add_eos)) if on]

        def seq(part: str, type_id: int) -> list[dict[str, Any]]:
            body = [{"Sequence": {"id": part, "type_id": type_id}}]
            pre_ = [{"SpecialToken": {"id": tokens[ids["bos"]], "type_id": type_id}}] if add_bos else []
            post_ = [{"SpecialToken": {"id": tokens[ids["eos"]], "type_id": type_id}}] if add_eos else []
            return pre_ + body + post_

        post = {"type": "Sequence", "processors": [post, {
            "type": "TemplateProcessing", "single": seq("A", 0), "pair": seq("A", 0) + seq("B", 1),
            "special_tokens": {t: {"id": t, "ids": [vocab[t]], "tokens": [t]} for t in specials},
        }]}
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": llama3,
            "vocab": vocab, "merges": [m.split(" ") for m in merges],
        },
    }
    try:
        from tokenizers import Tokenizer

        Tokenizer.from_str(json.dumps(tokenizer_json))
    except Exception as exc:  # tokenizers reports malformed vocab/merges as a bare Exception
        why = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise EdgeLlamaError(f"{label}: tokenizer metadata does not form a valid tokenizer ({why})") from None

    tokenizer_config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast",
                                        "clean_up_tokenization_spaces": False,
                                        "add_bos_token": add_bos, "add_eos_token": add_eos}
    for name, key in (("bos", "bos_token"), ("eos", "eos_token"), ("unknown", "unk_token"), ("padding", "pad_token")):
        if name in ids:
            tokenizer_config[key] = tokens[ids[name]]
    template = meta.get("tokenizer.chat_template")
    if isinstance(template, str):
        tokenizer_config["chat_template"] = template
    return tokenizer_json, tokenizer_config, ids


def load_gguf(path: str | os.PathLike) -> Source:
    """Open a llama.cpp GGUF file of a Llama model. Raises EdgeLlamaError with a one-line reason otherwise."""
    gguf = GGUFFile(path)
    label = gguf.path.name
    cfg = _hf_config(gguf)
    tokenizer_json, tokenizer_config, ids = tokenizer_from_metadata(gguf.metadata, label)
    stops = list(dict.fromkeys(ids[n] for n in ("eos", "eot", "eom") if n in ids))  # eot: chat turns end there
    if stops:
        cfg["eos_token_id"] = stops if len(stops) > 1 else stops[0]
    if ROPE_FREQS in gguf.tensors:
        partial = LlamaConfig.from_hf(cfg)  # validated theta and head_dim before solving with them
        scaling = _llama3_rope(gguf.get(ROPE_FREQS), partial.rope_theta, partial.head_dim, label)
        if scaling is not None:
            cfg["rope_scaling"] = scaling
    config = LlamaConfig.from_hf(cfg)
    if ROPE_FREQS in gguf.tensors and config.rope_scaling is not None:
        base = rope_inv_freq(LlamaConfig.from_hf({**cfg, "rope_scaling": None}))
        if not np.allclose(rope_inv_freq(config), base / gguf.get(ROPE_FREQS), rtol=1e-4, atol=0):
            raise EdgeLlamaError(f"{label}: {ROPE_FREQS} does not follow llama3 rope scaling")
    rope_dims = gguf.metadata.get("llama.rope.dimension_count", config.head_dim)
    if rope_dims != config.head_dim:
        raise EdgeLlamaError(f"{label}: partial rotary embeddings ({rope_dims} of {config.head_dim} dims) "
                             "are not supported")

    names = _map_tensor_names(gguf, config.num_hidden_layers)
    expected = _expected_shapes(config)
    for hf_name, shape in expected.items():
        if hf_name not in names:
            raise EdgeLlamaError(f"{label}: missing tensor for {hf_name}")
        got = gguf.tensors[names[hf_name]].shape
        if got != shape:
            raise EdgeLlamaError(f"{label}: tensor {names[hf_name]!r} has shape {list(got)}, "
                                 f"but the config implies {list(shape)} for {hf_name}")
    generation = None
    if ids:
        generation = {k: v for k, v in (("bos_token_id", ids.get("bos")), ("eos_token_id", cfg.get("eos_token_id")))
                      if v is not None}
    return Source(
        config=config,
        tensors=GGUFStore(gguf, names, config),
        description=f"gguf:{Path(path).name}",
        tokenizer_json=tokenizer_json,
        tokenizer_config=tokenizer_config,
        generation_config=generation,
        chat_template=tokenizer_config.get("chat_template"),
        hf_config=config.to_hf(),
    )
