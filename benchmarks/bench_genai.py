"""onnxruntime-genai: its model builder's int4 CPU build (as built, and tuned), and the timed runner.

    python bench_genai.py run MODEL_DIR PROMPT.json --new-tokens 128
Threads come from the build's genai_config.json, which is the point of the "tuned" variant:
left alone, onnxruntime-genai runs onnxruntime on one intra-op thread.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TUNED_BLOCK = 128


def builder_command(hf_dir: Path, out: Path, cache: Path, tuned: bool) -> list[str]:
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
           "-p", "int4", "-e", "cpu", "-c", str(cache)]
    if tuned:
        cmd += ["--extra_options", f"block_size={TUNED_BLOCK}"]  # `int4_block_size` is its deprecated alias
    return cmd


def build(hf_dir: Path, out: Path, *, tuned: bool, threads: int, log=print) -> Path:
    """Run the model builder (cached: a finished build is reused). Heavy: ~10 GB RAM for a 1B model."""
    if (out / "genai_config.json").is_file():
        return out
    tmp, cache = out.with_name(out.name + ".partial"), out.with_name(out.name + ".cache")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = builder_command(hf_dir, tmp, cache, tuned)
    log("$ " + " ".join(cmd))
    with open(out.with_name(out.name + ".log"), "w") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT)
    if tuned:
        set_threads(tmp, threads)
    shutil.rmtree(cache, ignore_errors=True)
    os.replace(tmp, out)
    return out


def set_threads(model_dir: Path, threads: int) -> None:
    path = model_dir / "genai_config.json"
    conf = json.loads(path.read_text())
    conf["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
    path.write_text(json.dumps(conf, indent=4) + "\n")


def configured_threads(model_dir: Path) -> int | None:
    conf = json.loads((model_dir / "genai_config.json").read_text())
    return conf["model"]["decoder"].get("session_options", {}).get("intra_op_num_threads")


def weight_files(model_dir: Path) -> list[Path]:
    return sorted(p for p in model_dir.iterdir() if p.suffix in (".onnx", ".data") or p.name.endswith(".onnx.data"))


def run(model_dir: Path, prompt: list[int], new_tokens: int) -> dict:
    import onnxruntime_genai as og

    from bench_common import greedy_run

    model = og.Model(str(model_dir))
    total = len(prompt) + new_tokens

    def generator():
        params = og.GeneratorParams(model)
        # min_length keeps EOS from ending a run early: every system decodes exactly new_tokens.
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        return og.Generator(model, params)

    state = {}

    def prefill(ids) -> int:
        g = state["g"]
        g.append_tokens(ids)  # runs the prompt through the model
        g.generate_next_token()  # picks from those logits
        return int(g.get_next_tokens()[0])

    def step(_token) -> int:
        g = state["g"]
        g.generate_next_token()  # feeds back the last token, then picks
        return int(g.get_next_tokens()[0])

    state["g"] = generator()  # warm-up, as edgellama bench does: one prefill and one step
    prefill(prompt)
    step(0)
    state["g"] = generator()
    result = greedy_run(prefill, step, prompt, new_tokens)
    result["threads"] = configured_threads(model_dir)
    return result


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(HERE))
    from bench_common import emit, read_prompt

    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("model", type=Path)
    r.add_argument("prompt")
    r.add_argument("--new-tokens", type=int, default=128)
    args = ap.parse_args(argv)
    emit(run(args.model, read_prompt(args.prompt), args.new_tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
