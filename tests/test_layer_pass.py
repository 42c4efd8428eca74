"""The export's one pass over the checkpoint (export/layer_pass.py): each weight read once, and the
same statistics, smoothed weights and reference logits as the separate passes it replaced."""

from __future__ import annotations

import collections
from dataclasses import replace

import numpy as np
import pytest

from edgellama.export.bundle_source import load_bundle_source
from edgellama.export.calibration import calibrate, calibration_batch, smooth_source
from edgellama.export.layer_pass import EMBED, HEAD, NORM, LayerPass
from edgellama.export.model import block_parameter_names
from edgellama.export.onnx_export import ExportOptions, export_onnx
from edgellama.export.sources import DerivedStore, load_source
from edgellama.export.verify import DECODE_STEPS, reference_logits
from edgellama.quantize.onnx_weights import QuantizedWeights, QuantOptions
from edgellama.runtime import bundle as B
from helpers import random_ids


class CountingStore(DerivedStore):
    """Counts reads; hands out copies, so in-place scaling cannot reach the wrapped store."""

    fresh_arrays = True

    def __init__(self, base):
        super().__init__(base)
        self.reads: collections.Counter[str] = collections.Counter()

    def get(self, name: str) -> np.ndarray:
        self.reads[name] += 1
        return np.array(self.base.get(name), dtype=np.float32, copy=True)


@pytest.mark.parametrize("name", ["gqa4", "mha"])  # tied and untied embeddings
def test_one_pass_serves_what_the_separate_passes_computed(exported, name):
    src = load_bundle_source(exported(name).dir)
    cfg = src.config
    opts = QuantOptions.from_dict({"bits": 4})
    calib = calibrate(src, keep_inputs=False)
    ref_em = QuantizedWeights(cfg, opts, "fast", None, dict(calib.act_scales), {})
    smoothed, record = smooth_source(src, ref_em)

    em = QuantizedWeights(cfg, opts, "fast", None, {}, {})
    ids = random_ids(20, seed=5)
    counted = CountingStore(src.tensors)
    lp = LayerPass(replace(src, tensors=counted), em, calib=calibration_batch(src)[0], smooth=True, verify=ids)
    names = [EMBED] + [f"model.layers.{i}.{k}" for i in range(cfg.num_hidden_layers)
                       for k in block_parameter_names(cfg)] + [NORM] + ([] if cfg.tie_word_embeddings else [HEAD])
    for n in names:  # build_llama_graph's order
        np.testing.assert_array_equal(lp.get(n), smoothed.tensors.get(n), err_msg=n)
    assert lp.smoothed == record["groups"] > 0
    assert em.act_scales.keys() == ref_em.act_scales.keys()
    for n, s in ref_em.act_scales.items():
        np.testing.assert_array_equal(em.act_scales[n], s, err_msg=n)
    np.testing.assert_allclose(lp.reference_logits, reference_logits(src, ids), rtol=0, atol=1e-5)
    # One read each; a tied table twice (the reference's logits need it again at the end, not kept)
    assert counted.reads == {n: 1 + (n == EMBED and cfg.tie_word_embeddings) for n in names}
    with pytest.raises(RuntimeError, match="layer 0 asked for after layer"):  # going back would read twice
        lp.get("model.layers.0.input_layernorm.weight")


def test_quantized_verified_export_reads_the_checkpoint_once(tiny_llama, tmp_path):
    """int4 (mixed, smoothed, calibrated) and verified: every weight read once, down_proj twice (the
    kurtosis ranking reads it before the build), the tied table twice (the reference logits)."""
    src = load_source(tiny_llama("gqa4").folder)
    counted = CountingStore(src.tensors)
    logs: list[str] = []
    export_onnx(replace(src, tensors=counted), tmp_path / "b", ExportOptions(max_context=64, quant={"bits": 4}),
                log=logs.append)
    weights = [n for n in src.tensors.names() if n.endswith(".weight")]
    want = {n: 1 + (n.endswith("down_proj.weight") or n == EMBED) for n in weights}
    assert {n: counted.reads[n] for n in weights} == want
    v = B.read_manifest(tmp_path / "b").extras["verification"]
    assert v["decode_steps"] == DECODE_STEPS and 0 < v["max_abs_logit_diff"] < 100  # int4 of a random tiny model: coarse
    assert any(m.startswith("calibration: ") for m in logs) and any(m.startswith("smoothing: ") for m in logs)


def test_float_export_verifies_to_float_precision(tiny_llama, tmp_path):
    report = export_onnx(tiny_llama("gqa4").folder, tmp_path / "b", ExportOptions(max_context=64), log=lambda m: None)
    v = report.verification
    assert v["decode_steps"] == DECODE_STEPS and v["greedy_agreement"] == 1.0 and v["max_abs_logit_diff"] < 1e-4
    assert v["prompt_tokens"] + DECODE_STEPS + 1 <= 40


def test_a_one_token_context_still_verifies(tiny_llama, tmp_path):
    """The verification text is cut to the context; one token leaves a prefill and nothing to decode."""
    report = export_onnx(tiny_llama("gqa4").folder, tmp_path / "b", ExportOptions(max_context=1), log=lambda m: None)
    v = report.verification
    assert (v["prompt_tokens"], v["decode_steps"], v["greedy_agreement"]) == (1, 0, 1.0)
    assert v["max_abs_logit_diff"] < 1e-4
