"""GGUF source: strict parsing, dequantization, Q/K un-permutation, llama3 RoPE, tokenizer, real SmolLM2."""

from __future__ import annotations

import json
import math
import struct
import time

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from edgellama.errors import EdgeLlamaError
from edgellama.export.gguf_reader import GGUFFile
from edgellama.export.gguf_source import load_gguf, tokenizer_from_metadata

Q = gguf.GGMLQuantizationType
HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 64, 128, 2, 4, 2, 16
THETA = 1000.0
SPECIALS = ["<|begin_of_text|>", "<|eot_id|>", "<|user|>"]
# HF -> llama.cpp tensor names, written out as the spec states them (the source maps the other way).
TO_GGUF = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
LAYER_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                 "post_attention_layernorm": "ffn_norm"}


def gguf_name(hf: str) -> str:
    if hf in TO_GGUF:
        return TO_GGUF[hf]
    _, _, layer, *mid, _ = hf.split(".")
    return f"blk.{layer}.{LAYER_TO_GGUF['.'.join(mid)]}.weight"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What convert_hf_to_gguf.py does to Q/K: new row 2j+p of a head is old row j + p*d/2."""
    d = w.shape[0] // n_head
    src = [h * d + j // 2 + (j % 2) * (d // 2) for h in range(n_head) for j in range(d)]
    return w[src]


def llama3_rope_factors(theta, head_dim, factor, low, high, original) -> np.ndarray:
    """llama.cpp's rope_freqs.weight for a llama3 rope_scaling (its converter's formula)."""
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            s = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - s) / factor + s))
    return np.array(out, dtype=np.float32)


@pytest.fixture(scope="module")
def byte_bpe() -> Tokenizer:
    """A tiny trained byte-level BPE (GPT-2 pre-tokenization) with a few control tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["the quick brown fox jumps over the lazy dog", "hello world, hello there",
              "what is the capital of France?"]
    tok.train_from_iterator(corpus * 20, trainer)
    return tok


def tokenizer_parts(tok: Tokenizer) -> tuple[list[str], list[int], list[str]]:
    d = json.loads(tok.to_str())
    vocab = d["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    types = [3 if t in SPECIALS else 1 for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in d["model"]["merges"]]
    return tokens, types, merges


def random_llama(vocab: int, tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """HF-layout weights scaled so attention is far from uniform (a wrong Q/K row order shows in logits)."""
    rng = np.random.default_rng(seed)
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    shapes = {"model.embed_tokens.weight": (vocab, HIDDEN), "model.norm.weight": (HIDDEN,)}
    if not tied:
        shapes["lm_head.weight"] = (vocab, HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (q, HIDDEN), p + "self_attn.k_proj.weight": (kv, HIDDEN),
                   p + "self_attn.v_proj.weight": (kv, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, q),
                   p + "mlp.gate_proj.weight": (INTER, HIDDEN), p + "mlp.up_proj.weight": (INTER, HIDDEN),
                   p + "mlp.down_proj.weight": (HIDDEN, INTER), p + "input_layernorm.weight": (HIDDEN,),
                   p + "post_attention_layernorm.weight": (HIDDEN,)}
    sd = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            sd[name] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            sd[name] = (rng.standard_normal(shape) * (1.5 / math.sqrt(shape[1]))).astype(np.float32)
    return sd


def write_llama_gguf(path, sd, tok_parts, *, qtype=Q.F32, arch="llama", pre="gpt2", rope_freqs=None,
                     permute=True, extra=None, kv=None):
    tokens, types, merges = tok_parts
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(1024)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(THETA)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|begin_of_text|>"))
    w.add_eos_token_id(tokens.index("<|eot_id|>"))
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}<|user|>{{ m['content'] }}<|eot_id|>{% endfor %}")
    for key, (value, vtype) in (kv or {}).items():
        w.add_key_value(key, value, vtype)
    for hf, arr in sd.items():
        if permute and hf.endswith("q_proj.weight"):
            arr = llama_cpp_permute(arr, HEADS)
        elif permute and hf.endswith("k_proj.weight"):
            arr = llama_cpp_permute(arr, KV_HEADS)
        if arr.ndim == 2 and qtype != Q.F32:  # llama.cpp keeps 1-D norms in F32
            w.add_tensor(gguf_name(hf), gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name(hf), arr)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs)
    for name, arr in (extra or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def hf_model(config: dict, sd: dict[str, np.ndarray]):
    import transformers
    from transformers.initialization import no_init_weights

    with no_init_weights():  # weights come from sd; skipping the random init keeps SmolLM2 fast
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}
    if config.get("tie_word_embeddings"):
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval()


def logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


# --- tiny synthetic models -----------------------------------------------------------------------

def test_unpermute_restores_hf_rows_and_llama3_rope_gives_same_logits(tmp_path, byte_bpe):
    parts = tokenizer_parts(byte_bpe)
    sd = random_llama(len(parts[0]), tied=False)
    rope = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=16.0, original_max_position_embeddings=256)
    freqs = llama3_rope_factors(THETA, HEAD_DIM, rope["factor"], rope["low_freq_factor"],
                                rope["high_freq_factor"], rope["original_max_position_embeddings"])
    assert 1 < len(set(freqs.tolist())) < len(freqs)  # some, not all, frequencies are scaled
    path = write_llama_gguf(tmp_path / "tiny.gguf", sd, parts, rope_freqs=freqs)
    src = load_gguf(path)

    assert src.description == "gguf:tiny.gguf"
    assert sorted(src.tensors.names()) == sorted(sd)
    for name, ref in sd.items():
        assert src.tensors.shape(name) == ref.shape
        got = src.tensors.get(name)
        assert got.dtype == np.float32 and np.array_equal(got, ref), name
    raw_q = GGUFFile(path).get("blk.0.attn_q.weight")
    assert not np.array_equal(raw_q, sd["model.layers.0.self_attn.q_proj.weight"])  # the file really is permuted

    c = src.config
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (HIDDEN, INTER, LAYERS)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (HEADS, KV_HEADS, HEAD_DIM)
    assert (c.vocab_size, c.max_position_embeddings, c.rope_theta, c.rms_norm_eps) == (len(parts[0]), 1024, THETA, 1e-5)
    assert not c.tie_word_embeddings
    assert c.rope_scaling is not None
    assert c.rope_scaling.original_max_position_embeddings == 256
    for key in ("factor", "low_freq_factor", "high_freq_factor"):
        assert getattr(c.rope_scaling, key) == pytest.approx(rope[key], rel=1e-4)

    reference = hf_model({**c.to_hf(), "rope_scaling": {"rope_type": "llama3", **rope},
                          "rope_parameters": {"rope_type": "llama3", "rope_theta": THETA, **rope}}, sd)
    loaded = hf_model(c.to_hf(), {n: src.tensors.get(n) for n in src.tensors.names()})
    ids = byte_bpe.encode("what is the capital of France? the quick brown fox").ids * 3
    want = logits(reference, ids)
    np.testing.assert_allclose(logits(loaded, ids), want, atol=2e-5, rtol=1e-5)

    # The check above can fail: GGUF's own row order, or RoPE without the llama3 scaling, move the logits.
    unfixed = {**sd, "model.layers.0.self_attn.q_proj.weight": raw_q,
               "model.layers.0.self_attn.k_proj.weight": GGUFFile(path).get("blk.0.attn_k.weight")}
    assert np.abs(logits(hf_model(c.to_hf(), unfixed), ids) - want).max() > 1e-2
    plain = {**c.to_hf(), "rope_scaling": None, "rope_parameters": {"rope_type": "default", "rope_theta": THETA}}
    assert np.abs(logits(hf_model(plain, sd), ids) - want).max() > 1e-2


# Worst-case |error| per element as a fraction of the tensor's max |w|: half a step of each format's grid
# (Q4_0 a whole step, for the clamp at +7), plus 1e-3 for scales stored in f16.
QUANT_TOLERANCE = {Q.F16: 1e-3, Q.BF16: 4e-3, Q.Q8_0: 1 / 254 + 1e-3, Q.Q4_0: 1 / 8 + 1e-3, Q.Q4_1: 1 / 15 + 1e-3}


@pytest.mark.parametrize("qtype", list(QUANT_TOLERANCE), ids=lambda q: q.name)
def test_quantized_tensors_dequantize_to_hf_layout(tmp_path, byte_bpe, qtype):
    parts = tokenizer_parts(byte_bpe)
    sd = random_llama(len(parts[0]), tied=True, seed=1)
    src = load_gguf(write_llama_gguf(tmp_path / f"{qtype.name}.gguf", sd, parts, qtype=qtype))
    assert src.config.tie_word_embeddings and "lm_head.weight" not in src.tensors.names()
    for name, ref in sd.items():
        got = src.tensors.get(name)
        assert got.dtype == np.float32 and got.shape == ref.shape, name
        if ref.ndim == 1:
            assert np.array_equal(got, ref)
            continue
        # Exactly what the format stores: gguf's own round trip, read in the file's (permuted) row order.
        heads = HEADS if "q_proj" in name else KV_HEADS if "k_proj" in name else None
        stored = llama_cpp_permute(ref, heads) if heads else ref
        expect = gguf.quants.dequantize(gguf.quants.quantize(stored, qtype), qtype)
        assert np.array_equal(llama_cpp_permute(got, heads) if heads else got, expect), name
        scale = np.abs(ref).max()
        assert np.abs(got - ref).max() <= QUANT_TOLERANCE[qtype] * scale, name


def ref_q4_k(block: bytes) -> np.ndarray:
    """ggml's dequantize_row_q4_K for one 256-value block, element by element."""
    d, dmin = np.frombuffer(block[:4], "<f2").astype(np.float64)
    sc, qs = block[4:16], block[16:144]

    def scale_min(j):
        if j < 4:
            return sc[j] & 63, sc[j + 4] & 63
        return (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4), (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)

    out = []
    for j in range(8):
        s, m = scale_min(j)
        chunk = qs[32 * (j // 2): 32 * (j // 2) + 32]
        out += [d * s * ((b >> 4) if j % 2 else (b & 0xF)) - dmin * m for b in chunk]
    return np.array(out)


def ref_q6_k(block: bytes) -> np.ndarray:
    """ggml's dequantize_row_q6_K for one 256-value block."""
    ql, qh = block[:128], block[128:192]
    sc = np.frombuffer(block[192:208], np.int8).astype(np.float64)
    d = float(np.frombuffer(block[208:210], "<f2")[0])
    y = np.zeros(256)
    for n in range(2):
        L, H, S = ql[64 * n:], qh[32 * n:], sc[8 * n:]
        for l in range(32):
            i = l // 16
            y[128 * n + l] = d * S[i] * (((L[l] & 0xF) | ((H[l] & 3) << 4)) - 32)
            y[128 * n + l + 32] = d * S[i + 2] * (((L[l + 32] & 0xF) | (((H[l] >> 2) & 3) << 4)) - 32)
            y[128 * n + l + 64] = d * S[i + 4] * (((L[l] >> 4) | (((H[l] >> 4) & 3) << 4)) - 32)
            y[128 * n + l + 96] = d * S[i + 6] * (((L[l + 32] >> 4) | (((H[l] >> 6) & 3) << 4)) - 32)
    return y


@pytest.mark.parametrize("qtype,ref,scale_at", [(Q.Q4_K, ref_q4_k, (0, 4)), (Q.Q6_K, ref_q6_k, (208,))],
                         ids=["Q4_K", "Q6_K"])
def test_k_quants_match_ggml_formula(tmp_path, qtype, ref, scale_at):
    """gguf's Python writer cannot quantize K-quants, so the blocks are random bytes with sane f16 scales."""
    rng = np.random.default_rng(7)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows, blocks_per_row = 3, 2
    raw = rng.integers(0, 256, size=(rows, blocks_per_row, type_size), dtype=np.uint8)
    for at in scale_at:
        scales = rng.uniform(0.001, 0.05, size=(rows, blocks_per_row)).astype("<f2")
        raw[..., at:at + 2] = scales[..., None].view(np.uint8)
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    w.add_tensor("w", raw.reshape(rows, -1), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = GGUFFile(tmp_path / "k.gguf")
    assert f.tensors["w"].qtype == qtype and f.tensors["w"].ne == (blocks_per_row * block, rows)
    # Read on demand into memory of its own (a mapping would keep the file's pages in RSS).
    assert not isinstance(f.raw("w"), np.memmap) and f.raw("w").tobytes() == raw.tobytes()
    got = f.get("w")
    want = np.stack([np.concatenate([ref(raw[r, b].tobytes()) for b in range(blocks_per_row)]) for r in range(rows)])
    assert got.shape == (rows, blocks_per_row * block)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_metadata_value_types_and_custom_alignment(tmp_path):
    V = gguf.GGUFValueType
    values = {
        "t.u8": (200, V.UINT8), "t.i8": (-100, V.INT8), "t.u16": (60000, V.UINT16), "t.i16": (-30000, V.INT16),
        "t.u32": (4_000_000_000, V.UINT32), "t.i32": (-2_000_000_000, V.INT32), "t.f32": (0.1, V.FLOAT32),
        "t.u64": (2**63 + 5, V.UINT64), "t.i64": (-(2**62), V.INT64), "t.f64": (math.pi, V.FLOAT64),
        "t.bool": (True, V.BOOL), "t.str": ("héllo ✓", V.STRING),
        "t.ints": ([1, -2, 3], V.ARRAY), "t.strs": (["a", "", "ç"], V.ARRAY), "t.nested": ([[1, 2], [3]], V.ARRAY),
    }
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    w.add_custom_alignment(64)
    for key, (v, t) in values.items():
        w.add_key_value(key, v, t)
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.arange(4, dtype=np.float16)
    w.add_tensor("a", a)
    w.add_tensor("b", b)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = GGUFFile(tmp_path / "m.gguf")
    meta = f.metadata
    assert f.version == 3 and f.alignment == 64 and f.data_offset % 64 == 0
    assert meta["general.architecture"] == "llama"
    for key, (v, t) in values.items():
        got = meta[key]
        if key == "t.nested":
            got = [x.tolist() for x in got]
        elif isinstance(got, np.ndarray):
            got = got.tolist()
        assert got == v and type(got) is type(v), key
    assert all(t.offset % 64 == 0 for t in f.tensors.values())
    assert f.tensors["a"].ne == (3, 2) and f.tensors["a"].shape == (2, 3)
    assert np.array_equal(f.get("a"), a) and np.array_equal(f.get("b"), b.astype(np.float32))


# --- tokenizers ------------------------------------------------------------------------------------

TEXTS = ["What is the capital of France?", "hello world, hello there!", "  two  spaces\n\nnew\tlines\r\n",
         "I'm sure they'll've DON'T", "1234567 3.14 1,000", "héllo wörld 你好 🤖", "<|user|>hi<|eot_id|>", ""]


def test_gpt2_tokenizer_matches_the_trained_one(tmp_path, byte_bpe):
    parts = tokenizer_parts(byte_bpe)
    src = load_gguf(write_llama_gguf(tmp_path / "t.gguf", random_llama(len(parts[0]), tied=True), parts))
    ours = Tokenizer.from_str(json.dumps(src.tokenizer_json))
    for text in TEXTS:
        assert ours.encode(text).ids == byte_bpe.encode(text).ids, text
        assert ours.decode(ours.encode(text).ids, skip_special_tokens=False) == text
    assert ours.encode("<|user|>").ids == [parts[0].index("<|user|>")]  # control tokens are atomic
    added = {a["content"]: a["special"] for a in src.tokenizer_json["added_tokens"]}
    assert added == dict.fromkeys(SPECIALS, True)
    cfg = src.tokenizer_config
    assert (cfg["bos_token"], cfg["eos_token"], cfg["add_bos_token"]) == ("<|begin_of_text|>", "<|eot_id|>", False)
    assert src.chat_template == cfg["chat_template"] and "<|user|>" in src.chat_template
    assert src.generation_config == {"bos_token_id": parts[0].index("<|begin_of_text|>"),
                                     "eos_token_id": parts[0].index("<|eot_id|>")}


def test_llama_bpe_tokenizer_matches_real_llama32():
    from edgellama.assets import LLAMA32_TOKENIZER, fetch

    folder = fetch(LLAMA32_TOKENIZER)
    real = Tokenizer.from_file(str(folder / "tokenizer.json"))
    d = json.loads((folder / "tokenizer.json").read_text())
    vocab, added = d["model"]["vocab"], {a["id"]: a for a in d["added_tokens"]}
    tokens = [""] * (max(added) + 1)
    types = np.ones(len(tokens), dtype=np.int32)
    for t, i in vocab.items():
        tokens[i] = t
    for i, a in added.items():
        tokens[i], types[i] = a["content"], 3 if a["special"] else 4
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.bos_token_id": 128000,
            "tokenizer.ggml.eos_token_id": 128001, "tokenizer.ggml.eot_token_id": 128009,
            "tokenizer.ggml.merges": [m if isinstance(m, str) else " ".join(m) for m in d["model"]["merges"]]}
    tok_json, tok_cfg, ids = tokenizer_from_metadata(meta)
    ours = Tokenizer.from_str(json.dumps(tok_json))
    texts = TEXTS + ["def f(x):\n    return x**2  # sq\n", "<|begin_of_text|>a<|eot_id|><|image|>",
                     "a\u00a0b\u2003c\n\n\n "]
    for text in texts:
        assert ours.encode(text).ids == real.encode(text).ids, text  # both prepend <|begin_of_text|>
    assert ours.encode("x").ids[0] == 128000 and tok_cfg["add_bos_token"] is True
    assert ids == {"bos": 128000, "eos": 128001, "eot": 128009}


# --- the real SmolLM2 file ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_path():
    from edgellama.assets import SMOLLM2_GGUF, fetch

    return fetch(SMOLLM2_GGUF)


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return load_gguf(smollm2_path)


def test_smollm2_config_tokenizer_and_reader(smollm2, smollm2_path):
    c = smollm2.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size) == (30, 576, 1536)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size) == (9, 3, 64, 49152)
    assert c.tie_word_embeddings and c.rope_scaling is None and c.rope_theta == 100000.0 and c.rms_norm_eps == 1e-5
    assert smollm2.description == "gguf:SmolLM2-135M-Instruct.Q4_1.gguf"
    assert smollm2.tensors.shape("model.layers.29.self_attn.k_proj.weight") == (192, 576)
    assert len(smollm2.tensors.names()) == 2 + 30 * 9

    tok = Tokenizer.from_str(json.dumps(smollm2.tokenizer_json))
    text = "What is the capital of France?"
    ids = tok.encode(text).ids
    assert len(ids) == 7 and tok.decode(ids) == text
    assert tok.encode("2024").tokens == ["2", "0", "2", "4"]  # smollm pre-tokenizer: digits one by one
    assert "<|im_start|>" in smollm2.chat_template
    assert smollm2.tokenizer_config["eos_token"] == "<|im_end|>"
    assert smollm2.generation_config["eos_token_id"] == tok.token_to_id("<|im_end|>")

    # Our parser against gguf's own reader, on a tensor of each type in the file.
    theirs = {t.name: t for t in gguf.GGUFReader(smollm2_path).tensors}
    ours = GGUFFile(smollm2_path)
    assert {t.qtype.name for t in ours.tensors.values()} == {"F32", "Q4_1", "Q8_0"}
    for name in ("token_embd.weight", "blk.3.ffn_down.weight", "output_norm.weight"):
        t = theirs[name]
        assert ours.tensors[name].qtype == t.tensor_type and ours.tensors[name].ne == tuple(int(n) for n in t.shape)
        assert np.array_equal(ours.get(name), gguf.quants.dequantize(t.data, t.tensor_type))


def test_smollm2_answers_paris(smollm2):
    from jinja2 import Environment

    sd = {n: smollm2.tensors.get(n) for n in smollm2.tensors.names()}
    model = hf_model(smollm2.config.to_hf(), sd)
    tok = Tokenizer.from_str(json.dumps(smollm2.tokenizer_json))
    prompt = Environment().from_string(smollm2.chat_template).render(
        messages=[{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True)
    ids = tok.encode(prompt).ids
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False,
                             eos_token_id=smollm2.generation_config["eos_token_id"])
    assert "Paris" in tok.decode(out[0, len(ids):].tolist())


# --- refused files -------------------------------------------------------------------------------

def s(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def header(n_tensors: int, n_kv: int, body: bytes = b"", version: int = 3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv) + body


def tensor_info(name: str, dims: list[int], ggml_type: int = 0, offset: int = 0) -> bytes:
    return s(name) + struct.pack(f"<I{len(dims)}Q", len(dims), *dims) + struct.pack("<IQ", ggml_type, offset)


def f32_tensor_file(*infos: bytes, data: bytes = b"\0" * 64) -> bytes:
    body = b"".join(infos)
    pad = -(len(header(0, 0)) + len(body)) % 32
    return header(len(infos), 0, body + b"\0" * pad + data)


BAD_FILES = {
    "empty": (b"", "GGUF"),
    "bad magic": (b"GGML" + header(0, 0)[4:], "bad magic"),
    "short": (b"GGUF\3\0", "truncated"),
    "version 1": (header(0, 0, version=1), "version 1"),
    "big-endian": (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "big-endian"),
    "tensor count 2^63": (header(2**63, 0), "tensor count"),
    "kv count 2^63": (header(0, 2**63), "metadata count"),
    "string length": (header(0, 1, struct.pack("<Q", 2**62) + b"key" + b"\0" * 16), "runs past the end"),
    "unknown value type": (header(0, 1, s("k") + struct.pack("<I", 13) + b"\0" * 8), "unknown GGUF value type 13"),
    "array length": (header(0, 1, s("k") + struct.pack("<IIQ", 9, 4, 2**61)), "more than the file can hold"),
    "array nesting": (header(0, 1, s("k") + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 6 + b"\0" * 64),
                      "nests arrays"),
    "dims overflow": (f32_tensor_file(tensor_info("w", [2**40] * 4)), "overflow"),
    "dims beyond file": (f32_tensor_file(tensor_info("w", [2**20, 2**20])), "beyond the end"),
    "too many dims": (f32_tensor_file(tensor_info("w", [1] * 5)), "5 dimensions"),
    "empty dim": (f32_tensor_file(tensor_info("w", [4, 0])), "empty dimension"),
    "unknown ggml type": (f32_tensor_file(tensor_info("w", [32], ggml_type=99)), "unknown ggml type 99"),
    "removed ggml type": (f32_tensor_file(tensor_info("w", [32], ggml_type=4)), "unknown ggml type 4"),
    "partial block": (f32_tensor_file(tensor_info("w", [16], ggml_type=int(Q.Q8_0))), "block size"),
    "misaligned": (f32_tensor_file(tensor_info("w", [4], offset=4)), "aligned"),
    "overlap": (f32_tensor_file(tensor_info("a", [8]), tensor_info("b", [8])), "overlap"),
    "duplicate tensor": (f32_tensor_file(tensor_info("a", [8]), tensor_info("a", [8], offset=32)), "duplicate"),
    "bad alignment": (header(0, 1, s("general.alignment") + struct.pack("<II", 4, 3)), "power of two"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_headers_are_refused_before_allocating(tmp_path, case):
    data, message = BAD_FILES[case]
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    start = time.perf_counter()
    with pytest.raises(EdgeLlamaError, match=message) as err:
        GGUFFile(path)
    assert time.perf_counter() - start < 0.5  # refused up front, not after sizing something huge
    assert "\n" not in str(err.value) and "bad.gguf" in str(err.value)


def test_truncated_anywhere_is_refused(tmp_path, byte_bpe):
    parts = tokenizer_parts(byte_bpe)
    full = write_llama_gguf(tmp_path / "full.gguf", random_llama(len(parts[0]), tied=True), parts,
                            qtype=Q.Q8_0).read_bytes()
    f = GGUFFile(tmp_path / "full.gguf")
    end = max(t.offset + t.nbytes for t in f.tensors.values())
    cuts = sorted({0, 3, 4, 8, 16, 23, 24, 40, f.data_offset - 1, f.data_offset, end - 1,
                   *np.linspace(25, end - 1, 40, dtype=int).tolist()})
    for cut in cuts:
        path = tmp_path / "cut.gguf"
        path.write_bytes(full[:cut])
        with pytest.raises(EdgeLlamaError, match="truncated|beyond the end|more than the file can hold|bad magic"):
            load_gguf(path)


def test_model_level_refusals(tmp_path, byte_bpe):
    parts = tokenizer_parts(byte_bpe)
    sd = random_llama(len(parts[0]), tied=True)
    V = gguf.GGUFValueType

    def refused(match, **kw):
        with pytest.raises(EdgeLlamaError, match=match):
            load_gguf(write_llama_gguf(tmp_path / "m.gguf", sd, parts, **kw))

    refused("unsupported architecture 'qwen2'", arch="qwen2")
    refused("tokenizer.ggml.pre 'qwen2'", pre="qwen2")
    refused("SentencePiece", kv={"tokenizer.ggml.model": ("llama", V.STRING)})
    bad = {**sd, "model.layers.1.mlp.up_proj.weight": sd["model.layers.1.mlp.up_proj.weight"][:96]}
    with pytest.raises(EdgeLlamaError, match=r"'blk\.1\.ffn_up\.weight' has shape \[96, 64\]"):
        load_gguf(write_llama_gguf(tmp_path / "shape.gguf", bad, parts))
    missing = {k: v for k, v in sd.items() if k != "model.layers.0.mlp.down_proj.weight"}
    with pytest.raises(EdgeLlamaError, match="missing tensor for model.layers.0.mlp.down_proj.weight"):
        load_gguf(write_llama_gguf(tmp_path / "missing.gguf", missing, parts))
    refused("unexpected tensor 'blk.0.ffn_gate_exps.weight'",
            extra={"blk.0.ffn_gate_exps.weight": np.zeros((2, 8), np.float32)})
    refused("beyond llama.block_count", extra={"blk.7.attn_q.weight": np.zeros((2, 8), np.float32)})
    rng = np.random.default_rng(3)
    refused("rope_freqs.weight", rope_freqs=rng.uniform(1, 4, HEAD_DIM // 2).astype(np.float32))
