"""Benchmark a bundle: TTFT, prefill and decode speed, peak RSS, and the share of host bandwidth decode uses.

The engine is driven directly (reset, prefill, then argmax fed back), so stop ids never cut a
run short and every system compared against gets exactly the same work. Only numpy and
onnxruntime are needed; the --plot PNG is drawn by hand (zlib + struct) so the base install
stays free of plotting libraries.
"""

from __future__ import annotations

import math
import os
import statistics
import struct
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from edgellama.errors import EdgeLlamaError
from edgellama.runtime import bundle as B

# Fixed text behind the synthetic prompt: ordinary prose, so prefill sees realistic token ids.
PROMPT_TEXT = (
    "The lighthouse keeper climbed the spiral stairs each evening, counting the one hundred and twelve "
    "steps while the wind pressed against the glass. From the lamp room he could see the harbour lights, "
    "the fishing boats returning with their catch, and the long line of the coast fading into the dusk. "
    "He wrote the weather in a small notebook: pressure falling, clouds building from the west, a swell "
    "that would reach the rocks by midnight. "
)
DEFAULT_CONTEXTS = (128, 256, 512, 1024, 2048, 4096)
SWEEP_STEPS = 16  # decode steps timed at each context length of the sweep
PREFILL_CHUNK = 256  # prompt tokens per forward while filling the cache for the sweep


@dataclass
class BenchOptions:
    prompt_tokens: int = 128
    new_tokens: int = 128
    repeat: int = 3
    threads: int | None = None
    max_context: int | None = None  # default: prompt + new tokens (the KV cache a real request of that size needs)
    provider: str | None = None
    warmup: bool = True  # one short untimed run first, so allocator and thread-pool start-up are not measured
    contexts: Sequence[int] = ()  # decode-speed sweep (for --plot); empty: no sweep
    speculate: str | None = None  # "lookup" or a draft bundle (runtime/speculative.py)
    draft_tokens: int | None = None

    def validate(self) -> "BenchOptions":
        for name, low in (("prompt_tokens", 1), ("new_tokens", 2), ("repeat", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise EdgeLlamaError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")
        if self.threads is not None and self.threads < 1:
            raise EdgeLlamaError(f"--threads must be >= 1, got {self.threads}")
        return self


@dataclass
class BenchRun:
    ttft_s: float
    prefill_tok_s: float
    decode_tok_s: float
    token_ids: list[int]
    draft_tokens: int = 0  # speculative decoding: tokens drafted, and those the model kept
    accepted_tokens: int = 0


@dataclass
class BenchResult:
    model: str
    quant: str
    params: int
    threads: int
    prompt_tokens: int
    new_tokens: int
    repeat: int
    ttft_s: float  # medians over the repeats
    prefill_tok_s: float
    decode_tok_s: float
    peak_rss_mb: float  # of the whole process, model load included
    size_bytes: int  # every file of the bundle
    weight_bytes: int  # the graph files (model.onnx + external data)
    read_bytes_per_token: int
    read_bytes_basis: str
    achieved_bandwidth_gbs: float  # read_bytes_per_token x decode tok/s
    host_bandwidth_gbs: float | None  # from the `host` device profile; None until `devices probe` has run
    bandwidth_utilisation: float | None
    predicted_decode_tok_s: float | None  # what `edgellama plan` predicts for this bundle on `host`
    runs: list[BenchRun] = field(default_factory=list)
    sweep: list[tuple[int, float]] = field(default_factory=list)  # (context length, decode tok/s)
    speculate: str | None = None
    draft_tokens: int = 0  # summed over the runs
    accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "acceptance_rate": self.acceptance_rate}


# -- inputs ------------------------------------------------------------------------------------
def synthetic_prompt(encode: Callable[[str], list[int]], n: int, bos_id: int | None) -> list[int]:
    """Exactly n token ids: BOS (if the model uses one), then PROMPT_TEXT repeated as needed."""
    body: list[int] = []
    want = n - (bos_id is not None)
    piece = encode(PROMPT_TEXT)
    if not piece:
        raise EdgeLlamaError("the tokenizer encodes the benchmark prompt to nothing")
    while len(body) < want:
        body += piece
    return ([bos_id] if bos_id is not None else []) + body[:want]


def bundle_prompt(manifest: B.Manifest, tokenizer, n: int) -> list[int]:
    """A bundle's synthetic prompt (benchmarks/harness.py feeds the same ids to the systems it compares)."""
    t = manifest.tokens
    return synthetic_prompt(tokenizer.encode, n, t.bos_id if t.add_bos else None)


def quant_label(manifest: B.Manifest) -> str:
    q = manifest.quantization
    if not q:
        return manifest.dtype
    label = f"int{q.get('bits', '?')}"
    if q.get("preset") and not q.get("preset_overrides"):
        label = q["preset"]
    if q.get("bits") == 4:
        label += f" b{q.get('block_size')}"
    if q.get("embeddings") not in (None, "keep"):
        label += f", emb {q['embeddings']}"
    return label


# -- bytes read per decoded token ----------------------------------------------------------------
def graph_bytes(bundle_dir: Path, manifest: B.Manifest) -> int:
    """Bytes of the graph and its external weights (the weights, a tied table counted once)."""
    root = bundle_dir / manifest.graph.file
    if root.is_dir():  # an .mlpackage
        return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    files = [root] + [bundle_dir / f for f in manifest.files if f.startswith(manifest.graph.file + ".")]
    return sum(p.stat().st_size for p in files if p.is_file())


def _plan_quant(manifest: B.Manifest) -> tuple[str, str, int]:
    """(quant, embed_quant, the tables' block size) of a bundle in devices.plan's terms; plan() takes the
    exact per-tensor format from the quantization record (WeightFormat.from_record)."""
    q = manifest.quantization
    if not q:
        return manifest.dtype, manifest.dtype, 32
    quant = f"int{q['bits']}"
    emb = q.get("embeddings") or quant
    block = int(q.get("embedding_block_size") or q.get("block_size") or 32)
    return quant, manifest.dtype if emb == "keep" else emb, block


def read_bytes_per_token(bundle_dir: Path, manifest: B.Manifest, mean_position: int) -> tuple[int, str]:
    """Weights plus KV cache that one decode step reads, and how that was counted."""
    from edgellama.devices.plan import FLOAT_BYTES, ModelShape, matrix_bytes

    a = ModelShape.from_hf_config(manifest.architecture)
    weights = graph_bytes(bundle_dir, manifest)
    basis = "graph file bytes"
    if not a.tie_word_embeddings:  # decode gathers one row of an untied input table: count that row only
        _, emb, block = _plan_quant(manifest)
        fb = FLOAT_BYTES.get(manifest.dtype, 4)
        table = matrix_bytes(a.vocab_size, a.hidden_size, emb, block_size=block, float_bytes=fb)
        weights -= table - table // a.vocab_size
        basis += " less the untied input-embedding table"
    kv_elem = 2 if any(s.dtype == "float16" for s in manifest.graph.inputs if s.name.startswith("past")) else 4
    kv = 2 * a.num_hidden_layers * a.num_key_value_heads * a.head_dim * kv_elem * mean_position
    return weights + kv, basis + f" + KV cache at the mean decode position ({mean_position})"


def _host_prediction(manifest: B.Manifest, context: int) -> tuple[float | None, float | None]:
    """(host bandwidth GB/s, plan's predicted decode tok/s), both None until the host has been probed."""
    from edgellama.devices.catalog import HOST, get_profile, is_probed
    from edgellama.devices.plan import ModelShape, WeightFormat, plan

    # No probe from here: its buffer would count in the peak RSS this process reports.
    host = get_profile(HOST, probe=False)
    if not is_probed(host):
        return None, None
    quant, emb, block = _plan_quant(manifest)
    shape = ModelShape.from_hf_config(manifest.architecture)
    weights = WeightFormat.from_record(manifest.quantization, manifest.dtype) if manifest.quantization else None
    try:
        p = plan(shape, host, quant=quant, embed_quant=emb, block_size=block, weights=weights,
                 max_context=min(context, shape.max_position_embeddings))
    except EdgeLlamaError:
        return host.memory_bandwidth_gbs, None
    return host.memory_bandwidth_gbs, p.predicted_decode_tok_s


# -- measuring ---------------------------------------------------------------------------------
class Progress:
    """A one-line bar on stderr, redrawn at most every 0.1 s."""

    def __init__(self, total: int, label: str, stream=None, width: int = 30):
        self.total, self.label, self.width = max(1, total), label, width
        self.stream = stream if stream is not None else sys.stderr
        self.done, self._last = 0, 0.0

    def step(self, n: int = 1, label: str | None = None) -> None:
        self.done = min(self.total, self.done + n)
        self.label = label or self.label
        now = time.perf_counter()
        if now - self._last >= 0.1 or self.done == self.total:
            self._last = now
            fill = self.width * self.done // self.total
            self.stream.write(f"\r[{'#' * fill}{'.' * (self.width - fill)}] {self.done}/{self.total} {self.label:<24}")
            self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def measure(engine, prompt: list[int], new_tokens: int, tick: Callable[[], None] = lambda: None,
            speculator: Callable[[], Any] | None = None) -> BenchRun:
    """One greedy run from an empty cache: TTFT covers prefill and picking the first token.

    speculator: a factory of Speculators (runtime/speculative.py) to decode with instead."""
    if speculator is not None:
        return _measure_speculative(engine, prompt, new_tokens, tick, speculator())
    engine.reset()
    t0 = time.perf_counter()
    token = int(np.argmax(engine.forward(prompt)))
    ttft = time.perf_counter() - t0
    ids = [token]
    tick()
    t1 = time.perf_counter()
    for _ in range(new_tokens - 1):
        token = int(np.argmax(engine.forward([token])))
        ids.append(token)
        tick()
    decode = time.perf_counter() - t1
    return BenchRun(ttft, len(prompt) / ttft, (new_tokens - 1) / decode, ids)


def _measure_speculative(engine, prompt: list[int], new_tokens: int, tick: Callable[[], None], spec) -> BenchRun:
    """measure() through a Speculator: greedy, no stop ids, the same token count."""
    from edgellama.runtime.sampling import Sampler

    engine.reset()
    history = list(prompt)
    t0 = time.perf_counter()
    logits = engine.forward(prompt)
    spec.prefill(history)
    source = spec.tokens(logits, Sampler(spec.params), history)
    ids = [next(source)[0]]
    ttft = time.perf_counter() - t0
    tick()
    t1 = time.perf_counter()
    for _ in range(new_tokens - 1):
        ids.append(next(source)[0])
        tick()
    decode = time.perf_counter() - t1
    source.close()
    return BenchRun(ttft, len(prompt) / ttft, (new_tokens - 1) / decode, ids,
                    spec.stats.draft_tokens, spec.stats.accepted_tokens)


def sweep_decode(engine, prompt: list[int], contexts: Sequence[int], steps: int = SWEEP_STEPS,
                 tick: Callable[[], None] = lambda: None) -> list[tuple[int, float]]:
    """Decode tok/s at each context length: the cache grows in place from one point to the next."""
    engine.reset()
    out = []
    token = 0
    for ctx in sorted(contexts):
        if ctx + steps > engine.context:
            break
        while engine.pos < ctx:  # fill with the prompt's tokens, cycled, in chunks that bound activation memory
            n = min(PREFILL_CHUNK, ctx - engine.pos)
            chunk = [prompt[(engine.pos + i) % len(prompt)] for i in range(n)]
            token = int(np.argmax(engine.forward(chunk)))
        t0 = time.perf_counter()
        for _ in range(steps):
            token = int(np.argmax(engine.forward([token])))
        out.append((ctx, steps / (time.perf_counter() - t0)))
        tick()
    return out


def bench(bundle_dir: str | os.PathLike, opts: BenchOptions | None = None, *, progress: bool = True) -> BenchResult:
    """Load a bundle and measure it; medians over opts.repeat runs."""
    from edgellama.devices.plan import ModelShape
    from edgellama.runtime.generate import load, peak_rss_mb

    opts = (opts or BenchOptions()).validate()
    path = Path(bundle_dir)
    need = opts.prompt_tokens + opts.new_tokens - 1  # the last generated token is never fed back
    model = load(path, provider=opts.provider, threads=opts.threads, max_context=opts.max_context or need)
    engine = model.engine
    if need > engine.context:
        raise EdgeLlamaError(f"{opts.prompt_tokens} prompt + {opts.new_tokens} new tokens exceed the context of "
                             f"{engine.context} tokens (raise --max-context)")
    prompt = bundle_prompt(model.manifest, model.tokenizer, opts.prompt_tokens)
    contexts = [c for c in opts.contexts if c + SWEEP_STEPS <= model.manifest.context_length]
    if opts.contexts and not contexts:
        raise EdgeLlamaError(f"no context length of the sweep fits this bundle's context of "
                             f"{model.manifest.context_length} tokens")
    speculator = None
    if opts.speculate is not None:
        from edgellama.runtime.sampling import SamplingParams
        from edgellama.runtime.speculative import Speculator, as_speculation

        spec = as_speculation(opts.speculate, opts.draft_tokens)
        params = SamplingParams(max_new_tokens=opts.new_tokens)
        speculator = lambda: Speculator(model, spec, params)  # noqa: E731  (a fresh one per run: adaptive K starts over)
    elif opts.draft_tokens is not None:
        as_speculation(None, opts.draft_tokens)  # the one error for draft tokens without speculation
    bar = Progress(opts.repeat * opts.new_tokens + len(contexts) + opts.warmup, "warm-up") if progress else None
    tick = (lambda: bar.step()) if bar else (lambda: None)
    try:
        if opts.warmup:
            measure(engine, prompt, 2, speculator=speculator)
            tick()
        runs = []
        for r in range(opts.repeat):
            if bar:
                bar.label = f"run {r + 1}/{opts.repeat}"
            runs.append(measure(engine, prompt, opts.new_tokens, tick, speculator))
        rss = peak_rss_mb()  # before the sweep loads a second session
        sweep: list[tuple[int, float]] = []
        if contexts:
            if bar:
                bar.label = "context sweep"
            sweep_model = load(path, provider=opts.provider, threads=opts.threads, max_context=max(contexts) + SWEEP_STEPS)
            sweep = sweep_decode(sweep_model.engine, prompt, contexts, tick=tick)
            del sweep_model
    finally:
        if bar:
            bar.close()
    med = lambda key: statistics.median(getattr(r, key) for r in runs)  # noqa: E731
    decode = med("decode_tok_s")
    mean_pos = opts.prompt_tokens + opts.new_tokens // 2
    read, basis = read_bytes_per_token(path, model.manifest, mean_pos)
    host_bw, predicted = _host_prediction(model.manifest, need)
    achieved = read * decode / 1e9
    m = model.manifest
    return BenchResult(
        model=_model_name(m.source), quant=quant_label(m), params=ModelShape.from_hf_config(m.architecture).param_count(),
        threads=engine.session.get_session_options().intra_op_num_threads if hasattr(engine, "session") else 0,
        prompt_tokens=opts.prompt_tokens, new_tokens=opts.new_tokens, repeat=opts.repeat,
        ttft_s=med("ttft_s"), prefill_tok_s=med("prefill_tok_s"), decode_tok_s=decode, peak_rss_mb=rss,
        size_bytes=sum((path / f).stat().st_size for f in B.bundle_files(path)) + (path / B.MANIFEST).stat().st_size,
        weight_bytes=graph_bytes(path, m), read_bytes_per_token=read, read_bytes_basis=basis,
        achieved_bandwidth_gbs=achieved, host_bandwidth_gbs=host_bw,
        bandwidth_utilisation=achieved / host_bw if host_bw else None, predicted_decode_tok_s=predicted,
        runs=runs, sweep=sweep, speculate=None if opts.speculate is None else str(opts.speculate),
        draft_tokens=sum(r.draft_tokens for r in runs), accepted_tokens=sum(r.accepted_tokens for r in runs),
    )


def _model_name(source: str) -> str:
    kind, _, rest = source.partition(":")
    return Path(rest).name if kind == "hf" and rest else (rest or source)


# -- reporting ---------------------------------------------------------------------------------
def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Aligned markdown, as llama.cpp's llama-bench prints it: paste-able into an issue."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    right = [i > 0 and all(_numeric(r[i]) for r in cells[1:]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if al else c.ljust(w) for c, w, al in zip(r, widths, right)) + " |"

    rule = "| " + " | ".join(("-" * (w - 1) + ":") if al else "-" * w for w, al in zip(widths, right)) + " |"
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


def _numeric(text: str) -> bool:
    try:
        float(text.split()[0].rstrip("%"))
        return True
    except (ValueError, IndexError):
        return text == "-"


def _spread(values: list[float]) -> str:
    med = statistics.median(values)
    return f"{med:.2f}" if len(values) < 2 else f"{med:.2f} ± {max(abs(v - med) for v in values):.2f}"


def report(r: BenchResult) -> str:
    """llama-bench's layout (one row per test), plus TTFT, RSS and bandwidth columns."""
    size = f"{r.size_bytes / (1 << 20):.1f} MiB"
    params = f"{r.params / 1e9:.2f} B" if r.params >= 1e9 else f"{r.params / 1e6:.0f} M"
    util = f"{100 * r.bandwidth_utilisation:.0f}%" if r.bandwidth_utilisation is not None else "-"
    pred = f"{r.predicted_decode_tok_s:.2f}" if r.predicted_decode_tok_s is not None else "-"
    head = ["model", "quant", "size", "params", "threads", "test", "t/s", "TTFT ms", "peak RSS MB", "GB/s read",
            "BW util", "plan t/s"]
    base = [r.model, r.quant, size, params, r.threads]
    rows = [
        base + [f"pp{r.prompt_tokens}", _spread([x.prefill_tok_s for x in r.runs]), f"{1000 * r.ttft_s:.1f}",
                f"{r.peak_rss_mb:.0f}", "-", "-", "-"],
        base + [f"tg{r.new_tokens}", _spread([x.decode_tok_s for x in r.runs]), "-", f"{r.peak_rss_mb:.0f}",
                f"{r.achieved_bandwidth_gbs:.2f}", util, pred],
    ]
    rows += [base + [f"tg@{ctx}", f"{tps:.2f}", "-", "-", "-", "-", "-"] for ctx, tps in r.sweep]
    notes = [f"medians of {r.repeat} run(s); bytes read per token: {r.read_bytes_per_token / 1e6:.1f} MB "
             f"({r.read_bytes_basis})"]
    if r.speculate is not None:
        notes.append(f"speculative decoding ({r.speculate}): {r.accepted_tokens} of {r.draft_tokens} drafted tokens "
                     f"accepted ({100 * r.acceptance_rate:.0f}%)")
    if r.host_bandwidth_gbs is None:
        notes.append("bandwidth utilisation needs the host's bandwidth: run `edgellama devices probe`")
    else:
        notes.append(f"host read bandwidth {r.host_bandwidth_gbs:.1f} GB/s (`host` device profile)")
    return markdown_table(head, rows) + "\n\n" + "\n".join(notes)


# -- the --plot PNG ------------------------------------------------------------------------------
# 3x5 glyphs, enough for axis labels: digits, a few letters and punctuation.
_GLYPHS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001010010010",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "/": "001001010100100",
    "k": "100101110101101", "c": "000011100100011", "d": "001001111101111", "e": "010101111100011",
    "n": "000110101101101", "o": "000111101101111", "s": "000111110011111", "t": "010111010010011",
    "v": "000101101101010", "x": "000101010101101", " ": "000000000000000",
}


def _text(img: np.ndarray, x: int, y: int, text: str, scale: int = 2, color=(0, 0, 0)) -> None:
    for ch in text.lower():
        bits = _GLYPHS.get(ch, _GLYPHS[" "])
        for i, b in enumerate(bits):
            if b == "1":
                r, c = divmod(i, 3)
                img[y + r * scale: y + (r + 1) * scale, x + c * scale: x + (c + 1) * scale] = color
        x += 4 * scale


def _line(img: np.ndarray, x0: float, y0: float, x1: float, y1: float, color, width: int = 2) -> None:
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    for t in np.linspace(0.0, 1.0, n):
        x, y = int(round(x0 + t * (x1 - x0))), int(round(y0 + t * (y1 - y0)))
        img[max(0, y - width // 2): y + (width + 1) // 2, max(0, x - width // 2): x + (width + 1) // 2] = color


def _png_bytes(img: np.ndarray) -> bytes:
    h, w, _ = img.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + img[y].tobytes() for y in range(h))  # filter 0 (none) on every row
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def _nice_step(raw: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^k that is >= raw: round tick values."""
    base = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    return next(m * base for m in (1, 2, 2.5, 5, 10) if m * base >= raw)


def plot_sweep(points: Sequence[tuple[int, float]], path: str | os.PathLike, *, width: int = 640,
               height: int = 400) -> Path:
    """Decode tok/s (y) against context length (x, log2-spaced) as a PNG."""
    if not points:
        raise EdgeLlamaError("nothing to plot: no context length was measured")
    img = np.full((height, width, 3), 255, np.uint8)
    left, right, top, bottom = 70, width - 30, 40, height - 50
    step = _nice_step(max(v for _, v in points) / 4)
    y_max = step * math.ceil(max(v for _, v in points) * 1.05 / step)
    xs = [math.log2(c) for c, _ in points]
    x_lo, x_hi = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1

    def px(c: int) -> float:
        return left + (math.log2(c) - x_lo) / (x_hi - x_lo) * (right - left)

    def py(v: float) -> float:
        return bottom - v / y_max * (bottom - top)

    grey, blue = (200, 200, 200), (31, 119, 180)
    for k in range(round(y_max / step) + 1):  # horizontal grid and y tick labels
        v = k * step
        _line(img, left, py(v), right, py(v), grey, 1)
        label = f"{v:g}"
        _text(img, left - 8 - 8 * len(label), int(py(v)) - 5, label)
    _line(img, left, top, left, bottom, (0, 0, 0))
    _line(img, left, bottom, right, bottom, (0, 0, 0))
    for c, _ in points:
        label = f"{c // 1024}k" if c >= 1024 and c % 1024 == 0 else str(c)
        _text(img, int(px(c)) - 4 * len(label), bottom + 10, label)
    for (c0, v0), (c1, v1) in zip(points, points[1:]):
        _line(img, px(c0), py(v0), px(c1), py(v1), blue, 3)
    for c, v in points:
        x, y = int(px(c)), int(py(v))
        img[y - 4: y + 5, x - 4: x + 5] = blue
    _text(img, left, 12, "decode tok/s vs context")
    _text(img, (left + right) // 2 - 28, height - 22, "context")
    out = Path(path)
    out.write_bytes(_png_bytes(img))
    return out
