"""What a swappable LoRA adapter costs: file size against the base bundle, and decode speed with it loaded.

On SmolLM2-135M (the built-in alias) it exports, all int4 and fast-form:
  plain   the base bundle
  slots   the base with --lora-slots R (run with no adapter, then with one)
  merged  the base with the same adapter merged at export
and times decode of the same forced tokens on each, interleaved round by round so the noise of a
shared machine lands on every variant alike. Both clocks are reported: wall time, and the
process's CPU time, which on an oversubscribed machine measures the work itself (with one
intra-op thread, CPU time has no spin-waiting in it). Sizes are measured on those files. With
--model-1b (a folder from benchmarks/make_1b_shape.py) the Llama-3.2-1B shape is exported and timed
the same way; without it, its int4 bundle is sized with the real quantizer run on row slices of each
weight (bytes per row do not depend on the row count), checked against the SmolLM2 bundle actually
written, and its adapter file is written in full from zero tensors.

    python benchmarks/experiments/lora_cost.py [--rank 16] [--rounds 7] [--new-tokens 64] [--work DIR] [--model-1b DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

LLAMA32_1B = {  # meta-llama/Llama-3.2-1B's numbers (benchmarks/make_1b_shape.py writes the full config)
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
    "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
    "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
    "rope_theta": 500000.0, "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu",
}


def random_peft_adapter(arch: dict, folder: Path, rank: int, alpha: float, seed: int) -> Path:
    """A PEFT-format LoRA adapter on all seven projections, with a trained adapter's scale of update
    (|scale * B @ A| a few percent of |W|) rather than peft's zero-initialised B."""
    from edgellama.export.safetensors_io import save_file
    from edgellama.runtime.adapters import PROJECTIONS, projection_shape

    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(arch["num_hidden_layers"]):
        for proj in PROJECTIONS:
            n, k = projection_shape(arch, proj)
            block = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{block}.{proj}"
            tensors[f"{key}.lora_A.weight"] = (rng.standard_normal((rank, k)) / math.sqrt(k)).astype(np.float32)
            tensors[f"{key}.lora_B.weight"] = (0.01 * rng.standard_normal((n, rank))).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": list(PROJECTIONS),
              "bias": "none", "lora_dropout": 0.0, "task_type": "CAUSAL_LM", "use_rslora": False}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder


def bundle_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def int4_bundle_bytes(arch: dict, context: int, tokenizer_bytes: int) -> dict:
    """The default int4 export's size for an architecture, from the quantizer's own layouts.

    Each weight is quantized as a 64-row slice and its bytes scaled to the full row count
    (blocks run along the rows, so bytes per row are exact); norms are float32 as the graph
    builder writes them."""
    from edgellama.export.config import LlamaConfig
    from edgellama.export.onnx_graph import FloatWeights
    from edgellama.quantize.onnx_weights import make_emitter
    from edgellama.quantize.packing import matmul_nbits
    from edgellama.runtime.adapters import PROJECTIONS, projection_shape

    cfg = LlamaConfig.from_hf(arch)
    # Unranked, the emitter gives the int8 down_proj share to the outermost layers; the export ranks
    # them by kurtosis instead, but for sizing only the count matters.
    em, _ = make_emitter(cfg, {"bits": 4}, form="fast", fallback=FloatWeights())
    rng = np.random.default_rng(0)
    per_row: dict[tuple[int, int, int], float] = {}
    scale_bytes = np.dtype(em.opts.scale_dtype).itemsize

    def row_bytes(k: int, bits: int, block: int) -> float:
        if (k, bits, block) not in per_row:
            w = rng.standard_normal((64, k)).astype(np.float32)
            qt = em._quantize(w, bits, block_size=block)  # the emitter's own choice of symmetry
            mw = matmul_nbits(qt)
            total = mw.B.nbytes + mw.scales.size * scale_bytes
            total += mw.zero_points.nbytes if mw.zero_points is not None else 0
            per_row[(k, bits, block)] = total / 64
        return per_row[(k, bits, block)]

    layers = 0.0
    for layer in range(cfg.num_hidden_layers):
        for proj in PROJECTIONS:
            n, k = projection_shape(arch, proj)
            block = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            bits = em.bits_for(f"model.layers.{layer}.{block}.{proj}")
            layers += n * row_bytes(k, bits, em.block_for(proj, bits))
    embed_bits = {"int8": 8, "int4": 4}[em.opts.embeddings]
    embed = cfg.vocab_size * row_bytes(cfg.hidden_size, embed_bits, em.embedding_block) * (
        1 if cfg.tie_word_embeddings else 2)
    floats = 4 * cfg.hidden_size * (2 * cfg.num_hidden_layers + 1)  # norms (RoPE tables are computed at load)
    return {"weights_bytes": int(layers + embed), "other_bytes": floats + tokenizer_bytes,
            "total_bytes": int(layers + embed) + floats + tokenizer_bytes}


def adapter_file_bytes(arch: dict, rank: int, work: Path) -> int:
    """Write a rank-R adapter file for every projection of every layer, as `edgellama adapter` lays it out."""
    from edgellama.export.safetensors_io import save_file
    from edgellama.runtime.adapters import PROJECTIONS, projection_shape, slot_input

    tensors = {}
    for layer in range(arch["num_hidden_layers"]):
        for proj in PROJECTIONS:
            n, k = projection_shape(arch, proj)
            tensors[slot_input(layer, proj, "A")] = np.zeros((rank, k), np.float32)
            tensors[slot_input(layer, proj, "B")] = np.zeros((n, rank), np.float32)
    path = work / "1b-shape.adapter.safetensors"
    save_file(tensors, path, metadata={"edgellama.adapter": json.dumps({"note": "size probe", "pad": "x" * 4096})})
    size = path.stat().st_size
    path.unlink()
    return size


def decode_tok_s(model, prompt: list[int], forced: list[int]) -> tuple[float, float]:
    """Prefill, then time len(forced) single-token steps (forced tokens: identical work for every variant).
    Returns (tok/s by CPU time, tok/s by wall time)."""
    engine = model.engine
    engine.reset()
    engine.forward(prompt)
    c0, w0 = time.process_time(), time.perf_counter()
    for token in forced:
        engine.forward([token])
    return len(forced) / (time.process_time() - c0), len(forced) / (time.perf_counter() - w0)


def measure(src, work: Path, args, merged: bool) -> dict:
    """Export plain / slots (/ merged) int4 bundles of `src`, write a random adapter file for the slots
    bundle, and time decode on each variant in interleaved rounds."""
    from edgellama.export.lora import write_adapter_file
    from edgellama.export.onnx_export import ExportOptions, export_onnx
    from edgellama.runtime.generate import load

    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    work.mkdir(parents=True, exist_ok=True)
    arch = src.config.to_hf()
    adapter_dir = random_peft_adapter(arch, work / "adapter", args.rank, 2.0 * args.rank, seed=0)
    quant = {"bits": 4}
    dirs = {"plain": work / "plain", "slots": work / "slots"}
    opts = {"plain": ExportOptions(quant=quant, verify=False),
            "slots": ExportOptions(quant=quant, verify=False, lora_slots=args.rank)}
    if merged:
        dirs["merged"] = work / "merged"
        opts["merged"] = ExportOptions(quant=quant, verify=False, adapter=str(adapter_dir))
    for name, out in dirs.items():
        if not (out / "edgellama.json").exists():
            t0 = time.perf_counter()
            export_onnx(src, out, opts[name], log=lambda m: None)
            log(f"exported {name} in {time.perf_counter() - t0:.0f} s")
    adapter_file = work / "adapter.safetensors"
    write_adapter_file(adapter_dir, dirs["slots"], adapter_file, force=True)

    ctx = args.prompt_tokens + args.new_tokens + 1
    models = {"plain": load(dirs["plain"], threads=args.threads, max_context=ctx),
              "slots, no adapter": load(dirs["slots"], threads=args.threads, max_context=ctx),
              "slots + adapter": load(dirs["slots"], threads=args.threads, max_context=ctx, adapter=adapter_file)}
    if merged:
        models["merged"] = load(dirs["merged"], threads=args.threads, max_context=ctx)
    rng = np.random.default_rng(1)
    prompt = rng.integers(100, 40000, args.prompt_tokens).tolist()
    forced = rng.integers(100, 40000, args.new_tokens).tolist()
    for m in models.values():  # warm-up: thread pools, allocator arenas
        decode_tok_s(m, prompt, forced[:4])
    speeds: dict[str, list[tuple[float, float]]] = {k: [] for k in models}
    for r in range(args.rounds):
        order = list(models) if r % 2 == 0 else list(reversed(models))  # no variant always runs first
        for name in order:
            speeds[name].append(decode_tok_s(models[name], prompt, forced))
        log(f"{src.config.num_hidden_layers}-layer model, round {r + 1}/{args.rounds} (cpu/wall tok/s): " +
            ", ".join(f"{k} {v[-1][0]:.1f}/{v[-1][1]:.1f}" for k, v in speeds.items()))
    del models
    return {"dirs": dirs, "cpu": {k: statistics.median(c for c, _ in v) for k, v in speeds.items()},
            "wall": {k: statistics.median(w for _, w in v) for k, v in speeds.items()}, "runs": speeds,
            "adapter_file": adapter_file, "sizes": {name: bundle_bytes(d) for name, d in dirs.items()}}


def ratios(m: dict[str, float]) -> dict[str, float]:
    r = {"slots+adapter / plain": m["slots + adapter"] / m["plain"],
         "slots+adapter / slots no adapter": m["slots + adapter"] / m["slots, no adapter"],
         "slots no adapter / plain": m["slots, no adapter"] / m["plain"]}
    if "merged" in m:
        r["merged / plain"] = m["merged"] / m["plain"]
    return r


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=None, help="keep exports here (default: a temporary folder)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--model-1b", type=Path, default=None,
                    help="also export and time a Llama-3.2-1B-shape folder (benchmarks/make_1b_shape.py)")
    args = ap.parse_args(argv)

    from edgellama.assets import LLAMA32_TOKENIZER, fetch
    from edgellama.export.sources import load_source

    work = args.work or Path(tempfile.mkdtemp(prefix="lora_cost-"))
    work.mkdir(parents=True, exist_ok=True)
    src = load_source("smollm2-135m-instruct")
    arch = src.config.to_hf()
    smol = measure(src, work, args, merged=True)
    dirs, med, med_wall, speeds, adapter_file = smol["dirs"], smol["cpu"], smol["wall"], smol["runs"], smol["adapter_file"]
    one_b_run = None
    if args.model_1b:
        # The merged graph is the plain one (only the weights differ), so the 1B shape skips it.
        one_b_run = measure(load_source(str(args.model_1b)), work / "1b", args, merged=False)

    tok_bytes = sum((Path(fetch(LLAMA32_TOKENIZER)) / f).stat().st_size for f in ("tokenizer.json", "tokenizer_config.json"))
    smol_tok = sum((dirs["plain"] / f).stat().st_size for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"))
    predicted_smol = int4_bundle_bytes(arch, read_context(dirs["plain"]), smol_tok)["total_bytes"]
    one_b = int4_bundle_bytes(LLAMA32_1B, 8192, tok_bytes)
    one_b_adapter = adapter_file_bytes(LLAMA32_1B, args.rank, work)
    sizes = smol["sizes"]
    result = {
        "model": "SmolLM2-135M-Instruct (int4, fast form)", "rank": args.rank, "rounds": args.rounds,
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "threads": args.threads,
        "decode_tok_s_cpu_median": med, "decode_tok_s_wall_median": med_wall, "decode_tok_s_runs": speeds,
        "ratios_cpu": ratios(med), "ratios_wall": ratios(med_wall),
        "smollm2_bytes": {**sizes, "adapter_file": adapter_file.stat().st_size,
                          "predicted_plain": predicted_smol},
        "smollm2_adapter_share_of_plain": adapter_file.stat().st_size / sizes["plain"],
        "llama32_1b_shape": {"int4_bundle_bytes": one_b["total_bytes"], "adapter_file_bytes": one_b_adapter,
                             "adapter_share": one_b_adapter / one_b["total_bytes"]},
    }
    if one_b_run:
        result["llama32_1b_shape_measured"] = {
            "decode_tok_s_cpu_median": one_b_run["cpu"], "decode_tok_s_wall_median": one_b_run["wall"],
            "ratios_cpu": ratios(one_b_run["cpu"]), "ratios_wall": ratios(one_b_run["wall"]),
            "bytes": {**one_b_run["sizes"], "adapter_file": one_b_run["adapter_file"].stat().st_size}}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def read_context(bundle: Path) -> int:
    from edgellama.runtime.bundle import read_manifest

    return read_manifest(bundle, verify=False).context_length


if __name__ == "__main__":
    sys.exit(main())
