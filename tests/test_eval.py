"""`edgellama eval`: bundle vs fp32 reference, teacher-forced; and the de-gridded SmolLM2 still knows Paris."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from edgellama.export.evaluate import KEYS, Reference, evaluate, greedy_reply, score, windows
from edgellama.export.requantize import quantize_bundle
from helpers import assert_one_line_error, edit_config, link_folder, run_cli

TEXT = (
    "The river rose slowly through the night, and by morning the lower fields were under water. "
    "Farmers moved their animals to the hills, where the old stone barns still stood. Nobody in the "
    "village could remember a flood like it, although the records in the church spoke of one two "
    "hundred years before, when the bridge was carried away and the mill was never rebuilt.\n\n"
    "In the afternoon the rain stopped. Children came out to look at the brown water, and the "
    "baker, who had kept his ovens lit all night, gave away bread to anyone who asked."
)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("text") / "story.txt"
    p.write_text(TEXT, encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def quantized(exported, tmp_path_factory):
    """int8 and int4 copies of the tiny untied model's fast bundle (round-to-nearest, for speed)."""
    b = exported("mha", "fast")
    out = {}
    for bits in (8, 4):
        d = tmp_path_factory.mktemp(f"eval-int{bits}") / "bundle"
        quantize_bundle(b.dir, d, {"bits": bits, "method": "rtn", "embeddings": f"int{bits}", "lm_head": f"int{bits}"},
                        verify=False, log=lambda m: None)
        out[bits] = d
    return b, out


def test_score_matches_direct_formulas():
    rng = np.random.default_rng(0)
    ref, got = rng.normal(size=(5, 11)) * 3, rng.normal(size=(5, 11)) * 3
    targets = rng.integers(0, 11, 5)
    s = score(ref.astype(np.float32), got.astype(np.float32), targets)
    p = np.exp(ref) / np.exp(ref).sum(-1, keepdims=True)
    q = np.exp(got) / np.exp(got).sum(-1, keepdims=True)
    np.testing.assert_allclose(s["kl"], (p * np.log(p / q)).sum(-1), rtol=1e-5)
    np.testing.assert_allclose(s["nll"], -np.log(q[np.arange(5), targets]), rtol=1e-5)
    np.testing.assert_allclose(s["ref_nll"], -np.log(p[np.arange(5), targets]), rtol=1e-5)
    assert (s["top1"] == (ref.argmax(-1) == got.argmax(-1))).all()
    assert score(ref, ref, targets)["kl"].max() == 0.0


def test_windows_put_bos_first_and_never_overlap():
    ids = list(range(10, 30))
    w = windows(ids, 8, bos=1)
    assert all(x[0] == 1 and len(x) <= 8 for x in w)
    assert [t for x in w for t in x[1:]] == ids
    w = windows(ids, 8, bos=None)
    assert [t for x in w for t in x] == ids and max(map(len, w)) == 8
    assert windows([5], 8, bos=None) == []  # one token predicts nothing


@pytest.mark.parametrize("form", ["fast", "portable"])
def test_float_bundle_against_its_own_reference(exported, text_file, form, capsys):
    b = exported("gqa4", form)
    r = run_cli(["eval", b.dir, "--reference", b.model.folder, "--text", text_file, "--window", "48", "--json"], capsys)
    assert r.code == 0, r.err
    out = json.loads(r.out)
    assert set(KEYS) <= set(out)
    assert out["kld_mean"] < 1e-6 and out["kld_p99"] < 1e-5
    assert out["top1_agreement"] == 1.0
    assert math.isclose(out["ppl"], out["ref_ppl"], rel_tol=1e-4)
    assert out["ppl"] > 1.0
    assert out["bits_per_weight"] == pytest.approx(32.0)
    assert out["size_bytes"] == sum(f.stat().st_size for f in b.dir.rglob("*") if f.is_file())
    # BOS starts each window of 48: the scored positions are every text token.
    n_text = len(Tokenizer.from_file(str(b.dir / "tokenizer.json")).encode(TEXT, add_special_tokens=False).ids)
    assert out["tokens"] == n_text and out["windows"] == math.ceil(n_text / 47)
    assert "eval [" in r.err  # the progress bar


def test_int4_is_worse_than_int8(quantized, text_file):
    b, q = quantized
    ref = Reference(b.model.folder)  # one torch model and its logits, shared by both runs
    r8 = evaluate(q[8], ref, text_file, window=64, progress=False)
    r4 = evaluate(q[4], ref, text_file, window=64, progress=False)
    assert 0 < r8["kld_mean"] < r4["kld_mean"]
    assert r8["top1_agreement"] >= r4["top1_agreement"] and r4["top1_agreement"] < 1.0
    assert r4["ref_ppl"] == r8["ref_ppl"]
    assert r4["bits_per_weight"] < r8["bits_per_weight"] < 32
    assert r4["size_bytes"] < r8["size_bytes"]
    assert r8["kld_p99"] >= r8["kld_mean"]


def test_external_data_bundle_is_scored_and_left_untouched(tiny_llama, text_file, tmp_path, monkeypatch):
    """Real models keep their weights in model.onnx.data; scoring every position rewrites the graph
    in a temporary folder, whose data must resolve inside it (onnxruntime refuses symlinks out)."""
    from edgellama.export import onnx_export

    monkeypatch.setattr(onnx_export, "INLINE_LIMIT", 0)
    m = tiny_llama("gqa4")
    bundle = tmp_path / "ext"
    onnx_export.export_onnx(m.folder, bundle, onnx_export.ExportOptions(max_context=64, verify=False), log=lambda _: None)
    assert (bundle / "model.onnx.data").is_file()
    before = sorted(p.name for p in tmp_path.iterdir())
    r = evaluate(bundle, m.folder, text_file, window=32, progress=False)
    assert r["kld_mean"] < 1e-6 and r["top1_agreement"] == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # the temporary variant is gone


def test_max_tokens_limits_the_text(exported, text_file):
    b = exported("gqa4", "fast")
    r = evaluate(b.dir, b.model.folder, text_file, window=16, max_tokens=20, progress=False)
    assert r["tokens"] == 20 and r["windows"] == 2  # BOS + 15, BOS + 5


def test_bad_input(exported, text_file, tmp_path, capsys):
    b = exported("gqa4", "fast")
    other = edit_folder(b.model.folder, tmp_path / "other")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    base = ["eval", b.dir, "--reference", b.model.folder, "--window", "32"]
    cases = [
        (base + ["--text", tmp_path / "missing.txt"], "not found"),
        (base + ["--text", empty], "empty"),
        (base + ["--text", text_file, "--window", "1"], "--window"),
        (base + ["--text", text_file, "--window", "100000"], "context"),
        (base + ["--text", text_file, "--max-tokens", "1"], "--max-tokens"),
        (["eval", tmp_path, "--reference", b.model.folder, "--text", text_file], "not a bundle"),
        (["eval", b.dir, "--reference", tmp_path / "nothing", "--text", text_file, "--window", "32"], "not found"),
        (["eval", b.dir, "--reference", other, "--text", text_file, "--window", "32"], "vocabulary"),
    ]
    for argv, fragment in cases:
        r = run_cli(argv, capsys)
        assert r.code == 2, argv
        assert_one_line_error(r.err, fragment)


def edit_folder(folder: Path, dst: Path) -> Path:
    """A checkpoint that is not the bundle's model: the same weights under a config with another vocabulary."""
    link_folder(folder, dst)
    edit_config(dst, vocab_size=1000)
    return dst


def _degrid_module():
    spec = importlib.util.spec_from_file_location("degrid_smollm2", ROOT / "benchmarks" / "degrid_smollm2.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_degridded_smollm2_int4_default_knows_paris(tmp_path):
    from edgellama.export.onnx_export import ExportOptions, export_onnx
    from edgellama.runtime.bundle import read_manifest

    degrid = _degrid_module()
    folder = degrid.degridded_smollm2()
    fp32 = tmp_path / "fp32"
    export_onnx(folder, fp32, ExportOptions(max_context=1024, verify=False), log=lambda m: None)
    int4 = tmp_path / "int4"
    quantize_bundle(fp32, int4, {"bits": 4}, verify=False, log=lambda m: None)
    assert read_manifest(int4).quantization["bits"] == 4
    reply = greedy_reply(int4, degrid.FRANCE, max_new_tokens=16)
    assert "Paris" in reply, reply
