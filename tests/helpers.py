"""Builders shared by the test suite: tiny random Llama checkpoints in Hugging Face layout, and CLI runners.

transformers and torch are imported inside the builders, so tests that only need the
runtime do not pay for them.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

LLAMA3_VOCAB = 128256  # the Llama 3 embedding rows; the 3.2 tokenizer lists one more token, <|image|>
LLAMA3_BOS = 128000
LLAMA3_END_OF_TEXT = 128001
LLAMA3_EOM = 128008
LLAMA3_EOT = 128009
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
HEAVY_MODULES = ("torch", "transformers", "onnx", "coremltools")


@dataclass(frozen=True)
class TinyLlama:
    """A tiny Llama 3: the real vocabulary and tokenizer, a hidden size small enough to export in seconds."""

    hidden: int = 64
    heads: int = 8
    kv_heads: int = 2
    head_dim: int | None = 16  # None: hidden // heads, and config.json leaves head_dim out
    layers: int = 2
    intermediate: int = 128
    vocab: int = LLAMA3_VOCAB
    tied: bool = True
    llama3_rope: bool = True
    rope_theta: float = 500000.0
    # A small original context, so llama3 scaling changes the frequencies short test prompts reach.
    rope_original_context: int = 32
    # "new": transformers 5 rope_parameters; "old": rope_theta + rope_scaling, the pre-5 spelling.
    spelling: str = "new"
    max_position: int = 512
    seed: int = 0

    def with_(self, **changes: Any) -> "TinyLlama":
        return replace(self, **changes)


# Named configurations, so every test file builds (and exports) each one once per session.
TINY_CONFIGS: dict[str, TinyLlama] = {
    # heads/kv 4, head_dim 16 != 64/8, llama3 RoPE, tied embeddings, transformers 5 spelling
    "gqa4": TinyLlama(),
    # the same weights described by a config.json in the pre-transformers-5 spelling
    "gqa4_old": TinyLlama(spelling="old"),
    # heads/kv 1 (plain MHA), head_dim = hidden/heads, default RoPE, untied, old spelling
    "mha": TinyLlama(hidden=64, heads=4, kv_heads=4, head_dim=None, tied=False, llama3_rope=False,
                     rope_theta=10000.0, spelling="old", seed=1),
    # heads/kv 3, head_dim 24: a head size GroupQueryAttention rejects on CPU; llama3 RoPE, untied
    "gqa3_hd24": TinyLlama(hidden=48, heads=6, kv_heads=2, head_dim=24, tied=False, seed=2),
    # heads/kv 3, head_dim = hidden/heads, default RoPE, tied, old spelling
    "gqa3": TinyLlama(hidden=96, heads=6, kv_heads=2, head_dim=None, llama3_rope=False, spelling="old", seed=3),
}


def hf_config(spec: TinyLlama):
    from transformers import LlamaConfig

    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": spec.rope_theta}
    if spec.llama3_rope:
        rope = {"rope_type": "llama3", "rope_theta": spec.rope_theta, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": spec.rope_original_context}
    kwargs = {"head_dim": spec.head_dim} if spec.head_dim is not None else {}
    return LlamaConfig(
        hidden_size=spec.hidden, intermediate_size=spec.intermediate, num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads, vocab_size=spec.vocab,
        max_position_embeddings=spec.max_position, rope_parameters=rope, tie_word_embeddings=spec.tied,
        rms_norm_eps=1e-5, bos_token_id=LLAMA3_BOS, eos_token_id=LLAMA3_END_OF_TEXT, **kwargs,
    )


def build_hf_model(spec: TinyLlama):
    """transformers' LlamaForCausalLM with random weights scaled so logits spread over several units.

    HF's default init (std 0.02) gives near-zero logits, against which a 1e-3 tolerance proves little.
    """
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(hf_config(spec)).eval()
    gen = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # not all ones, so a dropped or misplaced norm shows
                gain = 5.0 if name == "model.norm.weight" else 1.0
                p.copy_(gain * (1.0 + 0.2 * torch.randn(p.shape, generator=gen)))
            elif "embed_tokens" in name or name == "lm_head.weight":
                # Small next to the blocks' outputs, so a tied head does not just echo the input token;
                # the final norm's gain restores the logits' spread.
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
    return model


def old_spelling(config: dict[str, Any]) -> dict[str, Any]:
    """Rewrite a transformers 5 config.json in the older rope_theta + rope_scaling spelling."""
    cfg = {k: v for k, v in config.items() if k != "rope_parameters"}
    rope = dict(config["rope_parameters"])
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope if rope.get("rope_type") == "llama3" else None
    return cfg


def copy_tokenizer(tokenizer_dir: str | os.PathLike, folder: str | os.PathLike) -> None:
    for name in TOKENIZER_FILES:
        shutil.copy(Path(tokenizer_dir) / name, Path(folder) / name)


def write_hf_folder(model, spec: TinyLlama, folder: str | os.PathLike,
                    tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """save_pretrained, then config.json in the spec's spelling, then the tokenizer files."""
    folder = Path(folder)
    model.save_pretrained(folder)
    if spec.spelling == "old":
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(old_spelling(cfg), indent=2))
    elif spec.spelling != "new":
        raise ValueError(f"unknown spelling {spec.spelling!r}")
    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, folder)
    return folder


def make_tiny_llama(folder: str | os.PathLike, spec: TinyLlama = TinyLlama(),
                    tokenizer_dir: str | os.PathLike | None = None):
    """(folder, transformers model): a random checkpoint on disk and the in-memory model it came from."""
    model = build_hf_model(spec)
    return write_hf_folder(model, spec, folder, tokenizer_dir), model


def link_folder(src: str | os.PathLike, dst: str | os.PathLike, *, copy: Sequence[str] = ("config.json",)) -> Path:
    """A cheap variant of a checkpoint folder: weights symlinked, the named small files copied (to edit)."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name in copy:
            shutil.copy(f, dst / f.name)
        else:
            (dst / f.name).symlink_to(f.resolve())
    return dst


def edit_config(folder: str | os.PathLike, **changes: Any) -> dict[str, Any]:
    """Change keys of folder/config.json in place (a value of ... deletes the key)."""
    path = Path(folder) / "config.json"
    cfg = json.loads(path.read_text())
    for k, v in changes.items():
        if v is ...:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    path.write_text(json.dumps(cfg))
    return cfg


def hf_logits(model, ids, attention_mask=None, position_ids=None) -> np.ndarray:
    """transformers' logits, [batch, seq, vocab] as float32 numpy (ids may be one sequence or a batch)."""
    import torch

    t = torch.as_tensor(np.atleast_2d(np.asarray(ids, dtype=np.int64)))
    kw = {}
    if attention_mask is not None:
        kw["attention_mask"] = torch.as_tensor(np.asarray(attention_mask, dtype=np.int64))
    if position_ids is not None:
        kw["position_ids"] = torch.as_tensor(np.asarray(position_ids, dtype=np.int64))
    with torch.inference_mode():
        return model(input_ids=t, use_cache=False, **kw).logits.float().numpy()


def random_ids(n: int, seed: int = 0, vocab: int = 128000) -> list[int]:
    """Ordinary (non-special) token ids."""
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


@dataclass
class CliResult:
    code: int
    out: str
    err: str


def run_cli(argv: Sequence[str], capsys) -> CliResult:
    """edgellama.cli.main in-process, with captured output."""
    from edgellama.cli import main

    capsys.readouterr()
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return CliResult(code, captured.out, captured.err)


def assert_one_line_error(err: str, *fragments: str) -> str:
    """stderr is exactly one `edgellama: error: ...` line (no traceback) mentioning every fragment."""
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1, f"expected one stderr line, got:\n{err}"
    line = lines[0]
    assert line.startswith("edgellama: error: "), line
    assert "Traceback" not in err
    for frag in fragments:
        assert frag.lower() in line.lower(), f"{frag!r} not in {line!r}"
    return line


def leftovers(parent: str | os.PathLike, name: str) -> list[str]:
    """Temporary siblings an atomic write of parent/name might leave behind."""
    return sorted(p.name for p in Path(parent).iterdir() if p.name.startswith(f".{name}."))


def rewrite_safetensors_header(path: str | os.PathLike, edit) -> None:
    """Rewrite a safetensors header in place: edit(header_dict) mutates it; the data bytes are kept."""
    import struct

    path = Path(path)
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + blob[8 + n:])


def corrupt_safetensors(path: str | os.PathLike, how: str, tensor: str = "model.norm.weight") -> None:
    """Damage a safetensors file the ways real files break: "truncate", "offsets" or "shape" (lying header)."""
    path = Path(path)
    if how == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "offsets":  # points past the end of the file
        def edit(h):
            start, end = h[tensor]["data_offsets"]
            h[tensor]["data_offsets"] = [start + 10**9, end + 10**9]
        rewrite_safetensors_header(path, edit)
    elif how == "shape":  # claims twice the elements its bytes hold
        def edit(h):
            h[tensor]["shape"] = [h[tensor]["shape"][0] * 2] + h[tensor]["shape"][1:]
        rewrite_safetensors_header(path, edit)
    else:
        raise ValueError(how)


class PickleBomb:
    """Unpickling this creates `marker`: proof that a loader unpickled it."""

    def __init__(self, marker: str | os.PathLike):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_pickle_checkpoint(path: str | os.PathLike, marker: str | os.PathLike) -> Path:
    import pickle

    path = Path(path)
    path.write_bytes(pickle.dumps({"model.embed_tokens.weight": PickleBomb(marker)}))
    return path


def fake_hub_snapshot(cache: str | os.PathLike, repo_id: str, folder: str | os.PathLike,
                      revision: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """huggingface_hub's cache layout (models--owner--name/snapshots/<rev>/ + refs/main), files linked from folder."""
    repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / revision
    snap.mkdir(parents=True)
    for f in Path(folder).iterdir():
        (snap / f.name).symlink_to(f.resolve())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return snap
