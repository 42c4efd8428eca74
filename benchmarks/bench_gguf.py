"""Hugging Face Llama folder -> F16 GGUF that llama.cpp loads and quantizes, written tensor by tensor.

What llama.cpp's own converter does for Llama, re-done with the gguf package: its metadata keys,
its tensor names, the Q/K row permutation into interleaved RoPE pairs (the inverse of
edgellama.export.gguf_source.unpermute_qk), llama3 RoPE as a rope_freqs factor table, and
a gpt2-style BPE vocabulary from tokenizer.json.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

_LAYER = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_NORMAL, _USER_DEFINED, _CONTROL = 1, 4, 3  # llama.cpp token types


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate-half rows -> llama.cpp's interleaved pairs, per head (unpermute_qk undoes it)."""
    rows, cols = w.shape
    return np.ascontiguousarray(w.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols))


def llama3_rope_factors(head_dim: int, theta: float, scaling: dict) -> np.ndarray:
    """Per-frequency divisors of llama3 RoPE scaling, as llama.cpp stores them."""
    factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def _vocab(folder: Path, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    tok = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    by_id = {i: t for t, i in tok["model"]["vocab"].items()}
    kinds = {}
    for added in tok.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        kinds[added["id"]] = _CONTROL if added.get("special") else _USER_DEFINED
    # The embedding has vocab_size rows; tokens past it (Llama 3.2's <|image|>) cannot be looked up.
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [kinds.get(i, _NORMAL if i in by_id else _USER_DEFINED) for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"].get("merges", [])]
    return tokens, types, merges


def write_gguf(folder: str | os.PathLike, out: str | os.PathLike, *, pre: str, name: str) -> Path:
    """Write folder's checkpoint as an F16 GGUF (norms and rope factors F32). pre: llama.cpp pre-tokenizer name."""
    import gguf

    from edgellama.export.sources import load_hf_folder

    folder, out = Path(folder), Path(out)
    src = load_hf_folder(folder)
    c = src.config
    tmp = out.with_name(out.name + ".partial")
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_name(name)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    tokens, types, merges = _vocab(folder, c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    if c.bos_token_id is not None:
        w.add_bos_token_id(c.bos_token_id)
    if c.eos_token_id:
        w.add_eos_token_id(c.eos_token_id[0])

    names: list[tuple[str, str]] = [("model.embed_tokens.weight", "token_embd.weight"),
                                    ("model.norm.weight", "output_norm.weight")]
    if not c.tie_word_embeddings:
        names.append(("lm_head.weight", "output.weight"))
    for i in range(c.num_hidden_layers):
        names += [(f"model.layers.{i}.{hf}.weight", f"blk.{i}.{g}.weight") for hf, g in _LAYER.items()]

    def load(hf: str) -> np.ndarray:
        x = src.tensors.get(hf)
        if hf.endswith("q_proj.weight"):
            x = permute_qk(x, c.num_attention_heads)
        elif hf.endswith("k_proj.weight"):
            x = permute_qk(x, c.num_key_value_heads)
        return x.astype(np.float32 if x.ndim == 1 else np.float16)

    rope = None
    if c.rope_scaling is not None:
        s = c.rope_scaling
        rope = llama3_rope_factors(c.head_dim, c.rope_theta, {
            "factor": s.factor, "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings})
    # Tensor infos first, from shapes alone; then the data, one tensor in memory at a time.
    for hf, g in names:
        shape = src.tensors.shape(hf)
        dt = np.dtype(np.float32 if len(shape) == 1 else np.float16)
        w.add_tensor_info(g, shape, dt, int(np.prod(shape)) * dt.itemsize)
    if rope is not None:
        w.add_tensor_info("rope_freqs.weight", rope.shape, rope.dtype, rope.nbytes)
    w.write_header_to_file(tmp)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for hf, _ in names:
        w.write_tensor_data(load(hf))
    if rope is not None:
        w.write_tensor_data(rope)
    w.close()
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("hf", help="Hugging Face Llama folder")
    ap.add_argument("out", help="GGUF file to write")
    ap.add_argument("--pre", required=True, help="llama.cpp pre-tokenizer name (llama-bpe, smollm, ...)")
    ap.add_argument("--name", default=None, help="general.name (default: the folder's name)")
    args = ap.parse_args(argv)
    print(write_gguf(args.hf, args.out, pre=args.pre, name=args.name or Path(args.hf).name))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
