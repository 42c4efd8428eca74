"""The export checks itself: the graph against our torch reference, prefill then decode.

The reference logits of a fixed text come from the export's own pass over the checkpoint
(layer_pass.LayerPass runs each layer over the text as it is read), so verifying costs no second
read of the weights. The bundle then runs the same text: a prefill of all but the last
DECODE_STEPS tokens, then one decode step per remaining token through its own KV cache
(teacher-forced: every step sees the text's token, so each position compares like with like).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgellama.runtime import bundle as B

VERIFY_TEXT = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome."
DECODE_STEPS = 8
MAX_TOKENS = 40


def verification_ids(tokenizer_json: dict[str, Any], tokens: B.TokenInfo, vocab_size: int, context: int) -> list[int]:
    """VERIFY_TEXT's ids (BOS first where the bundle adds it), within the vocabulary and the context."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(json.dumps(tokenizer_json))
    ids = tok.encode(VERIFY_TEXT, add_special_tokens=False).ids
    if tokens.add_bos and tokens.bos_id is not None:
        ids = [tokens.bos_id] + ids
    return [i for i in ids if i < vocab_size][:min(MAX_TOKENS, context)]


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


def verify_onnx_bundle(bundle_dir: Path, manifest: B.Manifest, ids: list[int], reference: np.ndarray, *,
                       steps: int = DECODE_STEPS, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The bundle's logits over `ids` against `reference` ([len(ids), vocab], the torch model's)."""
    from edgellama.runtime.engine import OnnxEngine

    steps = max(0, min(steps, len(ids) - 2))
    n = max(1, len(ids) - 1 - steps)  # the prompt (the text's last token is never an input, unless it is the only one)
    engine = OnnxEngine(bundle_dir, manifest, max_context=len(ids))
    got = [engine.forward(ids[:n]).copy()]
    for token in ids[n:n + steps]:
        got.append(engine.forward([token]).copy())
    del engine
    got_arr, ref = np.stack(got), reference[n - 1:n + steps]
    max_diff = float(np.abs(got_arr - ref).max())
    agree = int((got_arr.argmax(-1) == ref.argmax(-1)).sum())
    result = {"prompt_tokens": n, "decode_steps": len(got) - 1, "max_abs_logit_diff": max_diff,
              "greedy_agreement": agree / len(got)}
    log(f"verify: max |Δlogit| {max_diff:.2e} over {n} prompt + {len(got) - 1} decode tokens; "
        f"greedy agreement {agree}/{len(got)}")
    return result
