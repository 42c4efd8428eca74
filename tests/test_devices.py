"""Device catalog, host probe, fit planner and their CLI verbs."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from edgellama.cli import main
from edgellama.devices.catalog import FIGURES, builtin_profiles, get_profile, load_catalog, profile_from_dict
from edgellama.devices.plan import ModelShape, plan, read_model_config
from edgellama.devices.probe import measure_read_bandwidth, probe_host, write_host_profile
from edgellama.errors import EdgeLlamaError

MiB = 1 << 20
GiB = 1 << 30
REQUIRED = {"iphone-15-pro", "iphone-13", "pixel-8", "galaxy-s24", "macbook-air-m2", "x86-laptop-16gb",
            "raspberry-pi-5-8gb", "jetson-orin-nano-8gb", "host"}
LLAMA_1B = ModelShape(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                      max_position_embeddings=131072)
LLAMA_3B = dataclasses.replace(LLAMA_1B, hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, head_dim=128)


def hf_config(shape: ModelShape) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **dataclasses.asdict(shape)}


@pytest.fixture(autouse=True)
def host_file(tmp_path, monkeypatch):
    path = tmp_path / "host_profile.json"
    monkeypatch.setenv("EDGELLAMA_HOST_PROFILE", str(path))
    return path


# --- catalog ---------------------------------------------------------------------------------------------

def test_catalog_has_the_required_devices_with_public_figures():
    catalog = load_catalog()
    assert REQUIRED <= set(catalog)
    for name, p in catalog.items():
        assert p.name == name
        assert 0 < p.app_memory_bytes <= p.total_ram_bytes
        assert set(FIGURES) <= set(p.sources)
    iphone = catalog["iphone-15-pro"]
    assert (iphone.total_ram_bytes, iphone.memory_bandwidth_gbs, iphone.format) == (8 * GiB, 51.2, "coreml")
    pi = catalog["raspberry-pi-5-8gb"]
    assert pi.memory_bandwidth_gbs == pytest.approx(4267e6 * 4 / 1e9, abs=0.1)  # LPDDR4X-4267, 32-bit bus


def test_profiles_round_trip_through_json():
    for p in builtin_profiles().values():
        assert profile_from_dict(json.loads(json.dumps(p.to_dict())), "test") == p


def _mutated(change):
    data = get_profile("iphone-15-pro").to_dict()
    change(data)
    return data


@pytest.mark.parametrize("change, field", [
    (lambda d: d.pop("total_ram_bytes"), "total_ram_bytes"),
    (lambda d: d.update(total_ram_bytes=-8 * GiB), "total_ram_bytes"),
    (lambda d: d.update(memory_bandwidth_gbs=0), "memory_bandwidth_gbs"),
    (lambda d: d.update(cores=True), "cores"),
    (lambda d: d.update(gpu_cores=6), "gpu_cores"),
    (lambda d: d.update(app_memory_bytes=16 * GiB), "app_memory_bytes"),
    (lambda d: d.update(efficiency=1.5), "efficiency"),
    (lambda d: d.update(default_quant="int3"), "default_quant"),
    (lambda d: d.update(format="onnx"), "accelerator"),  # CPU_AND_GPU is no execution provider
    (lambda d: d["sources"].pop("memory_bandwidth_gbs"), "sources"),
])
def test_bad_profiles_name_the_profile_and_the_field(change, field):
    with pytest.raises(EdgeLlamaError) as err:
        profile_from_dict(_mutated(change), "profiles.json")
    message = str(err.value)
    assert "'iphone-15-pro'" in message and f"'{field}'" in message and "\n" not in message


def steady(p):
    """A profile without the one figure that moves between two reads: the memory free right now."""
    return dataclasses.replace(p, app_memory_bytes=0)


def test_host_reads_memory_from_the_os_and_speed_from_its_file(host_file):
    from edgellama.devices.probe import physical_cores, total_ram_bytes

    placeholder = get_profile("host", probe=False)
    assert (placeholder.total_ram_bytes, placeholder.cores) == (total_ram_bytes(), physical_cores())  # not 8 GiB / 2
    assert placeholder.sources["memory_bandwidth_gbs"].startswith("placeholder")
    measured = dataclasses.replace(placeholder, total_ram_bytes=64 * GiB, memory_bandwidth_gbs=33.3, layer_cost_us=12.5,
                                   sources={**placeholder.sources, "memory_bandwidth_gbs": "measured: test",
                                            "layer_cost_us": "fitted by a test"})
    host_file.write_text(json.dumps(measured.to_dict()))
    got = get_profile("host")
    assert (got.memory_bandwidth_gbs, got.layer_cost_us) == (33.3, 12.5)
    assert got.total_ram_bytes == total_ram_bytes()  # the OS's figure, never a stored one
    assert builtin_profiles()["host"].memory_bandwidth_gbs != 33.3

    # A host file from before layer_cost_us existed takes the built-in default.
    old = measured.to_dict()
    del old["layer_cost_us"], old["sources"]["layer_cost_us"]
    host_file.write_text(json.dumps(old))
    assert get_profile("host").layer_cost_us == builtin_profiles()["host"].layer_cost_us > 0

    # Uncalibrated figures (estimates a probe carried over) follow the built-in profile, calibrated ones stay.
    stale = dataclasses.replace(measured, efficiency=0.123, layer_cost_us=45.6,
                                sources={**measured.sources, "layer_cost_us": "estimate: an older default"})
    host_file.write_text(json.dumps(stale.to_dict()))
    builtin = builtin_profiles()["host"]
    got = get_profile("host")
    assert (got.efficiency, got.layer_cost_us) == (builtin.efficiency, builtin.layer_cost_us) != (0.123, 45.6)
    calibrated = dataclasses.replace(stale, sources={**stale.sources, "efficiency": "calibrated: a test",
                                                     "layer_cost_us": "fitted by a test"})
    host_file.write_text(json.dumps(calibrated.to_dict()))
    assert (get_profile("host").efficiency, get_profile("host").layer_cost_us) == (0.123, 45.6)

    host_file.write_text("{not json")
    with pytest.raises(EdgeLlamaError, match="host_profile.json"):
        load_catalog()
    host_file.write_text(json.dumps(dataclasses.replace(measured, name="laptop").to_dict()))
    with pytest.raises(EdgeLlamaError, match="'name' must be 'host'"):
        load_catalog()


def test_unknown_device_lists_the_known_ones():
    with pytest.raises(EdgeLlamaError, match="unknown device 'nokia-3310'.*iphone-15-pro.*host"):
        get_profile("nokia-3310")


# --- model shape -----------------------------------------------------------------------------------------

def test_model_shape_from_hf_config_defaults_and_errors():
    cfg = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
           "vocab_size": 49152, "tie_word_embeddings": True}
    shape = ModelShape.from_hf_config(cfg)
    assert (shape.head_dim, shape.num_key_value_heads, shape.max_position_embeddings) == (64, 9, 2048)
    assert ModelShape.from_hf_config(hf_config(LLAMA_3B)) == LLAMA_3B
    with pytest.raises(EdgeLlamaError, match="missing 'hidden_size'"):
        ModelShape.from_hf_config({k: v for k, v in cfg.items() if k != "hidden_size"})
    with pytest.raises(EdgeLlamaError, match="num_hidden_layers"):
        ModelShape.from_hf_config({**cfg, "num_hidden_layers": 0})
    with pytest.raises(EdgeLlamaError, match="not a multiple"):
        ModelShape.from_hf_config({**cfg, "num_key_value_heads": 2})


def test_read_model_config_from_bundle_folder_and_file(tmp_path):
    cfg = hf_config(LLAMA_1B)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "edgellama.json").write_text(json.dumps({"format": "edgellama-bundle", "architecture": cfg}))
    assert read_model_config(tmp_path / "hf") == cfg
    assert read_model_config(tmp_path / "hf" / "config.json") == cfg
    assert read_model_config(tmp_path / "bundle") == cfg
    assert read_model_config(tmp_path / "bundle" / "edgellama.json") == cfg
    assert read_model_config(tmp_path / "missing.gguf") is None


# --- planner ---------------------------------------------------------------------------------------------

def _int4_bytes(n_weights: int, block: int, scale_bytes: int) -> float:
    # Every reduction dim here is a multiple of 2 * block: each block has packed nibbles, a scale and half a byte of zero point.
    return n_weights / 2 + n_weights / block * (scale_bytes + 0.5)


def test_llama_3_2_1b_int4_weights_match_an_independent_count():
    s = LLAMA_1B
    q, kv = s.num_attention_heads * s.head_dim, s.num_key_value_heads * s.head_dim
    linear = s.num_hidden_layers * (2 * s.hidden_size * q + 2 * s.hidden_size * kv + 3 * s.hidden_size * s.intermediate_size)
    embed = s.vocab_size * s.hidden_size
    norms = (2 * s.num_hidden_layers + 1) * s.hidden_size
    assert linear + embed + norms == s.param_count() == 1_235_814_400  # Llama 3.2 1B's published count

    onnx = plan(LLAMA_1B, get_profile("pixel-8"), quant="int4", max_context=4096, embed_quant="int4")  # fp32 scales
    gather_zero_points = embed / 32  # a tied int4 table's Gather keeps its own zero points, one byte per block
    assert onnx.weights_bytes == _int4_bytes(linear + embed, 32, 4) + norms * 4 + gather_zero_points
    coreml = plan(LLAMA_1B, get_profile("iphone-15-pro"), quant="int4", max_context=4096, embed_quant="int4")  # fp16
    assert coreml.weights_bytes == _int4_bytes(linear + embed, 32, 2) + norms * 2 + gather_zero_points
    for p in (onnx, coreml):
        assert 0.7e9 <= p.weights_bytes <= 0.81e9
    # An int4 bundle, ONNX or Core ML, keeps its embedding/lm_head at int8 unless told otherwise; so does its plan.
    default = plan(LLAMA_1B, get_profile("pixel-8"), quant="int4", max_context=4096)
    assert default.weights_bytes == plan(LLAMA_1B, get_profile("pixel-8"), quant="int4", max_context=4096,
                                         embed_quant="int8").weights_bytes
    assert plan(LLAMA_1B, get_profile("iphone-15-pro"), quant="int4", max_context=4096).weights_bytes == plan(
        LLAMA_1B, get_profile("iphone-15-pro"), quant="int4", max_context=4096, embed_quant="int8").weights_bytes
    # plan prices int8 in blocks of 32 (symmetric: a scale per block, no zero point), as the quantizer stores it
    assert default.weights_bytes - onnx.weights_bytes == embed + embed / 32 * 4 - _int4_bytes(embed, 32, 4) - gather_zero_points
    bigger_blocks = plan(LLAMA_1B, get_profile("pixel-8"), quant="int4", max_context=4096, block_size=128,
                         embed_quant="int4")
    assert bigger_blocks.weights_bytes == _int4_bytes(linear + embed, 128, 4) + norms * 4 + embed / 128

    int8 = plan(LLAMA_1B, get_profile("pixel-8"), quant="int8", max_context=4096)
    assert int8.weights_bytes == (linear + embed) * (1 + 4 / 32) + norms * 4
    fp16 = plan(LLAMA_1B, get_profile("pixel-8"), quant="fp16", max_context=4096)
    assert fp16.weights_bytes == s.param_count() * 2


def test_tied_embeddings_are_stored_once_but_read_the_same():
    untied = dataclasses.replace(LLAMA_1B, tie_word_embeddings=False)
    device = get_profile("galaxy-s24")
    a = plan(LLAMA_1B, device, quant="int4", max_context=2048, embed_quant="int4")
    b = plan(untied, device, quant="int4", max_context=2048, embed_quant="int4")
    table = LLAMA_1B.vocab_size * LLAMA_1B.hidden_size
    assert b.weights_bytes - a.weights_bytes == _int4_bytes(table, 32, 4) - table / 32  # less the tied Gather's zero points
    assert a.read_bytes_per_token == b.read_bytes_per_token  # decode reads the lm_head plus one embedding row either way
    assert a.predicted_decode_tok_s == b.predicted_decode_tok_s
    fp32_untied = plan(untied, device, quant="fp32", max_context=2048, embed_quant="fp32")
    assert fp32_untied.weights_bytes == untied.param_count() * 4


def test_kv_cache_bytes_and_dtype():
    s = LLAMA_3B
    per_token = 2 * s.num_hidden_layers * s.num_key_value_heads * s.head_dim
    assert plan(s, get_profile("iphone-15-pro"), quant="int4", max_context=8192).kv_bytes == per_token * 8192 * 2
    onnx = plan(s, get_profile("pixel-8"), quant="int4", max_context=8192)
    assert (onnx.kv_bytes, onnx.kv_dtype) == (per_token * 8192 * 4, "fp32")
    half = plan(s, get_profile("pixel-8"), quant="int4", max_context=8192, kv_dtype="fp16")
    assert (half.kv_bytes, half.kv_dtype) == (per_token * 8192 * 2, "fp16")
    assert half.total_bytes - half.overhead_bytes - half.weights_memory_bytes == half.kv_bytes


def test_predicted_decode_speed_is_the_roofline_plus_a_cost_per_layer():
    tiny = ModelShape(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=1000, tie_word_embeddings=True,
                      max_position_embeddings=4096)
    device = dataclasses.replace(get_profile("x86-laptop-16gb"), layer_cost_us=0.0)
    p = plan(tiny, device, quant="fp32", max_context=1000)
    layer_params = 64 * 64 * 2 + 64 * 32 * 2 + 64 * 128 * 3 + 2 * 64
    read = 4 * (2 * layer_params + 64 + 1000 * 64 + 64) + 2 * 2 * 2 * 16 * 500 * 4  # weights, lm_head, one row, KV at ctx/2
    assert p.read_bytes_per_token == read
    roofline = device.efficiency * device.memory_bandwidth_gbs * 1e9 / read
    assert p.predicted_decode_tok_s == pytest.approx(roofline, abs=0.01)
    faster = dataclasses.replace(device, memory_bandwidth_gbs=2 * device.memory_bandwidth_gbs)
    assert plan(tiny, faster, quant="fp32", max_context=1000).predicted_decode_tok_s == pytest.approx(
        2 * p.predicted_decode_tok_s, abs=0.02)
    # Each layer's fixed cost adds to the time per token: 2 layers x 100 us.
    slow = dataclasses.replace(device, layer_cost_us=100.0)
    assert plan(tiny, slow, quant="fp32", max_context=1000).predicted_decode_tok_s == pytest.approx(
        1 / (1 / roofline + 2 * 100e-6), abs=0.01)


def test_cpu_onnx_prices_int4_as_matmulnbits_packs_it():
    """onnxruntime's CPU provider reads int4 blocks of 32 as 4 bits + an fp32 scale + an fp32 block sum
    (6 bits per weight, plus the zero points), not the file's 4.6: reads and memory follow that."""
    cpu = get_profile("x86-laptop-16gb")
    gpu = dataclasses.replace(cpu, accelerator="CUDAExecutionProvider")
    on_cpu = plan(LLAMA_1B, cpu, quant="int4", max_context=2048, embed_quant="int4")
    elsewhere = plan(LLAMA_1B, gpu, quant="int4", max_context=2048, embed_quant="int4")
    assert on_cpu.weights_bytes == elsewhere.weights_bytes  # the file is the same
    s = LLAMA_1B
    q, kv = s.num_attention_heads * s.head_dim, s.num_key_value_heads * s.head_dim
    linear = s.num_hidden_layers * (2 * s.hidden_size * q + 2 * s.hidden_size * kv + 3 * s.hidden_size * s.intermediate_size)
    head = s.vocab_size * s.hidden_size
    packed = (linear + head) * (0.5 + 8 / 32 + 0.5 / 32)
    assert on_cpu.read_bytes_per_token - elsewhere.read_bytes_per_token == pytest.approx(
        packed - _int4_bytes(linear + head, 32, 4), rel=1e-9)
    assert on_cpu.weights_memory_bytes > elsewhere.weights_memory_bytes


def test_fits_flips_at_the_largest_context():
    device = get_profile("raspberry-pi-5-8gb")
    roomy = plan(LLAMA_3B, device, quant="int4", max_context=4096)
    assert roomy.fits and 4096 < roomy.max_context < LLAMA_3B.max_position_embeddings
    edge = plan(LLAMA_3B, device, quant="int4", max_context=roomy.max_context)
    over = plan(LLAMA_3B, device, quant="int4", max_context=roomy.max_context + 1)
    assert edge.fits and edge.total_bytes <= edge.budget_bytes
    assert not over.fits and over.total_bytes > over.budget_bytes
    contexts = [1024, 4096, 16384, 65536]
    totals = [plan(LLAMA_3B, device, quant="int4", max_context=c).total_bytes for c in contexts]
    assert totals == sorted(totals) and len(set(totals)) == 4


def test_max_context_is_capped_at_the_model_limit():
    short = dataclasses.replace(LLAMA_1B, max_position_embeddings=8192)
    p = plan(short, get_profile("macbook-air-m2"), quant="int4", max_context=None)
    assert p.fits and p.max_context == 8192 and p.context == 8192  # device default 8k, model limit 8k
    with pytest.raises(EdgeLlamaError, match="exceeds the model's max_position_embeddings"):
        plan(short, get_profile("macbook-air-m2"), quant="int4", max_context=8193)


def test_recommendations():
    device = get_profile("pixel-8")
    at_8k = plan(LLAMA_3B, device, quant="int4", max_context=8192)
    short = dataclasses.replace(device, app_memory_bytes=at_8k.total_bytes - 3 * MiB)
    p = plan(LLAMA_3B, short, quant="int4", max_context=8192)
    assert not p.fits and 512 <= p.max_context < 8192
    assert p.recommendation.startswith("fits at int4 with ") and "8k needs 3 MiB more" in p.recommendation

    # A 3B model at fp32 cannot fit a 4 GB phone at all; only int4 does.
    iphone13 = get_profile("iphone-13")
    p = plan(LLAMA_3B, iphone13, quant="fp32", max_context=2048)
    assert not p.fits and p.max_context == 0
    assert p.recommendation == "does not fit even at 512 tokens: try int4"
    assert plan(LLAMA_3B, iphone13, quant="int4", max_context=2048).fits

    p = plan(LLAMA_1B, get_profile("macbook-air-m2"), quant="int4", max_context=8192)
    assert p.fits and "fp32 also fits" in p.recommendation  # the best quality that fits is named

    tiny_device = dataclasses.replace(iphone13, app_memory_bytes=256 * MiB)
    p = plan(LLAMA_3B, tiny_device, quant="int4", max_context=2048)
    assert "at any quantization" in p.recommendation


@pytest.mark.parametrize("kwargs, match", [
    ({"quant": "int2"}, "unknown quant"),
    ({"block_size": 24}, "power of two"),
    ({"max_context": 0}, "positive integer"),
    ({"kv_dtype": "int8"}, "KV cache dtype"),
])
def test_plan_rejects_bad_arguments(kwargs, match):
    args = {"quant": "int4", "max_context": 1024, **kwargs}
    with pytest.raises(EdgeLlamaError, match=match):
        plan(LLAMA_1B, get_profile("pixel-8"), **args)


# --- probe -----------------------------------------------------------------------------------------------

def test_probe_measures_this_machine_and_round_trips(host_file):
    profile = probe_host(buffer_bytes=16 * MiB, repeats=2)
    assert profile.name == "host" and profile.memory_bandwidth_gbs > 0
    assert 1 <= profile.cores <= (os.cpu_count() or 1)
    assert 0 < profile.app_memory_bytes <= profile.total_ram_bytes
    assert profile.sources["memory_bandwidth_gbs"].startswith("measured: read of a 16 MiB buffer")
    assert write_host_profile(profile) == host_file
    assert steady(load_catalog()["host"]) == steady(profile)

    # A calibrated efficiency survives a re-probe.
    calibrated = dataclasses.replace(profile, efficiency=0.42, sources={**profile.sources, "efficiency": "measured: bench"})
    write_host_profile(calibrated)
    again = probe_host(buffer_bytes=4 * MiB, repeats=1)
    assert (again.efficiency, again.sources["efficiency"]) == (0.42, "measured: bench")


def test_host_is_probed_once_on_first_use(host_file, capsys):
    assert not host_file.exists()
    first = get_profile("host")
    err = capsys.readouterr().err
    assert "measuring this machine's memory bandwidth" in err and str(host_file) in err
    assert first.memory_bandwidth_gbs > 0 and first.sources["memory_bandwidth_gbs"].startswith("measured")
    again = get_profile("host")
    assert capsys.readouterr().err == ""  # cached: no second probe
    assert again.memory_bandwidth_gbs == first.memory_bandwidth_gbs


def test_read_bandwidth_counts_every_thread_slice():
    buffer = np.ones(4 * MiB, dtype=np.uint8)
    for threads in (1, 2, 3):
        gbs, kernel = measure_read_bandwidth(buffer, threads, repeats=2)
        assert gbs > 0 and kernel
    with pytest.raises(EdgeLlamaError, match="too small"):
        measure_read_bandwidth(np.ones(1024, dtype=np.uint8), 2)


def test_devices_package_imports_no_heavy_dependencies():
    code = ("import sys, edgellama.devices.catalog, edgellama.devices.plan, edgellama.devices.probe, edgellama.devices.cli;"
            "print(sorted({'torch', 'onnx', 'onnxruntime', 'transformers', 'coremltools'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- CLI -------------------------------------------------------------------------------------------------

def test_cli_devices_table_and_json(capsys):
    assert main(["devices"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| device") and set(lines[1]) <= set("|- ")
    assert any(line.startswith("| iphone-15-pro ") for line in lines)
    assert main(["devices", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert REQUIRED <= {d["name"] for d in listed}
    assert all(steady(profile_from_dict(d, "cli")) == steady(get_profile(d["name"], probe=False)) for d in listed)
    assert "measuring" not in capsys.readouterr().err  # listing probes nothing


def test_cli_devices_probe_writes_the_host_profile(capsys, host_file):
    assert main(["devices", "probe", "--json", "--buffer-mb", "8"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["memory_bandwidth_gbs"] > 0
    assert json.loads(host_file.read_text()) == printed
    assert main(["devices", "probe", "--buffer-mb", "8"]) == 0
    assert "| memory_bandwidth_gbs |" in capsys.readouterr().out


PLAN_KEYS = {"weights_bytes", "kv_bytes", "overhead_bytes", "total_bytes", "budget_bytes", "fits", "max_context",
             "predicted_decode_tok_s", "recommendation"}


def test_cli_plan_reads_folders_bundles_and_config_files(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf_config(LLAMA_3B)))
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "edgellama.json").write_text(json.dumps({"architecture": hf_config(LLAMA_3B)}))
    results = []
    for source in (tmp_path / "hf", tmp_path / "hf" / "config.json", tmp_path / "bundle"):
        assert main(["plan", str(source), "--device", "iphone-15-pro", "--max-context", "8192", "--json"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[0] == results[1] == results[2]
    assert PLAN_KEYS <= set(results[0])
    # int4 is priced as the quantizer would write it: its int8 parts and q/k blocks, not a uniform int4.
    from edgellama.devices.plan import WeightFormat
    from edgellama.export.config import LlamaConfig
    from edgellama.export.onnx_graph import FloatWeights
    from edgellama.quantize.onnx_weights import make_emitter, planned_summary

    emitter, _ = make_emitter(LlamaConfig.from_hf(hf_config(LLAMA_3B)), {"bits": 4}, form="fast", fallback=FloatWeights())
    record = planned_summary(emitter)
    assert len(record["int8_tensors"]) == 2 * 28 + round(0.3 * 28) + 2  # v and o everywhere, 30% of down, the table
    expected = plan(LLAMA_3B, get_profile("iphone-15-pro"), quant="int4", max_context=8192,
                    weights=WeightFormat.from_record(record, "fp32"))
    assert results[0] == expected.to_json()
    uniform = plan(LLAMA_3B, get_profile("iphone-15-pro"), quant="int4", max_context=8192)
    assert results[0]["weights_bytes"] > uniform.weights_bytes

    assert main(["plan", str(tmp_path / "hf"), "--device", "pixel-8", "--quant", "int8", "--block-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "| weights " in out and out.strip().splitlines()[-1].startswith(("fits", "does not fit"))


@pytest.mark.parametrize("argv, match", [
    (["--device", "nokia-3310"], "unknown device 'nokia-3310'"),
    (["--device", "pixel-8", "--quant", "int3"], "invalid choice"),
    (["--device", "pixel-8", "--max-context", "999999"], "max_position_embeddings"),
    (["--device", "pixel-8", "--block-size", "48"], "power of two"),
])
def test_cli_plan_errors_are_one_line(tmp_path, capsys, argv, match):
    (tmp_path / "config.json").write_text(json.dumps(hf_config(LLAMA_1B)))
    assert main(["plan", str(tmp_path), *argv]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edgellama: error: ") and match in err[0]
    assert captured.out == ""
