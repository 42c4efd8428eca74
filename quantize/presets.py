"""Named quantization presets: the points on the speed/quality frontier that `--quant` picks.

Each preset is a set of QuantOptions (onnx_weights.py) chosen by measurement on de-gridded
SmolLM2 and the Llama-3.2-1B shape (docs/quantization.md, docs/performance.md):

- ``int4`` (the balanced default): quality at least llama.cpp Q4_K_M's, at its file size.
- ``int4-fast``: every linear in the format of onnxruntime's fastest stock int4 kernel path
  (symmetric int4 in blocks of 128, no zero points), the tied embedding/lm_head int4 in asymmetric
  blocks of 64, its search weighted by the head's inputs; smoothing and the hqq block search kept.
  The file is smaller than onnxruntime-genai's tuned build; blocks of 64 are the coarsest table
  that stays more accurate than llama.cpp Q4_0 on both held-out texts.
- ``int8``: the quality end (better than llama.cpp Q8_0 at its size).

Aliases are the names users of llama.cpp, MLX and onnxruntime-genai would try. Pure Python (no
numpy, no onnx): the device planner reads it too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edgellama.errors import EdgeLlamaError


@dataclass(frozen=True)
class Preset:
    name: str
    options: dict[str, Any]  # QuantOptions.from_dict input; explicit flags override these keys
    aliases: tuple[str, ...] = ()
    about: str = ""
    # How devices/plan.py prices the bundle: linears, tables, their block sizes, zero points.
    plan: dict[str, Any] = field(default_factory=dict)


FAST_BLOCK = 128  # MatMulNBits' fastest int4 path: symmetric block 128 (benchmarks/kernel_formats.py)
FAST_TABLE_BLOCK = 64  # the int4 embedding/lm_head: asymmetric blocks of 64 (docs/quantization.md, Presets)

PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("int4", {"bits": 4}, aliases=("int4-balanced", "balanced", "q4_k_m", "q4km"),
           about="balanced default: mixed int4/int8, block 32 (q/k 16), at least llama.cpp Q4_K_M's quality",
           plan={"quant": "int4", "embed_quant": "int8"}),
    Preset("int4-fast", {"bits": 4, "method": "hqq", "block_size": FAST_BLOCK, "symmetric": True,
                         "embeddings": "int4", "lm_head": "int4", "embedding_block_size": FAST_TABLE_BLOCK,
                         "table_symmetric": False},
           aliases=("fast", "q4", "q4_0", "4bit"),
           about="fast int4: symmetric block 128 (onnxruntime's fastest int4 kernel), int4 embedding/lm_head "
                 "in asymmetric blocks of 64, smoothed and searched",
           plan={"quant": "int4", "embed_quant": "int4", "block_size": FAST_BLOCK, "symmetric": True,
                 "embed_block_size": FAST_TABLE_BLOCK, "embed_symmetric": False}),
    Preset("int8", {"bits": 8}, aliases=("q8", "q8_0", "8bit"),
           about="quality end: int8 block 32, symmetric, smoothed",
           plan={"quant": "int8", "embed_quant": "int8"}),
)}

_BY_NAME = {alias: p for p in PRESETS.values() for alias in (p.name, *p.aliases)}
CHOICES = tuple(_BY_NAME)  # every name `--quant` accepts, canonical names first within each preset


def resolve(name: str) -> Preset:
    """The preset called `name` or one of its aliases (case-insensitive; '-' and '_' alike)."""
    key = str(name).strip().lower()
    p = _BY_NAME.get(key) or _BY_NAME.get(key.replace("-", "_")) or _BY_NAME.get(key.replace("_", "-"))
    if p is None:
        names = ", ".join(f"{q.name} ({', '.join(q.aliases)})" for q in PRESETS.values())
        raise EdgeLlamaError(f"unknown quantization preset {name!r}: expected one of {names}")
    return p


# Options that change the bytes a bundle stores (what the planner prices); method, smoothing and
# calibration change only which codes are chosen.
FORMAT_KEYS = ("bits", "block_size", "symmetric", "embeddings", "lm_head", "embedding_block_size", "table_symmetric",
               "scale_dtype")


def of_record(quantization: dict[str, Any] | None) -> Preset | None:
    """The preset whose storage format a manifest's quantization record has (None: no preset, or one
    given with options that change its format)."""
    if not quantization or set(quantization.get("preset_overrides") or ()) & set(FORMAT_KEYS):
        return None
    name = quantization.get("preset")
    return PRESETS.get(name) if name else None
