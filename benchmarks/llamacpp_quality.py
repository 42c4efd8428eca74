"""llama.cpp's quantization quality on de-gridded SmolLM2-135M-Instruct, scored exactly as `edgellama eval` does.

    python benchmarks/llamacpp_quality.py [--text FILE ...] [--types Q8_0 Q4_K_M Q4_0]
                                          [--max-tokens 1022] [--window 512] [--fp32 BUNDLE]

For each text, prints a markdown table | system | file MB | mean KLD | p99 KLD | top-1 | ppl |
with one row per GGUF: the F16 conversion (a pipeline check: its KLD must be near 0) and each
of --types, made from it by llama_model_quantize. Default text: benchmarks/quality.py's held-out
prose (written to a temporary file).

Same metric, same tokens as `edgellama eval` (edgellama.export.evaluate): the text is tokenized
by the fp32 bundle's tokenizer and cut to --max-tokens, cut into non-overlapping --window
windows by `windows` (BOS first only when the bundle adds one; SmolLM2 does not), each window is
run as one prefill from an empty KV cache, and every position with a next token is scored by
`score` against the fp32 torch `Reference`: KL(reference || llama.cpp), both perplexities,
top-1 agreement. llama.cpp is fed those token ids directly (its own tokenizer is not used) and
returns the logits of every position of the window (a llama_batch with every logits flag set),
with its default context settings (F16 KV cache). The numbers are llama.cpp's whole CPU path,
not the weights alone: its quantized matmuls also round the activations (to Q8_0 / Q8_K).

Two processes: this one (edgellama's environment) tokenizes, runs the reference and scores; the
logits come from this same file run as `logits MODEL IDS.json OUT.npy` by the llama-cpp-python
venv that benchmarks/bench_llamacpp.py builds (benchmarks/work/venv-llamacpp), which has numpy
but not edgellama. Hence only the stdlib is imported at the top.

Files: GGUFs under benchmarks/work/quality-gguf/ (rebuilt when older than the de-gridded
checkpoint); the fp32 reference bundle is --fp32, exported there from the de-gridded folder when
it does not exist yet (default benchmarks/work/quality-gguf/fp32). "file MB" is the GGUF's size
in 1e6 bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
GGUF_DIR = HERE / "work" / "quality-gguf"
GGUF_PRE = "smollm"  # llama.cpp's pre-tokenizer name for SmolLM2 (harness.py's smollm2 workload)
F16 = "F16"


# ---------------------------------------------------------------- llama.cpp side (runs in the venv)

def llama_logits_main(model_path: Path, ids_json: Path, out_npy: Path, threads: int) -> None:
    """Every position's float32 logits of each window in ids_json, stacked [sum of lengths, vocab] into out_npy."""
    import ctypes

    import numpy as np

    import llama_cpp as L
    from bench_llamacpp import _clear

    wins: list[list[int]] = json.loads(ids_json.read_text())
    longest = max(len(w) for w in wins)
    L.llama_backend_init()
    model = L.llama_model_load_from_file(str(model_path).encode(), L.llama_model_default_params())
    if not model:
        raise SystemExit(f"llama.cpp cannot load {model_path}")
    cp = L.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = longest  # a window is one batch, one ubatch
    cp.n_threads = cp.n_threads_batch = threads
    ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        raise SystemExit("llama_init_from_model failed")
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    out = np.lib.format.open_memmap(out_npy, mode="w+", dtype=np.float32, shape=(sum(map(len, wins)), n_vocab))
    batch = L.llama_batch_init(longest, 0, 1)
    row = 0
    try:
        for w in wins:
            _clear(L, ctx)  # a fresh KV cache per window, positions from 0
            for i, t in enumerate(w):
                batch.token[i] = t
                batch.pos[i] = i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1  # every position's logits, in batch order
            batch.n_tokens = len(w)
            if L.llama_decode(ctx, batch) != 0:
                raise SystemExit("llama_decode failed")
            ptr = ctypes.cast(L.llama_get_logits(ctx), ctypes.POINTER(ctypes.c_float))
            out[row:row + len(w)] = np.ctypeslib.as_array(ptr, shape=(len(w), n_vocab))
            row += len(w)
    finally:
        L.llama_batch_free(batch)
        L.llama_free(ctx)
        L.llama_model_free(model)
    out.flush()


# ---------------------------------------------------------------- edgellama side

def gguf_file(ftype: str, log=lambda m: print(m, file=sys.stderr)) -> Path:
    """De-gridded SmolLM2 as an ftype GGUF under GGUF_DIR: F16 from the checkpoint, the rest quantized from F16."""
    from degrid_smollm2 import degridded_smollm2

    folder = degridded_smollm2()
    GGUF_DIR.mkdir(parents=True, exist_ok=True)
    out = GGUF_DIR / f"smollm2-degrid-{ftype.lower()}.gguf"
    made_after = (folder / "model.safetensors").stat().st_mtime
    if out.is_file() and out.stat().st_mtime >= made_after:
        return out
    if ftype == F16:
        from bench_gguf import write_gguf

        log(f"writing {out.name}")
        write_gguf(folder, out, pre=GGUF_PRE, name=folder.name)
    else:
        from bench_llamacpp import ensure_venv

        src = gguf_file(F16, log)
        log(f"quantizing {out.name}")
        subprocess.run([str(ensure_venv(log)), str(HERE / "bench_llamacpp.py"), "quantize", str(src), str(out), ftype],
                       check=True, capture_output=True)
    return out


def llama_logits(model: Path, wins: list[list[int]], threads: int) -> list:
    """llama.cpp's logits [len(w), vocab] of every window, from a subprocess in the llama-cpp-python venv."""
    import numpy as np

    from bench_llamacpp import ensure_venv

    with tempfile.TemporaryDirectory(prefix="llamacpp-quality-") as tmp:
        ids, out = Path(tmp) / "ids.json", Path(tmp) / "logits.npy"
        ids.write_text(json.dumps(wins))
        p = subprocess.run([str(ensure_venv()), __file__, "logits", str(model), str(ids), str(out),
                            "--threads", str(threads)], capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"llama.cpp logits failed ({p.returncode}):\n{p.stderr[-4000:]}")
        stacked = np.load(out)
    bounds = np.cumsum([len(w) for w in wins])[:-1]
    return np.split(stacked, bounds)


def fp32_bundle(path: Path) -> Path:
    """The fp32 bundle of the de-gridded folder at path, exported once."""
    from degrid_smollm2 import degridded_smollm2
    from edgellama.export.onnx_export import ExportOptions, export_onnx
    from edgellama.runtime.bundle import MANIFEST

    if not (path / MANIFEST).is_file():
        print(f"exporting the fp32 reference bundle to {path}", file=sys.stderr)
        export_onnx(degridded_smollm2(), path, ExportOptions(force=True, verify=False), log=lambda m: None)
    return path


def token_windows(bundle: Path, text: Path, window: int, max_tokens: int | None) -> list[list[int]]:
    """The windows `edgellama eval` scores for this bundle and text."""
    from edgellama.export.evaluate import _read_text, windows
    from edgellama.runtime.bundle import read_manifest
    from edgellama.runtime.tokenizer import Tokenizer

    manifest = read_manifest(bundle, verify=False)
    ids = Tokenizer.from_dir(bundle).encode(_read_text(text))
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return windows(ids, window, manifest.tokens.bos_id if manifest.tokens.add_bos else None)


def summarize(parts: list[dict]) -> dict:
    """evaluate()'s summary numbers over the per-window `score` results."""
    import numpy as np

    kl, nll, ref_nll, top1 = (np.concatenate([p[k] for p in parts]) for k in ("kl", "nll", "ref_nll", "top1"))
    return {"ppl": float(np.exp(nll.mean())), "ref_ppl": float(np.exp(ref_nll.mean())),
            "kld_mean": float(kl.mean()), "kld_p99": float(np.percentile(kl, 99)),
            "top1_agreement": float(top1.mean()), "tokens": int(len(kl))}


def quality(ref, model: Path, wins: list[list[int]], threads: int) -> dict:
    import numpy as np

    from edgellama.export.evaluate import score

    got = llama_logits(model, wins, threads)
    parts = [score(ref.logits(w)[:-1], g[:-1], np.asarray(w[1:])) for w, g in zip(wins, got)]
    return {**summarize(parts), "size_bytes": model.stat().st_size}


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["logits"]:  # the venv side
        ap = argparse.ArgumentParser(prog="llamacpp_quality.py logits")
        ap.add_argument("model", type=Path)
        ap.add_argument("ids", type=Path)
        ap.add_argument("out", type=Path)
        ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
        a = ap.parse_args(argv[1:])
        llama_logits_main(a.model, a.ids, a.out, a.threads)
        return 0

    from bench_llamacpp import FTYPES

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", type=Path, action="append", default=None,
                    help="text file to score (repeatable; default: quality.py's held-out prose)")
    ap.add_argument("--types", nargs="*", default=["Q8_0", "Q4_K_M", "Q4_0"], choices=sorted(FTYPES))
    ap.add_argument("--max-tokens", type=int, default=1022)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--fp32", type=Path, default=GGUF_DIR / "fp32",
                    help="fp32 bundle of the de-gridded folder (exported here if missing)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)

    from edgellama.export.evaluate import Reference

    t0 = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="llamacpp-quality-")
    texts = args.text
    if not texts:
        from quality import heldout_text

        texts = [Path(tmp.name) / "heldout.txt"]
        texts[0].write_text(heldout_text(), encoding="utf-8")
    bundle = fp32_bundle(args.fp32)
    ref = Reference(bundle)
    models = [(name, gguf_file(name)) for name in [F16, *args.types]]
    for text in texts:
        wins = token_windows(bundle, text, args.window, args.max_tokens)
        rows = []
        for name, model in models:
            print(f"{text.name}: llama.cpp {name} ...", file=sys.stderr)
            rows.append((name, quality(ref, model, wins, args.threads)))
        r0 = rows[0][1]
        print(f"\n{text.name}: de-gridded SmolLM2-135M-Instruct, {r0['tokens']} scored tokens in {len(wins)} windows "
              f"of <= {args.window}, fp32 reference ppl {r0['ref_ppl']:.3f}\n")
        print("| system | file MB | mean KLD | p99 KLD | top-1 | ppl |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, r in rows:
            print(f"| llama.cpp {name} | {r['size_bytes'] / 1e6:.1f} | {r['kld_mean']:.5f} | {r['kld_p99']:.4f} "
                  f"| {r['top1_agreement']:.3f} | {r['ppl']:.2f} |")
        if r0["kld_mean"] > 1e-3:
            print(f"\nWARNING: the F16 GGUF's mean KLD {r0['kld_mean']:.5f} exceeds 0.001: the pipeline is suspect")
    tmp.cleanup()
    print(f"\n({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as exc:
        if type(exc).__name__ != "EdgeLlamaError":  # edgellama's user-facing errors: one line, no traceback
            raise
        sys.exit(f"error: {exc}")
