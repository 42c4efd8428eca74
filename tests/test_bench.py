"""`edgellama bench`: the measurements, the bytes-per-token accounting, the table, the PNG, and bad input."""

from __future__ import annotations

import json
import re
import struct
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from helpers import assert_one_line_error, run_cli

RESULT_KEYS = ("ttft_s", "prefill_tok_s", "decode_tok_s", "peak_rss_mb", "size_bytes", "read_bytes_per_token",
               "achieved_bandwidth_gbs", "host_bandwidth_gbs", "bandwidth_utilisation", "predicted_decode_tok_s")


@pytest.fixture(autouse=True)
def unprobed_host(tmp_path, monkeypatch) -> Path:
    """Every test starts from the placeholder host profile, whatever this machine has calibrated."""
    path = tmp_path / "host_profile.json"
    monkeypatch.setenv("EDGELLAMA_HOST_PROFILE", str(path))
    return path


@pytest.fixture(scope="module")
def int4_bundle(tiny_llama, tmp_path_factory) -> Path:
    from edgellama.export.onnx_export import ExportOptions, export_onnx

    out = tmp_path_factory.mktemp("bench-int4") / "bundle"
    export_onnx(tiny_llama("gqa4").folder, out, ExportOptions(max_context=256, quant={"bits": 4}, verify=False),
                log=lambda m: None)
    return out


def read_png(path: Path) -> tuple[int, int, np.ndarray]:
    """Parse a PNG strictly (signature, chunk CRCs, 8-bit RGB, filter 0) into its pixels."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert zlib.crc32(kind + body) & 0xFFFFFFFF == crc, kind
        chunks.append((kind, body))
        pos += 12 + n
    assert [k for k, _ in chunks][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    w, h, depth, color, _, _, _ = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, color) == (8, 2)
    raw = zlib.decompress(b"".join(b for k, b in chunks if k == b"IDAT"))
    rows = np.frombuffer(raw, np.uint8).reshape(h, 1 + 3 * w)
    assert not rows[:, 0].any()
    return w, h, rows[:, 1:].reshape(h, w, 3)


def test_bench_cli_json_and_plot(exported, tmp_path, capsys):
    b = exported("gqa4")
    png = tmp_path / "sweep.png"
    r = run_cli(["bench", b.dir, "--json", "--repeat", "2", "--prompt-tokens", "16", "--new-tokens", "6",
                 "--threads", "1", "--plot", png], capsys)
    assert r.code == 0, r.err
    res = json.loads(r.out)
    for key in RESULT_KEYS:
        assert key in res
    for key in ("ttft_s", "prefill_tok_s", "decode_tok_s", "peak_rss_mb", "size_bytes", "read_bytes_per_token",
                "achieved_bandwidth_gbs"):
        assert res[key] > 0, key
    assert res["host_bandwidth_gbs"] is None and res["bandwidth_utilisation"] is None  # not probed
    assert res["threads"] == 1 and res["repeat"] == 2 and len(res["runs"]) == 2
    assert res["prefill_tok_s"] == pytest.approx(16 / res["ttft_s"], rel=0.5)  # medians of each, nearly reciprocal
    assert all(len(run["token_ids"]) == 6 for run in res["runs"])
    assert res["runs"][0]["token_ids"] == res["runs"][1]["token_ids"]  # greedy from a reset cache: deterministic
    # The sweep stops where the bundle's context (256) ends.
    assert [c for c, _ in res["sweep"]] == [128] and res["sweep"][0][1] > 0
    assert res["size_bytes"] == sum(p.stat().st_size for p in b.dir.rglob("*") if p.is_file())
    total = 1 + 2 * 6 + 1  # warm-up, every decoded token of both runs, one sweep point
    assert re.search(rf"\[#{{30}}\] {total}/{total} ", r.err)  # the progress bar, on stderr, ran to the end
    w, h, pixels = read_png(png)
    assert (w, h) == (640, 400)
    blue = np.all(pixels == (31, 119, 180), axis=-1)
    assert blue.sum() > 50  # the data marker was drawn
    assert (pixels == 0).all(axis=-1).sum() > 100  # axes and labels


def test_bench_generates_what_greedy_generation_does(exported):
    """Same tokens as the runtime's greedy decode, up to the point generate() would stop."""
    from edgellama.runtime.bench import BenchOptions, bench, bundle_prompt
    from edgellama.runtime.generate import load, stream_ids
    from edgellama.runtime.sampling import SamplingParams

    b = exported("gqa4")
    res = bench(b.dir, BenchOptions(prompt_tokens=12, new_tokens=10, repeat=1, threads=1), progress=False)
    model = load(b.dir, threads=1)
    prompt = bundle_prompt(model.manifest, model.tokenizer, 12)
    assert len(prompt) == 12 and prompt[0] == model.manifest.tokens.bos_id
    model.engine.reset()
    want = [e.token_id for e in stream_ids(model, prompt, SamplingParams(max_new_tokens=10))]
    got = res.runs[0].token_ids
    assert len(got) == 10 and got[:len(want)] == want


def test_synthetic_prompt_is_exact_and_fixed(llama_tokenizer_dir):
    from edgellama.runtime.bench import synthetic_prompt
    from edgellama.runtime.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(llama_tokenizer_dir)
    for n in (1, 2, 57, 300):
        ids = synthetic_prompt(tok.encode, n, 128000)
        assert len(ids) == n and ids[0] == 128000 and 128000 not in ids[1:]
    assert synthetic_prompt(tok.encode, 300, None)[:5] == synthetic_prompt(tok.encode, 6, 128000)[1:]
    assert tok.decode(synthetic_prompt(tok.encode, 8, None)).startswith("The lighthouse keeper")


def test_read_bytes_counts_untied_input_table_as_one_row(exported):
    from edgellama.runtime.bench import graph_bytes, read_bytes_per_token
    from edgellama.runtime.bundle import read_manifest

    b = exported("mha")  # fp32, untied: the input table is read one row per token
    m = read_manifest(b.dir)
    a = m.architecture
    table = a["vocab_size"] * a["hidden_size"] * 4
    kv_per_position = 2 * a["num_hidden_layers"] * a["num_key_value_heads"] * a["head_dim"] * 4
    read, basis = read_bytes_per_token(b.dir, m, 100)
    assert read == graph_bytes(b.dir, m) - table + a["hidden_size"] * 4 + 100 * kv_per_position
    assert "untied" in basis
    t = exported("gqa4")  # tied: the one table is the lm_head, read whole
    mt = read_manifest(t.dir)
    read, basis = read_bytes_per_token(t.dir, mt, 0)
    assert read == graph_bytes(t.dir, mt) and "untied" not in basis


def test_bandwidth_against_probed_host(int4_bundle, unprobed_host):
    from edgellama.devices.catalog import builtin_profiles
    from edgellama.devices.probe import write_host_profile
    from edgellama.runtime.bench import BenchOptions, bench, report

    measured = {k: "measured: test" for k in ("total_ram_bytes", "app_memory_bytes", "memory_bandwidth_gbs", "cores")}
    host = replace(builtin_profiles()["host"], memory_bandwidth_gbs=2.5, sources={**builtin_profiles()["host"].sources, **measured})
    write_host_profile(host)
    res = bench(int4_bundle, BenchOptions(prompt_tokens=8, new_tokens=5, repeat=1), progress=False)
    from edgellama.quantize.onnx_weights import MIXED_BLOCK

    assert res.quant.startswith(f"int4 b{MIXED_BLOCK}")  # the int4 default block
    assert res.host_bandwidth_gbs == 2.5
    assert res.achieved_bandwidth_gbs == pytest.approx(res.read_bytes_per_token * res.decode_tok_s / 1e9)
    assert res.bandwidth_utilisation == pytest.approx(res.achieved_bandwidth_gbs / 2.5)
    assert res.predicted_decode_tok_s > 0  # plan's model of this bundle on the probed host
    text = report(res)
    lines = text.splitlines()
    assert lines[0].startswith("| model") and set(lines[1]) <= set("|-: ")
    assert any("| pp8 " in l for l in lines) and any("| tg5 " in l for l in lines)
    assert "2.5 GB/s" in text


@pytest.mark.parametrize("argv, fragment", [
    (["--new-tokens", "1"], "--new-tokens"),
    (["--repeat", "0"], "--repeat"),
    (["--prompt-tokens", "250", "--new-tokens", "10"], "context"),
    (["--plot", "sweep.txt"], ".png"),
])
def test_bench_bad_input_is_one_line(exported, capsys, argv, fragment):
    r = run_cli(["bench", exported("gqa4").dir, *argv], capsys)
    assert r.code == 2
    assert_one_line_error(r.err, fragment)


def test_bench_missing_bundle(tmp_path, capsys):
    r = run_cli(["bench", tmp_path / "nope"], capsys)
    assert r.code == 2
    assert_one_line_error(r.err, "not found")


def test_benchmark_gguf_writer_round_trips_through_the_gguf_reader(llama_tokenizer_dir, tmp_path):
    """benchmarks/bench_gguf.py (llama.cpp's layout: Q/K permuted, llama3 RoPE as rope_freqs) read back by edgellama."""
    import sys

    from helpers import TinyLlama, make_tiny_llama

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_gguf import write_gguf

    from edgellama.export.sources import load_hf_folder, load_source

    # head_dim 64 and Llama 3's original context: enough transition frequencies for the reader to solve llama3 RoPE.
    spec = TinyLlama(hidden=128, heads=4, kv_heads=2, head_dim=64, layers=1, rope_original_context=8192,
                     max_position=16384, seed=5)
    folder, _ = make_tiny_llama(tmp_path / "hf", spec, llama_tokenizer_dir)
    out = write_gguf(folder, tmp_path / "tiny.gguf", pre="llama-bpe", name="tiny")
    a, b = load_hf_folder(folder), load_source(str(out))
    rope_a, rope_b = a.config.rope_scaling, b.config.rope_scaling
    assert b.config.rope_scaling is not None
    for key in ("factor", "low_freq_factor", "high_freq_factor"):
        assert getattr(rope_b, key) == pytest.approx(getattr(rope_a, key), rel=1e-3)
    assert rope_b.original_max_position_embeddings == rope_a.original_max_position_embeddings
    assert b.config.num_key_value_heads == 2 and b.config.vocab_size == a.config.vocab_size
    for name in a.tensors.names():
        x, y = a.tensors.get(name), b.tensors.get(name)
        np.testing.assert_allclose(y, x, rtol=1e-3, atol=1e-3 * np.abs(x).max(), err_msg=name)


def test_bench_imports_no_export_dependencies(exported):
    """bench is runtime-side: a device without torch/transformers/onnx/coremltools can run it."""
    import subprocess
    import sys

    from helpers import HEAVY_MODULES

    code = ("import sys; from edgellama.runtime.bench import BenchOptions, bench, report; "
            f"report(bench({str(exported('gqa4').dir)!r}, BenchOptions(prompt_tokens=4, new_tokens=2, repeat=1), "
            "progress=False)); "
            f"print(sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_plan_prices_a_quantized_bundle_from_its_record(int4_bundle):
    """The planner's byte count of a bundle (its int8 parts, q/k blocks, scales, zero points) is the file's."""
    from edgellama.devices.catalog import builtin_profiles
    from edgellama.devices.plan import ModelShape, WeightFormat, plan
    from edgellama.runtime.bench import graph_bytes

    from edgellama.runtime import bundle as B

    m = B.read_manifest(int4_bundle)
    fmt = WeightFormat.from_record(m.quantization, m.dtype)
    assert fmt.int8_layers and fmt.linear["q_proj"].block == m.quantization["qk_block_size"]
    p = plan(ModelShape.from_hf_config(m.architecture), builtin_profiles()["x86-laptop-16gb"], quant="int4",
             max_context=256, weights=fmt)
    assert p.weights_bytes == pytest.approx(graph_bytes(int4_bundle, m), rel=0.01)
    uniform = plan(ModelShape.from_hf_config(m.architecture), builtin_profiles()["x86-laptop-16gb"], quant="int4",
                   max_context=256)
    assert abs(uniform.weights_bytes / graph_bytes(int4_bundle, m) - 1) > 0.02  # the record is what makes it exact
