"""Random-weight Hugging Face folders with the exact shapes of Llama 3.2 1B / 3B and Llama 3.1 8B.

Speed and memory depend on shapes, not values, and the real weights cannot be fetched here.
Tensors are generated and written one at a time straight into safetensors files (header first,
from the shapes), sharded at 5 GB as the Hub ships them (model-0000N-of-0000M.safetensors plus
model.safetensors.index.json; one model.safetensors when it fits one shard), so memory stays at
one tensor however big the model. Each tensor has its own seeded stream: the files are
identical on every run and machine. Never commit them.

    python benchmarks/make_shape.py 3b            # -> benchmarks/work/llama-3.2-3b-shape
    python benchmarks/make_shape.py 8b            # -> benchmarks/work/llama-3.1-8b-shape (16 GB)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SHARD_BYTES = 5 * 10**9  # the Hub's default max_shard_size

# meta-llama/Llama-3.2-1B's config.json, number for number (the pre-transformers-5 spelling it ships with).
LLAMA_3_2_1B = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 8192,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 16,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "use_cache": True,
    "vocab_size": 128256,
}
GENERATION_CONFIG = {"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "do_sample": False}
DTYPES = {"bf16": ("BF16", 2, "bfloat16"), "fp32": ("F32", 4, "float32")}


def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of a Llama checkpoint (with lm_head.weight when untied), in HF names."""
    h, i, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    out = [("model.embed_tokens.weight", (cfg["vocab_size"], h)), ("model.norm.weight", (h,))]
    if not cfg["tie_word_embeddings"]:
        out.append(("lm_head.weight", (cfg["vocab_size"], h)))
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}"
        out += [
            (f"{p}.input_layernorm.weight", (h,)), (f"{p}.post_attention_layernorm.weight", (h,)),
            (f"{p}.self_attn.q_proj.weight", (q, h)), (f"{p}.self_attn.k_proj.weight", (kv, h)),
            (f"{p}.self_attn.v_proj.weight", (kv, h)), (f"{p}.self_attn.o_proj.weight", (h, q)),
            (f"{p}.mlp.gate_proj.weight", (i, h)), (f"{p}.mlp.up_proj.weight", (i, h)),
            (f"{p}.mlp.down_proj.weight", (h, i)),
        ]
    return sorted(out)  # safetensors writers conventionally sort names; readers do not care


def random_tensor(name: str, shape: tuple[int, ...], seed: int, index: int, std: float) -> np.ndarray:
    if name.endswith("norm.weight"):
        return np.ones(shape, np.float32)
    rng = np.random.default_rng([seed, index])
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(std)


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest even (numpy has no bfloat16; finite inputs only)."""
    u = np.ascontiguousarray(x, dtype=np.float32).reshape(-1).view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype("<u2")


def write_tensor(f, x: np.ndarray, dtype: str, chunk: int = 1 << 24) -> None:
    """In chunks, so converting the 262M-element embedding needs no full-size temporaries."""
    flat = x.reshape(-1)
    for start in range(0, flat.size, chunk):
        part = flat[start:start + chunk]
        f.write((to_bf16(part) if dtype == "bf16" else part.astype("<f4")).tobytes())


def write_safetensors_streaming(path: Path, shapes: list[tuple[str, tuple[int, ...]]], dtype: str,
                                make, log=print) -> None:
    """Header from the shapes, then each tensor's bytes as make(index, name, shape) produces it."""
    code, size, _ = DTYPES[dtype]
    header, offset = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape)) * size
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for k, (name, shape) in enumerate(shapes):
            write_tensor(f, make(k, name, shape), dtype)
            if k % 16 == 0:
                log(f"make_shape: {path.name}: {k + 1}/{len(shapes)} tensors")


# meta-llama/Llama-3.2-3B(-Instruct): the 1B's family at hidden 3072, 28 layers, 24 heads of 128.
LLAMA_3_2_3B = {**LLAMA_3_2_1B, "head_dim": 128, "hidden_size": 3072, "num_attention_heads": 24,
                "num_hidden_layers": 28}
# meta-llama/Llama-3.1-8B(-Instruct): untied 128k embedding and head, 32 layers of 4096, rope factor 8.
LLAMA_3_1_8B = {**LLAMA_3_2_1B, "head_dim": 128, "hidden_size": 4096, "intermediate_size": 14336,
                "num_attention_heads": 32, "num_hidden_layers": 32, "tie_word_embeddings": False,
                "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                 "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
SHAPES = {"1b": ("llama-3.2-1b-shape", LLAMA_3_2_1B), "3b": ("llama-3.2-3b-shape", LLAMA_3_2_3B),
          "8b": ("llama-3.1-8b-shape", LLAMA_3_1_8B)}


def shards(shapes: list[tuple[str, tuple[int, ...]]], size: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Consecutive groups of tensors, each under SHARD_BYTES (a single bigger tensor gets its own)."""
    out, cur, cur_bytes = [], [], 0
    for name, shape in shapes:
        n = int(np.prod(shape)) * size
        if cur and cur_bytes + n > SHARD_BYTES:
            out.append(cur)
            cur, cur_bytes = [], 0
        cur.append((name, shape))
        cur_bytes += n
    return out + [cur] if cur else out


def make_shape(which: str, out: str | os.PathLike | None = None, *, seed: int = 0, dtype: str = "bf16",
               force: bool = False, log=print) -> Path:
    """Write (or reuse) the folder: config.json, generation_config.json, safetensors shards, tokenizer files."""
    from edgellama.assets import LLAMA32_TOKENIZER, fetch

    if which not in SHAPES:
        raise SystemExit(f"make_shape: shape must be one of {', '.join(SHAPES)}")
    if dtype not in DTYPES:
        raise SystemExit(f"make_shape: dtype must be one of {', '.join(DTYPES)}")
    folder, cfg = SHAPES[which]
    out = Path(out) if out is not None else HERE / "work" / folder
    stamp = {"seed": seed, "dtype": dtype, "config": cfg}
    stamp_file = out / "make_shape.json"
    if not force and stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shapes = tensor_shapes(cfg)
    index = {name: k for k, (name, _) in enumerate(shapes)}  # each tensor's seed stream, whatever its shard
    std = cfg["initializer_range"]
    groups = shards(shapes, DTYPES[dtype][1])
    names = (["model.safetensors"] if len(groups) == 1 else
             [f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors" for k in range(len(groups))])
    for group, name in zip(groups, names):
        write_safetensors_streaming(tmp / name, group, dtype,
                                    lambda k, n, shape: random_tensor(n, shape, seed, index[n], std), log)
    if len(groups) > 1:
        total = sum(int(np.prod(s)) * DTYPES[dtype][1] for _, s in shapes)
        weight_map = {n: f for group, f in zip(groups, names) for n, _ in group}
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    (tmp / "config.json").write_text(json.dumps({**cfg, "torch_dtype": DTYPES[dtype][2]}, indent=2) + "\n")
    (tmp / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
    tok = Path(fetch(LLAMA32_TOKENIZER))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok / name, tmp / name)
    (tmp / stamp_file.name).write_text(json.dumps(stamp, indent=2) + "\n")  # last: marks a complete folder
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("--out", default=None, help="default: benchmarks/work/<the shape's folder>")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--force", action="store_true", help="rebuild even if the folder is up to date")
    args = ap.parse_args(argv)
    path = make_shape(args.shape, args.out, seed=args.seed, dtype=args.dtype, force=args.force,
                      log=lambda m: print(m, file=sys.stderr))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
