"""Issue 3's speed check: fast vs portable graph vs onnxruntime-genai, fp32 SmolLM2, interleaved.

    python benchmarks/fast_graph.py [--rounds 3] [--prompt 128] [--new 128] [--threads 2]

Exports (cached under benchmarks/work/) the fast and portable fp32 bundles, builds
onnxruntime-genai's own fp32 CPU model with its model builder (intra_op_num_threads set in its
genai_config, since its default is one thread), then measures decode tok/s and TTFT of each in its
own subprocess, A B C A B C ..., and prints medians and ratios. Also measures session load time of
the fast bundle with onnxruntime's optimizer on (level ALL) and off (the graph is saved pre-fused).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

WORK = Path(__file__).resolve().parent / "work"

MEASURE_OURS = r"""
import json, sys, time, numpy as np, onnxruntime as ort
from edgellama.runtime.bundle import read_manifest
from edgellama.runtime.engine import OnnxEngine
d, prompt, new, threads, level = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
m = read_manifest(d, verify=False)
if level != "default":
    m.session_options.setdefault("config_entries", {})
t = time.perf_counter()
e = OnnxEngine(d, m, threads=threads, max_context=prompt + new + 8)
load_s = time.perf_counter() - t
ids = list(range(1000, 1000 + prompt))
t = time.perf_counter(); lg = e.forward(ids); ttft = time.perf_counter() - t
tok = int(lg.argmax()); t = time.perf_counter()
for _ in range(new - 1):
    tok = int(e.forward([tok]).argmax())
print(json.dumps({"ttft_s": ttft, "decode_tok_s": (new - 1) / (time.perf_counter() - t), "load_s": load_s}))
"""

MEASURE_GENAI = r"""
import json, sys, time, onnxruntime_genai as og
d, prompt, new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model = og.Model(d)
p = og.GeneratorParams(model); p.set_search_options(max_length=prompt + new, min_length=prompt + new, do_sample=False)
g = og.Generator(model, p)
t = time.perf_counter(); g.append_tokens([list(range(1000, 1000 + prompt))]); g.generate_next_token(); ttft = time.perf_counter() - t
t = time.perf_counter(); n = 0
while not g.is_done() and n < new - 1:
    g.generate_next_token(); n += 1
print(json.dumps({"ttft_s": ttft, "decode_tok_s": n / (time.perf_counter() - t)}))
"""

MEASURE_LOAD = r"""
import json, sys, time, onnxruntime as ort
path, level, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
so = ort.SessionOptions(); so.intra_op_num_threads = threads
so.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                               "off": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[level]
t = time.perf_counter(); ort.InferenceSession(path, so, providers=["CPUExecutionProvider"]); print(json.dumps({"load_s": time.perf_counter() - t}))
"""


def sh(cmd: list[str], **kw) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout


def ensure_artifacts(threads: int) -> dict[str, Path]:
    WORK.mkdir(parents=True, exist_ok=True)
    fast, port = WORK / "smollm2-fp32-fast", WORK / "smollm2-fp32-portable"
    for out, extra in ((fast, []), (port, ["--portable"])):
        if not (out / "edgellama.json").exists():
            sh([sys.executable, "-m", "edgellama", "export", "smollm2-135m-instruct", "-o", str(out), "--force", *extra])
    hf = WORK / "smollm2-hf"
    if not (hf / "config.json").exists():
        sh([sys.executable, "-c", f"""
import json, shutil
from pathlib import Path
from edgellama.export.sources import load_source
from edgellama.export.safetensors_io import save_file
src = load_source("smollm2-135m-instruct"); out = Path({str(hf)!r}); out.mkdir(parents=True, exist_ok=True)
save_file({{n: src.tensors.get(n) for n in src.tensors.names()}}, out / "model.safetensors")
cfg = src.config.to_hf(); (out / "config.json").write_text(json.dumps(cfg))
for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
    shutil.copy({str(fast)!r} + "/" + f, out / f)
"""])
    genai = WORK / "smollm2-genai-fp32"
    if not (genai / "genai_config.json").exists():
        sh([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(genai), "-p", "fp32",
            "-e", "cpu", "-c", str(WORK / "genai-cache")])
    conf = json.loads((genai / "genai_config.json").read_text())
    conf["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    (genai / "genai_config.json").write_text(json.dumps(conf, indent=2))
    return {"fast": fast, "portable": port, "genai": genai}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    paths = ensure_artifacts(a.threads)
    results: dict[str, list[dict]] = {k: [] for k in paths}
    loads: dict[str, list[float]] = {"all": [], "off": []}
    for r in range(a.rounds):
        for name, path in paths.items():
            script = MEASURE_GENAI if name == "genai" else MEASURE_OURS
            args = [str(path), str(a.prompt), str(a.new)] + ([] if name == "genai" else [str(a.threads), "default"])
            results[name].append(json.loads(sh([sys.executable, "-c", script, *args])))
        for level in loads:
            loads[level].append(json.loads(sh([sys.executable, "-c", MEASURE_LOAD, str(paths["fast"] / "model.onnx"),
                                               level, str(a.threads)]))["load_s"])
        print(f"round {r + 1}/{a.rounds} done", file=sys.stderr)
    med = {k: {m: statistics.median(x[m] for x in v) for m in ("ttft_s", "decode_tok_s")} for k, v in results.items()}
    base = med["fast"]["decode_tok_s"]
    print(f"\nSmolLM2-135M fp32, {a.prompt}-token prompt, {a.new} new tokens, {a.threads} threads, "
          f"median of {a.rounds} interleaved rounds\n")
    print("| system | TTFT ms | decode tok/s | fast ÷ system (decode) |")
    print("|---|---|---|---|")
    labels = {"fast": "edgellama fast graph", "portable": "edgellama portable graph",
              "genai": f"onnxruntime-genai fp32, intra_op_num_threads={a.threads}"}
    for k, v in med.items():
        print(f"| {labels[k]} | {v['ttft_s'] * 1000:.0f} | {v['decode_tok_s']:.1f} | {base / v['decode_tok_s']:.2f}× |")
    print(f"\nsession load, fast bundle: optimizer ALL {statistics.median(loads['all']):.2f} s, "
          f"optimizer off {statistics.median(loads['off']):.2f} s")


if __name__ == "__main__":
    main()
