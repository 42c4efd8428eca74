"""optimum's ORTModelForCausalLM runs an edgellama bundle and picks the tokens `edgellama run` picks.

    python benchmarks/optimum_interop.py                 # SmolLM2-135M-Instruct, portable fp32
    python benchmarks/optimum_interop.py --reuse         # skip the export if the bundle is there
    python benchmarks/optimum_interop.py --form fast     # the fused-attention graph (optimum runs it too)

optimum-onnx 0.1.0 pins transformers < 4.58 and edgellama runs on transformers 5, so optimum
gets its own venv (benchmarks/work/venv-optimum, made on first use) and runs in a child process.
The venv sees this interpreter's site-packages (--system-site-packages) to reuse its CPU torch
wheel; what it installs itself (transformers 4.57, optimum) shadows the main environment's copies.

Steps: export a portable fp32 bundle in this environment; `edgellama run --json` greedy on a
few prompts; optimum generate() greedy from the same prompt ids in the venv; compare the ids.
Exit status 0 when every prompt's tokens are equal, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
VENV = WORK / "venv-optimum"
# What the venv needs; torch pinned to the main environment's CPU build (pip then keeps that one).
REQUIREMENTS = ["torch==2.13.0", "optimum-onnx==0.1.0", "transformers<4.58", "onnxruntime"]
PROMPTS = [
    ("plain", "The capital of France is"),
    ("chat", "What is the capital of France?"),
    ("chat", "Write a haiku about the sea."),
]


def venv_python() -> Path:
    py = VENV / "bin" / "python"
    probe = [str(py), "-c", "import optimum.onnxruntime, transformers; assert transformers.__version__ < '4.58'"]
    if py.is_file() and subprocess.run(probe, capture_output=True).returncode == 0:
        return py
    print(f"creating {VENV} ({' '.join(REQUIREMENTS)})", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(VENV)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", *REQUIREMENTS], check=True)
    return py


def edgellama(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgellama", *args], capture_output=True, text=True, check=True)


def export(source: str, bundle: Path, form: str, reuse: bool) -> None:
    if reuse and (bundle / "edgellama.json").is_file():
        return
    t0 = time.perf_counter()
    edgellama("export", source, *(["--portable"] if form == "portable" else []), "--dtype", "fp32",
              "-o", str(bundle), "--force")
    print(f"exported {source} to {bundle} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)


def run_edgellama(bundle: Path, max_new: int) -> list[dict]:
    out = []
    for kind, prompt in PROMPTS:
        chat = ["--chat"] if kind == "chat" else []
        r = edgellama("run", str(bundle), "-p", prompt, "--json", "--max-new-tokens", str(max_new), "--threads", "2", *chat)
        out.append(json.loads(r.stdout))
    return out


def child(bundle: str, max_new: int) -> None:
    """In the venv: optimum greedy generate() from each prompt's ids (read as JSON on stdin)."""
    import torch
    import transformers
    from optimum.onnxruntime import ORTModelForCausalLM

    eos = json.loads((Path(bundle) / "edgellama.json").read_text())["tokens"]["eos_ids"]
    prompts = json.loads(sys.stdin.read())
    results = {}
    for io_binding in (False, True):  # optimum's two ways of feeding the cache
        model = ORTModelForCausalLM.from_pretrained(bundle, file_name="model.onnx", use_cache=True,
                                                    use_io_binding=io_binding)
        results[f"io_binding={io_binding}"] = out = []
        for ids in prompts:
            x = torch.tensor([ids], dtype=torch.int64)
            y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new,
                               do_sample=False, eos_token_id=eos, pad_token_id=eos[0])
            out.append(y[0, len(ids):].tolist())
    print(json.dumps({"tokens": results, "transformers": transformers.__version__, "optimum_class": type(model).__name__}))


def run_optimum(py: Path, bundle: Path, prompt_ids: list[list[int]], max_new: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([str(py), __file__, "--child", str(bundle), "--max-new-tokens", str(max_new)],
                       input=json.dumps(prompt_ids), capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"optimum failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", default="smollm2-135m-instruct")
    ap.add_argument("--form", choices=["portable", "fast"], default="portable", help="graph form to export")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--reuse", action="store_true", help="reuse an exported bundle")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.max_new_tokens)
        return 0
    WORK.mkdir(parents=True, exist_ok=True)
    py = venv_python()
    bundle = WORK / f"smollm2-{args.form}" if args.source == "smollm2-135m-instruct" else WORK / f"bundle-{args.form}"
    export(args.source, bundle, args.form, args.reuse)
    ours = run_edgellama(bundle, args.max_new_tokens)
    theirs = run_optimum(py, bundle, [r["prompt_token_ids"] for r in ours], args.max_new_tokens)
    print(f"optimum-onnx ({theirs['optimum_class']}, transformers {theirs['transformers']}) vs edgellama run, "
          f"{args.form} fp32 bundle of {args.source}, greedy, {args.max_new_tokens} new tokens:")
    ok = True
    for mode, tokens in theirs["tokens"].items():
        for (kind, prompt), r, t in zip(PROMPTS, ours, tokens):
            same = r["token_ids"] == t
            ok &= same
            print(f"  {'MATCH' if same else 'DIFFER'}  {mode:16s} {kind:5s} {prompt!r}: {len(r['token_ids'])} tokens "
                  f"({r['finish_reason']}) {r['text']!r}")
            if not same:
                n = min(len(t), len(r["token_ids"]))
                i = next((i for i, (a, b) in enumerate(zip(r["token_ids"], t)) if a != b), n)
                print(f"         first difference at token {i}: edgellama {r['token_ids'][i:i + 5]} optimum {t[i:i + 5]}")
    print("RESULT:", "all greedy tokens equal" if ok else "tokens differ")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
