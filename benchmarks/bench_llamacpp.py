"""llama.cpp through llama-cpp-python: its own venv, GGUF quantization, and the timed runner.

Run by the harness with the venv's python (this file imports only the stdlib at the top):
    venv/bin/python bench_llamacpp.py quantize IN.gguf OUT.gguf Q4_0
    venv/bin/python bench_llamacpp.py run MODEL.gguf PROMPT.json --new-tokens 128 --threads 2
The runner drives llama.cpp's C API (llama_decode, llama_get_logits_ith) directly: the
high-level Llama class keeps an [n_ctx, vocab] float32 score matrix that would inflate
its peak RSS with a Python-binding artifact.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENV = HERE / "work" / "venv-llamacpp"
PACKAGE = "llama-cpp-python==0.3.36"
# The x86 vector extensions this machine's /proc/cpuinfo lists, named one by one instead of
# GGML_NATIVE: some of these VMs report AMX, and -march=native's AMX tile path segfaults in
# llama_decode there (ggml_backend_amx repacks the weights, then the first decode crashes), so AMX
# stays off; and a flag named ON that the CPU lacks (AVX_VNNI on an AMD EPYC VM) dies of SIGILL.
CPU_FLAGS = {"AVX": "avx", "AVX2": "avx2", "FMA": "fma", "F16C": "f16c", "BMI2": "bmi2", "AVX_VNNI": "avx_vnni",
             "AVX512": "avx512f", "AVX512_VBMI": "avx512vbmi", "AVX512_VNNI": "avx512_vnni",
             "AVX512_BF16": "avx512_bf16"}


def cpu_flags() -> set[str]:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return set()
    return next((set(ln.split(":", 1)[1].split()) for ln in lines if ln.startswith("flags")), set())


def cmake_args(flags: set[str] | None = None) -> str:
    have = cpu_flags() if flags is None else flags
    named = [("NATIVE", False)] + [(g, f in have) for g, f in CPU_FLAGS.items()] + \
        [("AMX_TILE", False), ("AMX_INT8", False), ("AMX_BF16", False)]
    return " ".join(f"-DGGML_{flag}={'ON' if on else 'OFF'}" for flag, on in named)


FTYPES = {"Q4_0": 2, "Q4_K_M": 15, "Q8_0": 7}  # llama_ftype values (llama.h)


def venv_python() -> Path:
    return VENV / "bin" / "python"


def ensure_venv(log=print) -> Path:
    """Create the venv and compile llama-cpp-python into it (minutes), once."""
    py, args, stamp = venv_python(), cmake_args(), VENV / "cmake-args.txt"
    built_here = stamp.is_file() and stamp.read_text() == args  # a venv carried from another CPU is rebuilt
    if built_here and subprocess.run([str(py), "-c", "import llama_cpp"], capture_output=True).returncode == 0:
        return py
    log(f"building {PACKAGE} into {VENV} (compiles llama.cpp: several minutes): {args}")
    shutil.rmtree(VENV, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    env = {**os.environ, "CMAKE_ARGS": args, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
    with open(HERE / "work" / "llamacpp-build.log", "w") as f:
        # --no-cache-dir: a wheel cached from another flag set would be reused silently
        subprocess.run([str(py), "-m", "pip", "install", "--no-cache-dir", PACKAGE], check=True, env=env, stdout=f,
                       stderr=subprocess.STDOUT)
    stamp.write_text(args)
    return py


def version() -> str:
    out = subprocess.run([str(venv_python()), "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                         capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def quantize(src: Path, dst: Path, ftype: str) -> None:
    import llama_cpp as L

    params = L.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.nthread = os.cpu_count() or 1
    tmp = dst.with_name(dst.name + ".partial")
    rc = L.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize({src.name} -> {ftype}) failed with {rc}")
    os.replace(tmp, dst)


def _clear(L, ctx) -> None:
    """Empty the KV cache (the function's name moved across llama.cpp versions)."""
    if hasattr(L, "llama_memory_clear"):
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
    elif hasattr(L, "llama_kv_self_clear"):
        L.llama_kv_self_clear(ctx)
    else:
        L.llama_kv_cache_clear(ctx)


def run(model_path: Path, prompt: list[int], new_tokens: int, threads: int) -> dict:
    import ctypes

    import numpy as np

    import llama_cpp as L
    from bench_common import greedy_run

    L.llama_backend_init()
    mp = L.llama_model_default_params()
    model = L.llama_model_load_from_file(str(model_path).encode(), mp)
    if not model:
        raise SystemExit(f"llama.cpp cannot load {model_path}")
    cp = L.llama_context_default_params()
    cp.n_ctx = len(prompt) + new_tokens
    cp.n_batch = cp.n_ubatch = max(512, len(prompt))
    cp.n_threads = cp.n_threads_batch = threads
    ctx = L.llama_init_from_model(model, cp)
    n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))

    def forward(ids) -> int:
        arr = (L.llama_token * len(ids))(*ids)
        if L.llama_decode(ctx, L.llama_batch_get_one(arr, len(ids))) != 0:
            raise SystemExit("llama_decode failed")
        logits = np.ctypeslib.as_array(ctypes.cast(L.llama_get_logits_ith(ctx, -1), ctypes.POINTER(ctypes.c_float)),
                                       shape=(n_vocab,))
        return int(np.argmax(logits))

    forward(prompt)  # warm-up, as edgellama bench does: one prefill and one step
    forward([0])
    _clear(L, ctx)
    result = greedy_run(forward, lambda t: forward([t]), prompt, new_tokens)
    result["threads"] = threads
    return result


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(HERE))
    from bench_common import emit, read_prompt

    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quantize")
    q.add_argument("src", type=Path)
    q.add_argument("dst", type=Path)
    q.add_argument("ftype", choices=sorted(FTYPES))
    r = sub.add_parser("run")
    r.add_argument("model", type=Path)
    r.add_argument("prompt")
    r.add_argument("--new-tokens", type=int, default=128)
    r.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if args.cmd == "quantize":
        quantize(args.src, args.dst, args.ftype)
    else:
        emit(run(args.model, read_prompt(args.prompt), args.new_tokens, args.threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
