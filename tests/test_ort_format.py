"""`export --ort-format`: the graph in onnxruntime's ORT format (ORT Mobile), and the operator list
for a reduced-size onnxruntime build. The .ort file must compute what model.onnx computes."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgellama.cli import main
from edgellama.errors import EdgeLlamaError
from edgellama.export import ort_format
from edgellama.export.ort_format import ORT_MODEL, REQUIRED_OPERATORS, write_ort_format
from edgellama.runtime import bundle as B
from edgellama.runtime.engine import OnnxEngine
from edgellama.runtime.pack import verify
from helpers import LLAMA3_BOS, random_ids

PROMPT = [LLAMA3_BOS, *random_ids(11, seed=5)]


@pytest.fixture(scope="module")
def ort_bundle(tiny_llama, tmp_path_factory):
    """ort_bundle(form, bits=None) -> bundle dir from `edgellama export --ort-format` (tiny gqa4, context 128)."""
    cache: dict[tuple, Path] = {}

    def get(form: str, bits: int | None = None) -> Path:
        key = (form, bits)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"ort-{form}-{bits}") / "bundle"
            argv = ["export", str(tiny_llama("gqa4").folder), "-o", str(out), "--max-context", "128", "--no-verify",
                    "--ort-format", "--device", "pixel-8"]
            argv += ["--portable"] if form == "portable" else []
            argv += [f"--quant=int{bits}"] if bits else []
            assert main(argv) == 0
            cache[key] = out
        return cache[key]

    return get


def decode_logits(root: Path, manifest: B.Manifest, graph_file: str, steps: int = 8) -> np.ndarray:
    """Prompt logits, then `steps` greedy decode steps' logits, through our engine on `graph_file`."""
    m = replace(manifest, graph=replace(manifest.graph, file=graph_file))
    engine = OnnxEngine(root, m, max_context=64, threads=1)
    out = [engine.forward(PROMPT)]
    for _ in range(steps):
        out.append(engine.forward([int(out[-1].argmax())]))
    return np.stack(out)


@pytest.mark.parametrize("form,bits", [("fast", None), ("portable", None), ("fast", 4)])
def test_ort_logits_equal_onnx_logits(ort_bundle, form, bits):
    root = ort_bundle(form, bits)
    m = B.read_manifest(root)
    want = decode_logits(root, m, B.ONNX_MODEL)
    got = decode_logits(root, m, ORT_MODEL)
    assert np.abs(want).max() > 1.0 and len(set(want.argmax(-1).tolist())) > 1  # logits worth comparing
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("form,contrib", [("fast", {"GroupQueryAttention"}), ("portable", set())])
def test_manifest_records_and_checksums_the_ort_files(ort_bundle, form, contrib):
    root = ort_bundle(form)
    m = verify(root)
    rec = m.extras["ort_format"]
    assert rec["file"] == ORT_MODEL and rec["required_operators"] == REQUIRED_OPERATORS
    assert rec["source"] == B.ONNX_MODEL and rec["onnxruntime"] == ort.__version__
    assert rec["optimization"] == {"style": "Fixed", "level": "all"}
    assert {ORT_MODEL, REQUIRED_OPERATORS, B.ONNX_MODEL} <= set(m.files)
    assert not any(p.name.startswith(".") for p in root.iterdir())  # the converter's scratch dir is gone

    config = (root / REQUIRED_OPERATORS).read_text()
    assert str(root) not in config and ".tmp-" not in config  # no path of the machine that exported it
    ops: dict[str, set[str]] = {}
    for line in config.splitlines():
        if line and not line.startswith("#"):
            domain, _opset, names = line.split(";")
            ops.setdefault(domain, set()).update(names.split(","))
    assert {"MatMul", "Gather"} & ops["ai.onnx"]
    assert contrib <= ops.get("com.microsoft", set())
    if form == "portable":
        assert "GroupQueryAttention" not in ops.get("com.microsoft", set())

    sess = ort.InferenceSession(str(root / ORT_MODEL), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == [s.name for s in m.graph.inputs]
    assert [o.name for o in sess.get_outputs()] == [s.name for s in m.graph.outputs]


def test_flipped_byte_in_the_ort_files_is_caught(ort_bundle, tmp_path):
    d = tmp_path / "b"
    shutil.copytree(ort_bundle("fast"), d)
    for rel in (ORT_MODEL, REQUIRED_OPERATORS):
        data = bytearray((d / rel).read_bytes())
        data[len(data) // 2] ^= 1
        (d / rel).write_bytes(bytes(data))
        with pytest.raises(EdgeLlamaError, match=f"{rel} is corrupt"):
            verify(d)
        data[len(data) // 2] ^= 1
        (d / rel).write_bytes(bytes(data))


def test_graph_with_external_data_converts_with_weights_inside(ort_bundle, tmp_path):
    """Big models keep weights in model.onnx.data; the .ort file embeds them and needs no data file."""
    src = ort_bundle("fast")
    m = B.read_manifest(src)
    ext = tmp_path / "ext"
    ext.mkdir()
    model = onnx.load(str(src / B.ONNX_MODEL))
    onnx.save_model(model, str(ext / B.ONNX_MODEL), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=B.ONNX_DATA, size_threshold=1024)
    assert (ext / B.ONNX_DATA).stat().st_size > 10 * (ext / B.ONNX_MODEL).stat().st_size
    rec = write_ort_format(ext)
    assert rec["file"] == ORT_MODEL
    alone = tmp_path / "alone"  # the .ort file by itself, without model.onnx.data next to it
    alone.mkdir()
    shutil.copy(ext / ORT_MODEL, alone / ORT_MODEL)
    np.testing.assert_allclose(decode_logits(alone, m, ORT_MODEL, steps=2),
                               decode_logits(src, m, B.ONNX_MODEL, steps=2), rtol=0, atol=1e-4)


def test_refusals_leave_nothing_behind(ort_bundle, tmp_path, monkeypatch):
    d = tmp_path / "b"
    d.mkdir()
    shutil.copy(ort_bundle("fast") / B.ONNX_MODEL, d / B.ONNX_MODEL)
    monkeypatch.setattr(ort_format, "MAX_WEIGHT_BYTES", 1 << 20)  # as if the graph were over 2 GB
    with pytest.raises(EdgeLlamaError, match="under 2 GB"):
        write_ort_format(d)
    monkeypatch.undo()
    (d / B.ONNX_MODEL).write_bytes(b"\x08\x07 this is not an ONNX model")
    with pytest.raises(EdgeLlamaError, match="could not convert model.onnx to ORT format") as exc:
        write_ort_format(d)
    assert "\n" not in str(exc.value)
    assert sorted(p.name for p in d.iterdir()) == [B.ONNX_MODEL]


def test_genai_loads_the_ort_file(ort_bundle, tmp_path):
    """onnxruntime-genai (what the Android/iOS apps use) runs model.ort when genai_config names it."""
    import onnxruntime_genai as og

    src = ort_bundle("fast")
    d = tmp_path / "genai"
    d.mkdir()
    for p in src.iterdir():
        if p.name != B.ONNX_MODEL:  # only the .ort graph: proves genai reads that one
            (d / p.name).symlink_to(p)
    conf = json.loads((src / B.GENAI_CONFIG).read_text())
    conf["model"]["decoder"]["filename"] = ORT_MODEL
    (d / B.GENAI_CONFIG).unlink()
    (d / B.GENAI_CONFIG).write_text(json.dumps(conf))
    model = og.Model(str(d))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=64)
    gen = og.Generator(model, params)
    gen.append_tokens(PROMPT)
    want = decode_logits(src, B.read_manifest(src), B.ONNX_MODEL, steps=0)[0]
    np.testing.assert_allclose(np.asarray(gen.get_output("logits")).reshape(-1), want, rtol=0, atol=1e-4)


def test_cli_device_flag_reaches_the_manifest(ort_bundle):
    hint = B.read_manifest(ort_bundle("fast")).extras["devices"]
    assert hint["planned_for"] == ["pixel-8"] and hint["context"] == 128 and hint["quant"] == "fp32"
    assert B.read_manifest(ort_bundle("fast", 4)).extras["devices"]["quant"] == "int4"
