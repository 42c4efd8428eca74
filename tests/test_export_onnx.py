"""Exported ONNX bundles (portable and fast forms) against transformers and against our torch model.

Each bundle is run through the runtime's OnnxEngine exactly as `edgellama run` would: a prefill,
then one token per step through the KV cache.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from edgellama.export.model import Llama
from edgellama.export.onnx_graph import GQA_HEAD_MULTIPLE
from edgellama.export.sources import load_source
from edgellama.runtime.engine import OnnxEngine
from helpers import hf_logits, random_ids

TOL = 1e-3
FORMS = ["portable", "fast"]
# ratio 4 + llama3 + tied (new spelling); ratio 1 + plain RoPE + untied (old spelling);
# ratio 3 + head_dim 24 (GQA-rejected) + llama3; ratio 3 + plain RoPE + tied (old spelling)
EXPORTED = ["gqa4", "mha", "gqa3_hd24", "gqa3"]
PREFILL, TOTAL = 16, 24


def engine_logits(bundle, ids, prefill: int = PREFILL, context: int = 64) -> np.ndarray:
    """Logits at positions prefill-1 .. len(ids)-1: one prefill call, then single-token decode steps."""
    engine = OnnxEngine(bundle.dir, bundle.manifest, max_context=context, threads=1)
    out = [engine.forward(ids[:prefill])]
    out += [engine.forward([t]) for t in ids[prefill:]]
    assert engine.pos == len(ids)
    return np.stack(out)


def graph_ops(bundle) -> set[tuple[str, str]]:
    model = onnx.load(str(bundle.dir / bundle.manifest.graph.file), load_external_data=False)
    return {(n.domain or "", n.op_type) for n in model.graph.node}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", EXPORTED)
def test_onnx_matches_transformers_and_torch(exported, name, form):
    b = exported(name, form)
    m = b.model
    ids = random_ids(TOTAL, seed=5)
    got = engine_logits(b, ids)
    ref = hf_logits(m.hf, ids)[0, PREFILL - 1:]
    with torch.inference_mode():
        ours = Llama.from_source(load_source(m.folder))(torch.tensor([ids]))[0][0, PREFILL - 1:].numpy()
    assert got.shape == (TOTAL - PREFILL + 1, m.spec.vocab)
    assert np.abs(got - ref).max() <= TOL
    assert np.abs(got - ours).max() <= TOL
    # The exporter's own check ran and recorded the same verdict (greedy may differ only at a near-tie).
    v = b.report.verification
    assert v["max_abs_logit_diff"] <= TOL and v["greedy_agreement"] >= 7 / 8
    assert b.manifest.extras["verification"] == v


@pytest.mark.parametrize("name", EXPORTED)
def test_graph_forms(exported, name):
    spec = exported(name, "fast").model.spec
    head_dim = spec.head_dim or spec.hidden // spec.heads
    portable, fast = exported(name, "portable"), exported(name, "fast")

    ops = graph_ops(portable)
    assert {d for d, _ in ops} == {""}, "the portable form must use standard ONNX ops only"
    assert portable.manifest.graph.attention == "mha" and not portable.manifest.graph.past_present_share_buffer

    ops = graph_ops(fast)
    assert ("com.microsoft", "SkipSimplifiedLayerNormalization") in ops
    if head_dim % GQA_HEAD_MULTIPLE == 0:
        assert ("com.microsoft", "GroupQueryAttention") in ops
        assert fast.manifest.graph.attention == "gqa" and fast.manifest.graph.past_present_share_buffer
        assert "position_ids" not in {s.name for s in fast.manifest.graph.inputs}
    else:  # GroupQueryAttention rejects this head size: the fast form falls back to standard attention
        assert ("com.microsoft", "GroupQueryAttention") not in ops
        assert fast.manifest.graph.attention == "mha" and not fast.manifest.graph.past_present_share_buffer
        assert "position_ids" in {s.name for s in fast.manifest.graph.inputs}


def test_gqa_head24_fallback_really_happens():
    """The fixture config is one GroupQueryAttention would reject, so the fallback test above is real."""
    from helpers import TINY_CONFIGS

    assert TINY_CONFIGS["gqa3_hd24"].head_dim % GQA_HEAD_MULTIPLE != 0


@pytest.mark.parametrize("form", FORMS)
def test_engine_logits_survive_the_next_step(exported, form):
    b = exported("gqa4", form)
    engine = OnnxEngine(b.dir, b.manifest, max_context=32, threads=1)
    first = engine.forward(random_ids(5, seed=1))
    kept = first.copy()
    second = engine.forward([int(first.argmax())])
    np.testing.assert_array_equal(first, kept)
    assert not np.array_equal(first, second)


def test_fp16_greedy_agrees_with_fp32(exported, llama_tokenizer_dir):
    """fp16 weights: teacher-forced on fp32's own free-running greedy continuation, 128 tokens."""
    from tokenizers import Tokenizer

    b32, b16 = exported("gqa4", "fast", "fp32"), exported("gqa4", "fast", "fp16")
    assert b16.manifest.dtype == "fp16"
    size = lambda b: sum((b.dir / f).stat().st_size for f in b.manifest.files if f.startswith("model.onnx"))
    assert size(b16) < 0.6 * size(b32)

    tok = Tokenizer.from_file(str(llama_tokenizer_dir / "tokenizer.json"))
    prompt = [128000] + tok.encode("Edge devices run small language models", add_special_tokens=False).ids
    n = 128
    e32 = OnnxEngine(b32.dir, b32.manifest, max_context=len(prompt) + n, threads=1)
    e16 = OnnxEngine(b16.dir, b16.manifest, max_context=len(prompt) + n, threads=1)
    l32, l16 = e32.forward(prompt), e16.forward(prompt)
    agree, max_diff, greedy = 0, 0.0, []
    for _ in range(n):
        nxt = int(l32.argmax())
        greedy.append(nxt)
        agree += int(l16.argmax()) == nxt
        max_diff = max(max_diff, float(np.abs(l16 - l32).max()))
        l32, l16 = e32.forward([nxt]), e16.forward([nxt])
    assert len(set(greedy)) > 8  # a varied continuation, not one token repeated
    assert agree >= 0.99 * n, f"fp16 agreed on {agree}/{n} greedy tokens"
    assert 0 < max_diff < 0.5  # fp16 weights really differ, and only by rounding
