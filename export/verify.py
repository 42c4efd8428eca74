"""The export checks itself: the ONNX graph against our torch model, prefill then teacher-forced decode."""

from __future__ import annotations

import json
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


def verify_onnx_bundle(bundle_dir: Path, manifest: B.Manifest, source, *, steps: int = 8,
                       log: Callable[[str], None] = print) -> dict[str, Any]:
    import torch

    from edgellama.export.model import Llama
    from edgellama.runtime.engine import OnnxEngine

    model = Llama.from_source(source)
    ids = prompt_ids(bundle_dir, manifest, source.config.vocab_size)
    engine = OnnxEngine(bundle_dir, manifest, max_context=min(manifest.context_length, len(ids) + steps + 1))
    max_diff, agree = 0.0, 0
    with torch.inference_mode():
        ref, past = model(torch.tensor([ids]))
        ref_last = ref[0, -1].numpy()
        got = engine.forward(ids)
        max_diff = float(np.abs(got - ref_last).max())
        for _ in range(steps):
            nxt = int(ref_last.argmax())  # teacher-forced: both sides continue with the reference's token
            agree += int(got.argmax()) == nxt
            ref, past = model(torch.tensor([[nxt]]), past=past)
            ref_last = ref[0, -1].numpy()
            got = engine.forward([nxt])
            max_diff = max(max_diff, float(np.abs(got - ref_last).max()))
    result = {"prompt_tokens": len(ids), "decode_steps": steps, "max_abs_logit_diff": max_diff,
              "greedy_agreement": agree / steps}
    log(f"verify: max |Δlogit| {max_diff:.2e} over {len(ids)} prompt + {steps} decode tokens; "
        f"greedy agreement {agree}/{steps}")
    return result
