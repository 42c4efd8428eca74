"""Calibration-driven quantization: float16 scales, GPTQ, per-channel smoothing and the calibration pass."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from edgellama.export.bundle_source import load_bundle_source, scan_initializers
from edgellama.export.calibration import RANDOM_TOKENS, ScaledTensors, calibrate, smooth_source
from edgellama.export.requantize import quantize_bundle
from edgellama.export.verify import reference_logits
from edgellama.quantize.gptq import gptq_quantize
from edgellama.quantize.methods import quantize
from edgellama.quantize.numerics import minmax_params
from edgellama.quantize.onnx_weights import QuantizedWeights, QuantOptions
from edgellama.quantize.smoothing import ALPHA, channel_scales
from edgellama.runtime.bundle import read_manifest
from edgellama.runtime.engine import OnnxEngine
from helpers import assert_one_line_error, random_ids, run_cli


def correlated_inputs(rows: int, k: int, seed: int = 0) -> np.ndarray:
    """Inputs with correlated channels and one outlier channel, as real activations have."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) * 0.1 + np.eye(k)
    x = rng.standard_normal((rows, k)) @ mix
    x[:, 5] *= 20
    return x.astype(np.float32)


def rel_output_error(w, dq, x) -> float:
    return float(np.linalg.norm((w - dq) @ x.T) / np.linalg.norm(w @ x.T))


def test_float16_scales_are_exact_and_codes_follow_them():
    w = np.random.default_rng(0).standard_normal((16, 96)).astype(np.float32) * 0.05
    for method in ("rtn", "hqq"):
        qt = quantize(w, 4, 32, method, symmetric=False, scale_dtype="float16")
        np.testing.assert_array_equal(qt.scales, qt.scales.astype(np.float16).astype(np.float32))
        # Codes were chosen against the rounded scales: round-to-nearest stays within half a step.
        if method == "rtn":
            step = np.repeat(qt.scales, 32, axis=1)
            assert (np.abs(qt.dequantize() - w) <= step / 2 + 1e-7).all()
    q32 = quantize(w, 4, 32, "rtn", symmetric=False)
    assert not np.array_equal(q32.scales, q32.scales.astype(np.float16).astype(np.float32))


def test_gptq_cuts_the_output_error_it_is_calibrated_for():
    x = correlated_inputs(1024, 128)
    w = np.random.default_rng(1).standard_normal((64, 128)).astype(np.float32) * 0.05
    h = x.T.astype(np.float64) @ x
    for method in ("rtn", "hqq"):
        plain = quantize(w, 4, 32, method, symmetric=False)
        gptq = quantize(w, 4, 32, method, symmetric=False, hessian=h)
        assert gptq.codes.shape == plain.codes.shape and gptq.scales.shape == plain.scales.shape
        e_plain, e_gptq = rel_output_error(w, plain.dequantize(), x), rel_output_error(w, gptq.dequantize(), x)
        assert e_gptq < 0.75 * e_plain, (method, e_plain, e_gptq)


def test_gptq_pads_like_the_plain_path_and_ignores_dead_inputs():
    rng = np.random.default_rng(2)
    x = correlated_inputs(512, 40)
    x[:, 3] = 0.0  # an input channel that never fires
    w = rng.standard_normal((8, 40)).astype(np.float32)
    qt = gptq_quantize(w, x.T.astype(np.float64) @ x, 4, 16, False, lambda wb, sw: minmax_params(wb, 4, False))
    assert qt.codes.shape == (8, 48) and qt.shape == (8, 40)
    zp = qt.zero_point_array()
    np.testing.assert_array_equal(qt.codes[:, 40:], np.repeat(zp[:, 2:3], 8, axis=1))  # padding decodes to 0
    dq = qt.dequantize()
    assert dq.shape == (8, 40) and np.isfinite(dq).all()
    np.testing.assert_array_equal(dq[:, 3], 0.0)  # a dead input's weight is irrelevant: quantized as zero


def int8_blocks(x: np.ndarray, block: int) -> np.ndarray:
    """x rounded as MatMulNBits accuracy_level 4 rounds activations: int8 per block along K."""
    t, k = x.shape
    xb = x.reshape(t, k // block, block)
    scale = np.abs(xb).max(axis=-1, keepdims=True) / 127
    return (np.rint(xb / np.where(scale == 0, 1, scale)) * scale).reshape(t, k)


def test_smoothing_scales_tame_outlier_channels():
    x = correlated_inputs(256, 128)
    act = np.abs(x).mean(0)
    w = np.random.default_rng(3).standard_normal((96, 128)).astype(np.float32) * 0.05
    s = channel_scales(act)
    assert np.isclose(np.exp(np.mean(np.log(s))), 1.0, atol=1e-5) and s.argmax() == 5
    np.testing.assert_array_equal(channel_scales(act, 0.0), np.ones(128, np.float32))
    ref = x @ w.T

    def err(scale):
        got = int8_blocks(x / scale, 32) @ quantize(w * scale, 8, 32, "rtn", symmetric=True).dequantize().T
        return float(np.sum((got - ref) ** 2) / np.sum(ref ** 2))

    assert err(s) < 0.7 * err(np.ones(128, np.float32))  # int8 weights and activations: the outlier costs less


@pytest.mark.parametrize("name", ["gqa4", "mha"])  # tied and untied
def test_smoothed_source_computes_the_same_function(exported, name):
    src = load_bundle_source(exported(name).dir)
    opts = QuantOptions.from_dict({"bits": 4})
    calib = calibrate(src)
    assert calib.source == f"random:{RANDOM_TOKENS}" and calib.tokens == RANDOM_TOKENS
    assert calib.act_inputs["model.layers.0.self_attn.q_proj"] is calib.act_inputs["model.layers.0.self_attn.v_proj"]
    assert calib.act_inputs["model.layers.0.mlp.down_proj"].shape == (RANDOM_TOKENS, src.config.intermediate_size)
    em = QuantizedWeights(src.config, opts, "fast", None, dict(calib.act_scales), dict(calib.act_inputs))
    smoothed, record = smooth_source(src, em)
    assert isinstance(smoothed.tensors, ScaledTensors) and record["groups"] == 3 * src.config.num_hidden_layers + (
        0 if src.config.tie_word_embeddings else 1)
    ids = random_ids(20, seed=5)
    np.testing.assert_allclose(reference_logits(smoothed, ids), reference_logits(src, ids), atol=2e-4)
    # The weights themselves did change, and the emitter's statistics moved with them.
    q = "model.layers.0.self_attn.q_proj"
    assert not np.allclose(smoothed.tensors.get(q + ".weight"), src.tensors.get(q + ".weight"))
    assert not np.allclose(em.act_scales[q], calib.act_scales[q])


def test_default_int4_records_its_calibration_and_stores_half_scales(exported, tmp_path):
    b = exported("gqa4")
    out = tmp_path / "int4"
    quantize_bundle(b.dir, out, {"bits": 4}, verify=False, log=lambda m: None)
    q = read_manifest(out).quantization
    assert q["method"] == "mixed" and q["calibration"] == f"random:{RANDOM_TOKENS}" and q["scale_dtype"] == "float16"
    assert q["smoothing"]["alpha"] == ALPHA and q["smoothing"]["groups"] > 0
    types = {n: i.data_type for n, i in scan_initializers(out / "model.onnx").items()}
    scales = [t for n, t in types.items() if n.endswith(".scales")]
    assert scales and set(scales) == {onnx.TensorProto.FLOAT16}
    ids = random_ids(12, seed=6)
    ref = OnnxEngine(b.dir, read_manifest(b.dir), max_context=64, threads=1).forward(ids)
    got = OnnxEngine(out, read_manifest(out), max_context=64, threads=1).forward(ids)
    assert np.corrcoef(ref, got)[0, 1] > 0.8
    # --no-smooth: the same bundle without the rescaling (and without calibrating at all).
    plain = tmp_path / "plain"
    quantize_bundle(b.dir, plain, {"bits": 4, "smooth": False}, verify=False, log=lambda m: None)
    qp = read_manifest(plain).quantization
    assert "smoothing" not in qp and "calibration" not in qp and qp["calibrated"] is False


def test_portable_form_keeps_float32_scales(exported, tmp_path):
    b = exported("gqa4", "portable")
    out = tmp_path / "p4"
    quantize_bundle(b.dir, out, {"bits": 4, "method": "rtn"}, verify=False, log=lambda m: None)
    assert read_manifest(out).quantization["scale_dtype"] == "float32"
    types = {n: i.data_type for n, i in scan_initializers(out / "model.onnx").items()}
    assert {t for n, t in types.items() if n.endswith(".scales")} == {onnx.TensorProto.FLOAT}


def test_gptq_needs_a_text(exported, tmp_path, capsys):
    b = exported("gqa4")
    r = run_cli(["quantize", b.dir, "-o", tmp_path / "g", "--bits", "4", "--method", "gptq", "--no-verify"], capsys)
    assert r.code == 2
    assert_one_line_error(r.err, "--calib")
    assert not (tmp_path / "g").exists()
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    r = run_cli(["quantize", b.dir, "-o", tmp_path / "g", "--bits", "4", "--method", "gptq", "--calib", text,
                 "--no-verify"], capsys)
    assert r.code == 0, r.err
    q = read_manifest(tmp_path / "g").quantization
    assert q["method"] == "gptq" and q["calibration"] == "calib.txt"


def test_the_int8_share_is_the_same_size_ranked_or_not():
    """An emitter used on its own (no kurtosis ranking) keeps as many int8 down_proj layers as the export's."""
    from types import SimpleNamespace

    from edgellama.quantize.onnx_weights import INT8_SHARE

    n = 30
    cfg = SimpleNamespace(num_hidden_layers=n)

    def int8_layers(em):
        return [i for i in range(n) if em.bits_for(f"model.layers.{i}.mlp.down_proj") == 8]

    opts = QuantOptions.from_dict({"bits": 4})
    unranked = int8_layers(QuantizedWeights(cfg, opts, "fast", None))
    ranked_em = QuantizedWeights(cfg, opts, "fast", None)
    ranked_em.rank_layers("down_proj", {i: float((i * 7) % n) for i in range(n)})
    ranked = int8_layers(ranked_em)
    assert len(unranked) == len(ranked) == round(INT8_SHARE["down_proj"] * n) > 0
    outermost = sorted(range(n), key=lambda i: (min(i, n - 1 - i), i))[:len(unranked)]
    assert unranked == sorted(outermost) and {0, n - 1} <= set(unranked)
    assert ranked != unranked
