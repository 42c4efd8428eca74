"""LoRA adapters: merged at export (against peft's merge_and_unload), and swapped on the device through
a --lora-slots bundle (against the merged bundles), with every unsupported variant refused in one line."""

from __future__ import annotations

import collections
import copy
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgellama.errors import EdgeLlamaError
from edgellama.export.lora import MergedStore, merge_adapter, read_adapter, write_adapter_file
from edgellama.export.onnx_export import ExportOptions, export_onnx
from edgellama.export.safetensors_io import SafetensorsFile, save_file
from edgellama.export.sources import load_source
from edgellama.runtime import bundle as B
from edgellama.runtime.engine import OnnxEngine
from edgellama.runtime.generate import ChatSession, load
from edgellama.runtime.sampling import SamplingParams
from helpers import HEAVY_MODULES, assert_one_line_error, hf_logits, random_ids, run_cli, write_hf_folder

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PACKED = {"gate_up_proj": ["gate_proj", "up_proj"], "qkv_proj": ["q_proj", "k_proj", "v_proj"]}
TOL = 1e-3
CTX = 256  # the context of the shared `exported` fixture bundles, so plain and slots bundles match in everything else


def make_peft_adapter(hf, folder: Path, *, seed: int, **config):
    """Save a seeded random peft LoRA adapter of `hf` (never modified) and return peft's merged model."""
    import torch
    from peft import LoraConfig, get_peft_model

    config = {"target_modules": SEVEN, "init_lora_weights": False, **config}
    peft_model = get_peft_model(copy.deepcopy(hf), LoraConfig(**config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # peft starts B at zero; a random B makes the adapter change every logit
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
    peft_model.save_pretrained(folder)
    return peft_model.merge_and_unload().eval()


def engine_trace(bundle: Path, ids: list[int], split: int = 6, adapter: Path | None = None) -> np.ndarray:
    """Last-position logits after prefilling ids[:split], then after each further token fed one at a time."""
    if adapter is None:
        engine = OnnxEngine(bundle, B.read_manifest(bundle), max_context=64)
    else:
        engine = load(bundle, max_context=64, adapter=adapter).engine
    return trace(engine, ids, split)


def trace(engine, ids: list[int], split: int = 6) -> np.ndarray:
    engine.reset()
    rows = [engine.forward(ids[:split])]
    rows += [engine.forward([t]) for t in ids[split:]]
    return np.stack(rows)


def export(source, out: Path, **opts) -> Path:
    export_onnx(source, out, ExportOptions(max_context=CTX, verify=False, **opts), log=lambda m: None)
    return out


@dataclass
class Lora:
    base: object  # conftest.TinyModel (gqa4: GQA, tied, llama3 RoPE)
    work: Path
    adapters: dict  # rank -> (peft folder, peft merged transformers model)
    merged: dict  # rank -> merged bundle
    slots: Path  # fp32 fast bundle, --lora-slots 16
    files: dict  # rank -> adapter file for `slots`
    ids: list[int]


@pytest.fixture(scope="module")
def lora(tmp_path_factory, tiny_llama) -> Lora:
    base = tiny_llama("gqa4")
    work = tmp_path_factory.mktemp("lora")
    adapters = {8: (work / "ad8", make_peft_adapter(base.hf, work / "ad8", seed=1, r=8, lora_alpha=16)),
                16: (work / "ad16", make_peft_adapter(base.hf, work / "ad16", seed=2, r=16, lora_alpha=8,
                                                     use_rslora=True))}
    merged = {r: export(base.folder, work / f"merged{r}", adapter=str(adapters[r][0])) for r in adapters}
    slots = export(base.folder, work / "slots", lora_slots=16)
    files = {r: write_adapter_file(adapters[r][0], slots, work / f"ad{r}.safetensors").out for r in adapters}
    return Lora(base, work, adapters, merged, slots, {r: Path(f) for r, f in files.items()}, random_ids(14, seed=3))


# -- merged at export -----------------------------------------------------------------------------

@pytest.mark.parametrize("rank", [8, 16])
def test_merged_export_matches_peft_merge_and_unload(lora, exported, rank):
    folder, peft_merged = lora.adapters[rank]
    ref = hf_logits(peft_merged, lora.ids)[0, 5:]
    got = engine_trace(lora.merged[rank], lora.ids)
    np.testing.assert_allclose(got, ref, atol=TOL)
    base = engine_trace(exported("gqa4").dir, lora.ids)
    assert np.abs(got - base).max() > 0.5  # the adapter moved the logits far beyond the tolerance

    record = B.read_manifest(lora.merged[rank]).extras["adapter"]
    assert record["r"] == rank and record["targets"] == SEVEN and record["layers"] == [0, 1]
    assert record["lora_alpha"] == (16 if rank == 8 else 8) and record["use_rslora"] == (rank == 16)
    assert record["files"] == {f: B.sha256_file(folder / f) for f in ("adapter_config.json", "adapter_model.safetensors")}
    assert B.read_manifest(lora.merged[rank]).source.endswith(f"+lora:{folder.name}")


@pytest.mark.parametrize("config", [
    {"r": 8, "lora_alpha": 16, "rank_pattern": {"q_proj": 4, "down_proj": 2}, "alpha_pattern": {"v_proj": 3}},
    {"r": 4, "lora_alpha": 32, "use_rslora": True, "target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1]},
], ids=["patterns", "rslora-subset"])
def test_merged_weights_follow_peft_arithmetic(lora, tmp_path, config):
    """Per-module ranks and alphas, rsLoRA, target and layer subsets: weight for weight, as peft merges."""
    peft_merged = make_peft_adapter(lora.base.hf, tmp_path / "ad", seed=4, **config)
    adapter = read_adapter(tmp_path / "ad")
    src = merge_adapter(load_source(lora.base.folder), adapter)
    assert isinstance(src.tensors, MergedStore)
    want = {k: v.numpy() for k, v in peft_merged.state_dict().items()}
    changed, original = 0, SafetensorsFile(lora.base.folder / "model.safetensors")
    for name in src.tensors.names():
        got = src.tensors.get(name)
        np.testing.assert_allclose(got, want[name], atol=1e-6, err_msg=name)
        changed += not np.array_equal(got, original.get(name))
    assert changed == len(adapter.modules) == (14 if "rank_pattern" in config else 2)


def test_fine_tuned_full_checkpoint_is_a_source(lora, exported, tmp_path):
    """A full fine-tune is just another HF folder: its own weights are exported, not the base's."""
    _, peft_merged = lora.adapters[8]
    folder = write_hf_folder(peft_merged, lora.base.spec, tmp_path / "ft", lora.base.folder)
    bundle = export(folder, tmp_path / "bundle")
    got = engine_trace(bundle, lora.ids)
    np.testing.assert_allclose(got, hf_logits(peft_merged, lora.ids)[0, 5:], atol=TOL)
    np.testing.assert_allclose(got, engine_trace(lora.merged[8], lora.ids), atol=1e-4)
    assert np.abs(got - engine_trace(exported("gqa4").dir, lora.ids)).max() > 0.5


# -- swappable on the device ----------------------------------------------------------------------

def test_slots_without_an_adapter_are_the_plain_bundle(lora, exported):
    plain = exported("gqa4")
    np.testing.assert_allclose(engine_trace(lora.slots, lora.ids), engine_trace(plain.dir, lora.ids), rtol=0, atol=1e-6)
    m = B.read_manifest(lora.slots)
    assert m.extras["lora_slots"] == {"rank": 16, "targets": SEVEN, "groups": PACKED}
    lora_inputs = {s.name: s.shape for s in m.graph.inputs if s.name.startswith("lora.")}
    assert len(lora_inputs) == 2 * 4 * 2  # A and B, four matmul nodes (two of them packed), two layers
    assert lora_inputs["lora.1.qkv_proj.A"] == ["lora.1.qkv_proj.rank", 64]
    assert lora_inputs["lora.1.qkv_proj.B"] == [128 + 2 * 32, "lora.1.qkv_proj.rank"]
    assert lora_inputs["lora.0.down_proj.A"] == ["lora.0.down_proj.rank", 128]
    # One side path per node: an A and a B matmul and an Add, nothing else
    ops = collections.Counter(n.op_type for n in onnx.load(lora.slots / "model.onnx", load_external_data=False).graph.node
                              if "/lora/" in n.name)
    assert ops == {"FusedMatMul": 2 * 4 * 2, "Add": 4 * 2}


def test_packed_slots_hold_each_part_on_the_block_diagonal(lora):
    """A packed node's inputs are its parts' A stacked and B on the block diagonal; a part the adapter
    leaves alone takes no rank and no rows' worth of delta."""
    from edgellama.runtime.adapters import slot_feeds

    m = B.read_manifest(lora.slots)
    rng = np.random.default_rng(0)
    q = (rng.standard_normal((3, 64)).astype(np.float32), rng.standard_normal((128, 3)).astype(np.float32))
    v = (rng.standard_normal((5, 64)).astype(np.float32), rng.standard_normal((32, 5)).astype(np.float32))
    feeds = slot_feeds(m, {(1, "q_proj"): q, (1, "v_proj"): v})
    a, b = feeds["lora.1.qkv_proj.A"], feeds["lora.1.qkv_proj.B"]
    assert a.shape == (8, 64) and b.shape == (192, 8)
    x = rng.standard_normal(64).astype(np.float32)
    delta = b @ (a @ x)
    np.testing.assert_allclose(delta[:128], q[1] @ (q[0] @ x), rtol=1e-5, atol=1e-5)
    assert not delta[128:160].any()  # k
    np.testing.assert_allclose(delta[160:], v[1] @ (v[0] @ x), rtol=1e-5, atol=1e-5)
    assert feeds["lora.0.qkv_proj.A"].shape == (0, 64) and feeds["lora.1.gate_up_proj.B"].shape == (2 * 128, 0)


def test_swapped_adapters_match_the_merged_bundles(lora, exported):
    """One session, no reload: each adapter in turn gives its merged bundle's logits; None gives the base."""
    model = load(lora.slots, max_context=64)
    plain = engine_trace(exported("gqa4").dir, lora.ids)
    for rank in (8, 16, 8):
        model.set_adapter(lora.files[rank])
        assert model.adapter == f"ad{rank}"
        np.testing.assert_allclose(trace(model.engine, lora.ids), engine_trace(lora.merged[rank], lora.ids), atol=TOL)
    model.set_adapter(None)
    assert model.adapter is None
    np.testing.assert_allclose(trace(model.engine, lora.ids), plain, atol=1e-6)


def test_adapter_file_is_prescaled_and_pinned(lora):
    from edgellama.runtime.adapters import read_adapter_file

    f = read_adapter_file(lora.files[8])
    assert f.meta["rank"] == 8 and f.meta["slots"] == 16 and f.targets == SEVEN
    assert f.meta["base"]["graph_sha256"] == B.read_manifest(lora.slots).files["model.onnx"]
    assert f.meta["adapter"] == B.read_manifest(lora.merged[8]).extras["adapter"]
    adapter = read_adapter(lora.adapters[8][0])
    a, b = f.tensors[(1, "gate_proj")]
    m = adapter.modules[(1, "gate_proj")]
    assert a.shape == (8, 64) and b.shape == (128, 8)  # the adapter's own rank: the graph's rank is symbolic
    np.testing.assert_allclose(b @ a, m.delta(), atol=1e-6)  # the LoRA scale is folded into B
    assert m.scale == 16 / 8


def test_partial_targets_and_packed_parts(lora, tmp_path):
    """Portable graph, slots asked for q and v: the packed qkv node gets slots for all three parts, and an
    adapter of q and v alone leaves k's rank-0 side path adding nothing."""
    folder = tmp_path / "qv"
    peft_merged = make_peft_adapter(lora.base.hf, folder, seed=5, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    bundle = export(lora.base.folder, tmp_path / "portable", form="portable", lora_slots=8, lora_targets=["q", "v"])
    assert B.read_manifest(bundle).extras["lora_slots"] == {"rank": 8, "targets": ["q_proj", "k_proj", "v_proj"],
                                                            "groups": {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}}
    out = write_adapter_file(folder, bundle, tmp_path / "qv.safetensors").out
    got = engine_trace(bundle, lora.ids, adapter=Path(out))
    np.testing.assert_allclose(got, hf_logits(peft_merged, lora.ids)[0, 5:], atol=TOL)
    with pytest.raises(EdgeLlamaError, match="adapts o_proj, gate_proj, up_proj, down_proj, which the base bundle "
                                             "has no LoRA slots for"):
        write_adapter_file(lora.adapters[8][0], bundle, tmp_path / "full.safetensors")


def test_quantized_base_takes_adapters(lora, exported, tmp_path):
    """int4 base weights keep their MatMulNBits; the adapter rides on top in float32."""
    # The quickest search, and no smoothing (tested on its own below): the plain and slots bundles
    # then hold the same codes, so without an adapter they match to the bit. What is tested is the graph.
    q = {"bits": 4, "method": "rtn", "smooth": False}
    plain = export(lora.base.folder, tmp_path / "int4", quant=q)
    slots = export(lora.base.folder, tmp_path / "int4-slots", quant=q, lora_slots=8)
    np.testing.assert_allclose(engine_trace(slots, lora.ids), engine_trace(plain, lora.ids), rtol=0, atol=1e-6)
    m = B.read_manifest(slots)
    assert m.quantization["tensors_by_precision"] == B.read_manifest(plain).quantization["tensors_by_precision"]
    out = Path(write_adapter_file(lora.adapters[8][0], slots, tmp_path / "ad8.safetensors").out)
    int4, int4_adapted = engine_trace(slots, lora.ids), engine_trace(slots, lora.ids, adapter=out)
    plain_fp32, merged_fp32 = engine_trace(exported("gqa4").dir, lora.ids), engine_trace(lora.merged[8], lora.ids)
    quant_error = np.abs(int4 - plain_fp32).mean()
    # int4 + adapter is as near the float merged model as int4 is to the float base: the adapter adds no
    # error of its own; without it the int4 bundle is much further from the merged model.
    assert np.abs(int4_adapted - merged_fp32).mean() < 1.25 * quant_error
    assert np.abs(int4 - merged_fp32).mean() > 2.5 * quant_error
    with pytest.raises(EdgeLlamaError, match="rank 16, more than the base bundle's 8 LoRA slots"):
        write_adapter_file(lora.adapters[16][0], slots, tmp_path / "ad16.safetensors")
    # Files are pinned to the exact base graph: the fp32 bundle's file does not load on the int4 one.
    with pytest.raises(EdgeLlamaError, match="made for another base bundle"):
        load(slots, max_context=16, adapter=lora.files[8])


def test_adapter_pins_the_weights_file_too(lora):
    """An external-data bundle's graph file holds offsets, not weights: the same graph over another
    checkpoint's weights is another base, and the adapter says so."""
    from dataclasses import replace

    from edgellama.runtime.adapters import check_adapter, read_adapter_file

    f = read_adapter_file(lora.files[8])
    m = B.read_manifest(lora.slots)
    assert f.meta["base"]["weights_sha256"] is None and B.ONNX_DATA not in m.files  # a one-file bundle
    check_adapter(f, m)
    other = replace(m, files={**m.files, B.ONNX_DATA: "0" * 64})
    with pytest.raises(EdgeLlamaError, match="made for another base bundle \\(its weights file differs\\)"):
        check_adapter(f, other)


def test_switching_adapters_mid_chat_recomputes_the_conversation(lora):
    params = SamplingParams(max_new_tokens=6)
    model = load(lora.slots, max_context=128, adapter=lora.files[8])
    chat = ChatSession(model, params=params)
    chat.say("Hello there, who are you?")
    history = copy.deepcopy(chat.messages)
    assert [m["role"] for m in history] == ["user", "assistant"]
    chat.set_adapter(lora.files[16])
    second = [e.token_id for e in chat.send("Tell me more.")]

    fresh_model = load(lora.slots, max_context=128, adapter=lora.files[16])
    fresh = ChatSession(fresh_model, params=params)
    fresh.messages = copy.deepcopy(history)
    assert [e.token_id for e in fresh.send("Tell me more.")] == second
    assert model.engine.pos == fresh_model.engine.pos

    # The switch mattered: the same conversation continued under the first adapter answers otherwise.
    chat.rewind()
    chat.set_adapter(lora.files[8])
    assert [e.token_id for e in chat.send("Tell me more.")] != second


def test_cli_adapter_and_run(lora, tmp_path, capsys):
    out = tmp_path / "ad16.safetensors"
    r = run_cli(["adapter", lora.adapters[16][0], "--base", lora.slots, "-o", out], capsys)
    assert r.code == 0, r.err
    assert out.read_bytes() == lora.files[16].read_bytes()  # deterministic: the library wrote the same file
    r = run_cli(["run", lora.slots, "--adapter", out, "-p", "The capital of France is", "--max-new-tokens", "5",
                 "--json", "--max-context", "64"], capsys)
    assert r.code == 0, r.err
    got = json.loads(r.out)
    model = load(lora.merged[16], max_context=64)
    logits = model.engine.forward(got["prompt_token_ids"])
    want = []
    for _ in range(len(got["token_ids"])):
        want.append(int(logits.argmax()))
        logits = model.engine.forward([want[-1]])
    assert got["token_ids"] == want


def test_onnx_adapter_format_runs_in_onnxruntime_genai(lora, tmp_path):
    import onnxruntime_genai as og  # dev extra: fail, never skip
    out = Path(write_adapter_file(lora.adapters[8][0], lora.slots, tmp_path / "ad8.onnx_adapter",
                                  fmt="onnx_adapter").out)
    prompt = lora.ids[:6]
    model = load(lora.slots, max_context=64, adapter=lora.files[8])
    logits = model.engine.forward(prompt)
    first, ours = logits.copy(), []
    for _ in range(8):
        ours.append(int(logits.argmax()))
        logits = model.engine.forward([ours[-1]])

    og_model = og.Model(str(lora.slots))
    adapters = og.Adapters(og_model)
    adapters.load(str(out), "ad8")
    params = og.GeneratorParams(og_model)
    params.set_search_options(max_length=64, do_sample=False)
    gen = og.Generator(og_model, params)
    gen.set_active_adapter(adapters, "ad8")
    gen.append_tokens(prompt)
    np.testing.assert_allclose(np.asarray(gen.get_output("logits")).reshape(-1), first, atol=TOL)
    theirs = []
    while len(theirs) < len(ours) and not gen.is_done():
        gen.generate_next_token()
        theirs.append(int(gen.get_next_tokens()[0]))
    assert theirs == ours[: len(theirs)] and len(theirs) >= 4


def test_loading_an_adapter_imports_no_heavy_module(lora):
    code = (f"import json, sys; from edgellama.runtime.generate import load; "
            f"m = load({str(lora.slots)!r}, max_context=16, adapter={str(lora.files[8])!r}); m.engine.forward([1, 2]); "
            f"print(json.dumps(sorted(k for k in sys.modules if k.split('.')[0] in {set(HEAVY_MODULES)!r})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


# -- refusals ----------------------------------------------------------------------------------------

def _edit_config(folder: Path, **changes):
    path = folder / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def _add_tensor(folder: Path, key: str, shape):
    st = SafetensorsFile(folder / "adapter_model.safetensors")
    tensors = {k: st.get(k) for k in st.keys()}
    tensors[key] = np.zeros(shape, np.float32)
    del st
    save_file(tensors, folder / "adapter_model.safetensors")


BAD_ADAPTERS = {
    "dora": (lambda d: _edit_config(d, use_dora=True), "DoRA"),
    "modules_to_save": (lambda d: _edit_config(d, modules_to_save=["lm_head"]), "modules_to_save"),
    "bias": (lambda d: _edit_config(d, bias="lora_only"), "bias='none'"),
    "fan_in_fan_out": (lambda d: _edit_config(d, fan_in_fan_out=True), "fan_in_fan_out"),
    "ia3": (lambda d: _edit_config(d, peft_type="IA3"), "LoRA adapters only"),
    "pissa": (lambda d: _edit_config(d, init_lora_weights="pissa"), "rewrites the base weights"),
    "rank_pattern": (lambda d: _edit_config(d, rank_pattern={"q_proj": 4}), "rank_pattern"),
    "embedding": (lambda d: _add_tensor(d, "base_model.model.model.embed_tokens.lora_embedding_A", (8, 128256)),
                  "embed_tokens is not supported"),
    "lm_head": (lambda d: _add_tensor(d, "base_model.model.lm_head.lora_A.weight", (8, 64)), "lm_head is not supported"),
    "dora_tensor": (lambda d: _add_tensor(d, "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
                                          (128,)), "DoRA"),
    "no_weights": (lambda d: (d / "adapter_model.safetensors").unlink(), "no adapter_model.safetensors"),
    "pickle": (lambda d: (d / "adapter_model.safetensors").rename(d / "adapter_model.bin"), "never unpickles"),
    "no_config": (lambda d: (d / "adapter_config.json").unlink(), "adapter_config.json is missing"),
    "wrong_base": (lambda d: _add_tensor(d, "base_model.model.model.layers.5.mlp.up_proj.lora_A.weight", (8, 64))
                   or _add_tensor(d, "base_model.model.model.layers.5.mlp.up_proj.lora_B.weight", (128, 8)),
                   "adapts layer 5, but the base model has 2 layers"),
    "wrong_shapes": (lambda d: _add_tensor(d, "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight", (8, 96)),
                     "maps 96 -> 128 features, the base 64 -> 128"),
}


@pytest.mark.parametrize("case", sorted(BAD_ADAPTERS))
def test_bad_adapters_are_refused(lora, tmp_path, case):
    edit, fragment = BAD_ADAPTERS[case]
    folder = shutil.copytree(lora.adapters[8][0], tmp_path / "bad")
    edit(folder)
    with pytest.raises(EdgeLlamaError, match=None) as exc:
        merge_adapter(load_source(lora.base.folder), folder) if case.startswith("wrong") else read_adapter(folder)
    assert fragment in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("case", ["dora", "wrong_shapes"])
def test_cli_export_refuses_bad_adapters(lora, tmp_path, capsys, case):
    edit, fragment = BAD_ADAPTERS[case]
    folder = shutil.copytree(lora.adapters[8][0], tmp_path / "bad")
    edit(folder)
    r = run_cli(["export", lora.base.folder, "-o", tmp_path / "out", "--adapter", folder, "--no-verify"], capsys)
    assert r.code == 2
    assert_one_line_error(r.err, fragment)
    assert not (tmp_path / "out").exists()


def test_bad_adapter_files_are_refused(lora, exported, tmp_path):
    from edgellama.runtime.adapters import check_adapter, read_adapter_file

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(lora.files[8].read_bytes()[:5000])
    for path, fragment in ((truncated, "not an edgellama adapter file"), (lora.adapters[8][0], "is a folder"),
                           (lora.adapters[8][0] / "adapter_model.safetensors", "no edgellama.adapter metadata")):
        with pytest.raises(EdgeLlamaError, match=fragment):
            read_adapter_file(path)
    for bundle in (exported("gqa4").dir, lora.merged[8]):
        with pytest.raises(EdgeLlamaError, match="this bundle has no LoRA slots"):
            check_adapter(read_adapter_file(lora.files[8]), B.read_manifest(bundle))


def test_cli_refuses_bad_adapter_files(lora, exported, tmp_path, capsys):
    cases = []
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(lora.files[8].read_bytes()[:5000])
    cases.append((["run", lora.slots, "--adapter", tmp_path / "missing.safetensors"], "not found"))
    cases.append((["run", lora.slots, "--adapter", truncated], "not an edgellama adapter file"))
    cases.append((["run", exported("gqa4").dir, "--adapter", lora.files[8]], "no LoRA slots"))
    cases.append((["adapter", lora.adapters[8][0], "--base", exported("gqa4").dir, "-o", tmp_path / "x"],
                  "has no LoRA slots"))
    cases.append((["adapter", lora.adapters[8][0], "--base", lora.slots, "-o", lora.files[8]], "already exists"))
    cases.append((["export", lora.base.folder, "-o", tmp_path / "o", "--lora-slots", "0", "--lora-targets", "q"],
                  "--lora-targets needs --lora-slots"))
    cases.append((["export", lora.base.folder, "-o", tmp_path / "o", "--lora-slots", "4", "--lora-targets", "qq"],
                  "unknown projection"))
    for argv, fragment in cases:
        r = run_cli([*argv, "-p", "hi"] if argv[0] == "run" else argv, capsys)
        assert r.code == 2, (argv, r.err)
        assert_one_line_error(r.err, fragment)


# -- SmolLM2 ------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("rank", [8, 16])
def test_smollm2_merged_and_swapped_match_peft(tmp_path_factory, rank):
    """The real SmolLM2-135M (from the GGUF alias, written out as an HF folder for peft)."""
    import torch
    from transformers import LlamaForCausalLM

    work = tmp_path_factory.mktemp(f"smol{rank}")
    src = load_source("smollm2-135m-instruct")
    folder = work / "hf"
    folder.mkdir()
    save_file({n: src.tensors.get(n) for n in src.tensors.names()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({**src.config.to_hf(), "torch_dtype": "float32"}))
    hf = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    peft_merged = make_peft_adapter(hf, work / "ad", seed=rank, r=rank, lora_alpha=2 * rank)
    ids = random_ids(16, seed=rank, vocab=49152)
    ref = hf_logits(peft_merged, ids)[0, 5:]

    merged = work / "merged"
    export_onnx(src, merged, ExportOptions(max_context=64, verify=False, adapter=str(work / "ad")), log=lambda m: None)
    np.testing.assert_allclose(engine_trace(merged, ids), ref, atol=TOL)
    slots = work / "slots"
    export_onnx(src, slots, ExportOptions(max_context=64, verify=False, lora_slots=16), log=lambda m: None)
    out = Path(write_adapter_file(work / "ad", slots, work / "ad.safetensors").out)
    np.testing.assert_allclose(engine_trace(slots, ids, adapter=out), engine_trace(merged, ids), atol=TOL)


def test_smoothed_slots_bundle_folds_its_scales_into_adapters(lora, exported, tmp_path):
    """A quantized slots bundle is smoothed like a plain one; adapter files carry A diag(s) for it."""
    from edgellama.export.lora import adapter_tensors
    from edgellama.export.lora_slots import INPUT_SCALES_FILE

    slots = export(lora.base.folder, tmp_path / "int8-slots", quant={"bits": 8}, lora_slots=8)
    m = B.read_manifest(slots)
    assert m.quantization["smoothing"]["groups"] > 0
    assert m.extras["lora_slots"]["input_scales"] == INPUT_SCALES_FILE and INPUT_SCALES_FILE in m.files
    scales = SafetensorsFile(slots / INPUT_SCALES_FILE)
    n = lora.base.hf.config.num_hidden_layers
    want = {f"{i}.{p}" for i in range(n) for p in SEVEN if p != "o_proj"}  # o_proj's input is not smoothed
    # down_proj's scales divide up_proj's rows, so up_proj's delta must be divided too
    assert set(scales.keys()) == {f"{k}.in" for k in want} | {f"{i}.up_proj.out" for i in range(n)}
    out = Path(write_adapter_file(lora.adapters[8][0], slots, tmp_path / "ad8.safetensors").out)
    raw = adapter_tensors(read_adapter(lora.adapters[8][0]))
    f = SafetensorsFile(out)
    s = scales.get("0.q_proj.in")
    assert np.ptp(s) > 0.1  # the scales are not all one: the test below can tell folded from not
    np.testing.assert_allclose(f.get("lora.0.q_proj.A"), raw[(0, "q_proj")][0] * s[None, :], rtol=1e-6)
    np.testing.assert_array_equal(f.get("lora.0.o_proj.A"), raw[(0, "o_proj")][0])
    np.testing.assert_allclose(f.get("lora.0.up_proj.B"), raw[(0, "up_proj")][1] / scales.get("0.up_proj.out")[:, None],
                               rtol=1e-6)
    # End to end: int8 + adapter is as near the float merged model as int8 is to the float base,
    # and the same adapter without the scales folded in is clearly further.
    unfolded = tmp_path / "unfolded.safetensors"
    have = set(scales.keys())

    def unfold(k: str) -> np.ndarray:
        key, which = k[len("lora."):-2], k[-1]
        if which == "A" and f"{key}.in" in have:
            return f.get(k) / scales.get(f"{key}.in")[None, :]
        if which == "B" and f"{key}.out" in have:
            return f.get(k) * scales.get(f"{key}.out")[:, None]
        return f.get(k)

    save_file({k: unfold(k) for k in f.keys()}, unfolded, metadata=f.metadata)
    base8, plain_fp32 = engine_trace(slots, lora.ids), engine_trace(exported("gqa4").dir, lora.ids)
    merged_fp32 = engine_trace(lora.merged[8], lora.ids)
    quant_error = np.abs(base8 - plain_fp32).mean()
    folded_error = np.abs(engine_trace(slots, lora.ids, adapter=out) - merged_fp32).mean()
    unfolded_error = np.abs(engine_trace(slots, lora.ids, adapter=unfolded) - merged_fp32).mean()
    assert folded_error < 1.5 * quant_error
    assert unfolded_error > 2.5 * folded_error
    (slots / INPUT_SCALES_FILE).unlink()
    with pytest.raises(EdgeLlamaError, match="missing lora_input_scales.safetensors"):
        write_adapter_file(lora.adapters[8][0], slots, tmp_path / "again.safetensors")
