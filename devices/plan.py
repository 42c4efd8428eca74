"""Will a model fit on a device, with how much context, and how fast will it decode?

Decode is memory-bound: each token reads every weight once (the embedding table
only for one row) plus the KV cache so far, so tok/s ~ efficiency * bandwidth / bytes read.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgellama.devices.catalog import QUANTS, DeviceProfile
from edgellama.errors import EdgeLlamaError
from edgellama.runtime.bundle import MANIFEST

MiB = 1 << 20
FLOAT_BYTES = {"fp32": 4, "fp16": 2}
# Measured: python + numpy + onnxruntime + the Llama 3 tokenizer hold ~126 MiB RSS before a session exists.
RUNTIME_BASE_BYTES = 128 * MiB
PREFILL_CHUNK = 64  # prompt tokens assumed to go through the graph at once; sizes the activation buffers
MIN_USEFUL_CONTEXT = 512


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "ModelShape":
        if not isinstance(cfg, dict):
            raise EdgeLlamaError("model config is not a JSON object")

        def positive(key: str, default: Any = None) -> int:
            value = cfg.get(key, default)
            if value is None:
                raise EdgeLlamaError(f"model config is missing {key!r}")
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise EdgeLlamaError(f"model config has an invalid {key!r}: {value!r} (expected a positive integer)")
            return value

        hidden = positive("hidden_size")
        heads = positive("num_attention_heads")
        kv_heads = positive("num_key_value_heads", heads)
        if heads % kv_heads:
            raise EdgeLlamaError(f"num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})")
        if cfg.get("head_dim") is None and hidden % heads:
            raise EdgeLlamaError(f"hidden_size ({hidden}) is not a multiple of num_attention_heads ({heads})")
        return cls(
            hidden_size=hidden,
            intermediate_size=positive("intermediate_size"),
            num_hidden_layers=positive("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=positive("head_dim", hidden // heads),
            vocab_size=positive("vocab_size"),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=positive("max_position_embeddings", 2048),
        )

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(out, in) of one decoder layer's matmuls: q, k, v, o, gate, up, down."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        return [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]

    def param_count(self) -> int:
        layer = sum(o * i for o, i in self.linear_shapes()) + 2 * self.hidden_size
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * layer + self.hidden_size + embeddings


def read_model_config(source: str | Path) -> dict[str, Any] | None:
    """The HF-style config of a bundle dir, a HF folder or a config.json; None if `source` is none of those."""
    path = Path(source)

    def load(p: Path) -> Any:
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise EdgeLlamaError(f"cannot read {p}: {exc}") from None

    if path.is_dir():
        if (path / MANIFEST).is_file():
            meta = load(path / MANIFEST)
            if isinstance(meta, dict) and isinstance(meta.get("architecture"), dict):
                return meta["architecture"]
        return load(path / "config.json") if (path / "config.json").is_file() else None
    if path.is_file() and path.suffix == ".json":
        data = load(path)
        if isinstance(data, dict) and "hidden_size" not in data and isinstance(data.get("architecture"), dict):
            return data["architecture"]  # an edgellama.json given directly
        return data
    return None


def matrix_bytes(rows: int, cols: int, quant: str, *, block_size: int, float_bytes: int,
                 symmetric: bool = False) -> int:
    """Stored size of a [rows, cols] weight; quantization groups run along cols (the reduction axis)."""
    if quant in FLOAT_BYTES:
        return rows * cols * FLOAT_BYTES[quant]
    if quant == "int8":  # symmetric, one scale per row
        return rows * cols + rows * float_bytes
    blocks = math.ceil(cols / block_size)  # int4: a scale (and a 4-bit zero point) per block, cols padded to whole blocks
    return rows * (blocks * block_size // 2 + blocks * float_bytes + (0 if symmetric else math.ceil(blocks / 2)))


def preset_format(quant: str) -> dict[str, Any]:
    """How a `quant` prices: plain names as they are; int4-fast by its preset (symmetric int4 in its own
    blocks, its own table precision and blocks)."""
    from edgellama.quantize.presets import PRESETS

    if quant == "int4-fast":
        return dict(PRESETS[quant].plan)
    return {"quant": quant}


@dataclass(frozen=True)
class Plan:
    device: str
    quant: str
    context: int
    kv_dtype: str
    weights_bytes: int
    kv_bytes: int
    overhead_bytes: int
    total_bytes: int
    budget_bytes: int
    fits: bool
    max_context: int  # largest context that fits at this quant (0: none), capped at max_position_embeddings
    read_bytes_per_token: int
    predicted_decode_tok_s: float
    recommendation: str

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return asdict(self)


@dataclass(frozen=True)
class _Sizer:
    """Byte counts for one (model, quant, dtype) choice; context is the only free variable."""

    arch: ModelShape
    quant: str
    embed_quant: str
    block_size: int
    float_bytes: int
    kv_bytes_per_elem: int
    symmetric: bool = False  # int4 without zero points (the fast preset)
    embed_block_size: int | None = None  # the tables' own int4 block (None: block_size)
    embed_symmetric: bool | None = None  # the tables' symmetry (None: symmetric)

    def matrix(self, rows: int, cols: int, quant: str | None = None) -> int:
        table = quant is not None
        sym = self.embed_symmetric if table and self.embed_symmetric is not None else self.symmetric
        return matrix_bytes(rows, cols, quant or self.quant, float_bytes=self.float_bytes, symmetric=sym,
                            block_size=(self.embed_block_size or self.block_size) if table else self.block_size)

    def layers(self) -> int:
        a = self.arch
        norms = (2 * a.num_hidden_layers + 1) * a.hidden_size * self.float_bytes
        return a.num_hidden_layers * sum(self.matrix(o, i) for o, i in a.linear_shapes()) + norms

    def weights(self) -> int:
        a = self.arch
        table = self.matrix(a.vocab_size, a.hidden_size, self.embed_quant)
        extra = 0
        if a.tie_word_embeddings and self.embed_symmetric is False and self.embed_quant == "int4":
            # GatherBlockQuantized and MatMulNBits share the codes and scales, not the zero points: the
            # Gather's copy holds one per byte (packing.gather_block_quantized).
            extra = a.vocab_size * math.ceil(a.hidden_size / (self.embed_block_size or self.block_size))
        return self.layers() + table * (1 if a.tie_word_embeddings else 2) + extra  # a tied table is stored once

    def read_per_token(self, context: int) -> int:
        a = self.arch
        lm_head = self.matrix(a.vocab_size, a.hidden_size, self.embed_quant)
        gather = self.matrix(1, a.hidden_size, self.embed_quant)  # the input embedding is one row, tied or not
        return self.layers() + lm_head + gather + self.kv(context // 2)  # KV read at the average position

    def kv(self, context: int) -> int:
        a = self.arch
        return 2 * a.num_hidden_layers * a.num_key_value_heads * a.head_dim * context * self.kv_bytes_per_elem

    def overhead(self, context: int) -> int:
        a = self.arch
        logits = PREFILL_CHUNK * a.vocab_size * 4  # fp32 logits for each position of a chunk
        hidden = PREFILL_CHUNK * (4 * a.hidden_size + 3 * a.intermediate_size) * self.float_bytes
        scores = PREFILL_CHUNK * a.num_attention_heads * context * self.float_bytes
        return RUNTIME_BASE_BYTES + logits + hidden + scores

    def total(self, context: int) -> int:
        return self.weights() + self.kv(context) + self.overhead(context)

    def max_context(self, budget: int) -> int:
        lo, hi = 0, self.arch.max_position_embeddings  # total() grows with context: bisect for the last fit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.total(mid) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return lo


def _ctx(n: int) -> str:
    if n < 1024:
        return str(n)
    if n % 1024 == 0:
        return f"{n // 1024}k"
    return f"{math.floor(n / 102.4) / 10:.1f}k"  # rounded down: never promise more context than fits


def _size(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / MiB:.0f} MiB"


def plan(
    arch: ModelShape,
    device: DeviceProfile,
    *,
    quant: str,
    max_context: int | None,
    block_size: int = 32,
    kv_dtype: str | None = None,
    embed_quant: str | None = None,
) -> Plan:
    """Memory and speed estimate of `arch` at `quant` on `device`, with a recommendation.

    `max_context` is the context to plan for (default: the device's default, capped at the
    model's). `kv_dtype` defaults to fp16 for Core ML and fp16 bundles, else fp32.
    `embed_quant` is how the embedding table and lm_head are stored (default: like the rest,
    except in an int4 bundle, ONNX or Core ML, which keeps them at int8 as the quantizer does).
    """
    if quant not in QUANTS:
        raise EdgeLlamaError(f"unknown quant {quant!r}; choose one of {', '.join(QUANTS)}")
    if embed_quant is None and quant == "int4":
        embed_quant = "int8"  # the int4 quantizer's default, for both formats
    if embed_quant is not None and embed_quant not in QUANTS[:-1]:
        raise EdgeLlamaError(f"unknown embed_quant {embed_quant!r}; choose one of {', '.join(QUANTS[:-1])}")
    if kv_dtype is not None and kv_dtype not in FLOAT_BYTES:
        raise EdgeLlamaError(f"unknown KV cache dtype {kv_dtype!r}; choose fp32 or fp16")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        raise EdgeLlamaError(f"block size must be a power of two >= 16, got {block_size!r}")
    limit = arch.max_position_embeddings
    if max_context is None:
        context = min(device.default_context, limit)
    elif isinstance(max_context, bool) or not isinstance(max_context, int) or max_context <= 0:
        raise EdgeLlamaError(f"max context must be a positive integer, got {max_context!r}")
    elif max_context > limit:
        raise EdgeLlamaError(f"max context {max_context} exceeds the model's max_position_embeddings ({limit})")
    else:
        context = max_context

    def float_dtype(q: str) -> str:  # of scales, norms and activations; Core ML runs fp16
        return "fp16" if device.format == "coreml" or q == "fp16" else "fp32"

    def sizer(q: str) -> _Sizer:
        kv = kv_dtype or float_dtype(q)
        fmt = preset_format(q)  # int4-fast brings its own blocks and tables; the caller's apply to the rest
        return _Sizer(arch, fmt["quant"], fmt["embed_quant"] if "embed_quant" in fmt else (embed_quant or q),
                      fmt.get("block_size", block_size), FLOAT_BYTES[float_dtype(q)], FLOAT_BYTES[kv],
                      symmetric=fmt.get("symmetric", False), embed_block_size=fmt.get("embed_block_size"),
                      embed_symmetric=fmt.get("embed_symmetric"))

    budget = device.app_memory_bytes
    s = sizer(quant)
    total = s.total(context)
    fits = total <= budget
    best_ctx = s.max_context(budget)

    def tok_s(q: str) -> float:
        return device.efficiency * device.memory_bandwidth_gbs * 1e9 / sizer(q).read_per_token(context)

    def first_fitting(ctx: int, candidates: tuple[str, ...] = QUANTS) -> str | None:
        return next((q for q in candidates if sizer(q).total(ctx) <= budget), None)

    if fits:
        rec = f"fits at {quant} with {_ctx(context)} context ({_size(total)} of {_size(budget)})"
        if best_ctx > context:
            rec += f"; up to {_ctx(best_ctx)} context fits"
        better = first_fitting(context, QUANTS[: QUANTS.index(quant)])
        if better:
            rec += f"; {better} also fits ({tok_s(better):.1f} tok/s vs {tok_s(quant):.1f})"
    elif best_ctx >= MIN_USEFUL_CONTEXT:
        rec = f"fits at {quant} with {_ctx(best_ctx)} context; {_ctx(context)} needs {_size(total - budget)} more"
        other = first_fitting(context)
        if other:
            rec += f"; {other} fits {_ctx(context)} ({tok_s(other):.1f} tok/s)"
    else:
        smallest = min(context, MIN_USEFUL_CONTEXT)
        other = first_fitting(context) or first_fitting(smallest)
        rec = f"does not fit even at {smallest} tokens"
        if other:
            rec += f": try {other}"
        else:
            short = sizer(QUANTS[-1]).total(smallest) - budget
            rec += f" at any quantization ({QUANTS[-1]} needs {_size(short)} more): pick a smaller model or a bigger device"
    return Plan(
        device=device.name,
        quant=quant,
        context=context,
        kv_dtype=kv_dtype or float_dtype(quant),
        weights_bytes=s.weights(),
        kv_bytes=s.kv(context),
        overhead_bytes=s.overhead(context),
        total_bytes=total,
        budget_bytes=budget,
        fits=fits,
        max_context=best_ctx,
        read_bytes_per_token=s.read_per_token(context),
        predicted_decode_tok_s=round(tok_s(quant), 2),
        recommendation=rec,
    )
