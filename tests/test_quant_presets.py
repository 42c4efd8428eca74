"""`--quant PRESET`: the frontier presets (int4, int4-fast, int8), their aliases, records and pricing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from edgellama.errors import EdgeLlamaError
from edgellama.export.bundle_source import scan_initializers
from edgellama.quantize.onnx_weights import QuantOptions
from edgellama.quantize.presets import FAST_BLOCK, FAST_TABLE_BLOCK, PRESETS, resolve
from edgellama.runtime.bundle import read_manifest
from edgellama.runtime.engine import OnnxEngine
from helpers import assert_one_line_error, random_ids, run_cli


def nodes(bundle_dir: Path, op: str) -> list[onnx.NodeProto]:
    m = onnx.load(str(bundle_dir / "model.onnx"), load_external_data=False)
    return [n for n in m.graph.node if n.op_type == op]


def attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def test_aliases_resolve_to_one_preset():
    assert {resolve(a).name for a in ("int4-fast", "fast", "Q4_0", "q4", "4bit", "INT4_FAST")} == {"int4-fast"}
    assert {resolve(a).name for a in ("int4", "q4_k_m", "balanced", "int4-balanced")} == {"int4"}
    assert {resolve(a).name for a in ("int8", "q8_0", "8bit")} == {"int8"}
    with pytest.raises(EdgeLlamaError, match="unknown quantization preset 'int3'"):
        resolve("int3")


def test_preset_options_and_overrides():
    fast = QuantOptions.from_dict({"preset": "fast"})
    assert (fast.preset, fast.bits, fast.block_size, fast.symmetric, fast.method, fast.mixed) == \
        ("int4-fast", 4, FAST_BLOCK, True, "hqq", False)
    assert (fast.embeddings, fast.lm_head, fast.embedding_block_size, fast.smooth) == ("int4", "int4", FAST_TABLE_BLOCK, True)
    assert fast.table_symmetric is False
    assert fast.preset_overrides == ()
    # The balanced preset is exactly the int4 defaults, so --bits 4 and --quant int4 make the same bundle.
    plain, balanced = QuantOptions.from_dict({"bits": 4}), QuantOptions.from_dict({"preset": "q4_k_m"})
    assert (balanced.mixed, balanced.block_size, balanced.embeddings) == (plain.mixed, plain.block_size, plain.embeddings)
    # An explicit option beats the preset's and is recorded as an override; restating one is not.
    o = QuantOptions.from_dict({"preset": "int4-fast", "block_size": 64, "symmetric": True, "smooth": False})
    assert (o.block_size, o.smooth, o.preset_overrides) == (64, False, ("block_size", "smooth"))
    with pytest.raises(EdgeLlamaError, match="int4-fast is 4-bit: it cannot take --bits 8"):
        QuantOptions.from_dict({"preset": "int4-fast", "bits": 8})


def test_quantize_int4_fast_writes_the_fast_kernel_format(exported, tmp_path, capsys):
    b = exported("gqa4", "fast")  # tied embedding/lm_head, hidden 64
    out = tmp_path / "fast"
    r = run_cli(["quantize", b.dir, "-o", out, "--quant", "fast"], capsys)
    assert r.code == 0, r.err
    q = read_manifest(out).quantization
    assert (q["preset"], q["preset_overrides"], q["bits"], q["block_size"], q["symmetric"], q["method"]) == \
        ("int4-fast", [], 4, FAST_BLOCK, True, "hqq")
    assert (q["embeddings"], q["lm_head"], q["int8_tensors"]) == ("int4", "int4", [])
    assert q["smoothing"]["groups"] > 0  # smoothing kept
    mm = nodes(out, "MatMulNBits")
    linears = [n for n in mm if not n.name.startswith("lm_head")]
    assert linears and all(attrs(n)["bits"] == 4 and attrs(n)["block_size"] == FAST_BLOCK for n in linears)
    # Symmetric linears: no zero-point input, so onnxruntime takes MatMulNBits' fast path.
    assert all(len(n.input) == 3 for n in linears)
    head, = [n for n in mm if n.name.startswith("lm_head")]
    assert (attrs(head)["bits"], attrs(head)["block_size"], len(head.input)) == (4, FAST_TABLE_BLOCK, 4)
    gather, = nodes(out, "GatherBlockQuantized")
    assert gather.input[0] == head.input[1]  # the tied table is stored once
    inits = scan_initializers(out / "model.onnx")
    # Only the table has zero points (asymmetric): 4 bits per block, a row's padded to whole bytes.
    assert sorted(n for n in inits if n.endswith(("qzeros", "gather_zeros"))) == \
        ["model.embed_tokens.gather_zeros", "model.embed_tokens.qzeros"]
    assert inits["model.embed_tokens.qzeros"].length == 128256 * -(-(64 // FAST_TABLE_BLOCK) // 2)
    # K = 64 pads to one block of 128: [N, 1, 64 bytes] codes.
    assert inits["model.layers.0.mlp.down_proj.qweight"].length == 64 * 1 * 64
    assert "preset int4-fast" in run_cli(["inspect", out], capsys).out
    # It runs, and stays near the float bundle (random Gaussian weights lose ~6% cosine at int4 block 128;
    # a wrong layout or sign convention would leave nothing of the float logits).
    ids = random_ids(12, seed=5)
    ref = OnnxEngine(b.dir, read_manifest(b.dir), max_context=32, threads=1).forward(ids)
    got = OnnxEngine(out, read_manifest(out), max_context=32, threads=1).forward(ids)
    assert np.isfinite(got).all() and ref @ got / np.linalg.norm(ref) / np.linalg.norm(got) > 0.9


def test_export_takes_presets_and_aliases(tiny_llama, tmp_path, capsys):
    model = tiny_llama("mha")  # untied: both tables at the preset's table precision
    out = tmp_path / "q4_0"
    r = run_cli(["export", model.folder, "-o", out, "--quant", "q4_0", "--method", "rtn", "--no-verify"], capsys)
    assert r.code == 0, r.err
    q = read_manifest(out).quantization
    assert (q["preset"], q["preset_overrides"], q["method"], q["block_size"]) == ("int4-fast", ["method"], "rtn", 128)
    assert (q["embeddings"], q["lm_head"]) == ("int4", "int4")
    assert "overridden: method" in run_cli(["inspect", out], capsys).out
    r = run_cli(["export", model.folder, "-o", tmp_path / "q8", "--quant", "q8_0", "--no-verify"], capsys)
    assert r.code == 0, r.err
    assert read_manifest(tmp_path / "q8").quantization["preset"] == "int8"


def test_preset_errors_are_one_line(exported, tiny_llama, tmp_path, capsys):
    b = exported("gqa4", "fast")
    cases = [
        (["quantize", b.dir, "-o", tmp_path / "o", "--quant", "int3"], "unknown quantization preset 'int3'"),
        (["quantize", b.dir, "-o", tmp_path / "o", "--quant", "int4-fast", "--bits", "8"], "cannot take --bits 8"),
        (["quantize", b.dir, "-o", tmp_path / "o"], "give --quant PRESET"),
        (["export", tiny_llama("gqa4").folder, "-o", tmp_path / "o", "--quant", "q5"], "unknown quantization preset"),
        (["export", tiny_llama("gqa4").folder, "-o", tmp_path / "o", "--format", "coreml", "--quant", "int4-fast"],
         "onnxruntime format"),
    ]
    for argv, fragment in cases:
        r = run_cli(argv, capsys)
        assert r.code == 2, argv
        assert_one_line_error(r.err, fragment)
        assert not (tmp_path / "o").exists()


def test_plan_prices_int4_fast_like_its_bundle(exported, tmp_path):
    from edgellama.devices.catalog import get_profile
    from edgellama.devices.plan import ModelShape, plan
    from edgellama.export.evaluate import weight_bytes
    from edgellama.export.requantize import quantize_bundle

    b = exported("gqa4", "fast")
    out = tmp_path / "fast"
    quantize_bundle(b.dir, out, {"preset": "int4-fast", "method": "rtn"}, verify=False, log=lambda m: None)
    m = read_manifest(out)
    shape = ModelShape.from_hf_config(m.architecture)
    p = plan(shape, get_profile("pixel-8"), quant="int4-fast", max_context=64)
    # The planner prices the file as the quantizer writes it (its policy, run by planned_summary).
    got = weight_bytes(out, m)
    assert abs(p.weights_bytes - got) < 0.02 * p.weights_bytes
    # Fewer bytes than the balanced default, so a faster predicted decode.
    default = plan(shape, get_profile("pixel-8"), quant="int4", max_context=64)
    assert p.weights_bytes < default.weights_bytes and p.predicted_decode_tok_s > default.predicted_decode_tok_s
    # The bundle's own record is planned as int4-fast (devices hint in the manifest).
    assert m.extras["devices"]["quant"] == "int4-fast"


def test_tied_table_is_searched_with_the_heads_inputs(tiny_llama):
    """A tied int4 table is also the lm_head: its hqq search weighs columns by the head's input
    magnitudes, which calibration reaches only after the last layer, so the emitter builds the table
    at lm_head() and splices its nodes back where the embedding was asked for."""
    from onnx import numpy_helper

    from edgellama.export.onnx_graph import FloatWeights, GraphBuilder, GraphOptions, WeightSink
    from edgellama.export.sources import load_source
    from edgellama.quantize.methods import quantize
    from edgellama.quantize.onnx_weights import TIED_EMBEDDING_OUT, QuantizedWeights
    from edgellama.quantize.packing import matmul_nbits

    src = load_source(tiny_llama("gqa3").folder)  # tied, hidden 96: two blocks of 64, trimmed
    cfg, w = src.config, src.tensors.get("model.embed_tokens.weight")
    head_in = np.random.default_rng(0).gamma(0.3, size=cfg.hidden_size).astype(np.float32)  # outlier channels
    em = QuantizedWeights(cfg, QuantOptions.from_dict({"preset": "int4-fast"}), "fast", FloatWeights(),
                          {"lm_head": head_in}, {})
    g = GraphBuilder(cfg, GraphOptions(), WeightSink(None), em)
    x = em.embedding(g, "input_ids", w, tied=True)
    assert x == TIED_EMBEDDING_OUT and em.reads_tied_head and not g.inits
    g.node("Identity", [x], name="layers")  # stands for everything between the embedding and the head
    em.lm_head(g, "layers/out", w, tied=True)
    produced = {o: i for i, n in enumerate(g.nodes) for o in n.output}
    assert produced[TIED_EMBEDDING_OUT] < produced["layers/out"] < produced["lm_head/MatMulNBits/out"]
    gather, = [n for n in g.nodes if n.op_type == "GatherBlockQuantized"]
    head, = [n for n in g.nodes if n.op_type == "MatMulNBits"]
    assert gather.input[0] == head.input[1] == "model.embed_tokens.qweight"
    stored = {t.name: numpy_helper.to_array(t) for t in g.inits}["model.embed_tokens.qweight"]
    codes = lambda act: matmul_nbits(quantize(w, 4, FAST_TABLE_BLOCK, "hqq", symmetric=False,  # noqa: E731
                                              act_scale=act, scale_dtype="float16")).B
    weighted, uniform = codes(head_in), codes(None)
    assert np.array_equal(stored, weighted) and not np.array_equal(weighted, uniform)
