"""One onnxruntime session and its KV cache: feed tokens, get next-token logits.

The cache is allocated once, for the context actually requested. With the fast graph
(past/present share buffer) every step binds the same buffers as input and output
through IO binding, so decoding allocates and copies no cache. With the portable graph,
each step's `present` OrtValues become the next step's `past` without touching numpy.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort

from edgellama.errors import EdgeLlamaError
from edgellama.runtime import bundle as B
from edgellama.runtime.adapters import INPUT_PREFIX as LORA_INPUT_PREFIX, slot_feeds

DEFAULT_CONTEXT = 4096
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "nnapi": "NnapiExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "dml": "DmlExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "webgpu": "WebGpuExecutionProvider",
}


def _heap_trimmer() -> Callable[[], object]:
    # glibc keeps freed heap pages for reuse (and raises its mmap threshold after big frees), so
    # what a long prefill released stays resident; malloc_trim hands it back. Elsewhere a no-op.
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):
        return lambda: None
    trim.argtypes = [ctypes.c_size_t]
    return lambda: trim(0)


_trim_heap = _heap_trimmer()

_MADV_PAGEOUT = 21  # Linux >= 5.4: reclaim these pages now; semantics-preserving (clean file pages are re-read)


def _libc_madvise() -> Callable[[int, int, int], int] | None:
    try:
        madvise = ctypes.CDLL(None).madvise
    except (OSError, AttributeError, TypeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


_madvise = _libc_madvise()


def _page_out_files_under(root: Path) -> int:
    """Ask the kernel to reclaim this process's pages of files mapped from under `root` (Linux; else 0).

    onnxruntime memory-maps external weights. Once MatMulNBits has packed them into its own
    buffers only the tied embedding table is still read (by GatherBlockQuantized, a row per token),
    yet every page prepacking touched stays resident: 250 MB of the 1B shape's RSS. Paged out, the
    table's rows come back from the page cache as tokens need them."""
    if _madvise is None:
        return 0
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return 0
    prefix, done = str(root.resolve()) + os.sep, 0
    for line in maps.splitlines():
        fields = line.split(None, 5)
        if len(fields) == 6 and fields[5].startswith(prefix):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            done += _madvise(start, end - start, _MADV_PAGEOUT) == 0  # a range unmapped meanwhile fails harmlessly
    return done


@contextlib.contextmanager
def _weights_paged_out(root: Path, interval_s: float = 0.05):
    """While the session loads, keep paging out the bundle's mapped weights (each tensor is mapped,
    read by prepacking, then unmapped or kept for the table): the load's peak RSS then holds the
    packed weights, not the packed weights plus their file copies (1B shape: peak 1718 -> ~1470-1580
    MB). Once more at the end for what is still mapped."""
    stop = threading.Event()

    def keep_paging_out() -> None:
        while not stop.wait(interval_s):
            _page_out_files_under(root)

    worker = threading.Thread(target=keep_paging_out, name="edgellama-pageout", daemon=True)
    worker.start()
    try:
        yield
    finally:
        stop.set()
        worker.join()
        _page_out_files_under(root)


def physical_cores() -> int:
    """Cores this process may use, counting SMT siblings once (onnxruntime's best intra-op setting)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        text = Path("/proc/cpuinfo").read_text()
        siblings = int(next(l.split(":")[1] for l in text.splitlines() if l.startswith("siblings")))
        cores = int(next(l.split(":")[1] for l in text.splitlines() if l.startswith("cpu cores")))
        if siblings > cores > 0:
            return max(1, usable * cores // siblings)
    except (OSError, StopIteration, ValueError):
        pass
    return max(1, usable)


def resolve_provider(name: str | None) -> str:
    if name is None:
        return PROVIDERS["cpu"]
    full = PROVIDERS.get(name.lower(), name)
    available = ort.get_available_providers()
    if full not in available:
        short = ", ".join(k for k, v in PROVIDERS.items() if v in available)
        raise EdgeLlamaError(f"execution provider {name!r} is not available in this onnxruntime build "
                             f"(available: {short})")
    return full


def session_options(manifest: B.Manifest, threads: int | None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    conf = dict(manifest.session_options)
    n = threads or conf.pop("intra_op_num_threads", 0) or physical_cores()
    conf.pop("intra_op_num_threads", None)
    if n < 1:
        raise EdgeLlamaError(f"threads must be a positive integer, got {n}")
    so.intra_op_num_threads = int(n)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Errors only: a graph's logits_to_keep is an overridable initializer by design, and onnxruntime
    # warns at every load that such an input is not constant-folded.
    so.log_severity_level = 3
    for key, value in (conf.get("config_entries") or {}).items():
        so.add_session_config_entry(str(key), str(value))
    return so


class OnnxEngine:
    def __init__(self, bundle_dir: str | os.PathLike, manifest: B.Manifest, *, provider: str | None = None,
                 threads: int | None = None, max_context: int | None = None):
        self.manifest = manifest
        self.root = Path(bundle_dir)
        g = manifest.graph
        limit = manifest.context_length
        ctx = min(DEFAULT_CONTEXT, limit) if max_context is None else max_context
        if ctx < 1 or ctx > limit:
            raise EdgeLlamaError(f"max context {ctx} is outside what this bundle serves (1..{limit})")
        self.context = ctx
        self.threads = threads
        self.provider = resolve_provider(provider)
        so = session_options(manifest, threads)
        try:
            # Only external weights are memory-mapped: a one-file bundle has nothing to page out. The
            # file, not the manifest's list, decides: the export verifies before it lists its files.
            external = (self.root / B.ONNX_DATA).is_file()
            paging = _weights_paged_out(self.root) if external else contextlib.nullcontext()
            with paging:
                self.session = ort.InferenceSession(str(self.root / g.file), so, providers=[self.provider])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise EdgeLlamaError(f"onnxruntime cannot load {g.file}: {str(exc).splitlines()[0][:300]}") from None
        self._check_io()
        arch = manifest.architecture
        self.n_layers = int(arch["num_hidden_layers"])
        self.kv_heads = int(arch["num_key_value_heads"])
        self.head_dim = int(arch["head_dim"])
        self.vocab_size = int(arch["vocab_size"])
        self._check_sizes()
        self.share = g.past_present_share_buffer
        self.has_position_ids = any(s.name == B.POSITION_IDS for s in g.inputs)
        self._kv_dtype = np.float16 if any(s.dtype == "float16" for s in g.inputs if s.name.startswith("past")) else np.float32
        self._io = self.session.io_binding()
        self._mask = np.ones((1, ctx), dtype=np.int64)
        self._positions = np.arange(ctx, dtype=np.int64)[None, :]
        self._step_ids = np.zeros((1, 1), dtype=np.int64)
        self._step_logits = np.zeros((1, 1, self.vocab_size), dtype=np.float32)
        self._step_logits_ov = ort.OrtValue.ortvalue_from_numpy(self._step_logits)
        # Bound once; forward(last=n) writes n into it for one run and puts 1 back, so plain steps
        # feed exactly the graph's default.
        self._keep = np.ones(1, dtype=np.int64)
        overridable = {i.name for i in self.session.get_overridable_initializers()}
        self.multi_logits = g.logits == "all" or B.LOGITS_TO_KEEP in overridable
        if g.logits == "last" and self.multi_logits:
            self._io.bind_ortvalue_input(B.LOGITS_TO_KEEP, ort.OrtValue.ortvalue_from_numpy(self._keep))
        # The padding row's switch (B.PAD_ROWS), bound once like _keep: exact_rows writes into it.
        self._pad_rows = np.zeros((), dtype=np.int64)
        if B.PAD_ROWS in overridable:
            self._io.bind_ortvalue_input(B.PAD_ROWS, ort.OrtValue.ortvalue_from_numpy(self._pad_rows))
        # A prefill's activations grow onnxruntime's CPU arena to fit the longest prompt seen, and the
        # arena keeps that peak for good: shrinking it after multi-token runs keeps RSS flat over a
        # long chat that re-prefills its history (decode steps, the hot path, skip it).
        self._prefill_run = ort.RunOptions()
        self._prefill_run.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        self._kv: list[ort.OrtValue] = []
        if self.share:
            # Allocated and bound once, for the whole context: these buffers are past and present
            # for the engine's lifetime, and reset/rewind only move `pos` (the attention mask hides
            # whatever stale entries lie beyond it).
            # One slot more than the context: a fast graph writes a padding row past the last token
            # (export/onnx_graph._pad_row), and would drop it for want of room at a full context.
            self._kv = [self._zeros(ctx + 1) for _ in range(2 * self.n_layers)]
            for i in range(self.n_layers):
                for j, kind in enumerate(("key", "value")):
                    self._io.bind_ortvalue_input(B.past_name(i, kind), self._kv[2 * i + j])
                    self._io.bind_ortvalue_output(B.present_name(i, kind), self._kv[2 * i + j])
        self.set_adapter_inputs(None)
        self.reset()

    def _check_io(self) -> None:
        """The graph must agree with what the manifest promises, name for name."""
        want_in = [s.name for s in self.manifest.graph.inputs]
        want_out = [s.name for s in self.manifest.graph.outputs]
        got_in = [i.name for i in self.session.get_inputs()]
        got_out = [o.name for o in self.session.get_outputs()]
        if sorted(want_in) != sorted(got_in) or sorted(want_out) != sorted(got_out):
            missing = sorted(set(want_in + want_out) ^ set(got_in + got_out))
            raise EdgeLlamaError(f"the ONNX graph's inputs/outputs disagree with the manifest (e.g. {missing[:3]})")

    def _check_sizes(self) -> None:
        """Buffers are sized from the manifest's numbers, so they must be the graph's own."""
        past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        logits = [o for o in self.session.get_outputs() if o.name == B.LOGITS]
        ok = len(past) == 2 * self.n_layers and len(logits) == 1
        for i in past:
            ok = ok and len(i.shape) == 4 and all(
                not isinstance(d, int) or d == want for d, want in zip(i.shape[1::2], (self.kv_heads, self.head_dim)))
        if ok and logits[0].shape and isinstance(logits[0].shape[-1], int):
            ok = logits[0].shape[-1] == self.vocab_size
        if not ok:
            raise EdgeLlamaError("the manifest's architecture (layers, kv heads, head_dim, vocab) disagrees with "
                                 "the ONNX graph")

    def set_adapter_inputs(self, feeds: dict[str, np.ndarray] | None) -> None:
        """Bind a LoRA-slots graph's adapter inputs (None: empty, rank-0 ones); bound once, they stay for every step.

        The caller resets the cache: what it holds was computed with the previous adapter."""
        feeds = slot_feeds(self.manifest) if feeds is None else feeds
        self._lora = {s.name: ort.OrtValue.ortvalue_from_numpy(feeds[s.name])
                      for s in self.manifest.graph.inputs if s.name.startswith(LORA_INPUT_PREFIX)}
        for name, value in self._lora.items():
            self._io.bind_ortvalue_input(name, value)

    # -- cache --------------------------------------------------------------------------------
    def _zeros(self, length: int) -> ort.OrtValue:
        # Not np.zeros: its calloc'd pages become resident only as decoding first writes them, so
        # RSS would creep up token by token. Filling touches them now: the cache's memory is taken
        # at load, where running short is a clear failure, and stays flat while it fills.
        buf = np.empty((1, self.kv_heads, length, self.head_dim), self._kv_dtype)
        buf.fill(0)
        return ort.OrtValue.ortvalue_from_numpy(buf)

    def reset(self) -> None:
        self.pos = 0
        if not self.share:  # the concat cache starts empty and grows by each step's presents
            self._kv = [self._zeros(0) for _ in range(2 * self.n_layers)]

    def rewind(self, n_tokens: int) -> None:
        """Forget everything after the first n_tokens of the cache."""
        if not 0 <= n_tokens <= self.pos:
            raise EdgeLlamaError(f"cannot rewind to {n_tokens} tokens (cache holds {self.pos})")
        if not self.share and n_tokens < self.pos:
            self._kv = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v.numpy()[:, :, :n_tokens]))
                        for v in self._kv]
        self.pos = n_tokens

    # -- forward ------------------------------------------------------------------------------
    @property
    def exact_rows(self) -> bool:
        """Whether every attention run gets the padding row, so that a decode step's logits are bitwise
        a verification run's rows (speculative decoding turns it on). Only the attention's rounding
        changes (~1e-6): the cache holds the same numbers either way, so a session may switch."""
        return bool(self._pad_rows)

    @exact_rows.setter
    def exact_rows(self, on: bool) -> None:
        self._pad_rows[()] = int(bool(on))

    def forward(self, ids, *, all_logits: bool = False, last: int | None = None) -> np.ndarray:
        """Run new tokens through the model. Returns logits [vocab] for the last one ([n, vocab] if
        all_logits; [last, vocab] for the last `last` ones, which needs `multi_logits`)."""
        n = len(ids)
        if n == 0:
            raise EdgeLlamaError("no tokens to run")
        if self.pos + n > self.context:
            raise EdgeLlamaError(f"context is full: {self.pos} cached + {n} new tokens exceed the context of "
                                 f"{self.context} tokens")
        graph_all = self.manifest.graph.logits == "all"
        if last is not None:
            if not 1 <= last <= n:
                raise EdgeLlamaError(f"cannot return the logits of the last {last} of {n} tokens")
            if not self.multi_logits:
                raise EdgeLlamaError("this bundle computes one position's logits per run (exported before "
                                     "logits_to_keep): re-export it to verify several tokens in one run")
            if graph_all:
                return self.forward(ids, all_logits=True)[-last:]
        io = self._io
        if n == 1 and not all_logits:
            self._step_ids[0, 0] = ids[0]
            input_ids = self._step_ids
        else:
            input_ids = np.asarray(ids, dtype=np.int64)[None, :]
        total = self.pos + n
        io.bind_cpu_input(B.INPUT_IDS, input_ids)
        io.bind_cpu_input(B.ATTENTION_MASK, self._mask[:, :total])
        if self.has_position_ids:
            io.bind_cpu_input(B.POSITION_IDS, self._positions[:, self.pos:total])
        if not self.share:
            io.clear_binding_outputs()  # outputs come back in binding order: presents, then logits
            for i in range(self.n_layers):
                for j, kind in enumerate(("key", "value")):
                    io.bind_ortvalue_input(B.past_name(i, kind), self._kv[2 * i + j])
                    io.bind_output(B.present_name(i, kind), "cpu")
        want_all = all_logits or graph_all and n > 1
        if all_logits and not graph_all and n > 1:
            raise EdgeLlamaError("this bundle computes last-position logits only")
        if last is not None and not want_all:
            # onnxruntime allocates it: a preallocated buffer must match the declared length (1), which
            # stays 1 for onnxruntime-genai's sake
            out = None
            io.bind_output(B.LOGITS, "cpu")
        elif want_all:
            out = np.empty((1, n, self.vocab_size), dtype=np.float32)
            io.bind_ortvalue_output(B.LOGITS, ort.OrtValue.ortvalue_from_numpy(out))
        else:
            out = self._step_logits
            io.bind_ortvalue_output(B.LOGITS, self._step_logits_ov)
        # A verification run is a decode step (its tokens are few): no arena shrink, no heap trim.
        prefill = n > 1 and last is None
        if last is not None:
            self._keep[0] = last
        try:
            self.session.run_with_iobinding(io, self._prefill_run if prefill else None)
        finally:
            self._keep[0] = 1
        if prefill:
            _trim_heap()
        if not self.share or out is None:
            outputs = io.get_outputs()
            if not self.share:
                self._kv = outputs[: 2 * self.n_layers]
            if out is None:
                out = outputs[-1].numpy()  # logits are bound last
        self.pos = total
        if out is self._step_logits:  # the step buffer is reused by the next call: hand out a copy
            return out[0, -1].copy()
        return out[0] if all_logits or last is not None else out[0, -1]
