"""KLD of an onnxruntime-genai model-builder build against the fp32 reference, scored as `edgellama eval` scores.

    python benchmarks/genai_quality.py GENAI_DIR --reference FP32_BUNDLE --text FILE [--max-tokens 1022]

The genai graph (input_ids, attention_mask, past_key_values.*; logits of every position) runs in
plain onnxruntime, one prefill per window from an empty cache, through evaluate.score_windows: the
same tokens, windows and scoring as eval gives an edgellama bundle. Build the model from the same
float weights (e.g. benchmarks/degrid_smollm2.py's folder) with bench_genai.builder_command.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort


class GenaiEngine:
    """reset() / forward(ids, all_logits=True): the engine interface score_windows drives."""

    def __init__(self, model_dir: Path, threads: int = 2):
        conf = json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"]
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        self.sess = ort.InferenceSession(str(model_dir / conf["filename"]), so, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.sess.get_inputs()}
        self.kv_heads, self.head_dim = conf["num_key_value_heads"], conf["head_size"]

    def reset(self) -> None:
        pass  # every forward starts from an empty cache

    def forward(self, ids: list[int], all_logits: bool = True) -> np.ndarray:
        n = len(ids)
        feed = {"input_ids": np.asarray([ids], np.int64), "attention_mask": np.ones((1, n), np.int64)}
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.arange(n, dtype=np.int64)[None]
        for name, spec in self.inputs.items():
            if name.startswith("past_key_values"):
                dtype = np.float16 if "float16" in spec.type else np.float32
                feed[name] = np.zeros((1, self.kv_heads, 0, self.head_dim), dtype)
        logits = self.sess.run(["logits"], feed)[0][0]
        return logits.astype(np.float32) if all_logits else logits[-1:].astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--reference", required=True, type=Path, help="the fp32 edgellama bundle of the same weights")
    ap.add_argument("--text", required=True, type=Path)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=1022)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    from edgellama.export.evaluate import Reference, score_windows, windows
    from edgellama.runtime.bundle import read_manifest
    from edgellama.runtime.tokenizer import Tokenizer

    m = read_manifest(args.reference, verify=False)
    ids = Tokenizer.from_dir(args.reference).encode(args.text.read_text(encoding="utf-8"))[: args.max_tokens]
    wins = windows(ids, args.window, m.tokens.bos_id if m.tokens.add_bos else None)
    s = score_windows(GenaiEngine(args.model, args.threads), Reference(args.reference), wins)
    size = sum(p.stat().st_size for p in args.model.iterdir() if p.name.startswith("model.onnx"))
    out = {"model": str(args.model), "kld_mean": float(s["kl"].mean()), "kld_p99": float(np.percentile(s["kl"], 99)),
           "top1_agreement": float(s["top1"].mean()), "ppl": float(np.exp(s["nll"].mean())),
           "ref_ppl": float(np.exp(s["ref_nll"].mean())), "tokens": int(len(s["kl"])), "weight_mb": size / 1e6}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
