"""Build the Llama 3 ONNX graph directly from weights, one tensor at a time.

Two forms share one builder:
- "portable": standard ONNX ops only (opset 21), explicit concat KV cache; runs on any ONNX runtime.
- "fast": onnxruntime contrib ops: GroupQueryAttention with RoPE and a past/present share buffer,
  SkipSimplifiedLayerNormalization, packed QKV and gate/up projections, last-position logits.
  Head sizes GroupQueryAttention rejects on CPU (not a multiple of 16) keep the standard attention.

Weights never sit in memory all at once: each initializer is streamed to the external data file
as soon as it is made (or kept inline when the whole model is small enough for one protobuf).
Linear layers go through a `LinearEmitter`, so the quantizer plugs in without forking the builder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgellama.errors import EdgeLlamaError
from edgellama.export.config import LlamaConfig, rope_inv_freq
from edgellama.quantize.onnx_weights import MS_DOMAIN
from edgellama.runtime import bundle as B

OPSET = 21
# Float weights (as estimated before quantization) above this go to model.onnx.data, not into
# model.onnx. Protobuf caps a model at 2 GB, but the reason to go external far below that is memory:
# onnxruntime memory-maps external weights, so once MatMulNBits has packed them they leave RSS
# (the engine pages out what stays mapped), where inline ones arrive as a heap copy of the file
# (SmolLM2 int4: peak RSS 304 -> 274 MB). Toy models (the tests' tiny configs) stay one file.
INLINE_LIMIT = 256_000_000
_NEG = -1e9  # additive mask value: large enough to zero a softmax weight, finite so padded rows stay NaN-free
GQA_HEAD_MULTIPLE = 16  # onnxruntime's CPU GroupQueryAttention rejects other head sizes at run time
_NP_TO_ONNX = {np.dtype("float32"): TensorProto.FLOAT, np.dtype("float16"): TensorProto.FLOAT16,
               np.dtype("int64"): TensorProto.INT64, np.dtype("int32"): TensorProto.INT32,
               np.dtype("uint8"): TensorProto.UINT8, np.dtype("int8"): TensorProto.INT8}


@dataclass
class GraphOptions:
    form: str = "fast"  # "fast" | "portable"
    dtype: str = "fp32"  # "fp32" | "fp16": the storage dtype of float weights
    max_context: int = 4096
    logits: str = "last"  # "last" | "all"
    pack_qkv: bool = True
    pack_gate_up: bool = True
    # One padding row per attention run, for bitwise-exact speculative verification (_pad_row).
    # Off where it buys nothing: linears whose one-row kernel rounds differently anyway (block 128).
    pad_row: bool = True

    @property
    def use_gqa(self) -> bool:
        return self.form == "fast"


class WeightSink:
    """Makes initializers; streams their bytes to an external data file when asked."""

    def __init__(self, data_path: Path | None):
        self.data_path = data_path
        self._f = open(data_path, "wb") if data_path else None
        self.nbytes = 0

    def tensor(self, name: str, arr: np.ndarray) -> TensorProto:
        arr = np.asarray(arr, order="C")  # not ascontiguousarray: it turns a 0-d scalar into shape (1,)
        if arr.dtype not in _NP_TO_ONNX:
            raise TypeError(f"unsupported initializer dtype {arr.dtype}")
        t = TensorProto(name=name, data_type=_NP_TO_ONNX[arr.dtype], dims=list(arr.shape))
        return self.raw(t, arr.tobytes())

    def raw(self, t: TensorProto, data: bytes) -> TensorProto:
        """Attach bytes to a prepared TensorProto (used for packed int4 data too)."""
        if self._f is None or len(data) < 1024:
            t.raw_data = data
        else:
            pad = -self._f.tell() % 64  # aligned so onnxruntime can map weights without a copy
            self._f.write(b"\0" * pad)
            offset = self._f.tell()
            self._f.write(data)
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", self.data_path.name), ("offset", str(offset)), ("length", str(len(data)))):
                t.external_data.add(key=k, value=v)
        self.nbytes += len(data)
        return t

    def close(self) -> None:
        if self._f:
            # On disk before the export's verification maps them: the engine pages mapped weights out
            # while the session packs them, and dirty pages cannot be reclaimed (8B shape: peak 10.9 GB).
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()


class WeightEmitter(Protocol):
    """How weights enter the graph: float here, quantized codes in edgellama.quantize.

    Weights arrive in Hugging Face layout, [N, K] (out x in)."""

    def linear(self, g: "GraphBuilder", x: str, name: str, w: np.ndarray, parts=None) -> str: ...
    def embedding(self, g: "GraphBuilder", ids: str, w: np.ndarray, tied: bool) -> str: ...
    def lm_head(self, g: "GraphBuilder", x: str, w: np.ndarray | None, tied: bool) -> str: ...


class FloatWeights:
    """fp32 or fp16 storage; fp16 weights are widened once, when the session loads."""

    EMBED = "model.embed_tokens.weight"

    def linear(self, g: "GraphBuilder", x: str, name: str, w: np.ndarray, parts=None) -> str:
        return g.node("MatMul", [x, g.weight(f"{name}.weight_t", w.T)], name=f"{name}/MatMul")

    def embedding(self, g: "GraphBuilder", ids: str, w: np.ndarray, tied: bool) -> str:
        table = g.init(self.EMBED, w.astype(g.fdtype))
        x = g.node("Gather", [table, ids], name="/model/embed_tokens/Gather")
        if g.fdtype == np.float16:  # widen only the gathered rows
            x = g.node("Cast", [x], name="/model/embed_tokens/Cast", to=TensorProto.FLOAT)
        return x

    def lm_head(self, g: "GraphBuilder", x: str, w: np.ndarray | None, tied: bool) -> str:
        # Gemm(transB=1) reads the [vocab, hidden] table as stored: a tied head shares the embedding, no copy.
        table = self.EMBED if tied else g.init("lm_head.weight", w.astype(g.fdtype))
        if g.fdtype == np.float16:
            table = g.node("Cast", [table], name="/lm_head/CastWeight", to=TensorProto.FLOAT)
        flat = g.node("Reshape", [x, g.const([-1, g.cfg.hidden_size])], name="/lm_head/Flatten")
        y = g.node("Gemm", [flat, table], name="/lm_head/Gemm", transB=1)
        lead = g.node("Slice", [g.node("Shape", [x], name="/lm_head/Shape"), g.const([0]), g.const([2])],
                      name="/lm_head/LeadDims")
        shape = g.node("Concat", [lead, g.const([g.cfg.vocab_size])], name="/lm_head/OutShape", axis=0)
        return g.node("Reshape", [y, shape], name="/lm_head/Unflatten")


@dataclass
class GraphBuilder:
    cfg: LlamaConfig
    opts: GraphOptions
    sink: WeightSink
    emitter: WeightEmitter = field(default_factory=FloatWeights)
    nodes: list = field(default_factory=list)
    inits: list = field(default_factory=list)
    _names: set = field(default_factory=set)
    _consts: dict = field(default_factory=dict)

    @property
    def fdtype(self) -> np.dtype:
        return np.dtype(np.float16 if self.opts.dtype == "fp16" else np.float32)

    # -- primitives -------------------------------------------------------------------------
    def node(self, op: str, inputs: list[str], name: str, outputs: int = 1, domain: str = "", **attrs) -> str | list[str]:
        if name in self._names:
            raise ValueError(f"duplicate node name {name}")
        self._names.add(name)
        outs = [f"{name}/out{i}" if outputs > 1 else f"{name}/out" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, domain=domain or None, **attrs))
        return outs if outputs > 1 else outs[0]

    def init(self, name: str, arr: np.ndarray) -> str:
        self.inits.append(self.sink.tensor(name, arr))
        return name

    def weight(self, name: str, arr: np.ndarray) -> str:
        """A float weight in the storage dtype; fp16 is widened once, at session load."""
        if self.fdtype == np.float16:
            self.init(name, arr.astype(np.float16))
            return self.node("Cast", [name], name=f"{name}/Cast", to=TensorProto.FLOAT)
        return self.init(name, arr.astype(np.float32, copy=False))

    def const(self, values, dtype=np.int64) -> str:
        arr = np.asarray(values, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init(f"const_{len(self._consts)}", arr)
        return self._consts[key]

    def linear(self, x: str, name: str, w: np.ndarray, parts: list[tuple[str, int]] | None = None) -> str:
        """parts names the rows of a packed weight ([(hf_name, rows), ...]) so precision can follow them."""
        return self.emitter.linear(self, x, name, w, parts)

    # -- model pieces -----------------------------------------------------------------------
    def rms_norm(self, x: str, gamma: np.ndarray, name: str) -> str:
        eps = self.cfg.rms_norm_eps
        if self.opts.form == "fast":
            return self.node("SimplifiedLayerNormalization", [x, self.weight(f"{name}.weight", gamma)],
                             name=f"{name}/SimplifiedLayerNorm", axis=-1, epsilon=eps, stash_type=1)
        sq = self.node("Mul", [x, x], name=f"{name}/Square")
        mean = self.node("ReduceMean", [sq, self.const([-1])], name=f"{name}/ReduceMean", keepdims=1)
        var = self.node("Add", [mean, self.const(eps, np.float32)], name=f"{name}/AddEps")
        inv = self.node("Reciprocal", [self.node("Sqrt", [var], name=f"{name}/Sqrt")], name=f"{name}/Reciprocal")
        normed = self.node("Mul", [x, inv], name=f"{name}/Normalize")
        return self.node("Mul", [normed, self.weight(f"{name}.weight", gamma)], name=f"{name}/Scale")

    def add_norm(self, x: str, residual: str, gamma: np.ndarray, name: str) -> tuple[str, str]:
        """(norm(x + residual), x + residual): one fused node in the fast form."""
        if self.opts.form == "fast":
            outs = self.node("SkipSimplifiedLayerNormalization", [x, residual, self.weight(f"{name}.weight", gamma)],
                             name=f"{name}/SkipSimplifiedLayerNorm", outputs=4, domain=MS_DOMAIN,
                             epsilon=self.cfg.rms_norm_eps)
            # Outputs 1-2 (mean, inverse std) are optional: named, the kernel computes and stores them
            # every step (measured 15 against 9 us per node on SmolLM2 decode).
            self.nodes[-1].output[1] = self.nodes[-1].output[2] = ""
            return outs[0], outs[3]
        total = self.node("Add", [x, residual], name=f"{name}/Residual")
        return self.rms_norm(total, gamma, name), total


# The Slices that keep only the last position (logits "last"), on the last layer's attention output
# and residual; evaluate.py bypasses them to score every position.
LAST_TOKEN_SLICES = ("/model/LastToken/attn", "/model/LastToken/residual")
# How many copies of the last row a fast graph appends (0 or 1, see _pad_row); evaluate.py pins it to 0.
PAD_ROW_COUNT = "/model/PadRow/Count"
# Each layer's padding nodes end with these names (f"{layer}/attn/PadRowQ", ...): benchmarks strip them.
PAD_ROW_NODE, DROP_PAD_ROW_NODE = "/attn/PadRow", "/attn/DropPadRow"


@dataclass
class GraphResult:
    model: onnx.ModelProto
    inputs: list[B.TensorSpec]
    outputs: list[B.TensorSpec]
    attention: str
    share_buffer: bool


def _value_info(spec: B.TensorSpec) -> onnx.ValueInfoProto:
    et = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "int64": TensorProto.INT64,
          "int32": TensorProto.INT32}[spec.dtype]
    return helper.make_tensor_value_info(spec.name, et, spec.shape)


def build_llama_graph(
    cfg: LlamaConfig,
    get: Callable[[str], np.ndarray],
    opts: GraphOptions,
    sink: WeightSink,
    emitter: WeightEmitter | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> GraphResult:
    """Emit the whole graph. `get(hf_name)` returns a float32 tensor; each is dropped after use."""
    g = GraphBuilder(cfg, opts, sink, emitter or FloatWeights())
    H, nh, nkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    gqa = opts.use_gqa and hd % GQA_HEAD_MULTIPLE == 0
    share = gqa
    kv_dtype = "float32"
    past_dim = "max_sequence_length" if share else "past_sequence_length"
    present_dim = "max_sequence_length" if share else "total_sequence_length"

    inputs = [B.TensorSpec(B.INPUT_IDS, "int64", ["batch_size", "sequence_length"]),
              B.TensorSpec(B.ATTENTION_MASK, "int64", ["batch_size", "total_sequence_length"])]
    if not gqa:  # GroupQueryAttention derives positions from the mask; the standard form needs them
        inputs.append(B.TensorSpec(B.POSITION_IDS, "int64", ["batch_size", "sequence_length"]))
    for i in range(cfg.num_hidden_layers):
        for kind in ("key", "value"):
            inputs.append(B.TensorSpec(B.past_name(i, kind), kv_dtype, ["batch_size", nkv, past_dim, hd]))
    # "last": the logits of the last `logits_to_keep` positions, an input whose stored default is 1
    # (an initializer that is also a graph input): runtimes that never feed it, onnxruntime-genai
    # and optimum among them, get the last position's logits as before; speculative decoding feeds
    # K+1 to verify K drafted tokens in one run. The declared length stays 1: onnxruntime-genai
    # preallocates logits from it (a symbolic length there means one row per input token).
    logit_seq = 1 if opts.logits == "last" else "sequence_length"
    outputs = [B.TensorSpec(B.LOGITS, "float32", ["batch_size", logit_seq, cfg.vocab_size])]
    for i in range(cfg.num_hidden_layers):
        for kind in ("key", "value"):
            outputs.append(B.TensorSpec(B.present_name(i, kind), kv_dtype, ["batch_size", nkv, present_dim, hd]))

    tied = cfg.tie_word_embeddings
    embed = get("model.embed_tokens.weight")
    x = g.emitter.embedding(g, B.INPUT_IDS, embed, tied)
    del embed

    # Shared per-step tensors.
    pads = None  # the padding row's Pad amounts (fast graph only)
    if gqa:
        mask_sum = g.node("ReduceSum", [B.ATTENTION_MASK, g.const([1])], name="/model/mask/ReduceSum", keepdims=0)
        seqlens = g.node("Cast", [g.node("Sub", [mask_sum, g.const(1)], name="/model/mask/Sub")],
                         name="/model/mask/SeqlensK", to=TensorProto.INT32)
        total = g.node("Gather", [g.node("Shape", [B.ATTENTION_MASK], name="/model/mask/Shape"), g.const(1)],
                       name="/model/mask/TotalLen", axis=0)
        # One position more than the context: the padding row's (_pad_row).
        cos_cache, sin_cache = _rope_tables(g, cfg, opts.max_context + 1, full=False)
        if opts.pad_row:
            pads, seqlens, total = _pad_row(g, seqlens, total, opts.max_context + 1)
            rows = g.node("Shape", [B.INPUT_IDS], name="/model/PadRow/Rows", start=1, end=2)
        total = g.node("Cast", [total], name="/model/mask/TotalLenInt32", to=TensorProto.INT32)
    else:
        cos_full, sin_full = _rope_tables(g, cfg, opts.max_context, full=True)
        cos = g.node("Unsqueeze", [g.node("Gather", [cos_full, B.POSITION_IDS], name="/model/rope/GatherCos"),
                                   g.const([1])], name="/model/rope/UnsqueezeCos")  # [b, 1, s, hd]
        sin = g.node("Unsqueeze", [g.node("Gather", [sin_full, B.POSITION_IDS], name="/model/rope/GatherSin"),
                                   g.const([1])], name="/model/rope/UnsqueezeSin")
        mask = _causal_mask(g)

    residual = None
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        n = f"/model/layers.{i}"
        if residual is None:
            h, residual = g.rms_norm(x, get(f"{p}.input_layernorm.weight"), f"{p}.input_layernorm"), x
        else:
            h, residual = g.add_norm(x, residual, get(f"{p}.input_layernorm.weight"), f"{p}.input_layernorm")
        wq, wk, wv = (get(f"{p}.self_attn.{k}_proj.weight") for k in "qkv")
        if opts.pack_qkv:
            qkv = g.linear(h, f"{p}.self_attn.qkv_proj", np.concatenate([wq, wk, wv], axis=0),
                           [(f"{p}.self_attn.{c}_proj", w.shape[0]) for c, w in zip("qkv", (wq, wk, wv))])
            if gqa:
                q, k, v = qkv, "", ""
            else:
                q, k, v = g.node("Split", [qkv, g.const([nh * hd, nkv * hd, nkv * hd])], name=f"{n}/attn/SplitQKV",
                                 outputs=3, axis=-1)
        else:
            q, k, v = (g.linear(h, f"{p}.self_attn.{c}_proj", w) for c, w in zip("qkv", (wq, wk, wv)))
        del wq, wk, wv
        past_k, past_v = B.past_name(i, "key"), B.past_name(i, "value")
        pres_k, pres_v = B.present_name(i, "key"), B.present_name(i, "value")
        if gqa:
            if pads:
                q, k, v = (t and g.node("Pad", [t, pads], name=f"{n}{PAD_ROW_NODE}{c}", mode="edge")
                           for t, c in zip((q, k, v), "QKV"))
            attn, _, _ = g.node("GroupQueryAttention", [q, k, v, past_k, past_v, seqlens, total, cos_cache, sin_cache],
                                name=f"{n}/attn/GroupQueryAttention", outputs=3, domain=MS_DOMAIN,
                                num_heads=nh, kv_num_heads=nkv, do_rotary=1, rotary_interleaved=0,
                                scale=float(hd ** -0.5), local_window_size=-1)
            g.nodes[-1].output[1], g.nodes[-1].output[2] = pres_k, pres_v
            if pads:
                attn = g.node("Slice", [attn, g.const([0]), rows, g.const([1])], name=f"{n}{DROP_PAD_ROW_NODE}")
        else:
            attn = _standard_attention(g, n, q, k, v, cos, sin, mask, past_k, past_v, pres_k, pres_v)
        if opts.logits == "last" and i == cfg.num_hidden_layers - 1:
            # Past the last attention only the kept positions reach the logits: the last layer's
            # o_proj and MLP run on one row by default (1B shape: 5% of a 128-token prefill's matmul work).
            g.init(B.LOGITS_TO_KEEP, np.array([1], dtype=np.int64))
            keep_input = helper.make_tensor_value_info(B.LOGITS_TO_KEEP, TensorProto.INT64, [1])
            start = g.node("Neg", [B.LOGITS_TO_KEEP], name="/model/LastToken/Start")
            attn, residual = (g.node("Slice", [t, start, g.const([np.iinfo(np.int64).max]), g.const([1])],
                                     name=slice_name) for t, slice_name in zip((attn, residual), LAST_TOKEN_SLICES))
        x = g.linear(attn, f"{p}.self_attn.o_proj", get(f"{p}.self_attn.o_proj.weight"))
        h, residual = g.add_norm(x, residual, get(f"{p}.post_attention_layernorm.weight"),
                                 f"{p}.post_attention_layernorm")
        wg, wu = get(f"{p}.mlp.gate_proj.weight"), get(f"{p}.mlp.up_proj.weight")
        if opts.pack_gate_up:
            gu = g.linear(h, f"{p}.mlp.gate_up_proj", np.concatenate([wg, wu], axis=0),
                          [(f"{p}.mlp.gate_proj", wg.shape[0]), (f"{p}.mlp.up_proj", wu.shape[0])])
            gate, up = g.node("Split", [gu, g.const([cfg.intermediate_size] * 2)], name=f"{n}/mlp/SplitGateUp",
                              outputs=2, axis=-1)
        else:
            gate, up = g.linear(h, f"{p}.mlp.gate_proj", wg), g.linear(h, f"{p}.mlp.up_proj", wu)
        del wg, wu
        if opts.form == "fast":  # the node onnxruntime would fuse Sigmoid+Mul into anyway: saved pre-fused
            act = g.node("QuickGelu", [gate], name=f"{n}/mlp/Silu", domain=MS_DOMAIN, alpha=1.0)
        else:
            act = g.node("Mul", [gate, g.node("Sigmoid", [gate], name=f"{n}/mlp/Sigmoid")], name=f"{n}/mlp/Silu")
        x = g.linear(g.node("Mul", [act, up], name=f"{n}/mlp/GateMul"), f"{p}.mlp.down_proj",
                     get(f"{p}.mlp.down_proj.weight"))
        if progress:
            progress(i + 1, cfg.num_hidden_layers)

    inputs += getattr(g.emitter, "extra_inputs", [])  # e.g. LoRA slots: inputs an emitter added while building
    h, _ = g.add_norm(x, residual, get("model.norm.weight"), "model.norm")
    # A tied head gets the table again only when the emitter deferred it (quantize: the head's statistics).
    head = get("lm_head.weight") if not tied or getattr(g.emitter, "reads_tied_head", False) else None
    logits = g.emitter.lm_head(g, h, head, tied)
    g.nodes.append(helper.make_node("Identity", [logits], [B.LOGITS], name="/lm_head/Output"))

    graph_inputs = [_value_info(s) for s in inputs]
    if opts.logits == "last":  # not in the manifest's inputs: those are what every run must feed
        graph_inputs.append(keep_input)
    if pads:
        graph_inputs.append(helper.make_tensor_value_info(B.PAD_ROWS, TensorProto.INT64, []))
    graph = helper.make_graph(g.nodes, "edgellama_llama3", graph_inputs,
                              [_value_info(s) for s in outputs], initializer=g.inits)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="edgellama")
    model.ir_version = 10
    return GraphResult(model, inputs, outputs, "gqa" if gqa else "mha", share)


def _pad_row(g: GraphBuilder, seqlens: str, total: str, positions: int) -> tuple[str, str, str]:
    """Give every attention run a copy of its last row, when the cache has a slot for it.

    Speculative decoding verifies K drafted tokens in one run and promises greedy's tokens.
    But onnxruntime's attention takes other kernels for a one-row run than for a several-row run
    (MLAS's one-row GEMM), whose sums round differently (1e-6), and MatMulNBits' int8 activations
    (accuracy_level 4) turn such an ulp into a different rounding step: 0.3-0.8 logit differences
    on SmolLM2 int4, enough to change greedy tokens. GroupQueryAttention's rows are the same in any
    run of two or more rows, so each attention gets one more query/key/value row (Pad, mode edge)
    and its output drops it again (Slice): the copy's cache entry lies past the last token and is
    overwritten by the next run. Cost: 2-8% of decode at a 128-token context, 37% at 2048
    (benchmarks/experiments/pad_row_cost.py), so the row count is an optional input (B.PAD_ROWS,
    default 0): plain decode runs one row, a speculating runtime feeds 1 to every run.
    Only attention is padded: MatMulNBits rows are bitwise M-invariant at blocks 16 and 32 (the
    default int4 and int8 presets); padding the whole network cost 16% / 10% of decode, for
    int4-fast's block-128 linears, whose one-row kernel differs by 1e-6.
    The count is 0 when the cache (or the RoPE table) has no slot left, e.g. onnxruntime-genai's
    buffer at max_length: a run is then plain, and never writes out of bounds.
    Returns the Pad amounts for a [batch, seq, hidden] tensor, seqlens_k and total length (int64 scalar)."""
    slots = g.node("Gather", [g.node("Shape", [B.past_name(0, "key")], name="/model/PadRow/CacheShape"), g.const(2)],
                   name="/model/PadRow/CacheSlots", axis=0)
    slots = g.node("Min", [slots, g.const(positions)], name="/model/PadRow/Slots")
    g.init(B.PAD_ROWS, np.array(0, dtype=np.int64))  # overridable: the runtime feeds 1 when it speculates
    count = g.node("Min", [g.node("Sub", [slots, total], name="/model/PadRow/Room"), B.PAD_ROWS], name=PAD_ROW_COUNT)
    pads = g.node("Concat", [g.const([0, 0, 0, 0]), g.node("Unsqueeze", [count, g.const([0])], name="/model/PadRow/Count1"),
                             g.const([0])], name="/model/PadRow/Pads", axis=0)
    seqlens = g.node("Add", [seqlens, g.node("Cast", [count], name="/model/PadRow/CountInt32", to=TensorProto.INT32)],
                     name="/model/PadRow/SeqlensK")
    total = g.node("Add", [total, count], name="/model/PadRow/TotalLen")
    return pads, seqlens, total


def _causal_mask(g: GraphBuilder) -> str:
    """Additive mask [b, 1, 1, s, total]: causal over positions, and padding from attention_mask."""
    total = g.node("Gather", [g.node("Shape", [B.ATTENTION_MASK], name="/model/mask/ShapeMask"), g.const(1)],
                   name="/model/mask/Total", axis=0)
    seq = g.node("Gather", [g.node("Shape", [B.INPUT_IDS], name="/model/mask/ShapeIds"), g.const(1)],
                 name="/model/mask/Seq", axis=0)
    past = g.node("Sub", [total, seq], name="/model/mask/Past")
    kidx = g.node("Range", [g.const(0), total, g.const(1)], name="/model/mask/KeyIdx")
    qidx = g.node("Unsqueeze", [g.node("Range", [past, total, g.const(1)], name="/model/mask/QueryIdx"),
                                g.const([1])], name="/model/mask/QueryCol")
    causal = g.node("LessOrEqual", [kidx, qidx], name="/model/mask/Causal")  # [s, total]
    keep = g.node("Cast", [B.ATTENTION_MASK], name="/model/mask/KeepBool", to=TensorProto.BOOL)
    keep = g.node("Unsqueeze", [keep, g.const([1, 2, 3])], name="/model/mask/KeepExpand")  # [b,1,1,1,total]
    allowed = g.node("And", [causal, keep], name="/model/mask/Allowed")
    return g.node("Where", [allowed, g.const(0.0, np.float32), g.const(_NEG, np.float32)], name="/model/mask/Additive")


def _rope_tables(g: GraphBuilder, cfg: LlamaConfig, max_context: int, full: bool) -> tuple[str, str]:
    """cos/sin [max_context, head_dim/2] (or [.., head_dim] when full) as constant subgraphs.

    Stored as the inverse frequencies plus Range -> Mul -> Cos/Sin, which onnxruntime folds into
    tables once, at session load: the file does not carry a [context, head_dim] table per
    function (33 MB at Llama 3.2's 131,072 positions). The angles are computed in fp32, as
    transformers computes them.
    """
    inv = g.init("rope_inv_freq", rope_inv_freq(cfg).astype(np.float32)[None, :])
    pos = g.node("Range", [g.const(0.0, np.float32), g.const(float(max_context), np.float32), g.const(1.0, np.float32)],
                 name="/model/rope/Positions")
    angles = g.node("Mul", [g.node("Unsqueeze", [pos, g.const([1])], name="/model/rope/PositionsColumn"), inv],
                    name="/model/rope/Angles")
    if full:
        angles = g.node("Concat", [angles, angles], name="/model/rope/AnglesFull", axis=1)
    return (g.node("Cos", [angles], name="/model/rope/CosTable"), g.node("Sin", [angles], name="/model/rope/SinTable"))


def _standard_attention(g: GraphBuilder, n: str, q, k, v, cos, sin, mask, past_k, past_v, pres_k, pres_v) -> str:
    cfg = g.cfg
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

    def heads(t: str, count: int, tag: str) -> str:  # [b, s, count*hd] -> [b, count, s, hd]
        r = g.node("Reshape", [t, g.const([0, 0, count, hd])], name=f"{n}/attn/Reshape{tag}")
        return g.node("Transpose", [r], name=f"{n}/attn/Transpose{tag}", perm=[0, 2, 1, 3])

    def rope(t: str, tag: str) -> str:
        a, b = g.node("Split", [t, g.const([hd // 2, hd // 2])], name=f"{n}/attn/RopeSplit{tag}", outputs=2, axis=-1)
        rot = g.node("Concat", [g.node("Neg", [b], name=f"{n}/attn/RopeNeg{tag}"), a], name=f"{n}/attn/RopeRot{tag}", axis=-1)
        return g.node("Add", [g.node("Mul", [t, cos], name=f"{n}/attn/RopeCos{tag}"),
                              g.node("Mul", [rot, sin], name=f"{n}/attn/RopeSin{tag}")], name=f"{n}/attn/Rope{tag}")

    q = rope(heads(q, nh, "Q"), "Q")
    k = rope(heads(k, nkv, "K"), "K")
    v = heads(v, nkv, "V")
    k_all = g.node("Concat", [past_k, k], name=f"{n}/attn/ConcatK", axis=2)
    v_all = g.node("Concat", [past_v, v], name=f"{n}/attn/ConcatV", axis=2)
    g.nodes.append(helper.make_node("Identity", [k_all], [pres_k], name=f"{n}/attn/PresentK"))
    g.nodes.append(helper.make_node("Identity", [v_all], [pres_v], name=f"{n}/attn/PresentV"))
    group = nh // nkv
    # Grouped heads without copying K/V: q [b, kv, group, s, hd] against k [b, kv, 1, hd, total].
    q5 = g.node("Reshape", [q, g.const([0, nkv, group, -1, hd])], name=f"{n}/attn/GroupQ")
    q5 = g.node("Mul", [q5, g.const(hd ** -0.5, np.float32)], name=f"{n}/attn/ScaleQ")
    kt = g.node("Transpose", [g.node("Unsqueeze", [k_all, g.const([2])], name=f"{n}/attn/GroupK")],
                name=f"{n}/attn/TransposeKT", perm=[0, 1, 2, 4, 3])
    scores = g.node("Add", [g.node("MatMul", [q5, kt], name=f"{n}/attn/QK"), mask], name=f"{n}/attn/Mask")
    probs = g.node("Softmax", [scores], name=f"{n}/attn/Softmax", axis=-1)
    v5 = g.node("Unsqueeze", [v_all, g.const([2])], name=f"{n}/attn/GroupV")
    y = g.node("MatMul", [probs, v5], name=f"{n}/attn/PV")  # [b, kv, group, s, hd]
    y = g.node("Reshape", [y, g.const([0, nh, -1, hd])], name=f"{n}/attn/MergeGroups")
    y = g.node("Transpose", [y], name=f"{n}/attn/TransposeOut", perm=[0, 2, 1, 3])
    return g.node("Reshape", [y, g.const([0, 0, nh * hd])], name=f"{n}/attn/MergeHeads")


def save_graph(result: GraphResult, out_dir: Path) -> list[str]:
    """Write model.onnx (weights already streamed by the sink). Returns the files written."""
    path = out_dir / B.ONNX_MODEL
    try:
        onnx.save_model(result.model, str(path))
    except ValueError as exc:
        raise EdgeLlamaError(f"cannot save the ONNX graph: {exc}") from None
    files = [B.ONNX_MODEL]
    if (out_dir / B.ONNX_DATA).exists():
        if os.path.getsize(out_dir / B.ONNX_DATA) == 0:
            os.remove(out_dir / B.ONNX_DATA)
        else:
            files.append(B.ONNX_DATA)
    return files
