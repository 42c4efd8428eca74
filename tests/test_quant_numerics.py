"""Quantization numerics, and the packed layouts checked by running them in onnxruntime."""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgellama.errors import EdgeLlamaError
from edgellama.quantize import numerics
from edgellama.quantize.degrid import degrid, degrid_named
from edgellama.quantize.methods import quantize, sensitivity
from edgellama.quantize.numerics import quantize_rtn
from edgellama.quantize.packing import (
    dequantize_linear,
    gather_block_quantized,
    matmul_nbits,
    onnx_raw_data,
    pack_bits,
    unpack_bits,
)


def gaussian(n, k, seed=0):
    return (np.random.default_rng(seed).standard_normal((n, k)) * 0.02).astype(np.float32)


def with_outliers(n, k, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.02
    hits = rng.random((n, k)) < 0.01
    w[hits] *= 12
    return w


def rel_norm_err(w, qt):
    return float(np.linalg.norm(w - qt.dequantize()) / np.linalg.norm(w))


# --- numerics --------------------------------------------------------------------------


def test_int8_per_channel_and_int4_block32_error_bounds():
    w = gaussian(64, 512)
    assert rel_norm_err(w, quantize_rtn(w, 8, 512, symmetric=True)) < 1e-2
    assert rel_norm_err(w, quantize_rtn(w, 8, 512, symmetric=False)) < 1e-2
    assert rel_norm_err(w, quantize_rtn(w, 4, 32, symmetric=False)) < 0.1
    assert rel_norm_err(w, quantize_rtn(w, 4, 32, symmetric=True)) < 0.1
    # More bits and smaller blocks must help.
    assert rel_norm_err(w, quantize_rtn(w, 8, 32, True)) < rel_norm_err(w, quantize_rtn(w, 4, 32, True)) / 8
    assert rel_norm_err(w, quantize_rtn(w, 4, 32, False)) < rel_norm_err(w, quantize_rtn(w, 4, 128, False))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_layout_and_elementwise_bound(bits, symmetric):
    w = with_outliers(12, 100, seed=bits)  # 100 = 3 blocks of 32 + a padded one
    qt = quantize_rtn(w, bits, 32, symmetric)
    assert qt.codes.dtype == np.uint8 and qt.codes.shape == (12, 128)
    assert qt.scales.dtype == np.float32 and qt.scales.shape == (12, 4)
    assert qt.shape == (12, 100) and qt.n_blocks == 4
    assert int(qt.codes.max()) <= (1 << bits) - 1
    if symmetric:
        assert qt.zero_points is None
        assert (qt.zero_point_array() == 1 << (bits - 1)).all()
    else:
        assert qt.zero_points.dtype == np.uint8 and qt.zero_points.shape == (12, 4)
    # Padding codes sit on the zero point, so they stand for exactly 0.
    assert (qt.codes[:, 100:] == qt.zero_point_array()[:, 3:4]).all()
    dq = qt.dequantize()
    assert dq.shape == (12, 100) and dq.dtype == np.float32
    # Round-to-nearest misses by at most half a step, one step where the range is clipped.
    step = np.repeat(np.abs(qt.scales), 32, axis=1)[:, :100]
    assert (np.abs(w - dq) <= step * 1.0001).all()
    assert (np.abs(w - dq) <= step * 0.5001).mean() > 0.97


def test_weights_on_the_grid_are_reproduced_exactly():
    rng = np.random.default_rng(1)
    n, nb, bs = 16, 4, 32
    codes = rng.integers(0, 16, (n, nb, bs))
    codes[..., 0], codes[..., 1] = 0, 15  # every block spans the whole grid
    zp = rng.integers(1, 15, (n, nb, 1))
    scale = rng.uniform(0.001, 0.01, (n, nb, 1))
    w = ((codes - zp) * scale).astype(np.float32).reshape(n, nb * bs)
    for method in ("rtn", "mse", "hqq"):
        qt = quantize(w, 4, bs, method, symmetric=False)
        np.testing.assert_allclose(qt.dequantize(), w, atol=1e-6)
        assert (qt.zero_points == zp[..., 0]).all()


def test_zero_and_constant_blocks():
    w = np.zeros((4, 64), np.float32)
    w[1, :32] = 0.5
    for sym in (True, False):
        for method in ("rtn", "mse", "hqq"):
            qt = quantize(w, 4, 32, method, symmetric=sym)
            np.testing.assert_allclose(qt.dequantize(), w, atol=1e-7)
            assert np.isfinite(qt.scales).all()
    assert sensitivity(np.zeros((2, 32), np.float32), quantize_rtn(np.zeros((2, 32), np.float32), 4, 32, True)) == 0.0


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("block_size", [32, 128])
def test_searches_beat_round_to_nearest(symmetric, block_size):
    for w in (gaussian(64, 1024, seed=3), with_outliers(64, 1024, seed=4)):
        rtn = sensitivity(w, quantize(w, 4, block_size, "rtn", symmetric))
        mse = sensitivity(w, quantize(w, 4, block_size, "mse", symmetric))
        hqq = sensitivity(w, quantize(w, 4, block_size, "hqq", symmetric))
        assert mse < 0.97 * rtn
        assert hqq < 0.97 * rtn
        # hqq starts from a coarse version of the mse search and only keeps improvements.
        assert hqq < 1.01 * mse


def test_searches_never_lose_to_rtn_per_block():
    w = with_outliers(32, 256, seed=5)
    rtn = quantize(w, 4, 32, "rtn")
    for method in ("mse", "hqq"):
        qt = quantize(w, 4, 32, method)
        err = lambda q: ((w - q.dequantize()) ** 2).reshape(32, 8, 32).sum(-1)  # noqa: E731
        assert (err(qt) <= err(rtn) * (1 + 1e-5) + 1e-12).all()


def test_act_scale_weights_the_search():
    w = gaussian(64, 256, seed=6)
    act = np.ones(256, np.float32)
    act[::7] = 20.0  # a few channels with large activations

    def weighted(qt):
        return float((((w - qt.dequantize()) * act) ** 2).sum())

    for method in ("mse", "hqq"):
        plain = quantize(w, 4, 64, method)
        aware = quantize(w, 4, 64, method, act_scale=act)
        assert weighted(aware) < 0.95 * weighted(plain)
    # Uniform importance is no importance.
    flat = quantize(w, 4, 64, "mse", act_scale=np.full(256, 3.0))
    assert flat.codes.tobytes() == quantize(w, 4, 64, "mse").codes.tobytes()


@pytest.mark.parametrize("method", ["rtn", "mse", "hqq"])
def test_deterministic_and_independent_of_row_chunking(method, monkeypatch):
    w = with_outliers(40, 200, seed=7)
    act = np.random.default_rng(8).uniform(0.5, 2, 200)
    a = quantize(w, 4, 64, method, act_scale=act if method != "rtn" else None)
    b = quantize(w, 4, 64, method, act_scale=act if method != "rtn" else None)
    monkeypatch.setattr(numerics, "CHUNK_ELEMENTS", 256)  # one or two rows per chunk
    c = quantize(w, 4, 64, method, act_scale=act if method != "rtn" else None)
    for q in (b, c):
        assert q.codes.tobytes() == a.codes.tobytes()
        assert q.scales.tobytes() == a.scales.tobytes()
        assert q.zero_points.tobytes() == a.zero_points.tobytes()
    assert matmul_nbits(a).B.tobytes() == matmul_nbits(b).B.tobytes()


def test_sensitivity_is_relative_squared_error():
    w = with_outliers(16, 96, seed=9)
    qt = quantize(w, 4, 32, "rtn")
    expected = ((w.astype(np.float64) - qt.dequantize()) ** 2).sum() / (w.astype(np.float64) ** 2).sum()
    assert sensitivity(w, qt) == pytest.approx(expected, rel=1e-5)
    assert sensitivity(w, quantize(w, 8, 32, "rtn")) < sensitivity(w, qt) / 100


def test_default_symmetry_follows_bits():
    w = gaussian(8, 64)
    assert quantize(w, 8, 64).symmetric and quantize(w, 8, 64).zero_points is None
    assert not quantize(w, 4, 32).symmetric and quantize(w, 4, 32).zero_points is not None


@pytest.mark.parametrize(
    "call",
    [
        lambda w: quantize(w, 3, 32),
        lambda w: quantize(w, 4, 0),
        lambda w: quantize(w, 4, 32, "gptq"),
        lambda w: quantize(w[0], 4, 32),
        lambda w: quantize(w.astype(np.int32), 4, 32),
        lambda w: quantize(np.where(w > 0.03, np.nan, w), 4, 32),
        lambda w: quantize(w, 4, 32, "mse", act_scale=np.ones(5)),
        lambda w: quantize(w, 4, 32, "mse", act_scale=-np.ones(64)),
        lambda w: sensitivity(w[:, :32], quantize(w, 4, 32)),
        lambda w: matmul_nbits(quantize(w, 4, 48)),
        lambda w: gather_block_quantized(quantize(w, 8, 64 * 3)),
        lambda w: dequantize_linear(quantize(w, 4, 32), layout="kk"),
    ],
)
def test_bad_input_is_a_user_error(call):
    with pytest.raises(EdgeLlamaError):
        call(gaussian(8, 64))


# --- packing ---------------------------------------------------------------------------


def test_pack_bits_low_nibble_first_and_round_trip():
    assert pack_bits(np.array([1, 2, 3], np.uint8), 4).tolist() == [0x21, 0x03]
    assert pack_bits(np.array([[0xF, 0x0, 0x5, 0xA]], np.uint8), 4).tolist() == [[0x0F, 0xA5]]
    v = np.random.default_rng(0).integers(0, 16, (3, 5, 33)).astype(np.uint8)
    assert (unpack_bits(pack_bits(v, 4), 4, 33) == v).all()
    assert (unpack_bits(pack_bits(v, 8), 8, 33) == v).all()


def make_model(nodes, inits, inputs, outputs):
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 10
    return model


def session(model, **config):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    for key, value in config.items():
        opts.add_session_config_entry(key, value)
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def f32(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def mnb_node(qt, inputs, out, accuracy_level=0):
    return helper.make_node(
        "MatMulNBits", inputs, [out], domain="com.microsoft", accuracy_level=accuracy_level,
        **matmul_nbits(qt).attributes,
    )


def mnb_inits(packed, prefix=""):
    inits = [numpy_helper.from_array(packed.B, prefix + "B"), numpy_helper.from_array(packed.scales, prefix + "S")]
    names = [prefix + "B", prefix + "S"]
    if packed.zero_points is not None:
        inits.append(numpy_helper.from_array(packed.zero_points, prefix + "Z"))
        names.append(prefix + "Z")
    return inits, names


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("block_size", "k"), [(32, 256), (64, 200), (128, 576), (16, 48)])
def test_matmul_nbits_matches_dequantized_matmul(bits, symmetric, block_size, k):
    n = 40
    w = with_outliers(n, k, seed=block_size + bits)
    qt = quantize(w, bits, block_size, "hqq", symmetric)
    packed = matmul_nbits(qt)
    nb = -(-k // block_size)
    assert packed.B.shape == (n, nb, block_size * bits // 8) and packed.B.dtype == np.uint8
    assert packed.scales.shape == (n, nb)
    if symmetric:
        assert packed.zero_points is None
    else:
        assert packed.zero_points.shape == (n, -(-nb * bits // 8))
    inits, names = mnb_inits(packed)
    a = np.random.default_rng(0).standard_normal((2, 3, k)).astype(np.float32)
    ref = a @ qt.dequantize().T.astype(np.float64)
    for level, tol in ((0, 1e-4), (4, 2e-2)):
        model = make_model([mnb_node(qt, ["A"] + names, "Y", level)], inits, [f32("A", [2, 3, k])], [f32("Y", None)])
        (y,) = session(model).run(None, {"A": a})
        assert np.abs(y - ref).max() <= tol * np.abs(ref).max()


def gbq_node(weights, inputs, out):
    return helper.make_node("GatherBlockQuantized", inputs, [out], domain="com.microsoft", **weights.attributes)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("h", [128, 100])
def test_gather_block_quantized_looks_up_dequantized_rows(bits, symmetric, h):
    v = 50
    qt = quantize(with_outliers(v, h, seed=h), bits, 32, "mse", symmetric)
    g = gather_block_quantized(qt)
    assert g.data.shape == (v, -(-h * bits // 8)) and g.data.dtype == np.uint8
    inits = [numpy_helper.from_array(g.data, "D"), numpy_helper.from_array(g.scales, "S")]
    names = ["D", "I", "S"]
    if g.zero_points is not None:
        inits.append(numpy_helper.from_array(g.zero_points, "Z"))
        names.append("Z")
    ids = np.array([[0, 7, v - 1], [3, 3, 12]], np.int64)
    model = make_model(
        [gbq_node(g, names, "E")], inits,
        [helper.make_tensor_value_info("I", TensorProto.INT64, [2, 3])], [f32("E", None)],
    )
    (e,) = session(model).run(None, {"I": ids})
    np.testing.assert_array_equal(e, qt.dequantize()[ids])


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_tied_embedding_and_lm_head_share_one_initializer(bits, symmetric):
    v, h, bs = 96, 128, 32
    qt = quantize(with_outliers(v, h, seed=11), bits, bs, "rtn", symmetric)
    head, emb = matmul_nbits(qt), gather_block_quantized(qt, tied=True)
    assert emb.data.shape == head.B.shape and emb.data.tobytes() == head.B.tobytes()
    inits, names = mnb_inits(head)
    inits += [
        numpy_helper.from_array(emb.scales, "S3"),
        numpy_helper.from_array(np.array([0, 0, -1], np.int64), "flat"),
    ]
    gather_inputs = ["B", "I", "S3"]
    if emb.zero_points is not None:
        inits.append(numpy_helper.from_array(emb.zero_points, "Z3"))
        gather_inputs.append("Z3")
    nodes = [
        gbq_node(emb, gather_inputs, "E3"),
        helper.make_node("Reshape", ["E3", "flat"], ["E"]),  # [b, s, nb, bs] -> [b, s, H]
        mnb_node(qt, ["E"] + names, "Y"),
    ]
    model = make_model(
        nodes, inits, [helper.make_tensor_value_info("I", TensorProto.INT64, [1, 4])], [f32("E", None), f32("Y", None)]
    )
    assert sum(1 for t in model.graph.initializer if t.data_type == TensorProto.UINT8 and len(t.dims) == 3) == 1 + (
        emb.zero_points is not None
    )
    ids = np.array([[5, 0, 95, 5]], np.int64)
    e, y = session(model).run(None, {"I": ids})
    dq = qt.dequantize()
    np.testing.assert_array_equal(e, dq[ids])
    ref = dq[ids] @ dq.T.astype(np.float64)
    assert np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max()


def int_tensor(name, values, onnx_type, bits):
    """A TensorProto from our raw bytes, checked against onnx's own packing of the values."""
    dtype = getattr(TensorProto, onnx_type)
    ours = helper.make_tensor(name, dtype, values.shape, onnx_raw_data(values, bits), raw=True)
    theirs = helper.make_tensor(name, dtype, values.shape, values.reshape(-1).tolist())
    np.testing.assert_array_equal(numpy_helper.to_array(ours), numpy_helper.to_array(theirs))
    np.testing.assert_array_equal(numpy_helper.to_array(ours).astype(np.int16), values.astype(np.int16))
    return ours


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("layout", ["kn", "nk"])
def test_dequantize_linear_reproduces_dequantize(bits, symmetric, layout):
    n, k = 24, 200  # 200 = 3 blocks of 64 + a partial one (odd element count per block row)
    qt = quantize(with_outliers(n, k, seed=12), bits, 64, "mse", symmetric)
    dql = dequantize_linear(qt, layout)
    assert dql.onnx_type == ("INT" if symmetric else "UINT") + str(bits)
    expected = qt.dequantize() if layout == "nk" else qt.dequantize().T
    assert dql.data.shape == expected.shape
    inits = [int_tensor("D", dql.data, dql.onnx_type, bits), numpy_helper.from_array(dql.scale, "S")]
    names = ["D", "S"]
    if dql.zero_point is not None:
        inits.append(int_tensor("Z", dql.zero_point, dql.onnx_type, bits))
        names.append("Z")
    node = helper.make_node("DequantizeLinear", names, ["W"], axis=dql.axis, block_size=dql.block_size)
    (out,) = session(make_model([node], inits, [], [f32("W", None)])).run(None, {})
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("symmetric", [True, False])
def test_dequantize_linear_then_matmul_is_exact_at_accuracy_level_1(symmetric):
    # onnxruntime fuses DQ(int4, axis 0) + MatMul into MatMulNBits, by default with int8
    # activations; accuracy level 1 keeps them float32.
    n, k = 48, 256
    qt = quantize(with_outliers(n, k, seed=13), 4, 32, "hqq", symmetric)
    dql = dequantize_linear(qt, "kn")
    inits = [int_tensor("D", dql.data, dql.onnx_type, 4), numpy_helper.from_array(dql.scale, "S")]
    names = ["D", "S"]
    if dql.zero_point is not None:
        inits.append(int_tensor("Z", dql.zero_point, dql.onnx_type, 4))
        names.append("Z")
    nodes = [
        helper.make_node("DequantizeLinear", names, ["W"], axis=0, block_size=32),
        helper.make_node("MatMul", ["A", "W"], ["Y"]),
    ]
    model = make_model(nodes, inits, [f32("A", [5, k])], [f32("Y", None)])
    a = np.random.default_rng(1).standard_normal((5, k)).astype(np.float32)
    ref = a @ qt.dequantize().T.astype(np.float64)
    (y,) = session(model, **{"session.qdq_matmulnbits_accuracy_level": "1"}).run(None, {"A": a})
    assert np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max()


# --- degrid ----------------------------------------------------------------------------


def q4_1_like(n, k, seed=0):
    """Weights as a Q4_1 GGUF stores them: min + d * code, codes spanning 0..15 per 32."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 16, (n, k // 32, 32))
    codes[..., 0], codes[..., 1] = 0, 15
    d = rng.uniform(0.001, 0.004, (n, k // 32, 1))
    lo = rng.uniform(-0.03, -0.01, (n, k // 32, 1))
    return (lo + d * codes).astype(np.float32).reshape(n, k), np.repeat(d[..., 0], 32, axis=1)


def test_degrid_noise_is_ratio_times_grid_step():
    w, step = q4_1_like(256, 512)
    out = degrid(w, group=32, ratio=0.33, rng=0)
    z = (out.astype(np.float64) - w) / step
    assert out.dtype == np.float32 and out.shape == w.shape
    assert abs(z.mean()) < 0.01
    assert z.std() == pytest.approx(0.33, rel=0.02)
    assert abs(((z / 0.33) ** 4).mean() - 3) < 0.1  # Gaussian kurtosis
    finer = (degrid(w, ratio=0.33, rng=0, levels=255).astype(np.float64) - w) / step
    assert finer.std() == pytest.approx(0.33 * 15 / 254, rel=0.02)
    with pytest.raises(EdgeLlamaError):
        degrid(w, levels=1)
    # Off the grid: 16 distinct values per group of 32 before, 32 after.
    distinct = lambda a: np.diff(np.sort(a.reshape(-1, 32), axis=1), axis=1).astype(bool).sum(1) + 1  # noqa: E731
    assert (distinct(w) <= 16).all() and (distinct(out) == 32).all()


def test_degrid_is_deterministic_and_leaves_vectors_alone():
    w, _ = q4_1_like(8, 96, seed=1)
    assert degrid(w, rng=5).tobytes() == degrid(w, rng=5).tobytes()
    assert degrid(w, rng=5).tobytes() != degrid(w, rng=6).tobytes()
    norm = np.ones(96, np.float32)
    assert degrid(norm, rng=5) is norm
    # A short last group takes its step from its own elements.
    tail = degrid(w[:, :80], rng=5)[:, 64:] - w[:, 64:80]
    assert np.abs(tail).max() > 0
    named = {"a": w, "b": w * 2}
    one, other = degrid_named(named, seed=3), degrid_named(dict(reversed(list(named.items()))), seed=3)
    assert one["a"].tobytes() == other["a"].tobytes() and one["b"].tobytes() == other["b"].tobytes()
    assert one["a"].tobytes() != degrid_named({"c": w}, seed=3)["c"].tobytes()

