"""`edgellama quantize`: float bundles read back exactly, re-exported with quantized weights, byte-for-byte reproducibly."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgellama.errors import EdgeLlamaError
from edgellama.export.bundle_source import load_bundle_source, scan_initializers
from edgellama.export.requantize import quantize_bundle
from edgellama.export.sources import load_source
from edgellama.runtime.bundle import read_manifest
from edgellama.runtime.engine import OnnxEngine
from helpers import assert_one_line_error, random_ids, run_cli

FAST_QUANT = {"method": "rtn"}  # round-to-nearest: the searches cost seconds on a 128k-row embedding


def ops(bundle_dir: Path) -> set[tuple[str, str]]:
    m = onnx.load(str(bundle_dir / "model.onnx"), load_external_data=False)
    return {(n.domain or "", n.op_type) for n in m.graph.node}


def init_types(bundle_dir: Path) -> dict[str, int]:
    return {name: i.data_type for name, i in scan_initializers(bundle_dir / "model.onnx").items()}


def tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def last_logits(bundle_dir: Path, ids: list[int]) -> np.ndarray:
    return OnnxEngine(bundle_dir, read_manifest(bundle_dir), max_context=64, threads=1).forward(ids)


@pytest.mark.parametrize("form", ["fast", "portable"])
@pytest.mark.parametrize("name", ["gqa4", "mha"])  # tied and untied embeddings
def test_float_bundle_reads_back_exactly(exported, name, form):
    b = exported(name, form)
    src, orig = load_bundle_source(b.dir), load_source(b.model.folder)
    assert sorted(src.tensors.names()) == sorted(orig.tensors.names())
    for n in orig.tensors.names():
        got = src.tensors.get(n)
        assert got.dtype == np.float32 and got.flags.writeable and tuple(src.tensors.shape(n)) == got.shape
        np.testing.assert_array_equal(got, orig.tensors.get(n), err_msg=n)
    assert src.config == orig.config
    assert src.chat_template == b.manifest.chat_template and src.chat_template
    assert src.tokenizer_json["model"]["vocab"] == orig.tokenizer_json["model"]["vocab"]


def test_fp16_bundle_reads_back_as_rounded_float32(exported):
    b = exported("gqa4", "fast", "fp16")
    src, orig = load_bundle_source(b.dir), load_source(b.model.folder)
    for n in ("model.embed_tokens.weight", "model.layers.1.self_attn.k_proj.weight", "model.layers.0.mlp.up_proj.weight",
              "model.norm.weight"):
        want = orig.tensors.get(n).astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(src.tensors.get(n), want, err_msg=n)


def test_quantize_fast_int4_cli(exported, tmp_path, capsys):
    b = exported("gqa4", "fast")
    out = tmp_path / "int4"
    r = run_cli(["quantize", b.dir, "-o", out, "--bits", "4", "--method", "rtn", "--block-size", "32"], capsys)
    assert r.code == 0, r.err
    m, src = read_manifest(out), b.manifest
    q = m.quantization
    assert (q["bits"], q["block_size"], q["method"], q["embeddings"], q["lm_head"]) == (4, 32, "rtn", "int8", "int8")
    # Everything but the weights is carried over from the float bundle.
    assert (m.graph.form, m.graph.logits, m.dtype, m.context_length) == (src.graph.form, src.graph.logits, src.dtype,
                                                                         src.context_length)
    assert m.tokens == src.tokens and m.chat_template == src.chat_template and m.architecture == src.architecture
    assert {("com.microsoft", "MatMulNBits"), ("com.microsoft", "GatherBlockQuantized")} <= ops(out)
    assert ("", "MatMul") not in ops(out)
    assert "verification" in m.extras
    r = run_cli(["inspect", out], capsys)
    row = next(line for line in r.out.splitlines() if line.startswith("quantization"))
    assert "int4 rtn (block 32); int8 " in row and "embedding" in row and "scales float16" in row
    # Quantized, not broken: the logits still follow the float model's.
    ids = random_ids(12, seed=3)
    ref, got = last_logits(b.dir, ids), last_logits(out, ids)
    assert not np.array_equal(ref, got)
    assert np.corrcoef(ref, got)[0, 1] > 0.8  # random tiny weights lose more to int4 than trained ones


def test_quantize_portable_int8(exported, tmp_path):
    b = exported("gqa4", "portable")
    out = tmp_path / "int8"
    quantize_bundle(b.dir, out, {"bits": 8, **FAST_QUANT}, verify=False, log=lambda m: None)
    m = read_manifest(out)
    assert m.graph.form == "portable" and m.quantization["bits"] == 8
    o = ops(out)
    assert {d for d, _ in o} == {""}, "a portable bundle stays standard ONNX"
    assert ("", "DequantizeLinear") in o
    assert m.session_options["config_entries"] == {"session.qdq_matmulnbits_accuracy_level": "4"}
    ids = random_ids(12, seed=4)
    ref, got = last_logits(b.dir, ids), last_logits(out, ids)
    assert np.abs(ref - got).max() < 0.05 * np.abs(ref).max()  # int8 per block: close to float


def test_embedding_and_lm_head_precision_options(exported, tmp_path, capsys):
    b = exported("mha", "fast")  # untied: the two tables are quantized independently
    out = tmp_path / "mixed-heads"
    r = run_cli(["quantize", b.dir, "-o", out, "--bits", "4", "--method", "rtn", "--embeddings", "int4",
                 "--lm-head", "int8", "--no-verify"], capsys)
    assert r.code == 0, r.err
    q = read_manifest(out).quantization
    assert (q["embeddings"], q["lm_head"]) == ("int4", "int8")
    assert "verification" not in read_manifest(out).extras
    inits = scan_initializers(out / "model.onnx")
    # int4 embedding rows pack two codes a byte; the int8 lm_head keeps one code a byte.
    assert inits["model.embed_tokens.qweight"].length == 128256 * 64 // 2
    assert inits["lm_head.qweight"].length == 128256 * 64

    keep = tmp_path / "keep"
    quantize_bundle(b.dir, keep, {"bits": 4, "embeddings": "keep", "lm_head": "keep", **FAST_QUANT}, verify=False,
                    log=lambda m: None)
    types = init_types(keep)
    assert types["model.embed_tokens.weight"] == onnx.TensorProto.FLOAT
    assert types["lm_head.weight"] == onnx.TensorProto.FLOAT
    assert ("com.microsoft", "GatherBlockQuantized") not in ops(keep)


def test_tied_model_refuses_disagreeing_tables(exported, tmp_path, capsys):
    b = exported("gqa4", "fast")
    r = run_cli(["quantize", b.dir, "-o", tmp_path / "x", "--bits", "4", "--embeddings", "int4", "--lm-head", "int8"],
                capsys)
    assert r.code == 2
    assert_one_line_error(r.err, "ties")
    assert not (tmp_path / "x").exists()


def test_quantizing_is_deterministic(exported, tmp_path):
    b = exported("gqa3", "fast")
    # The default method (hqq searches, the mixed policy) and the verification run; the 128k-row
    # embedding stays float only to keep the test fast.
    q = {"bits": 4, "embeddings": "keep", "lm_head": "keep"}
    a, c = tmp_path / "a", tmp_path / "c"
    quantize_bundle(b.dir, a, q, log=lambda m: None)
    quantize_bundle(b.dir, c, q, log=lambda m: None)
    da, dc = tree_digest(a), tree_digest(c)
    assert da == dc
    assert {"model.onnx", "edgellama.json", "tokenizer.json"} <= set(da)
    assert read_manifest(a).quantization["method"] == "mixed"


def test_quantized_bundle_is_refused_as_input(exported, tmp_path, capsys):
    b = exported("gqa4", "fast")
    q = tmp_path / "q"
    quantize_bundle(b.dir, q, {"bits": 8, **FAST_QUANT}, verify=False, log=lambda m: None)
    with pytest.raises(EdgeLlamaError, match="already quantized"):
        load_bundle_source(q)
    r = run_cli(["quantize", q, "-o", tmp_path / "qq", "--bits", "4"], capsys)
    assert r.code == 2
    assert_one_line_error(r.err, "already quantized: quantize the float bundle or the original checkpoint")
    assert not (tmp_path / "qq").exists()


def test_bad_input(exported, tmp_path, capsys):
    b = exported("gqa4", "fast")
    cases = [
        (["quantize", tmp_path / "nope", "-o", tmp_path / "o", "--bits", "4"], "not found"),
        (["quantize", b.dir, "-o", tmp_path / "o", "--bits", "3"], "invalid choice"),
        (["quantize", b.dir, "-o", tmp_path / "o", "--bits", "4", "--block-size", "24"], "block-size"),
        (["quantize", b.dir, "-o", tmp_path / "o", "--bits", "4", "--method", "awq"], "unknown quantization method"),
        (["quantize", b.dir, "-o", b.dir, "--bits", "4"], "source bundle"),
        (["quantize", b.dir, "-o", b.model.folder, "--bits", "4"], "already exists"),
    ]
    for argv, fragment in cases:
        r = run_cli(argv, capsys)
        assert r.code == 2, argv
        assert_one_line_error(r.err, fragment)
    # A damaged float bundle is caught by its checksums before anything is read.
    broken = tmp_path / "broken"
    shutil.copytree(b.dir, broken)
    cfg = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**cfg, "hidden_size": 1}))
    r = run_cli(["quantize", broken, "-o", tmp_path / "o2", "--bits", "4"], capsys)
    assert r.code == 2
    assert_one_line_error(r.err, "config.json")


def test_calibration_weights_the_search(exported, tmp_path, capsys):
    from edgellama.export.calibration import calibrate

    b = exported("gqa3", "fast")
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    src = load_bundle_source(b.dir)
    scales = calibrate(src, text).act_scales
    cfg = src.config
    assert len(scales) == 7 * cfg.num_hidden_layers + 1
    assert scales["model.layers.1.mlp.down_proj"].shape == (cfg.intermediate_size,)
    assert scales["lm_head"].shape == (cfg.hidden_size,) and (scales["lm_head"] > 0).all()
    # q, k and v read the same normed input.
    np.testing.assert_array_equal(scales["model.layers.0.self_attn.q_proj"], scales["model.layers.0.self_attn.v_proj"])

    common = ["--bits", "4", "--method", "mse", "--embeddings", "keep", "--lm-head", "keep", "--no-verify", "--no-smooth"]
    assert run_cli(["quantize", b.dir, "-o", tmp_path / "plain", *common], capsys).code == 0
    r = run_cli(["quantize", b.dir, "-o", tmp_path / "calib", *common, "--calib", text], capsys)
    assert r.code == 0, r.err
    assert read_manifest(tmp_path / "calib").quantization["calibrated"] is True
    assert read_manifest(tmp_path / "plain").quantization["calibrated"] is False
    plain, calib = scan_initializers(tmp_path / "plain" / "model.onnx"), scan_initializers(tmp_path / "calib" / "model.onnx")
    name = "model.layers.0.mlp.down_proj.scales"
    read = lambda i: (i.file.read_bytes()[i.offset:i.offset + i.length])  # noqa: E731
    assert read(plain[name]) != read(calib[name])
    r = run_cli(["quantize", b.dir, "-o", tmp_path / "x", *common, "--calib", tmp_path / "missing.txt"], capsys)
    assert r.code == 2
    assert_one_line_error(r.err, "calibration text")


def test_scale_dtype_flag_stores_float32_scales(exported, tmp_path, capsys):
    """--scale-dtype float32: scales stored as float32 (no Cast for onnxruntime to fold into a resident
    copy), nearly the same model otherwise; it needs --quant on export."""
    b = exported("gqa4", "fast")
    outs = {}
    for dtype in ("float16", "float32"):
        outs[dtype] = tmp_path / dtype
        r = run_cli(["quantize", b.dir, "-o", outs[dtype], "--bits", "4", "--no-verify", "--scale-dtype", dtype], capsys)
        assert r.code == 0, r.err
        assert read_manifest(outs[dtype]).quantization["scale_dtype"] == dtype
    graph = {d: onnx.load(str(o / "model.onnx"), load_external_data=False).graph for d, o in outs.items()}
    scale_types = {d: {t.data_type for t in g.initializer if t.name.endswith(".scales")} for d, g in graph.items()}
    assert scale_types == {"float16": {onnx.TensorProto.FLOAT16}, "float32": {onnx.TensorProto.FLOAT}}
    assert not any(n.op_type == "Cast" and "Scales" in n.name for n in graph["float32"].node)
    ids = random_ids(12, seed=3)
    a, b16 = last_logits(outs["float32"], ids), last_logits(outs["float16"], ids)
    assert not np.array_equal(a, b16) and np.corrcoef(a, b16)[0, 1] > 0.99  # scales a half-ulp apart, codes refit
    r = run_cli(["export", b.model.folder, "-o", tmp_path / "x", "--scale-dtype", "float32"], capsys)
    assert r.code == 2
    assert_one_line_error(r.err, "--scale-dtype needs --quant")
