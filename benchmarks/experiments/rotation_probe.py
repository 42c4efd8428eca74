"""Does rotating the residual stream (QuaRot/QuIP-style incoherence) help weight-only int4?

    python benchmarks/experiments/rotation_probe.py [--work DIR] [--kind hadamard|qr] [--text FILE ...]

An orthogonal Q applied to the residual stream leaves the float model's function unchanged once
every RMSNorm gain is folded into the linears that read it: embeddings E Q; q/k/v and gate/up
W diag(g) Q; o_proj and down_proj Q^T W; lm_head W diag(g_final) Q (which unties a tied table).
The rotated weights have flatter rows, which is what the rotation papers quantize better. This
builds that copy of de-gridded SmolLM2 (benchmarks/degrid_smollm2.py), exports it and the
original as fp32 bundles, quantizes both with the same options, and scores each against the
original fp32 bundle (mean KLD, `edgellama eval`'s measure). The rotated copy is a probe, not a
product: its untied int8 head adds 28 MB, so only the KLD column compares.

--kind hadamard: Q = (random orthogonal of size hidden/2^m) ⊗ (Sylvester Hadamard of size 2^m,
the largest power of two dividing hidden), rows with random signs; --kind qr: a random orthogonal
matrix (QR of a Gaussian). Both seeded.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]  # benchmarks/: the shared helpers live there
sys.path.insert(0, str(ROOT))

from degrid_smollm2 import degridded_smollm2  # noqa: E402
from quality import _bundle, texts_or_heldout  # noqa: E402

CONFIGS: list[tuple[str, dict]] = [
    ("int4 default (mixed)", {"bits": 4}),
    ("int4 hqq symmetric b32, emb/head int8", {"bits": 4, "method": "hqq", "block_size": 32, "symmetric": True}),
    ("int4 hqq symmetric b32, emb/head int8, --no-smooth",
     {"bits": 4, "method": "hqq", "block_size": 32, "symmetric": True, "smooth": False}),
]


def rotation(hidden: int, kind: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "qr":
        q, r = np.linalg.qr(rng.standard_normal((hidden, hidden)))
        return q * np.sign(np.diag(r))
    p = hidden & -hidden  # largest power of two dividing hidden
    h = np.ones((1, 1))
    while h.shape[0] < p:
        h = np.block([[h, h], [h, -h]])
    small, _ = np.linalg.qr(rng.standard_normal((hidden // p, hidden // p)))
    return np.kron(small, h / np.sqrt(p)) * rng.choice([-1.0, 1.0], hidden)[:, None]


def rotated_copy(folder: Path, out: Path, kind: str) -> Path:
    """The same function with a rotated residual stream: norms folded to ones, tables untied."""
    from safetensors.numpy import load_file, save_file

    if (out / "model.safetensors").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, out / f.name)
    t = {k: v.astype(np.float64) for k, v in load_file(folder / "model.safetensors").items()}
    cfg = json.loads((folder / "config.json").read_text())
    hidden = cfg["hidden_size"]
    q = rotation(hidden, kind)
    ones = np.ones(hidden, np.float32)
    w = {"model.embed_tokens.weight": t["model.embed_tokens.weight"] @ q,
         "lm_head.weight": (t.get("lm_head.weight", t["model.embed_tokens.weight"]) * t["model.norm.weight"]) @ q,
         "model.norm.weight": ones}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for norm, readers in (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                              ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))):
            for r in readers:
                w[p + r + ".weight"] = (t[p + r + ".weight"] * t[p + norm + ".weight"]) @ q
            w[p + norm + ".weight"] = ones
        for r in ("self_attn.o_proj", "mlp.down_proj"):
            w[p + r + ".weight"] = q.T @ t[p + r + ".weight"]
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in w.items()}, out / "model.safetensors")
    cfg["tie_word_embeddings"] = False
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgellama-rotation"))
    ap.add_argument("--kind", choices=("hadamard", "qr"), default="hadamard")
    ap.add_argument("--text", type=Path, action="append", help="held-out text(s) (default: quality.py's)")
    ap.add_argument("--max-tokens", type=int, default=1022)
    args = ap.parse_args(argv)

    from edgellama.export.evaluate import Reference, evaluate
    from edgellama.export.onnx_export import ExportOptions, export_onnx

    args.work.mkdir(parents=True, exist_ok=True)
    folder = degridded_smollm2()
    texts = texts_or_heldout(args.text, args.work)
    sources = {"original": folder, f"rotated ({args.kind})": rotated_copy(folder, args.work / f"hf-{args.kind}", args.kind)}
    fp32 = {}
    for label, src in sources.items():
        out = args.work / ("fp32" if label == "original" else f"fp32-{args.kind}")
        if not (out / "edgellama.json").is_file():
            export_onnx(src, out, ExportOptions(force=True, verify=True), log=lambda m: None)
        fp32[label] = out
    ref = Reference(fp32["original"])
    print(f"mean KLD against the original fp32 bundle; texts: {', '.join(t.name for t in texts)}\n")
    print("| weights | bundle | file MB | " + " | ".join(f"KLD {t.stem}" for t in texts) + " |")
    print("|---|---|---:|" + "---:|" * len(texts))
    for label, base in fp32.items():
        rows = [("fp32", {})] + CONFIGS if label != "original" else CONFIGS
        for name, quant in rows:
            work = args.work / (label.split()[0] + ("" if label == "original" else "-" + args.kind))
            work.mkdir(exist_ok=True)
            b = _bundle(work, name, quant, base)
            res = [evaluate(b, ref, t, max_tokens=args.max_tokens, progress=False) for t in texts]
            print(f"| {label} | {name} | {res[0]['size_bytes'] / 1e6:.1f} | "
                  + " | ".join(f"{r['kld_mean']:.4f}" for r in res) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
