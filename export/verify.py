"""The export checks itself: the graph against our torch reference, prefill then decode.

The graph runs first (prompt, then greedy decode through its own KV cache); the reference then
scores the whole sequence in one pass, streaming one layer's weights at a time, so verifying a
large model never holds a second full copy of it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgellama.runtime import bundle as B

VERIFY_PROMPT = "The capital of France is Paris. The capital of Germany is"


def prompt_ids(bundle_dir: Path, manifest: B.Manifest, vocab_size: int) -> list[int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(bundle_dir / "tokenizer.json"))
    ids = tok.encode(VERIFY_PROMPT, add_special_tokens=False).ids
    if manifest.tokens.add_bos and manifest.tokens.bos_id is not None:
        ids = [manifest.tokens.bos_id] + ids
    return [i for i in ids if i < vocab_size][:32]


def reference_logits(source, ids: list[int]):
    """fp32 logits [len(ids), vocab] from our torch model, loading one layer at a time."""
    import torch

    from edgellama.export.model import stream_hidden

    cfg = source.config
    h = stream_hidden(source, torch.tensor([ids]))
    head = torch.from_numpy(source.tensors.get("model.embed_tokens.weight" if cfg.tie_word_embeddings
                                               else "lm_head.weight"))
    with torch.inference_mode():
        return torch.nn.functional.linear(h, head)[0].numpy()


def verify_onnx_bundle(bundle_dir: Path, manifest: B.Manifest, source, *, steps: int = 8,
                       log: Callable[[str], None] = print) -> dict[str, Any]:
    from edgellama.runtime.engine import OnnxEngine

    ids = prompt_ids(bundle_dir, manifest, source.config.vocab_size)
    engine = OnnxEngine(bundle_dir, manifest, max_context=min(manifest.context_length, len(ids) + steps + 1))
    got = [engine.forward(ids).copy()]
    seq = list(ids)
    for _ in range(steps):
        seq.append(int(got[-1].argmax()))
        got.append(engine.forward([seq[-1]]).copy())
    del engine
    ref = reference_logits(source, seq)[len(ids) - 1:]
    got_arr = np.stack(got)
    max_diff = float(np.abs(got_arr - ref).max())
    agree = int((got_arr.argmax(-1) == ref.argmax(-1)).sum())
    result = {"prompt_tokens": len(ids), "decode_steps": steps, "max_abs_logit_diff": max_diff,
              "greedy_agreement": agree / len(got)}
    log(f"verify: max |Δlogit| {max_diff:.2e} over {len(ids)} prompt + {steps} decode tokens; "
        f"greedy agreement {agree}/{len(got)}")
    return result
