"""Will a model fit on a device, with how much context, and how fast will it decode?

Decode is memory-bound: each token reads every weight once (the embedding table only for one
row) plus the KV cache so far, and each layer also pays a fixed cost that does not scale with
bytes (op dispatch, attention, norms):

    seconds per token = bytes read / (efficiency x bandwidth) + layers x layer_cost_us

On onnxruntime's CPU provider the bytes are the weights as MatMulNBits holds them after packing
at load (accuracy_level 4: codes plus an fp32 scale and an fp32 block sum per block), not as the
file stores them: int4 in blocks of 32 is 4.6 bits per weight on disk and 6 in memory.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
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
    prec = _precision(quant, block_size)
    return (replace(prec, zero_points=False) if symmetric else prec).file_bytes(rows, cols, float_bytes)


@dataclass(frozen=True)
class Precision:
    """How one weight matrix is stored: bits (4 or 8 quantized, 16 or 32 float) and block size."""

    bits: int
    block: int = 32
    zero_points: bool = False  # asymmetric int4: a 4-bit zero point per block

    @property
    def quantized(self) -> bool:
        return self.bits < 16

    def file_bytes(self, rows: int, cols: int, scale_bytes: int) -> int:
        if not self.quantized:
            return rows * cols * self.bits // 8
        blocks = math.ceil(cols / self.block)  # cols padded to whole blocks
        zp = math.ceil(blocks * self.bits / 8) if self.zero_points else 0
        return rows * (blocks * self.block * self.bits // 8 + blocks * scale_bytes + zp)

    def scales(self, rows: int, cols: int) -> int:
        return rows * math.ceil(cols / self.block) if self.quantized else 0

    def packed_bytes(self, rows: int, cols: int) -> int:
        """In memory after MatMulNBits' prepack on CPU: codes, an fp32 scale and an fp32 block sum per block."""
        if not self.quantized:
            return rows * cols * self.bits // 8
        blocks = math.ceil(cols / self.block)
        zp = math.ceil(blocks * self.bits / 8) if self.zero_points else 0
        return rows * (blocks * self.block * self.bits // 8 + blocks * 8 + zp)


def _precision(quant: str, block: int) -> Precision:
    if quant in FLOAT_BYTES:
        return Precision(8 * FLOAT_BYTES[quant])
    if quant == "int8":
        return Precision(8, block)
    if quant == "int4":
        return Precision(4, block, zero_points=True)
    raise EdgeLlamaError(f"unknown quantization {quant!r}; choose one of {', '.join(QUANTS)}")


def preset_weights(quant: str, arch: "ModelShape") -> "WeightFormat | None":
    """The exact format an export at this preset (int4, int4-fast, int8 or an alias) writes: the
    quantizer's own policy run over the model's tensor names (planned_summary), so the planner never
    restates it. None for float dtypes, or without the export extra (no quantizer installed)."""
    if quant in FLOAT_BYTES:
        return None
    try:
        from edgellama.export.config import LlamaConfig
        from edgellama.export.onnx_graph import FloatWeights
        from edgellama.quantize.onnx_weights import make_emitter, planned_summary
        from edgellama.quantize.presets import resolve
    except ModuleNotFoundError:
        return None
    preset = resolve(quant)
    cfg = LlamaConfig.from_hf({"model_type": "llama", **asdict(arch)})
    emitter, _ = make_emitter(cfg, {"preset": preset.name, "bits": preset.options["bits"]}, form="fast",
                              fallback=FloatWeights())
    return WeightFormat.from_record(planned_summary(emitter), "fp32")


LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # linear_shapes' order


@dataclass(frozen=True)
class WeightFormat:
    """Every weight's precision: one per linear kind, some kinds at int8 in a number of layers, and the
    embedding table / lm_head. Built from a bundle's quantization record, or uniform for a plain quant."""

    linear: dict[str, Precision]
    int8_layers: dict[str, tuple[int, Precision]]  # kind -> (layers at int8, that precision)
    table: Precision  # the input embedding
    head: Precision  # the lm_head (the same table when tied)
    scale_bytes: int  # per stored scale in the file
    label: str

    @classmethod
    def uniform(cls, quant: str, block_size: int = 32, embed_quant: str | None = None, *,
                scale_bytes: int = 4) -> "WeightFormat":
        body, table = _precision(quant, block_size), _precision(embed_quant or quant, block_size)
        label = quant + (f" (block {block_size})" if body.quantized else "")
        return cls({leaf: body for leaf in LEAVES}, {}, table, table, scale_bytes, label)

    @classmethod
    def from_record(cls, q: dict[str, Any], dtype: str) -> "WeightFormat":
        """From a manifest's quantization record: its block sizes and the names of its int8 tensors."""
        bits, block = int(q["bits"]), int(q.get("block_size") or 32)
        int4 = Precision(4, block, zero_points=not q.get("symmetric"))
        int8 = Precision(8, int(q.get("int8_block_size") or block))
        linear = {leaf: int4 if bits == 4 else Precision(8, block) for leaf in LEAVES}
        if bits == 4 and q.get("qk_block_size"):
            linear["q_proj"] = linear["k_proj"] = replace(int4, block=int(q["qk_block_size"]))
        counts: dict[str, int] = {}
        for name in q.get("int8_tensors") or []:
            parts = name.split(".")
            if len(parts) > 3 and parts[1] == "layers":
                counts[parts[-1]] = counts.get(parts[-1], 0) + 1
        table_block = int(q.get("embedding_block_size") or (int8.block if bits == 4 else block))

        def table(choice: str | None) -> Precision:
            if choice in (None, "keep"):
                return _precision(dtype, block)
            return Precision(8, table_block) if choice == "int8" else Precision(4, table_block, zero_points=True)

        scale_bytes = 4 if q.get("scale_dtype") == "float32" else 2
        label = q.get("preset") or f"int{bits} ({q.get('method', 'rtn')}, block {block})"
        return cls(linear, {k: (n, int8) for k, n in counts.items()}, table(q.get("embeddings")),
                   table(q.get("lm_head")), scale_bytes, label)

    def _layer_sum(self, arch: "ModelShape", size) -> int:
        total = 0
        for leaf, (rows, cols) in zip(LEAVES, arch.linear_shapes()):
            n8, p8 = self.int8_layers.get(leaf, (0, None))
            for prec, n in ((self.linear[leaf], arch.num_hidden_layers - n8), (p8, n8)):
                if prec is not None and n:
                    total += n * size(prec, rows, cols)
        return total

    def layer_bytes(self, arch: "ModelShape", packed: bool) -> int:
        """All decoder layers' linear weights, as stored (packed=False) or as MatMulNBits holds them."""
        if packed:
            return self._layer_sum(arch, lambda p, r, c: p.packed_bytes(r, c))
        return self._layer_sum(arch, lambda p, r, c: p.file_bytes(r, c, self.scale_bytes))

    def layer_scales(self, arch: "ModelShape") -> int:
        return self._layer_sum(arch, lambda p, r, c: p.scales(r, c))


@dataclass(frozen=True)
class Plan:
    device: str
    quant: str
    context: int
    kv_dtype: str
    weights_bytes: int  # as the bundle stores them
    weights_memory_bytes: int  # as the runtime holds them (onnxruntime CPU: packed at load)
    kv_bytes: int
    overhead_bytes: int
    total_bytes: int  # the predicted peak RSS: weights in memory + KV cache + overhead
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
    """Byte counts and decode time for one (model, weight format, device) choice; context is the only free variable."""

    arch: ModelShape
    fmt: WeightFormat
    float_bytes: int
    kv_bytes_per_elem: int
    packed: bool  # onnxruntime's CPU provider: MatMulNBits packs quantized weights at load

    def _matrix(self, prec: Precision, rows: int, cols: int, packed: bool) -> int:
        return prec.packed_bytes(rows, cols) if packed else prec.file_bytes(rows, cols, self.fmt.scale_bytes)

    def norms(self) -> int:
        return (2 * self.arch.num_hidden_layers + 1) * self.arch.hidden_size * self.float_bytes

    def weights(self) -> int:
        a, f = self.arch, self.fmt
        table = self._matrix(f.table, a.vocab_size, a.hidden_size, False)
        head = 0 if a.tie_word_embeddings else self._matrix(f.head, a.vocab_size, a.hidden_size, False)
        if a.tie_word_embeddings and f.table.bits == 4 and f.table.zero_points:
            # GatherBlockQuantized and MatMulNBits share the codes and scales, not the zero points:
            # the Gather's copy holds one per byte (packing.gather_block_quantized).
            head = f.table.scales(a.vocab_size, a.hidden_size)
        return f.layer_bytes(a, packed=False) + table + head + self.norms()  # a tied table is stored once

    def weights_in_memory(self) -> int:
        if not self.packed:
            return self.weights()
        a, f = self.arch, self.fmt
        head = self._matrix(f.head, a.vocab_size, a.hidden_size, True)
        # The input table is read a row per token from the file mapping, which the engine pages out.
        # float16 scales reach MatMulNBits through a Cast that onnxruntime folds into a float32 copy
        # and keeps after packing (163 MB on the 1B shape, docs/performance.md).
        widened = 0
        if f.scale_bytes == 2:
            widened = 4 * (f.layer_scales(a) + f.head.scales(a.vocab_size, a.hidden_size))
        return f.layer_bytes(a, packed=True) + head + self.norms() + widened

    def read_per_token(self, context: int) -> int:
        a, f = self.arch, self.fmt
        lm_head = self._matrix(f.head, a.vocab_size, a.hidden_size, self.packed)
        gather = f.table.file_bytes(1, a.hidden_size, f.scale_bytes)  # the input embedding is one row, tied or not
        return f.layer_bytes(a, packed=self.packed) + self.norms() + lm_head + gather + self.kv(context // 2)

    def seconds_per_token(self, device: DeviceProfile, context: int) -> float:
        roofline = self.read_per_token(context) / (device.efficiency * device.memory_bandwidth_gbs * 1e9)
        return roofline + self.arch.num_hidden_layers * device.layer_cost_us * 1e-6

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
        return self.weights_in_memory() + self.kv(context) + self.overhead(context)

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
    weights: WeightFormat | None = None,
) -> Plan:
    """Memory and speed estimate of `arch` at `quant` on `device`, with a recommendation.

    `max_context` is the context to plan for (default: the device's default, capped at the
    model's). `kv_dtype` defaults to fp16 for Core ML and fp16 bundles, else fp32.
    `embed_quant` is how the embedding table and lm_head are stored (default: like the rest,
    except in an int4 bundle, ONNX or Core ML, which keeps them at int8 as the quantizer does).
    `weights`: the exact format of a bundle (WeightFormat.from_record), instead of a uniform
    `quant` at `block_size`; `quant` then only names its family for the other options compared.
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

    packed = device.format == "onnx" and device.accelerator == "CPUExecutionProvider"

    def sizer(q: str) -> _Sizer:
        kv = kv_dtype or float_dtype(q)
        fb = FLOAT_BYTES[float_dtype(q)]
        if q == quant and weights is not None:
            fmt = weights
        elif q not in ("fp32", "fp16", "int8", "int4"):  # a preset with its own blocks and tables (int4-fast)
            fmt = preset_weights(q, arch) or WeightFormat.uniform("int4", 128, "int4", scale_bytes=fb)
        else:
            fmt = WeightFormat.uniform(q, block_size, embed_quant if q == quant else ("int8" if q == "int4" else q),
                                       scale_bytes=fb)
        return _Sizer(arch, fmt, fb, FLOAT_BYTES[kv], packed)

    budget = device.app_memory_bytes
    s = sizer(quant)
    total = s.total(context)
    fits = total <= budget
    best_ctx = s.max_context(budget)

    def tok_s(q: str) -> float:
        return 1.0 / sizer(q).seconds_per_token(device, context)

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
        weights_memory_bytes=s.weights_in_memory(),
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
