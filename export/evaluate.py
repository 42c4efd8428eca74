"""How far a bundle's next-token distributions are from the fp32 torch reference on real text.

Teacher-forced over non-overlapping windows of the tokenized text, each run as one prefill
from an empty cache (BOS first when the bundle adds one). Every position with a next token
is scored: perplexity of both models, KL(reference || bundle), and top-1 agreement.

A fast bundle computes last-position logits only. Rather than feed a window one token at a
time (one session call per token), eval runs a variant of the graph with the two last-token
Slice nodes bypassed, so one call returns every position's logits. The variant differs
from the bundle only in where the final norm and lm_head are applied, and the weights are
untouched. Prefill exercises the same quantized kernels as decode.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, TextIO

import numpy as np

from edgellama.errors import EdgeLlamaError
from edgellama.export.onnx_graph import LAST_TOKEN_SLICES, PAD_ROW_COUNT
from edgellama.runtime import bundle as B

# Bundles before stop 15 sliced after the last layer ("/model/LastToken/x" and the residual)
_SLICES = (*LAST_TOKEN_SLICES, "/model/LastToken/x")
KEYS = ("ppl", "ref_ppl", "kld_mean", "kld_p99", "top1_agreement", "size_bytes", "bits_per_weight")
_ROWS = 64  # positions per float64 softmax chunk: bounds memory for a 128k vocabulary


class Progress:
    """A one-line progress bar on stderr; redrawn in place on a terminal, a line per update otherwise."""

    def __init__(self, total: int, label: str, enabled: bool = True, stream: TextIO | None = None):
        self.total, self.label, self.enabled = total, label, enabled
        self.stream = stream or sys.stderr  # looked up now: sys.stderr may have been replaced since import
        self.done, self.t0 = 0, time.perf_counter()
        self.tty = enabled and self.stream.isatty()

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        width = 30
        fill = int(width * self.done / max(self.total, 1))
        line = (f"{self.label} [{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} tokens "
                f"{time.perf_counter() - self.t0:.1f}s")
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


class Reference:
    """The fp32 torch reference, loaded once; logits memoized per window, so one reference can score many bundles."""

    def __init__(self, source: str | os.PathLike):
        from edgellama.export.sources import load_source

        if (Path(source) / B.MANIFEST).is_file():  # a float bundle stands in for its checkpoint
            from edgellama.export.bundle_source import load_bundle_source

            self.source = load_bundle_source(source)
        else:
            self.source = load_source(source)
        self.config = self.source.config
        self._model = None
        self._memo: dict[tuple[int, ...], np.ndarray] = {}

    def logits(self, ids: list[int]) -> np.ndarray:
        """Float32 logits [len(ids), vocab] of one window from an empty cache."""
        key = tuple(ids)
        if key not in self._memo:
            import torch

            from edgellama.export.model import Llama

            if self._model is None:
                self._model = Llama.from_source(self.source)
            with torch.inference_mode():
                self._memo[key] = self._model(torch.tensor([ids]))[0][0].numpy()
        return self._memo[key]


def _read_text(text: str | os.PathLike) -> str:
    path = Path(text)
    try:
        body = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EdgeLlamaError(f"text file {path} not found") from None
    except IsADirectoryError:
        raise EdgeLlamaError(f"text file {path} is a directory") from None
    except UnicodeDecodeError:
        raise EdgeLlamaError(f"text file {path} is not UTF-8 text") from None
    except OSError as exc:
        raise EdgeLlamaError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not body.strip():
        raise EdgeLlamaError(f"text file {path} is empty")
    return body


def windows(ids: list[int], window: int, bos: int | None) -> list[list[int]]:
    """Non-overlapping windows of at most `window` tokens, each starting with `bos` when given."""
    step = window - (bos is not None)
    out = []
    for start in range(0, len(ids), step):
        chunk = ids[start:start + step]
        out.append(([bos] if bos is not None else []) + chunk)
    return [w for w in out if len(w) >= 2]  # a lone token predicts nothing


@contextmanager
def all_logits_bundle(bundle_dir: Path, manifest: B.Manifest) -> Iterator[tuple[Path, B.Manifest]]:
    """The bundle, or (graph.logits == "last") a temporary copy whose graph returns every position's logits."""
    if manifest.graph.logits == "all":
        yield bundle_dir, manifest
        return
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(bundle_dir / manifest.graph.file), load_external_data=False)
    g = model.graph
    bypass = {}
    keep = []
    for node in g.node:
        if node.name in _SLICES:
            bypass[node.output[0]] = node.input[0]
        elif node.name == PAD_ROW_COUNT:  # no padding row: every row is a position to score
            g.initializer.append(numpy_helper.from_array(np.array(0, dtype=np.int64), node.output[0]))
        else:
            keep.append(node)
    if len(bypass) != len(LAST_TOKEN_SLICES):
        raise EdgeLlamaError("the bundle's graph lacks the last-token Slice nodes: cannot score every position")
    for node in keep:
        for i, name in enumerate(node.input):
            if name in bypass:
                node.input[i] = bypass[name]
    del g.node[:]
    g.node.extend(keep)
    used = {name for node in keep for name in node.input}
    unused = [t for t in g.initializer if t.name not in used]  # the slices' bounds, the padding row's switch
    for t in unused:
        g.initializer.remove(t)
    gone = {t.name for t in unused}  # an optional input whose initializer went would become a required one
    for inp in [i for i in g.input if i.name in gone]:
        g.input.remove(inp)
    for out in g.output:
        if out.name == B.LOGITS:
            out.type.tensor_type.shape.dim[1].dim_param = "sequence_length"
    spec = [B.TensorSpec(s.name, s.dtype, ["batch_size", "sequence_length", s.shape[-1]]) if s.name == B.LOGITS else s
            for s in manifest.graph.outputs]
    variant = replace(manifest, graph=replace(manifest.graph, logits="all", outputs=spec))
    # Next to the bundle, so its files can be hard-linked: onnxruntime refuses external data that
    # resolves outside the model's folder, which rules out symlinks. Elsewhere (a read-only parent,
    # another filesystem) they are copied.
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".edgellama-eval-", dir=bundle_dir.resolve().parent))
    except OSError:
        tmp = Path(tempfile.mkdtemp(prefix="edgellama-eval-"))
    try:
        for f in bundle_dir.iterdir():  # external weights and anything else the graph names
            if f.name not in (manifest.graph.file, B.MANIFEST) and f.is_file():
                try:
                    os.link(f, tmp / f.name)
                except OSError:
                    shutil.copyfile(f, tmp / f.name)
        onnx.save_model(model, str(tmp / manifest.graph.file))
        del model
        yield tmp, variant
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x -= x.max(-1, keepdims=True)
    x -= np.log(np.exp(x).sum(-1, keepdims=True))
    return x


def score(ref: np.ndarray, got: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """Per-position KL(ref || got), both models' NLL of the targets and top-1 agreement.

    ref, got: logits [n, V] at the n positions whose next tokens are `targets`."""
    kl, nll, ref_nll = (np.empty(len(targets)) for _ in range(3))
    for s in range(0, len(targets), _ROWS):
        rows = slice(s, s + _ROWS)
        lr, lg = _log_softmax(ref[rows]), _log_softmax(got[rows])
        kl[rows] = np.einsum("ij,ij->i", np.exp(lr), lr - lg)
        t = targets[rows]
        idx = np.arange(len(t))
        nll[rows], ref_nll[rows] = -lg[idx, t], -lr[idx, t]
    return {"kl": np.maximum(kl, 0.0), "nll": nll, "ref_nll": ref_nll,
            "top1": ref.argmax(-1) == got.argmax(-1)}


def score_windows(engine, ref: "Reference", wins: list[list[int]], progress: "Progress | None" = None) -> dict[str, np.ndarray]:
    """score() over every window, each run from an empty cache through `engine` (ONNX or Core ML), concatenated."""
    parts: list[dict[str, np.ndarray]] = []
    for w in wins:
        engine.reset()
        got = engine.forward(w, all_logits=True)
        parts.append(score(ref.logits(w)[:-1], got[:-1], np.asarray(w[1:])))
        if progress is not None:
            progress.update(len(w))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def weight_bytes(bundle_dir: Path, manifest: B.Manifest) -> int:
    """Bytes of the graph's weight initializers (codes, scales, zero points, norms), each counted once."""
    from edgellama.export.bundle_source import scan_initializers

    inits = scan_initializers(bundle_dir / manifest.graph.file)
    return sum(i.length for name, i in inits.items() if name.startswith(("model.", "lm_head")))


def evaluate(
    bundle_dir: str | os.PathLike,
    reference_source: str | os.PathLike | Reference,
    text: str | os.PathLike,
    *,
    window: int = 512,
    max_tokens: int | None = None,
    progress: bool = True,
    threads: int | None = None,
) -> dict[str, Any]:
    """Quality of an ONNX bundle against the fp32 torch reference on the text file `text`."""
    from edgellama.export.config import LlamaConfig
    from edgellama.runtime.engine import OnnxEngine
    from edgellama.runtime.tokenizer import Tokenizer

    if window < 2:
        raise EdgeLlamaError(f"--window must be at least 2 tokens, got {window}")
    if max_tokens is not None and max_tokens < 2:
        raise EdgeLlamaError(f"--max-tokens must be at least 2, got {max_tokens}")
    root = Path(bundle_dir)
    manifest = B.read_manifest(root)
    if manifest.graph.kind != "onnx":
        raise EdgeLlamaError(f"eval runs ONNX bundles; {root} is a {manifest.graph.kind} bundle")
    if window > manifest.context_length:
        raise EdgeLlamaError(f"--window {window} exceeds the bundle's context of {manifest.context_length} tokens")
    body = _read_text(text)
    cfg = LlamaConfig.from_hf(manifest.architecture)
    tok = Tokenizer.from_dir(root)
    ids = tok.encode(body)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    bos = manifest.tokens.bos_id if manifest.tokens.add_bos else None
    wins = windows(ids, window, bos)
    if not wins:
        raise EdgeLlamaError(f"text file {text} has too few tokens to score (need 2)")
    ref = reference_source if isinstance(reference_source, Reference) else Reference(reference_source)
    ref_cfg = ref.config
    if ref_cfg.vocab_size != cfg.vocab_size:
        raise EdgeLlamaError(f"the reference's vocabulary ({ref_cfg.vocab_size}) differs from the bundle's "
                             f"({cfg.vocab_size}): not the same model")
    if window > ref_cfg.max_position_embeddings:
        raise EdgeLlamaError(f"--window {window} exceeds the reference's {ref_cfg.max_position_embeddings} positions")
    t0 = time.perf_counter()
    bar = Progress(sum(len(w) for w in wins), "eval", progress)
    with all_logits_bundle(root, manifest) as (run_dir, run_manifest):
        engine = OnnxEngine(run_dir, run_manifest, threads=threads, max_context=max(len(w) for w in wins))
        scores = score_windows(engine, ref, wins, bar)
        del engine
    bar.close()
    kl, nll, ref_nll, top1 = (scores[k] for k in ("kl", "nll", "ref_nll", "top1"))
    size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    return {
        "ppl": float(np.exp(nll.mean())),
        "ref_ppl": float(np.exp(ref_nll.mean())),
        "kld_mean": float(kl.mean()),
        "kld_p99": float(np.percentile(kl, 99)),
        "top1_agreement": float(top1.mean()),
        "size_bytes": int(size),
        "bits_per_weight": weight_bytes(root, manifest) * 8 / cfg.param_count(),
        "tokens": int(len(kl)),
        "windows": len(wins),
        "seconds": round(time.perf_counter() - t0, 2),
        "quantization": (manifest.quantization or {}).get("method", "none"),
    }


def greedy_reply(bundle_dir: str | os.PathLike, question: str, *, max_new_tokens: int = 32,
                 threads: int | None = None) -> str:
    """The bundle's greedy answer to one user turn, through its own chat template (a smoke test of quality)."""
    from edgellama.runtime.engine import OnnxEngine
    from edgellama.runtime.tokenizer import Tokenizer

    root = Path(bundle_dir)
    manifest = B.read_manifest(root)
    tok = Tokenizer.from_dir(root)
    ids = tok.encode_chat([{"role": "user", "content": question}], manifest.chat_template)
    engine = OnnxEngine(root, manifest, threads=threads, max_context=min(manifest.context_length,
                                                                          len(ids) + max_new_tokens))
    stops = set(manifest.tokens.eos_ids)
    out: list[int] = []
    logits = engine.forward(ids)
    for _ in range(max_new_tokens):
        nxt = int(np.argmax(logits))
        if nxt in stops:
            break
        out.append(nxt)
        if len(out) == max_new_tokens:
            break
        logits = engine.forward([nxt])
    return tok.decode(out)


def format_report(r: dict[str, Any]) -> str:
    rows = [("perplexity", f"{r['ppl']:.3f} (reference {r['ref_ppl']:.3f})"),
            ("KL(ref || bundle)", f"mean {r['kld_mean']:.5f}, p99 {r['kld_p99']:.5f}"),
            ("top-1 agreement", f"{r['top1_agreement']:.4f}"),
            ("size", f"{r['size_bytes'] / 1e6:.1f} MB, {r['bits_per_weight']:.3f} bits/weight"),
            ("scored", f"{r['tokens']} tokens in {r['windows']} windows, {r['seconds']:.1f} s")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def to_json(r: dict[str, Any]) -> str:
    return json.dumps(r, indent=2, sort_keys=True)
