"""The CLI's contract with bad input and with the output path.

Bad input: exit status 2, exactly one `edgellama: error: ...` line on stderr, no traceback, and
nothing at the output path. Output: written atomically; an existing one is kept unless --force.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from edgellama.errors import EdgeLlamaError
from edgellama.export import onnx_export
from edgellama.runtime.bundle import read_manifest
from helpers import (
    assert_one_line_error,
    corrupt_safetensors,
    edit_config,
    leftovers,
    link_folder,
    run_cli,
    write_pickle_checkpoint,
)

SMALL = ["--max-context", "64"]


def variant(m, dst, **config_changes):
    folder = link_folder(m.folder, dst)
    if config_changes:
        edit_config(folder, **config_changes)
    return folder


# name -> (make(model, tmp_path) -> source argument, extra CLI args, fragments the error must mention)
BAD_INPUTS = {
    "missing source": (lambda m, t: t / "no-such-model", [], ["not found"]),
    "missing relative hub-like path": (lambda m, t: "./no/such", [], ["not found"]),
    "unknown alias": (lambda m, t: "smollm9-unknown", [], ["smollm9-unknown", "alias"]),
    "truncated safetensors": (lambda m, t: _corrupt(m, t, "truncate"), [], ["model.safetensors", "truncated"]),
    "safetensors offsets lie": (lambda m, t: _corrupt(m, t, "offsets"), [], ["model.norm.weight", "offsets"]),
    "safetensors shape lies": (lambda m, t: _corrupt(m, t, "shape"), [], ["model.norm.weight", "does not match"]),
    "gpt2 config": (lambda m, t: variant(m, t / "v", model_type="gpt2", architectures=["GPT2LMHeadModel"]), [],
                    ["unsupported architecture", "GPT2LMHeadModel"]),
    "mistral config": (lambda m, t: variant(m, t / "v", model_type="mistral", architectures=["MistralForCausalLM"]),
                       [], ["MistralForCausalLM"]),
    "mistral architecture, llama type": (lambda m, t: variant(m, t / "v", architectures=["MistralForCausalLM"]), [],
                                         ["MistralForCausalLM"]),
    "config missing hidden_size": (lambda m, t: variant(m, t / "v", hidden_size=...), [], ["missing", "hidden_size"]),
    "config missing model_type": (lambda m, t: variant(m, t / "v", model_type=...), [], ["missing", "model_type"]),
    "absurd layer count": (lambda m, t: variant(m, t / "v", num_hidden_layers=10**12), [],
                           ["absurd", "num_hidden_layers"]),
    "shapes disagree with config": (lambda m, t: variant(m, t / "v", intermediate_size=96), [],
                                    ["mlp", "shape", "96"]),
    "more layers than weights": (lambda m, t: variant(m, t / "v", num_hidden_layers=3), [],
                                 ["missing tensor", "model.layers.2"]),
    "invalid eos id": (lambda m, t: variant(m, t / "v", eos_token_id="</s>"), [], ["eos_token_id"]),
    "zero-width llama3 band": (lambda m, t: variant(m, t / "v", rope_parameters={
        "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}), [], ["llama3 rope scaling"]),
    "config not JSON": (lambda m, t: _write(link_folder(m.folder, t / "v"), "config.json", "{nope"),
                        [], ["config.json", "JSON"]),
    "no tokenizer": (lambda m, t: _unlink(link_folder(m.folder, t / "v"), "tokenizer.json"), [], ["tokenizer.json"]),
    "max context above the model's": (lambda m, t: m.folder, ["--max-context", "100000"], ["100000", "512"]),
    "max context zero": (lambda m, t: m.folder, ["--max-context", "0"], ["--max-context 0"]),
    "negative threads": (lambda m, t: m.folder, ["--threads", "-1"], ["--threads"]),
    "quant option without --quant": (lambda m, t: m.folder, ["--block-size", "32"], ["--block-size", "--quant"]),
    "unknown dtype": (lambda m, t: m.folder, ["--dtype", "int3"], ["--dtype", "int3"]),
    "stateless onnx": (lambda m, t: m.folder, ["--stateless"], ["--stateless", "coreml"]),
    "calibration text without --quant": (lambda m, t: m.folder, ["--calib", "x.txt"], ["--calib", "--quant"]),
}


def _corrupt(m, t, how):
    folder = link_folder(m.folder, t / how, copy=("config.json", "model.safetensors"))
    corrupt_safetensors(folder / "model.safetensors", how)
    return folder


def _write(folder, name, text):
    (folder / name).unlink()
    (folder / name).write_text(text)
    return folder


def _unlink(folder, name):
    (folder / name).unlink()
    return folder


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_clean_error_and_writes_nothing(case, tiny_llama, tmp_path, capsys):
    make, extra, fragments = BAD_INPUTS[case]
    source = make(tiny_llama("gqa4"), tmp_path)
    out = tmp_path / "out" / "bundle"
    r = run_cli(["export", source, "-o", out, *SMALL, *extra], capsys)
    assert r.code == 2
    assert_one_line_error(r.err, *fragments)
    assert not out.exists()
    assert not out.parent.exists() or not list(out.parent.iterdir())


def test_pickle_checkpoint_refused_without_unpickling(tiny_llama, tmp_path, capsys):
    marker = tmp_path / "unpickled.marker"
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_llama("gqa4").folder / "config.json").read_text())
    bin_path = write_pickle_checkpoint(folder / "pytorch_model.bin", marker)
    for source in (folder, bin_path):
        out = tmp_path / "out"
        r = run_cli(["export", source, "-o", out], capsys)
        assert r.code == 2
        assert_one_line_error(r.err, "pickle", "never unpickles")
        assert not out.exists()
    assert not marker.exists()


def test_usage_errors_are_one_line(capsys, tmp_path):
    r = run_cli(["export", str(tmp_path)], capsys)  # no -o
    assert r.code == 2
    assert_one_line_error(r.err, "--output")
    r = run_cli(["frobnicate"], capsys)
    assert r.code == 2
    assert_one_line_error(r.err, "frobnicate")
    r = run_cli(["inspect", tmp_path, "--no-such-flag"], capsys)  # caught by the top-level parser
    assert r.code == 2
    line = assert_one_line_error(r.err, "unrecognized arguments: --no-such-flag")
    assert line.count("edgellama") == 1, line
    r = run_cli(["inspect"], capsys)  # caught by the verb's parser: named once, with the verb
    assert r.code == 2
    line = assert_one_line_error(r.err, "inspect: ", "required")
    assert line.count("edgellama") == 1, line
    r = run_cli(["inspect", tmp_path / "nothing-here"], capsys)
    assert r.code == 2
    assert_one_line_error(r.err, "not found")
    r = run_cli(["inspect", tmp_path], capsys)
    assert r.code == 2
    assert_one_line_error(r.err, "edgellama.json is missing")


def test_real_process_reports_one_line(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "edgellama", "export", str(tmp_path / "missing"), "-o", str(out)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, "not found")
    assert proc.stdout == ""
    assert not out.exists()


def test_existing_output_needs_force(tiny_llama, tmp_path, capsys):
    src = tiny_llama("gqa3").folder
    out = tmp_path / "bundle"
    assert run_cli(["export", src, "-o", out, "--max-context", "64", "--no-verify"], capsys).code == 0
    before = (out / "edgellama.json").read_bytes()
    assert read_manifest(out).context_length == 64
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask  # an ordinary directory, not mkdtemp's 0700

    r = run_cli(["export", src, "-o", out, "--max-context", "96", "--no-verify"], capsys)
    assert r.code == 2
    assert_one_line_error(r.err, "already exists", "--force")
    assert (out / "edgellama.json").read_bytes() == before

    keep = out / "stale-file.txt"  # --force replaces the whole directory, not file by file
    keep.write_text("old")
    r = run_cli(["export", src, "-o", out, "--max-context", "96", "--no-verify", "--force"], capsys)
    assert r.code == 0, r.err
    assert read_manifest(out).context_length == 96
    assert not keep.exists()
    assert leftovers(tmp_path, "bundle") == []

    (tmp_path / "afile").write_text("x")
    r = run_cli(["export", src, "-o", tmp_path / "afile", *SMALL], capsys)
    assert r.code == 2
    assert_one_line_error(r.err, "afile")
    assert (tmp_path / "afile").read_text() == "x"


def _explode_after_writing(*args, **kwargs):
    sink = args[3]
    if sink.data_path is not None:  # leave a partial file behind, as a crash would
        sink.tensor("half_written", np.zeros(4096, np.float32))
    raise RuntimeError("simulated crash while building the graph")


def test_failed_export_leaves_nothing(tiny_llama, tmp_path, monkeypatch):
    src = tiny_llama("gqa3").folder
    out = tmp_path / "bundle"
    monkeypatch.setattr(onnx_export, "build_llama_graph", _explode_after_writing)
    monkeypatch.setattr(onnx_export, "INLINE_LIMIT", 0)  # stream weights, so there is a data file to leave behind
    with pytest.raises(RuntimeError, match="simulated crash"):
        onnx_export.export_onnx(src, out, onnx_export.ExportOptions(max_context=64), log=lambda m: None)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_failed_verification_leaves_nothing_and_old_bundle_intact(tiny_llama, tmp_path, monkeypatch, capsys):
    src = tiny_llama("gqa3").folder
    out = tmp_path / "bundle"
    assert run_cli(["export", src, "-o", out, *SMALL, "--no-verify"], capsys).code == 0
    files_before = {p.name: p.read_bytes() for p in out.iterdir() if p.stat().st_size < 10**7}

    from edgellama.export import verify

    def refuse(*a, **k):
        raise EdgeLlamaError("verification failed: max |Δlogit| 3.1 exceeds 1e-3")

    monkeypatch.setattr(verify, "verify_onnx_bundle", refuse)
    r = run_cli(["export", src, "-o", out, "--max-context", "96", "--force"], capsys)
    assert r.code == 2
    assert "verification failed" in r.err.strip().splitlines()[-1]
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.stat().st_size < 10**7} == files_before
    read_manifest(out)  # still complete and intact
    assert leftovers(tmp_path, "bundle") == []

    r = run_cli(["export", src, "-o", tmp_path / "fresh", *SMALL], capsys)
    assert r.code == 2 and not (tmp_path / "fresh").exists()


def test_interrupted_export_leaves_nothing(tiny_llama, tmp_path, monkeypatch, capsys):
    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_export, "save_graph", interrupt)
    out = tmp_path / "bundle"
    r = run_cli(["export", tiny_llama("gqa3").folder, "-o", out, *SMALL], capsys)
    assert r.code == 130
    assert "Traceback" not in r.err
    assert list(tmp_path.iterdir()) == []


def test_inspect_text_and_json(exported, capsys):
    b = exported("gqa4", "fast")
    r = run_cli(["inspect", b.dir], capsys)
    assert r.code == 0 and r.err == ""
    assert "2 layers, hidden 64, heads 8/2, head_dim 16, vocab 128256, tied True" in r.out
    assert "onnx fast (model.onnx), attention gqa" in r.out
    assert f"bos 128000, stop {b.manifest.tokens.eos_ids}" in r.out
    rows = {k: v for k, v in (re.split(r"\s{2,}", line, maxsplit=1) for line in r.out.splitlines())}
    assert rows["source"] == b.manifest.source
    assert rows["chat template"] == "yes"
    assert rows["context"] == "256"
    assert rows["quantization"] == "none"

    r = run_cli(["inspect", b.dir, "--json"], capsys)
    assert r.code == 0
    assert json.loads(r.out) == json.loads((b.dir / "edgellama.json").read_text())
