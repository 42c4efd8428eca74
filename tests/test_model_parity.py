"""Our export-time torch Llama against transformers' LlamaForCausalLM, on tiny random checkpoints.

Covers heads-to-KV-heads ratios 1, 3 and 4, llama3 RoPE scaling on and off, tied and untied
embeddings, head_dim != hidden/heads, and both config.json spellings of RoPE.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edgellama.export.config import LlamaConfig, rope_inv_freq
from edgellama.export.model import Llama
from edgellama.export.sources import load_source
from helpers import TINY_CONFIGS, hf_logits, random_ids

TOL = 1e-3
ALL = sorted(TINY_CONFIGS)


def ours(folder) -> Llama:
    return Llama.from_source(load_source(folder))


def our_logits(model: Llama, ids, **kw) -> np.ndarray:
    with torch.inference_mode():
        logits, _ = model(torch.as_tensor(np.atleast_2d(ids)), **kw)
    return logits.numpy()


@pytest.mark.parametrize("name", ALL)
def test_config_read_as_transformers_reads_it(tiny_llama, name):
    m = tiny_llama(name)
    spec = m.spec
    raw = json.loads((m.folder / "config.json").read_text())
    assert ("rope_parameters" in raw) == (spec.spelling == "new")  # the fixture really wrote that spelling
    cfg = LlamaConfig.from_hf(raw)
    assert (cfg.num_attention_heads // cfg.num_key_value_heads) == spec.heads // spec.kv_heads
    assert cfg.head_dim == (spec.head_dim or spec.hidden // spec.heads)
    assert cfg.rope_theta == spec.rope_theta
    assert (cfg.rope_scaling is not None) == spec.llama3_rope
    assert cfg.tie_word_embeddings == spec.tied
    if spec.llama3_rope:
        assert cfg.rope_scaling.original_max_position_embeddings == spec.rope_original_context
    # Our inverse frequencies are transformers' own.
    ref = m.hf.model.rotary_emb.inv_freq.double().numpy()
    np.testing.assert_allclose(rope_inv_freq(cfg), ref, rtol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_full_sequence_matches_transformers(tiny_llama, name):
    m = tiny_llama(name)
    ids = random_ids(40, seed=7)  # past the 32-token original context, where llama3 scaling bites
    ref = hf_logits(m.hf, ids)
    got = our_logits(ours(m.folder), ids)
    assert ref.std() > 1.0  # logits spread wide enough for the tolerance to mean something
    assert np.abs(got - ref).max() <= TOL


@pytest.mark.parametrize("name", ALL)
def test_kv_cache_prefill_then_decode_matches_transformers(tiny_llama, name):
    m = tiny_llama(name)
    ids = random_ids(30, seed=11)
    ref = hf_logits(m.hf, ids)[0]
    model = ours(m.folder)
    with torch.inference_mode():
        logits, past = model(torch.tensor([ids[:21]]))
        steps = [logits[0].numpy()]
        for i in range(21, 30):
            logits, past = model(torch.tensor([[ids[i]]]), past=past)
            steps.append(logits[0].numpy())
    got = np.concatenate(steps)
    assert past[0][0].shape[2] == 30 and len(past) == m.spec.layers
    assert np.abs(got - ref).max() <= TOL


@pytest.mark.parametrize("name", ["gqa4", "mha", "gqa3_hd24"])
def test_left_padded_batch_matches_transformers_and_unpadded(tiny_llama, name):
    m = tiny_llama(name)
    a, b = random_ids(12, seed=3), random_ids(7, seed=4)
    pad = 12 - 7
    ids = np.array([a, [0] * pad + b])
    mask = np.array([[1] * 12, [0] * pad + [1] * 7])
    positions = np.clip(mask.cumsum(1) - 1, 0, None)
    model = ours(m.folder)
    got = our_logits(model, ids, attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions))
    ref = hf_logits(m.hf, ids, attention_mask=mask, position_ids=positions)
    real = mask.astype(bool)  # padded positions' logits are meaningless on both sides
    assert np.abs(got[real] - ref[real]).max() <= TOL
    # Padding must be invisible: the padded row equals the sequence run alone.
    alone = our_logits(model, b)[0]
    assert np.abs(got[1, pad:] - alone).max() <= TOL
    assert np.abs(got[0] - our_logits(model, a)[0]).max() <= TOL


def test_tolerance_catches_a_wrong_rope():
    """The parity bar is not vacuous: llama3 scaling off changes logits by far more than the tolerance."""
    from dataclasses import replace

    from helpers import build_hf_model

    spec = TINY_CONFIGS["gqa4"].with_(vocab=512)
    hf = build_hf_model(spec)
    cfg = LlamaConfig.from_hf(hf.config.to_dict())
    assert cfg.rope_scaling is not None
    ids = random_ids(40, seed=7, vocab=512)
    ref = hf_logits(hf, ids)

    def run(c: LlamaConfig) -> np.ndarray:
        model = Llama(c)
        model.load_state_dict(hf.state_dict(), strict=False)
        return our_logits(model.eval(), ids)

    assert np.abs(run(cfg) - ref).max() <= TOL
    assert np.abs(run(replace(cfg, rope_scaling=None)) - ref).max() > 100 * TOL
