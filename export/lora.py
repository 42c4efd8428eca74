"""PEFT LoRA adapters: read and validate one, merge it into a Source's weights, or turn it into a swappable
adapter file for a bundle exported with LoRA slots (the file format lives in edgellama.runtime.adapters).

Merging follows peft's own arithmetic, W' = W + scale * (B @ A) with scale = alpha / r (alpha / sqrt(r)
with rsLoRA), so a merged export reproduces `merge_and_unload()`. Only the plain LoRA of the seven
Llama projections is accepted: every variant that changes the forward pass in another way (DoRA,
biases, full-module copies, ...) is refused by name rather than silently dropped.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgellama import __version__
from edgellama.errors import EdgeLlamaError
from edgellama.export.config import LlamaConfig
from edgellama.export.safetensors_io import SafetensorsFile, save_file
from edgellama.export.sources import PICKLE_SUFFIXES, DerivedStore, Source, TensorStore
from edgellama.runtime import adapters as RA
from edgellama.runtime import bundle as B

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.([a-z]+_proj)\.lora_([AB])(?:\.[\w-]+)?\.weight$")
_BLOCK_OF = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
             "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
# Config keys whose non-empty value means something other than plain LoRA on the projections.
_REFUSED = {
    "use_dora": "DoRA (use_dora)", "lora_bias": "LoRA biases (lora_bias)", "fan_in_fan_out": "fan_in_fan_out",
    "modules_to_save": "modules_to_save (full trained copies of modules such as embed_tokens or lm_head)",
    "trainable_token_indices": "trainable_token_indices", "layer_replication": "layer_replication",
    "use_qalora": "QA-LoRA (use_qalora)", "target_parameters": "target_parameters",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)", "use_bdlora": "block-diagonal LoRA",
    "velora_config": "VeLoRA", "monteclora_config": "MonteCLoRA", "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
}
# Initialisations that rewrite the base weights: their adapters only fit the rewritten base.
_BASE_REWRITING_INIT = ("pissa", "olora", "corda", "loftq", "lora_ga")


def projection_name(name: str) -> str:
    """'q', 'q_proj', 'self_attn.q_proj' or 'model.layers.3.self_attn.q_proj' -> 'q_proj'."""
    short = str(name).rsplit(".", 1)[-1]
    short = short if short.endswith("_proj") else f"{short}_proj"
    if short not in RA.PROJECTIONS:
        raise EdgeLlamaError(f"unknown projection {name!r}: expected q, k, v, o, gate, up or down")
    return short


@dataclass
class LoraModule:
    a: np.ndarray  # [r, K]
    b: np.ndarray  # [N, r]
    alpha: float
    scale: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def delta(self) -> np.ndarray:
        return (self.b @ self.a) * np.float32(self.scale)  # peft's order: (B @ A) * scaling


@dataclass
class LoraAdapter:
    path: Path
    config: dict[str, Any]
    modules: dict[tuple[int, str], LoraModule] = field(default_factory=dict)  # (layer, projection) -> module
    files_sha256: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def targets(self) -> list[str]:
        present = {proj for _, proj in self.modules}
        return [p for p in RA.PROJECTIONS if p in present]

    @property
    def rank(self) -> int:
        return max(m.rank for m in self.modules.values())

    def record(self) -> dict[str, Any]:
        """What the manifest (and an adapter file) says about this adapter."""
        ranks = sorted({m.rank for m in self.modules.values()})
        alphas = sorted({m.alpha for m in self.modules.values()})
        return {"name": self.name, "path": str(self.path.resolve()), "files": self.files_sha256,
                "peft_type": "LORA", "r": ranks[0] if len(ranks) == 1 else ranks,
                "lora_alpha": alphas[0] if len(alphas) == 1 else alphas,
                "use_rslora": bool(self.config.get("use_rslora")), "targets": self.targets,
                "layers": sorted({layer for layer, _ in self.modules}),
                "base_model_name_or_path": self.config.get("base_model_name_or_path")}

    def check_fits(self, cfg: LlamaConfig) -> None:
        arch = cfg.to_hf()
        for (layer, proj), m in sorted(self.modules.items()):
            n, k = RA.projection_shape(arch, proj)
            if layer >= cfg.num_hidden_layers:
                raise EdgeLlamaError(f"adapter {self.name!r} adapts layer {layer}, but the base model has "
                                     f"{cfg.num_hidden_layers} layers: it was trained for another model")
            if m.a.shape[1] != k or m.b.shape[0] != n:
                raise EdgeLlamaError(f"adapter {self.name!r} does not fit the base model: layer {layer} {proj} "
                                     f"maps {m.a.shape[1]} -> {m.b.shape[0]} features, the base {k} -> {n}")


def _sha256(path: Path) -> str:
    return B.sha256_file(path)


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's rank_pattern/alpha_pattern lookup: the first key matching a suffix of the module name."""
    for key, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        except re.error:
            raise EdgeLlamaError(f"adapter_config.json has an invalid pattern {key!r}") from None
    return default


def _check_config(cfg: Any, folder: Path) -> dict[str, Any]:
    if not isinstance(cfg, dict):
        raise EdgeLlamaError(f"{folder / CONFIG_FILE} is not a JSON object")
    kind = cfg.get("peft_type")
    if str(kind).upper() != "LORA":
        raise EdgeLlamaError(f"adapter {folder.name!r} is a {kind} adapter: edgellama supports LoRA adapters only")
    for key, what in _REFUSED.items():
        if cfg.get(key):
            raise EdgeLlamaError(f"adapter {folder.name!r} uses {what}, which edgellama does not support")
    if cfg.get("bias", "none") != "none":
        raise EdgeLlamaError(f"adapter {folder.name!r} trains biases (bias={cfg['bias']!r}): only bias='none' "
                             "is supported (Llama projections have no bias)")
    init = str(cfg.get("init_lora_weights", True)).lower()
    if init.startswith(_BASE_REWRITING_INIT):
        raise EdgeLlamaError(f"adapter {folder.name!r} was initialised with {init!r}, which rewrites the base "
                             "weights: convert it to a plain LoRA adapter first (peft's "
                             "path_initial_model_for_weight_conversion)")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key) is not None and not isinstance(cfg[key], dict):
            raise EdgeLlamaError(f"adapter_config.json: {key} must be an object")
    for key in ("r", "lora_alpha"):
        value = cfg.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise EdgeLlamaError(f"adapter_config.json has an invalid {key}: {value!r}")
    return cfg


def read_adapter(folder: str | os.PathLike) -> LoraAdapter:
    """Read a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors), fully validated."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EdgeLlamaError(f"adapter folder {folder} not found")
    cfg_path, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    try:
        cfg = _check_config(json.loads(cfg_path.read_text(encoding="utf-8")), folder)
    except FileNotFoundError:
        raise EdgeLlamaError(f"{folder} is not a PEFT adapter: {CONFIG_FILE} is missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise EdgeLlamaError(f"{cfg_path} is not valid JSON") from None
    if not weights.is_file():
        pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise EdgeLlamaError(f"adapter {folder.name!r} is stored as a pickle ({pickles[0]}): edgellama never "
                                 "unpickles; save it with safetensors (peft's default)")
        raise EdgeLlamaError(f"adapter {folder.name!r} has no {WEIGHTS_FILE}")
    st = SafetensorsFile(weights)
    found: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key in st.keys():
        m = _KEY.match(key)
        if not m or _BLOCK_OF.get(m[3]) != m[2]:
            raise EdgeLlamaError(f"adapter {folder.name!r} holds {key!r}: {_what(key)}")
        found.setdefault((int(m[1]), m[3]), {})[m[4]] = st.get(key)
    if not found:
        raise EdgeLlamaError(f"adapter {folder.name!r} holds no LoRA weights")
    use_rslora = bool(cfg.get("use_rslora"))
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    adapter = LoraAdapter(folder, cfg, files_sha256={CONFIG_FILE: _sha256(cfg_path), WEIGHTS_FILE: _sha256(weights)})
    for (layer, proj), ab in sorted(found.items()):
        module = f"model.layers.{layer}.{_BLOCK_OF[proj]}.{proj}"
        if set(ab) != {"A", "B"}:
            raise EdgeLlamaError(f"adapter {folder.name!r}: {module} has lora_{''.join(ab)} but not both matrices")
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
            raise EdgeLlamaError(f"adapter {folder.name!r}: {module} has mismatched shapes A {list(a.shape)}, "
                                 f"B {list(b.shape)}")
        r = _pattern_value(rank_pattern, module, cfg["r"])
        if r != a.shape[0]:
            raise EdgeLlamaError(f"adapter {folder.name!r}: {module} has rank {a.shape[0]} but its config says "
                                 f"r={r} (rank_pattern it cannot follow)")
        alpha = float(_pattern_value(alpha_pattern, module, cfg["lora_alpha"]))
        scale = alpha / (math.sqrt(r) if use_rslora else r)
        if not np.isfinite(a).all() or not np.isfinite(b).all():
            raise EdgeLlamaError(f"adapter {folder.name!r}: {module} has non-finite weights")
        adapter.modules[(layer, proj)] = LoraModule(a, b, alpha, scale)
    return adapter


def _what(key: str) -> str:
    if "lora_magnitude_vector" in key:
        return "DoRA is not supported"
    if "embed_tokens" in key or "lora_embedding" in key:
        return "adapting embed_tokens is not supported (LoRA on the q/k/v/o/gate/up/down projections only)"
    if "lm_head" in key:
        return "adapting lm_head is not supported (LoRA on the q/k/v/o/gate/up/down projections only)"
    if key.endswith(".bias"):
        return "trained biases are not supported"
    return "not a LoRA weight of a Llama q/k/v/o/gate/up/down projection"


class MergedStore(DerivedStore):
    """A TensorStore that adds the adapter's delta to each adapted projection as it is read."""

    def __init__(self, base: TensorStore, adapter: LoraAdapter):
        super().__init__(base)
        self._deltas = {f"model.layers.{layer}.{_BLOCK_OF[proj]}.{proj}.weight": m
                        for (layer, proj), m in adapter.modules.items()}

    def get(self, name: str) -> np.ndarray:
        w = self.base.get(name)
        m = self._deltas.get(name)
        return w if m is None else (w + m.delta()).astype(np.float32, copy=False)


def merge_adapter(src: Source, adapter: LoraAdapter | str | os.PathLike) -> Source:
    """The same source with the adapter merged into its weights (lazily, tensor by tensor)."""
    if not isinstance(adapter, LoraAdapter):
        adapter = read_adapter(adapter)
    adapter.check_fits(src.config)
    return replace(src, tensors=MergedStore(src.tensors, adapter),
                   description=f"{src.description}+lora:{adapter.name}")


# -- swappable adapter files ------------------------------------------------------------------

@dataclass
class AdapterFileReport:
    out: str
    size_bytes: int
    rank: int
    slots: int
    targets: list[str]


def adapter_tensors(adapter: LoraAdapter) -> dict[tuple[int, str], tuple[np.ndarray, np.ndarray]]:
    """(A [r, K], scale * B [N, r]) per projection: the scale folded into B, so the graph needs no multiply.

    Not padded to the bundle's R: the graph's rank dimensions are symbolic, and padding would only
    add bytes to the file and zeros to every decode step."""
    return {key: (m.a.astype(np.float32), (m.b * np.float32(m.scale)).astype(np.float32))
            for key, m in adapter.modules.items()}


def check_against_bundle(adapter: LoraAdapter, manifest: B.Manifest) -> int:
    """The adapter fits the bundle's slots; returns the slot rank R."""
    slots = manifest.extras.get("lora_slots")
    if manifest.graph.kind != "onnx" or not slots:
        raise EdgeLlamaError("the base bundle has no LoRA slots: export it with --lora-slots R")
    adapter.check_fits(LlamaConfig.from_hf(manifest.architecture))
    R = int(slots["rank"])
    if adapter.rank > R:
        raise EdgeLlamaError(f"adapter {adapter.name!r} has rank {adapter.rank}, more than the base bundle's {R} "
                             f"LoRA slots: re-export the base with --lora-slots {adapter.rank} or more")
    missing = [p for p in adapter.targets if p not in slots["targets"]]
    if missing:
        raise EdgeLlamaError(f"adapter {adapter.name!r} adapts {', '.join(missing)}, which the base bundle has no "
                             f"LoRA slots for (slots: {', '.join(slots['targets'])})")
    return R


def write_adapter_file(adapter_dir: str | os.PathLike, base: str | os.PathLike, out: str | os.PathLike, *,
                       fmt: str = "edgellama", force: bool = False) -> AdapterFileReport:
    """PEFT adapter folder -> the small file a LoRA-slots bundle swaps in at run time.

    fmt "edgellama": our safetensors file (read by edgellama.runtime); "onnx_adapter": onnxruntime's
    adapter format, with tensors packed exactly as the graph inputs (read by onnxruntime.LoraAdapter and
    onnxruntime-genai's Adapters, which need every slot input: the projections the adapter leaves alone
    get rank-0 tensors). The edgellama file is pinned to this base bundle; onnxruntime's format has
    no room for that record."""
    if fmt not in ("edgellama", "onnx_adapter"):
        raise EdgeLlamaError(f"unknown adapter format {fmt!r} (edgellama or onnx_adapter)")
    out = Path(out)
    if out.is_dir() or (out.exists() and not force):
        raise EdgeLlamaError(f"{out} already exists: pass --force to replace it")
    if not out.parent.is_dir():
        raise EdgeLlamaError(f"output folder {out.parent} does not exist")
    adapter = read_adapter(adapter_dir)
    manifest = B.read_manifest(base, verify=False)
    R = check_against_bundle(adapter, manifest)
    tensors = adapter_tensors(adapter)
    scales_file = manifest.extras["lora_slots"].get("input_scales")
    if scales_file:  # a smoothed base feeds the slots x / s: A diag(s) computes A x
        if not (Path(base) / scales_file).is_file():
            raise EdgeLlamaError(f"the base bundle is missing {scales_file}, which its manifest lists")
        scales = SafetensorsFile(Path(base) / scales_file)
        have = set(scales.keys())

        def fold(key: str, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            if f"{key}.in" in have:  # the slot sees x / s
                a = (a * scales.get(f"{key}.in")[None, :]).astype(np.float32)
            if f"{key}.out" in have:  # the base weight's rows were divided by s: so must the delta be
                b = (b / scales.get(f"{key}.out")[:, None]).astype(np.float32)
            return a, b

        tensors = {(layer, proj): fold(f"{layer}.{proj}", a, b) for (layer, proj), (a, b) in tensors.items()}
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        if fmt == "edgellama":
            meta = {"format": RA.FORMAT, "format_version": RA.FORMAT_VERSION, "name": adapter.name,
                    "rank": adapter.rank, "slots": R, "targets": adapter.targets,
                    "base": RA.base_identity(manifest), "adapter": adapter.record(),
                    "created_by": f"edgellama {__version__}"}
            named = {}
            for (layer, proj), (a, b) in tensors.items():
                named[RA.slot_input(layer, proj, "A")], named[RA.slot_input(layer, proj, "B")] = a, b
            save_file(named, tmp, metadata={RA.META_KEY: json.dumps(meta, sort_keys=True)})
        else:
            _write_onnx_adapter(RA.slot_feeds(manifest, tensors), tmp)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return AdapterFileReport(str(out), out.stat().st_size, adapter.rank, R, adapter.targets)


def _write_onnx_adapter(feeds: dict[str, np.ndarray], path: Path) -> None:
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(1)
    fmt.set_model_version(1)
    fmt.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(arr) for name, arr in feeds.items()})
    fmt.export_adapter(str(path))
