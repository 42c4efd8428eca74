"""LoRA slots: a WeightEmitter wrapper that gives each adapted projection a low-rank side path fed by graph inputs.

    y = inner.linear(x) + (x @ A^T) @ B^T        A: lora.{i}.{node}.A [r, K], B: lora.{i}.{node}.B [N, r]

It wraps whatever emitter the export uses (float or quantized), so the base weights keep their
precision and the adapter stays float32. The rank r is a symbolic dimension per slotted node: the
runtime binds an adapter's own rank, or empty tensors (no adapter), which add exactly zero.

A packed node (qkv_proj, gate_up_proj) keeps one base matmul and gets one side path too: its
inputs `lora.{i}.qkv_proj.A` [r_q + r_k + r_v, K] (the parts' A stacked) and `.B` [N_q + N_k + N_v,
r_q + r_k + r_v] (their B on the block diagonal), which the runtime assembles from the per-projection
adapter file (runtime/adapters.py, slot_feeds). The manifest's extras["lora_slots"]["groups"] says
which projections each packed input holds. Slots therefore cover whole packed nodes: asking for q
alone in a graph that packs q/k/v gives k and v slots too (empty unless an adapter fills them).
Why one path per node, although the block-diagonal B reads up to 3x its parts' bytes: 12 side-path
nodes per layer instead of 20 measured faster on SmolLM2 and on the 1B shape (docs/specialists.md).
"""

from __future__ import annotations

import re

import numpy as np

from edgellama.errors import EdgeLlamaError
from edgellama.quantize.onnx_weights import MS_DOMAIN
from edgellama.runtime import adapters as RA
from edgellama.runtime import bundle as B

_LINEAR = re.compile(r"^model\.layers\.(\d+)\.(?:self_attn|mlp)\.\w+$")
MAX_RANK = 256  # beyond this a merged export (or a full fine-tune) is the better tool
# A smoothed (quantized) slots bundle's scales for the slotted projections: "{layer}.{proj}.in"
# [K] where smoothing fed the projection x / s (A diag(s) then computes A x), "{layer}.{proj}.out"
# [N] where it divided the weight's rows by s (up_proj, for down_proj's scales: B must be too).
INPUT_SCALES_FILE = "lora_input_scales.safetensors"


def check_slot_options(rank: int, targets: list[str] | None) -> list[str]:
    """Validate --lora-slots / --lora-targets; returns the projections asked for."""
    from edgellama.export.lora import projection_name

    if not rank:
        raise EdgeLlamaError("--lora-targets needs --lora-slots R")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= MAX_RANK:
        raise EdgeLlamaError(f"--lora-slots must be a rank between 1 and {MAX_RANK}, got {rank!r}")
    chosen = {projection_name(t) for t in targets} if targets else set(RA.PROJECTIONS)
    return [p for p in RA.PROJECTIONS if p in chosen]


class LoraSlots:
    def __init__(self, inner, rank: int, targets: list[str], form: str):
        self.inner, self.rank, self.targets, self.fast = inner, rank, set(targets), form == "fast"
        self.extra_inputs: list[B.TensorSpec] = []  # picked up by build_llama_graph after the layer loop
        self.slotted: set[str] = set()
        self.groups: dict[str, list[str]] = {}  # packed node -> the projections its one slot pair holds

    def __getattr__(self, name):  # summary(), tensor_bits, ...: whatever the wrapped emitter offers
        return getattr(self.inner, name)

    def embedding(self, g, ids: str, w: np.ndarray, tied: bool) -> str:
        return self.inner.embedding(g, ids, w, tied)

    def lm_head(self, g, x: str, w: np.ndarray | None, tied: bool) -> str:
        return self.inner.lm_head(g, x, w, tied)

    def linear(self, g, x: str, name: str, w: np.ndarray, parts=None) -> str:
        y = self.inner.linear(g, x, name, w, parts)
        m = _LINEAR.match(name)
        parts = [(p.rsplit(".", 1)[-1], n) for p, n in parts or [(name, w.shape[0])]]
        if not m or not self.targets & {proj for proj, _ in parts}:
            return y
        layer, k, group = int(m[1]), w.shape[1], name.rsplit(".", 1)[-1]
        self.slotted.update(proj for proj, _ in parts)
        if len(parts) > 1:
            self.groups[group] = [proj for proj, _ in parts]
        a, b, r = (RA.slot_input(layer, group, which) for which in ("A", "B", "rank"))
        self.extra_inputs += [B.TensorSpec(a, "float32", [r, k]), B.TensorSpec(b, "float32", [w.shape[0], r])]
        tag = f"/model/layers.{layer}/lora/{group}"
        delta = self._matmul_t(g, self._matmul_t(g, x, a, f"{tag}/A"), b, f"{tag}/B")
        return g.node("Add", [y, delta], name=f"{name}/lora/Add")

    def _matmul_t(self, g, x: str, w: str, name: str) -> str:
        """x @ w^T without materialising w^T: FusedMatMul in the fast form; Transpose+MatMul, which
        onnxruntime fuses into the same kernel, in the portable one."""
        if self.fast:
            return g.node("FusedMatMul", [x, w], name=f"{name}/FusedMatMul", domain=MS_DOMAIN, transB=1)
        wt = g.node("Transpose", [w], name=f"{name}/Transpose", perm=[1, 0])
        return g.node("MatMul", [x, wt], name=f"{name}/MatMul")

    def record(self) -> dict:
        """The manifest's extras["lora_slots"]: the largest rank an adapter may bring, and where it may act."""
        rec = {"rank": self.rank, "targets": [p for p in RA.PROJECTIONS if p in self.slotted]}
        if self.groups:
            rec["groups"] = dict(sorted(self.groups.items()))
        return rec


def input_scales(tensors, n_layers: int, projections: list[str]) -> dict[str, np.ndarray]:
    """INPUT_SCALES_FILE's tensors: the smoothing of each slotted projection (`tensors` is the
    export's layer_pass.LayerPass, or calibration.ScaledTensors; anything else has none)."""
    from edgellama.export.lora import _BLOCK_OF

    out = {}
    for kind, scaled in (("in", getattr(tensors, "cols", None) or {}), ("out", getattr(tensors, "rows", None) or {})):
        for i in range(n_layers):
            for proj in projections:
                s = scaled.get(f"model.layers.{i}.{_BLOCK_OF[proj]}.{proj}.weight")
                if s is not None:
                    out[f"{i}.{proj}.{kind}"] = np.asarray(s, np.float32)
    return out
