"""A random-weight Hugging Face folder with Llama-3.2-1B's exact shapes, for speed benchmarks.

Speed depends on shapes, not values, and the real weights cannot be fetched here. Tensors
are generated and written one at a time straight into a single safetensors file (header
first, from the shapes), so memory stays at one tensor instead of the whole 1.2B params.
Each tensor has its own seeded stream: the file is identical on every run and machine.

    python benchmarks/make_1b_shape.py            # -> benchmarks/work/llama-3.2-1b-shape
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
DEFAULT_OUT = HERE / "work" / "llama-3.2-1b-shape"

# meta-llama/Llama-3.2-1B's config.json, number for number (the pre-transformers-5 spelling it ships with).
CONFIG = {
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
    """Every tensor of a tied Llama checkpoint, in HF names."""
    h, i, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    out = [("model.embed_tokens.weight", (cfg["vocab_size"], h)), ("model.norm.weight", (h,))]
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
                log(f"make_1b_shape: {k + 1}/{len(shapes)} tensors")


def make_1b_shape(out: str | os.PathLike = DEFAULT_OUT, *, seed: int = 0, dtype: str = "bf16",
                  force: bool = False, log=print) -> Path:
    """Write (or reuse) the folder: config.json, generation_config.json, model.safetensors, tokenizer files."""
    from edgellama.assets import LLAMA32_TOKENIZER, fetch

    if dtype not in DTYPES:
        raise SystemExit(f"make_1b_shape: dtype must be one of {', '.join(DTYPES)}")
    out = Path(out)
    stamp = {"seed": seed, "dtype": dtype, "config": CONFIG}
    stamp_file = out / "make_1b_shape.json"
    if not force and stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shapes = tensor_shapes(CONFIG)
    std = CONFIG["initializer_range"]
    write_safetensors_streaming(tmp / "model.safetensors", shapes, dtype,
                                lambda k, name, shape: random_tensor(name, shape, seed, k, std), log)
    config = {**CONFIG, "torch_dtype": DTYPES[dtype][2]}
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
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
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--force", action="store_true", help="rebuild even if the folder is up to date")
    args = ap.parse_args(argv)
    path = make_1b_shape(args.out, seed=args.seed, dtype=args.dtype, force=args.force,
                         log=lambda m: print(m, file=sys.stderr))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
