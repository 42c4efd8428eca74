"""Quantized weights in the ONNX graph: the WeightEmitter the graph builder calls for every weight.

Fast form: com.microsoft MatMulNBits for linear layers and the lm_head, GatherBlockQuantized
for the embedding; a tied embedding is quantized once and its packed table shared by both.
Portable form: standard opset-21 DequantizeLinear (INT4/UINT4/INT8, blocked) feeding MatMul,
Gather and Gemm, so any ONNX runtime loads it.

Numerics (codes, scales, searches) live in numerics.py / methods.py; this module only decides
precision per tensor and lays the codes out as graph nodes. It knows the graph builder only
by the calls it makes (node, init, const, sink), so quantize never imports export.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from onnx import TensorProto, helper

from edgellama.errors import EdgeLlamaError
from edgellama.quantize.methods import METHODS, quantize
from edgellama.quantize.numerics import QuantizedTensor
from edgellama.quantize.presets import resolve as resolve_preset
from edgellama.quantize.packing import (dequantize_linear, gather_block_quantized, matmul_nbits,
                                        onnx_raw_data)

# MatMulNBits accuracy_level 4 computes with int8 activations: about twice the decode speed
# of fp32 activations on this class of CPU, for a small activation-rounding error (measured
# in docs/quantization.md). The portable form's DequantizeLinear+MatMul pairs are fused into
# the same kernel by onnxruntime; the session entry below makes that choice explicit.
DEFAULT_ACCURACY_LEVEL = 4
MS_DOMAIN = "com.microsoft"
TIED_EMBEDDING_OUT = "/model/embed_tokens/out"  # a deferred tied table's embedding output (QuantizedWeights)
PRECISIONS = ("keep", "int8", "int4")
METHOD_NAMES = METHODS + ("gptq", "mixed")


@dataclass
class QuantOptions:
    bits: int = 4
    block_size: int = 32
    # The embedding table's own block size (None: block_size). A Gather reads no activations, so
    # only a tied lm_head's int8 activation blocks care; docs/quantization.md has the trade.
    embedding_block_size: int | None = None
    # The tables' (embedding, lm_head) symmetry; None: as `symmetric`. The fast preset's linears are
    # symmetric for MatMulNBits' fast path, its table keeps zero points (docs/quantization.md, Presets).
    table_symmetric: bool | None = None
    method: str = "hqq"  # rtn | mse | hqq: how each block's scale and zero point are fitted
    mixed: bool = True  # keep the most sensitive projections at 8 bits, as Q4_K_M does
    gptq: bool = False  # GPTQ error compensation over calibration inputs (needs text: --calib)
    smooth: bool = True  # per-channel input scaling searched on calibration inputs (quantize/smoothing.py)
    symmetric: bool | None = None  # None: asymmetric int4, symmetric int8
    embeddings: str = "int8"  # keep | int8 | int4
    lm_head: str = "int8"
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL
    # Stored scale precision. MatMulNBits wants scales in the activations' dtype, so float16
    # scales reach it through a Cast that onnxruntime folds at session load: half a bit per
    # weight less on disk at block 32 (int4 5.125 -> 4.625), nothing at run time.
    scale_dtype: str = "float16"
    preset: str | None = None  # the --quant preset these options came from (quantize/presets.py)
    preset_overrides: tuple[str, ...] = ()  # options given explicitly that differ from the preset's

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantOptions":
        d = dict(d)
        preset, overrides = d.pop("preset", None), ()
        if preset is not None:
            p = resolve_preset(preset)
            preset = p.name
            overrides = tuple(sorted(k for k, v in d.items() if k not in p.options or p.options[k] != v))
            if "bits" in overrides:  # every preset names its bits
                raise EdgeLlamaError(f"--quant {p.name} is {p.options['bits']}-bit: it cannot take --bits {d['bits']}")
            d = {**p.options, **d}
        bits = d.pop("bits", 4)
        if bits not in (4, 8):
            raise EdgeLlamaError(f"--bits must be 4 or 8, got {bits}")
        method = d.pop("method", None) or ("mixed" if bits == 4 else "rtn")
        mixed, gptq = method == "mixed", method == "gptq"
        if mixed or gptq:
            method = "hqq"
        if method not in METHODS:
            raise EdgeLlamaError(f"unknown quantization method {method!r}: expected one of {METHOD_NAMES}")
        default_head = "int8"
        opts = cls(bits=bits, method=method, mixed=mixed and bits == 4, gptq=gptq, smooth=bool(d.pop("smooth", True)),
                   # 32 for int8 too: accuracy_level 4 quantizes activations per weight block, and on
                   # de-gridded SmolLM2 int8 KLD went 0.018 (128) -> 0.0098 (64) -> 0.0057 (32);
                   # 128 also pads K = 576 rows to 640. docs/quantization.md has the table.
                   block_size=d.pop("block_size", None) or (MIXED_BLOCK if mixed and bits == 4 else 32),
                   embedding_block_size=d.pop("embedding_block_size", None),
                   embeddings=d.pop("embeddings", None) or ("int8" if bits == 8 else default_head),
                   lm_head=d.pop("lm_head", None) or ("int8" if bits == 8 else default_head),
                   symmetric=d.pop("symmetric", None), table_symmetric=d.pop("table_symmetric", None),
                   accuracy_level=d.pop("accuracy_level", DEFAULT_ACCURACY_LEVEL),
                   scale_dtype=d.pop("scale_dtype", None) or "float16",
                   preset=preset, preset_overrides=overrides)
        if d:
            raise EdgeLlamaError(f"unknown quantization option(s): {', '.join(sorted(d))}")
        for bs in (opts.block_size, opts.embedding_block_size or 16):
            if bs < 16 or bs & (bs - 1):
                raise EdgeLlamaError(f"--block-size must be a power of two >= 16, got {bs}")
        for name in ("embeddings", "lm_head"):
            if getattr(opts, name) not in PRECISIONS:
                raise EdgeLlamaError(f"--{name.replace('_', '-')} must be one of {PRECISIONS}")
        if opts.scale_dtype not in ("float16", "float32"):
            raise EdgeLlamaError(f"scale_dtype must be float16 or float32, got {opts.scale_dtype!r}")
        if opts.accuracy_level not in (0, 1, 2, 3, 4):
            raise EdgeLlamaError(f"accuracy_level must be 0..4, got {opts.accuracy_level}")
        return opts


# The mixed policy (the int4 default), measured on de-gridded SmolLM2 against llama.cpp's Q4_K_M
# (docs/quantization.md) and for speed (docs/performance.md): int4 in blocks of 32, q/k in blocks
# of QK_BLOCK, and int8 (blocks of INT8_BLOCK) for v_proj, o_proj, the embedding/lm_head and
# down_proj in this share of the layers, those with the heaviest-tailed weights (rank_layers).
# Without a ranking (an emitter used on its own), the same share goes to the outermost layers. Block 16 everywhere scored
# better (KLD 0.067 against 0.073) but MatMulNBits runs it ~1.5x slower per weight than block 32
# and unpacks it to twice the memory; int8 b32 runs faster than int4 b16.
MIXED_BLOCK = 32
QK_BLOCK = 16  # q/k gain most from small blocks per byte: 0.0885 -> 0.0743 for 1 MB on SmolLM2
INT8_BLOCK = 32
INT8_SHARE = {"down_proj": 0.3}
INT8_ALWAYS = ("v_proj", "o_proj")  # the most sensitive weights per byte (small under GQA, for v)


class QuantizedWeights:
    def __init__(self, cfg, opts: QuantOptions, form: str, fallback, act_scales: dict[str, np.ndarray] | None = None,
                 act_inputs: dict[str, np.ndarray] | None = None):
        """cfg: the model's LlamaConfig; fallback: the float emitter, for tensors kept float;
        act_scales: per-input-channel activation magnitudes by HF module name (calibration), or None;
        act_inputs: calibration inputs [rows, K] by HF module name, for GPTQ, or None."""
        self.cfg, self.opts, self.form, self.fallback = cfg, opts, form, fallback
        self.act_scales = act_scales or {}
        self.act_inputs = act_inputs or {}
        self._hessians: dict[int, np.ndarray] = {}
        self.int8_layers: dict[str, set[int]] = {}  # leaf -> layers, set by rank_layers
        self.fast = form == "fast"
        self.tensor_bits: dict[str, int] = {}
        self._tied_table: dict[str, str] | None = None
        self._deferred_table: tuple[int, str] | None = None  # (node index, ids) of a tied table not yet built

    # -- precision policy ---------------------------------------------------------------------
    def bits_for(self, name: str) -> int:
        """Bits for one HF-named projection (e.g. model.layers.3.self_attn.v_proj)."""
        o = self.opts
        if o.bits == 8 or not o.mixed:
            return o.bits
        parts = name.split(".")
        if len(parts) > 3 and parts[1] == "layers":
            if parts[-1] in INT8_ALWAYS:
                return 8
            layer, leaf = int(parts[2]), parts[-1]
            if leaf in INT8_SHARE and leaf not in self.int8_layers:
                # Unranked: one policy, one size. The first and last layers are the usual outliers.
                n = self.cfg.num_hidden_layers
                self.rank_layers(leaf, {i: -min(i, n - 1 - i) for i in range(n)})
            if leaf in self.int8_layers:
                return 8 if layer in self.int8_layers[leaf] else 4
        return 4

    def rank_layers(self, leaf: str, scores: dict[int, float]) -> None:
        """Keep `leaf` at int8 in the INT8_SHARE of layers with the highest scores (worst at int4)."""
        n = round(INT8_SHARE.get(leaf, 0.0) * len(scores))
        self.int8_layers[leaf] = set(sorted(scores, key=lambda i: (-scores[i], i))[:n])

    def _hessian(self, name: str | None) -> np.ndarray | None:
        """H = X^T X of the named linear's calibration inputs (shared by the linears that read them)."""
        x = self.act_inputs.get(name) if (name and self.opts.gptq) else None
        if x is None:
            return None
        if id(x) not in self._hessians:
            self._hessians = {id(x): x.T.astype(np.float64) @ x.astype(np.float64)}  # one at a time: K^2 each
        return self._hessians[id(x)]

    def block_for(self, name: str, bits: int) -> int:
        """Block size of one tensor: an int4 bundle's int8 tensors keep blocks of at least INT8_BLOCK,
        which cost half as much per weight at 8 bits and serve the int8 activation blocks well."""
        if name == "lm_head" and self.opts.embedding_block_size:  # an untied head is a table too
            return self.opts.embedding_block_size
        if self.opts.bits == 4 and bits == 8:
            return max(self.opts.block_size, INT8_BLOCK)
        if self.opts.mixed and name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "q_proj_k_proj"):
            return min(self.opts.block_size, QK_BLOCK)
        return self.opts.block_size

    def table_bits(self, name: str) -> int:
        """Bits of a quantized table: "model.embed_tokens" (--embeddings) or "lm_head" (--lm-head)."""
        return 8 if (self.opts.embeddings if name == "model.embed_tokens" else self.opts.lm_head) == "int8" else 4

    @property
    def embedding_block(self) -> int:
        return self.opts.embedding_block_size or self.block_for("model.embed_tokens", self.table_bits("model.embed_tokens"))

    def _quantize(self, w: np.ndarray, bits: int, act_scale: np.ndarray | None = None,
                  name: str | None = None, block_size: int | None = None, table: bool = False) -> QuantizedTensor:
        sym = self.opts.symmetric if self.opts.symmetric is not None else (bits == 8)
        if table and self.opts.table_symmetric is not None:
            sym = self.opts.table_symmetric
        # The int8 tensors of a mixed bundle round to nearest: 256 levels leave a search little to
        # find, and on Llama 3.2 1B's 262M-weight embedding the search is most of the export time.
        method = "rtn" if (self.opts.mixed and bits == 8) else self.opts.method
        return quantize(w, bits, block_size or self.opts.block_size, method, symmetric=sym, act_scale=act_scale,
                        scale_dtype=self.opts.scale_dtype, hessian=self._hessian(name))

    def quantize_tensor(self, name: str, w: np.ndarray) -> QuantizedTensor:
        """One weight as this policy quantizes it, for a format that stores its own ops (Core ML).

        name: an HF linear ("model.layers.3.mlp.down_proj") or a table ("model.embed_tokens",
        "lm_head"). The same precision, block, method and calibration weighting as the ONNX nodes;
        a table tied to the lm_head is quantized as the embedding is, once for both."""
        if name in ("model.embed_tokens", "lm_head"):
            bits = self.table_bits(name)
            if name == "lm_head" and not self.cfg.tie_word_embeddings:
                qt = self._quantize(w, bits, self.act_scales.get("lm_head"), "lm_head", self.block_for("lm_head", bits),
                                    table=True)
            else:
                # A tied table is the lm_head too: its search weighs columns by the head's inputs
                # (embedding() defers it until they are known); a Gather alone reads no activations.
                head = self.act_scales.get("lm_head") if self.cfg.tie_word_embeddings else None
                qt = self._quantize(w, bits, head, block_size=self.embedding_block, table=True)
        else:
            bits = self.bits_for(name)
            qt = self._quantize(w, bits, self.act_scales.get(name), name, self.block_for(name, bits))
        self.tensor_bits[name] = bits
        return qt

    # -- node emission ------------------------------------------------------------------------
    def _scales(self, g, name: str, scales: np.ndarray) -> str:
        """The scales as a float32 graph value, stored in opts.scale_dtype (a folded Cast if float16)."""
        if self.opts.scale_dtype == "float32":
            return g.init(f"{name}.scales", scales.astype(np.float32))
        stored = g.init(f"{name}.scales", scales.astype(np.float16))
        return g.node("Cast", [stored], name=f"{name}/ScalesToFloat", to=TensorProto.FLOAT)

    def _matmul_nbits(self, g, x: str, name: str, qt: QuantizedTensor, b_name: str | None = None) -> str:
        mw = matmul_nbits(qt)
        if b_name is None:
            b_name = g.init(f"{name}.qweight", mw.B)
        inputs = [x, b_name, self._scales(g, name, mw.scales)]
        if mw.zero_points is not None:
            inputs.append(g.init(f"{name}.qzeros", mw.zero_points))
        return g.node("MatMulNBits", inputs, name=f"{name}/MatMulNBits", domain=MS_DOMAIN,
                      accuracy_level=self.opts.accuracy_level, **mw.attributes)

    def _dq(self, g, name: str, qt: QuantizedTensor, layout: str) -> str:
        dq = dequantize_linear(qt, layout=layout)
        t = TensorProto(name=f"{name}.qweight", data_type=getattr(TensorProto, dq.onnx_type), dims=list(dq.data.shape))
        g.inits.append(g.sink.raw(t, onnx_raw_data(dq.data, qt.bits)))
        inputs = [t.name, g.init(f"{name}.scales", dq.scale.astype(np.float32))]
        if dq.zero_point is not None:
            zt = TensorProto(name=f"{name}.qzeros", data_type=getattr(TensorProto, dq.onnx_type),
                             dims=list(dq.zero_point.shape))
            g.inits.append(g.sink.raw(zt, onnx_raw_data(dq.zero_point, qt.bits)))
            inputs.append(zt.name)
        return g.node("DequantizeLinear", inputs, name=f"{name}/DequantizeLinear", axis=dq.axis,
                      block_size=dq.block_size)

    def _linear_q(self, g, x: str, name: str, w: np.ndarray, bits: int, act_scale: np.ndarray | None = None,
                  input_of: str | None = None) -> str:
        qt = self._quantize(w, bits, act_scale, input_of, self.block_for(name, bits))
        self.tensor_bits[name] = bits
        if self.fast:
            return self._matmul_nbits(g, x, name, qt)
        return g.node("MatMul", [x, self._dq(g, name, qt, "kn")], name=f"{name}/MatMul")

    def linear(self, g, x: str, name: str, w: np.ndarray, parts=None) -> str:
        """parts: [(hf_name, rows), ...] of a packed weight; runs of equal precision share one node."""
        parts = parts or [(name, w.shape[0])]
        act = self.act_scales.get(parts[0][0])  # the parts of a packed weight share one input
        groups: list[tuple[int, int, int, list[str]]] = []  # (bits, start, stop, names)
        row = 0
        for part_name, rows in parts:
            bits = self.bits_for(part_name)
            if groups and groups[-1][0] == bits:
                b, s, _, names = groups[-1]
                groups[-1] = (b, s, row + rows, names + [part_name])
            else:
                groups.append((bits, row, row + rows, [part_name]))
            row += rows
        if len(groups) == 1:
            return self._linear_q(g, x, name, w, groups[0][0], act, parts[0][0])
        outs = []
        for bits, start, stop, names in groups:
            sub = name if len(names) == len(parts) else f"{name}.{'_'.join(n.rsplit('.', 1)[-1] for n in names)}"
            outs.append(self._linear_q(g, x, sub, w[start:stop], bits, act, parts[0][0]))
        return g.node("Concat", outs, name=f"{name}/ConcatParts", axis=-1)

    @property
    def reads_tied_head(self) -> bool:
        """True once a tied table waits for lm_head(): the graph builder then hands it the table again."""
        return self._deferred_table is not None

    def embedding(self, g, ids: str, w: np.ndarray, tied: bool) -> str:
        o = self.opts
        if o.embeddings == "keep":
            return self.fallback.embedding(g, ids, w, tied)
        self.tensor_bits["model.embed_tokens"] = self.table_bits("model.embed_tokens")
        if tied and o.lm_head == o.embeddings:
            # A tied table is the lm_head too, and its search weighs each column by the head's input
            # magnitude (the final norm's outlier channels carry the logits): int4-fast's KLD 0.350 ->
            # 0.319 at the same bytes (docs/quantization.md). Calibration reaches the head's input
            # only after the last layer, so lm_head() quantizes the table and splices its nodes here.
            self._deferred_table = (len(g.nodes), ids)
            return TIED_EMBEDDING_OUT
        return self._gather(g, ids, self.quantize_tensor("model.embed_tokens", w), share=False)

    def _gather(self, g, ids: str, qt: QuantizedTensor, share: bool) -> str:
        """The embedding's nodes; with share, the table is also kept for the lm_head (_tied_table)."""
        H = self.cfg.hidden_size
        name = "model.embed_tokens"
        if not self.fast:
            table = self._dq(g, name, qt, "nk")  # [V, H] float
            if share:
                self._tied_table = {"float": table}
            return g.node("Gather", [table, ids], name="/model/embed_tokens/Gather")
        if share:
            # One packed table for both nodes: GatherBlockQuantized reads MatMulNBits's 3-D B directly.
            mw = matmul_nbits(qt)
            b = g.init(f"{name}.qweight", mw.B)
            scales = self._scales(g, name, mw.scales)
            gw = gather_block_quantized(qt, tied=True)
            scales3 = g.node("Unsqueeze", [scales, g.const([2])], name="/model/embed_tokens/ScalesForGather")
            inputs = [b, ids, scales3]
            if gw.zero_points is not None:
                inputs.append(g.init(f"{name}.gather_zeros", gw.zero_points))
            self._tied_table = {"qweight": b, "scales": scales,
                                "qzeros": g.init(f"{name}.qzeros", mw.zero_points) if mw.zero_points is not None else ""}
            y = g.node("GatherBlockQuantized", inputs, name="/model/embed_tokens/GatherBlockQuantized",
                       domain=MS_DOMAIN, **gw.attributes)
            flat = g.node("Reshape", [y, g.const([0, 0, qt.n_blocks * qt.block_size])],
                          name="/model/embed_tokens/MergeBlocks")
            if qt.n_blocks * qt.block_size != H:
                flat = g.node("Slice", [flat, g.const([0]), g.const([H]), g.const([2])], name="/model/embed_tokens/Trim")
            return flat
        gw = gather_block_quantized(qt, tied=False)
        inputs = [g.init(f"{name}.qweight", gw.data), ids, self._scales(g, name, gw.scales)]
        if gw.zero_points is not None:
            inputs.append(g.init(f"{name}.qzeros", gw.zero_points))
        return g.node("GatherBlockQuantized", inputs, name="/model/embed_tokens/GatherBlockQuantized",
                      domain=MS_DOMAIN, **gw.attributes)

    def _build_tied_table(self, g, w: np.ndarray) -> None:
        """Quantize the deferred tied table with the head's statistics and put its embedding nodes
        where embedding() was called, their output renamed to the name it returned."""
        mark, ids = self._deferred_table
        self._deferred_table = None
        start = len(g.nodes)
        out = self._gather(g, ids, self.quantize_tensor("model.embed_tokens", w), share=True)
        nodes = g.nodes[start:]
        del g.nodes[start:]
        for n in nodes:
            n.output[:] = [TIED_EMBEDDING_OUT if o == out else o for o in n.output]
        g.nodes[mark:mark] = nodes

    def lm_head(self, g, x: str, w: np.ndarray | None, tied: bool) -> str:
        o = self.opts
        if o.lm_head == "keep":
            if tied and o.embeddings != "keep":
                raise EdgeLlamaError("a tied lm_head cannot stay float when the embedding is quantized: "
                                     "use the same precision for --embeddings and --lm-head")
            return self.fallback.lm_head(g, x, w, tied)
        if self._deferred_table is not None:
            if w is None:
                raise ValueError("lm_head(): a deferred tied table needs the table (reads_tied_head)")
            self._build_tied_table(g, w)
        if self._tied_table is not None:
            self.tensor_bits["lm_head"] = self.tensor_bits["model.embed_tokens"]
            t = self._tied_table
            if not self.fast:
                return self._gemm(g, x, t["float"])
            bits = self.tensor_bits["lm_head"]
            attrs = {"K": self.cfg.hidden_size, "N": self.cfg.vocab_size, "bits": bits, "block_size": self.embedding_block}
            inputs = [x, t["qweight"], t["scales"]] + ([t["qzeros"]] if t["qzeros"] else [])
            return g.node("MatMulNBits", inputs, name="lm_head/MatMulNBits", domain=MS_DOMAIN,
                          accuracy_level=o.accuracy_level, **attrs)
        bits = self.table_bits("lm_head")
        qt = self._quantize(w, bits, self.act_scales.get("lm_head"), "lm_head", self.block_for("lm_head", bits),
                            table=True)
        self.tensor_bits["lm_head"] = bits
        if self.fast:
            return self._matmul_nbits(g, x, "lm_head", qt)
        return self._gemm(g, x, self._dq(g, "lm_head", qt, "nk"))

    def _gemm(self, g, x: str, table: str) -> str:
        flat = g.node("Reshape", [x, g.const([-1, self.cfg.hidden_size])], name="/lm_head/Flatten")
        y = g.node("Gemm", [flat, table], name="/lm_head/Gemm", transB=1)
        lead = g.node("Slice", [g.node("Shape", [x], name="/lm_head/Shape"), g.const([0]), g.const([2])],
                      name="/lm_head/LeadDims")
        shape = g.node("Concat", [lead, g.const([self.cfg.vocab_size])], name="/lm_head/OutShape", axis=0)
        return g.node("Reshape", [y, shape], name="/lm_head/Unflatten")

    def summary(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for bits in self.tensor_bits.values():
            counts[f"int{bits}"] = counts.get(f"int{bits}", 0) + 1
        info = {k: v for k, v in asdict(self.opts).items()}
        info["method"] = "mixed" if self.opts.mixed else ("gptq" if self.opts.gptq else self.opts.method)
        info["tensors_by_precision"] = counts
        info["int8_tensors"] = sorted(n for n, b in self.tensor_bits.items() if b == 8 and self.opts.bits == 4)
        info["activation"] = "int8" if self.opts.accuracy_level == 4 else "fp32"
        info["calibrated"] = bool(self.act_scales)
        if self.opts.bits == 4 and "int8" in counts:
            info["int8_block_size"] = self.block_for("", 8)
        if self.opts.mixed:
            info["qk_block_size"] = self.block_for("q_proj", 4)
        return info


def make_emitter(cfg, quant: dict[str, Any], *, form: str, fallback) -> tuple[QuantizedWeights, dict[str, Any]]:
    """The emitter, plus the manifest's `quantization` record (completed by summary() after the build)."""
    quant = dict(quant)
    act_scales = quant.pop("act_scales", None)  # arrays from calibration: used, not recorded
    act_inputs = quant.pop("act_inputs", None)
    calibration = quant.pop("calibration", None)  # where the arrays came from: recorded
    opts = QuantOptions.from_dict(quant)
    if form == "portable":
        # DequantizeLinear's output takes its scale's dtype: float16 scales would need a Cast of
        # every dequantized weight, which also stops onnxruntime fusing the pair into MatMulNBits.
        opts.scale_dtype = "float32"
    if cfg.tie_word_embeddings and (opts.embeddings == "keep") != (opts.lm_head == "keep"):
        raise EdgeLlamaError("this model ties its embedding and lm_head: --embeddings and --lm-head must both "
                             "be 'keep' or both be quantized")
    if cfg.tie_word_embeddings and opts.embeddings != opts.lm_head:
        raise EdgeLlamaError("this model ties its embedding and lm_head: they are quantized once, so "
                             "--embeddings and --lm-head must agree")
    em = QuantizedWeights(cfg, opts, form, fallback, act_scales, act_inputs)
    info: dict[str, Any] = {}
    if calibration:
        info["calibration"] = calibration
    if form == "portable":
        # onnxruntime would otherwise fuse DequantizeLinear+MatMul with int8 activations silently.
        info["session_config"] = {"session.qdq_matmulnbits_accuracy_level": str(opts.accuracy_level)}
    return em, info


def planned_summary(em: QuantizedWeights) -> dict[str, Any]:
    """The quantization record (summary()) an export with this emitter will write, known before any
    weight is read: every projection's precision comes from the same policy the build applies.
    The planner prices a bundle from it (devices.plan.WeightFormat.from_record)."""
    probe = copy.copy(em)  # bits_for may rank layers: leave the real emitter as it was
    probe.int8_layers, probe.tensor_bits = dict(em.int8_layers), {}
    for i in range(em.cfg.num_hidden_layers):
        for module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                       "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            name = f"model.layers.{i}.{module}"
            probe.tensor_bits[name] = probe.bits_for(name)
    if em.opts.embeddings != "keep":
        probe.tensor_bits["model.embed_tokens"] = probe.table_bits("model.embed_tokens")
    if em.opts.lm_head != "keep":
        probe.tensor_bits["lm_head"] = probe.table_bits("lm_head")
    return probe.summary()
