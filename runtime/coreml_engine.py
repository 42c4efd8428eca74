"""Run a Core ML bundle through coremltools' MLModel.predict: macOS only.

Core ML itself exists only on Apple platforms; coremltools on Linux can convert and read
models but not run them. Off macOS, CoreMLEngine refuses with a one-line explanation.
The interface mirrors OnnxEngine: forward(ids) -> logits [vocab], reset(), rewind(n), pos, context.
coremltools is imported only when an engine is built, never by `import edgellama.runtime`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from edgellama.errors import EdgeLlamaError
from edgellama.runtime import bundle as B

# Feature names, as the exporter writes them (swift-transformers' names).
INPUT_IDS, CAUSAL_MASK, LOGITS = "inputIds", "causalMask", "logits"
KEY_CACHE, VALUE_CACHE, PRESENT_KEYS, PRESENT_VALUES = "keyCache", "valueCache", "presentKeys", "presentValues"
COMPUTE_UNITS = ("ALL", "CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE")
# Finite rather than -inf, as swift-transformers does: a fully masked row stays a number, not NaN.
MASKED = np.finfo(np.float16).min


def causal_mask(q: int, end: int) -> np.ndarray:
    """Additive fp16 mask [1, 1, q, end] for q new tokens at positions end - q .. end - 1."""
    rows = np.arange(end - q, end)[:, None]
    return np.where(np.arange(end)[None, :] <= rows, 0.0, MASKED).astype(np.float16)[None, None]


def coreml_unavailable_message(manifest: B.Manifest) -> str:
    """Why this machine cannot run the bundle, and what was checked instead (one line)."""
    target = manifest.extras.get("coreml", {}).get("target", "iOS 18 / macOS 15")
    checked = (manifest.extras.get("verification") or {}).get("summary")
    return (f"this bundle is a Core ML model ({manifest.graph.form}, for {target} and later) and Core ML runs only "
            f"on Apple platforms: run it on a Mac, or export with --format onnx to run it here"
            + (f" (at export edgellama checked {checked})" if checked else " (it was exported with --no-verify)"))


class CoreMLEngine:
    """One Core ML model and its KV cache (Core ML state, or numpy arrays for the stateless form).

    `backend` replaces the MLModel: anything with predict(data, state=None) and make_state();
    tests pass a numpy replay of the program, which is how this class is exercised off macOS.
    """

    def __init__(self, bundle_dir: str | os.PathLike, manifest: B.Manifest, *, compute_units: str | None = None,
                 max_context: int | None = None, backend: Any = None):
        if manifest.graph.kind != "coreml":
            raise EdgeLlamaError(f"bundle holds a {manifest.graph.kind} graph, not Core ML")
        self.manifest = manifest
        self.root = Path(bundle_dir)
        limit = manifest.context_length
        ctx = max_context or limit
        if ctx < 1 or ctx > limit:
            raise EdgeLlamaError(f"max context {ctx} is outside what this bundle serves (1..{limit})")
        self.context = ctx
        self.stateful = manifest.graph.form == "coreml-stateful"
        arch = manifest.architecture
        self.vocab_size = int(arch["vocab_size"])
        self._cache_shape = (int(arch["num_hidden_layers"]), 1, int(arch["num_key_value_heads"]), limit,
                             int(arch["head_dim"]))
        self.model = backend if backend is not None else self._load(compute_units)
        self.reset()

    def _load(self, compute_units: str | None):
        if sys.platform != "darwin":
            raise EdgeLlamaError(coreml_unavailable_message(self.manifest))
        units = (compute_units or "ALL").upper()
        if units not in COMPUTE_UNITS:
            raise EdgeLlamaError(f"unknown compute units {compute_units!r} (one of {', '.join(COMPUTE_UNITS)})")
        try:
            import coremltools as ct
        except ImportError:
            raise EdgeLlamaError("running a Core ML bundle needs coremltools: pip install 'edgellama[coreml]'") from None
        try:
            return ct.models.MLModel(str(self.root / self.manifest.graph.file), compute_units=ct.ComputeUnit[units])
        except Exception as exc:  # Core ML reports load failures with its own exception types
            raise EdgeLlamaError(f"Core ML cannot load {self.manifest.graph.file}: {str(exc).splitlines()[0][:300]}") from None

    def reset(self) -> None:
        self.pos = 0
        if self.stateful:
            self._state = self.model.make_state()
        else:
            self._keys = np.zeros(self._cache_shape, np.float16)
            self._values = np.zeros(self._cache_shape, np.float16)

    def rewind(self, n_tokens: int) -> None:
        """Forget everything after the first n_tokens: later rows are masked out, then overwritten."""
        if not 0 <= n_tokens <= self.pos:
            raise EdgeLlamaError(f"cannot rewind to {n_tokens} tokens (cache holds {self.pos})")
        self.pos = n_tokens

    def forward(self, ids, *, all_logits: bool = False) -> np.ndarray:
        """Run new tokens. Returns float32 logits [vocab] for the last one ([n, vocab] if all_logits)."""
        n = len(ids)
        if n == 0:
            raise EdgeLlamaError("no tokens to run")
        end = self.pos + n
        if end > self.context:
            raise EdgeLlamaError(f"context is full: {self.pos} cached + {n} new tokens exceed the context of "
                                 f"{self.context} tokens")
        data = {INPUT_IDS: np.asarray(ids, dtype=np.int32)[None, :], CAUSAL_MASK: causal_mask(n, end)}
        if self.stateful:
            out = self.model.predict(data, state=self._state)
        else:
            data[KEY_CACHE], data[VALUE_CACHE] = self._keys, self._values
            out = self.model.predict(data)
            self._keys[:, :, :, self.pos:end] = out[PRESENT_KEYS]
            self._values[:, :, :, self.pos:end] = out[PRESENT_VALUES]
        self.pos = end
        logits = np.asarray(out[LOGITS], dtype=np.float32)[0]
        return logits if all_logits else logits[-1]
