"""Core ML export, verified on Linux: the saved programs are replayed in numpy (coreml_replay.py)
and compared with the torch model; their interface and op set are checked against the target."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from coreml_replay import Replay, affine_dequantize, blockwise_shift_scale, lut_to_dense
from safetensors.numpy import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

from edgellama.cli import main
from edgellama.errors import EdgeLlamaError
from edgellama.export import coreml_export as CE
from edgellama.export.config import LlamaConfig
from edgellama.export.model import Llama
from edgellama.export.sources import load_source
from edgellama.runtime.bundle import read_manifest
from edgellama.runtime.coreml_engine import CoreMLEngine

CTX = 64
PROMPT = [0, 17, 512, 3, 999, 42, 7, 256]
TINY = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=1000, head_dim=16, max_position_embeddings=128,
                   tie_word_embeddings=True, bos_token_id=0, eos_token_id=[1])


def write_checkpoint(folder: Path, cfg: LlamaConfig = TINY, seed: int = 0) -> Path:
    """A random Llama as a Hugging Face folder, with a word-level tokenizer over its vocabulary."""
    folder.mkdir(parents=True)
    torch.manual_seed(seed)
    state = {k: v.detach().numpy().copy() for k, v in Llama(cfg).state_dict().items()}
    rng = np.random.default_rng(seed)
    for name in state:  # norms at 1 would let a dropped RMSNorm weight go unnoticed
        if name.endswith("norm.weight"):
            state[name] = rng.uniform(0.5, 1.5, state[name].shape).astype(np.float32)
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(cfg.to_hf()))
    words = ["<|begin_of_text|>", "<|eot_id|>", "<unk>"] + [f"w{i}" for i in range(cfg.vocab_size - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    (folder / "tokenizer.json").write_text(tok.to_str())
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}))
    return folder


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("coreml") / "tiny")


@pytest.fixture(scope="module")
def model(ckpt) -> Llama:
    return Llama.from_source(load_source(ckpt))


@pytest.fixture(scope="module")
def fp16_bundle(ckpt) -> Path:
    out = ckpt.parent / "fp16"
    assert main(["export", str(ckpt), "--format", "coreml", "-o", str(out), "--max-context", str(CTX)]) == 0
    return out


@pytest.fixture(scope="module")
def int4_bundle(ckpt) -> Path:
    out = ckpt.parent / "int4"
    CE.export_coreml(ckpt, out, CE.CoreMLOptions(max_context=CTX, quant={"bits": 4}), log=lambda m: None)
    return out


@pytest.fixture(scope="module")
def stateless_int8_bundle(ckpt) -> Path:
    out = ckpt.parent / "stateless-int8"
    CE.export_coreml(ckpt, out, CE.CoreMLOptions(stateful=False, max_context=CTX, quant={"bits": 8}), log=lambda m: None)
    return out


def engine(bundle: Path, package: Path | None = None) -> CoreMLEngine:
    return CoreMLEngine(bundle, read_manifest(bundle), backend=Replay(package or bundle / "model.mlpackage"))


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def compare(eng: CoreMLEngine, ref: Llama, steps: int = 5) -> list[float]:
    """Cosines of replay vs torch logits: every prefill position, then `steps` decode steps on torch's greedy tokens."""
    got = eng.forward(PROMPT, all_logits=True)
    with torch.no_grad():
        want, past = ref(torch.tensor([PROMPT]))
    cos = [cosine(g, w) for g, w in zip(got, want[0].numpy())]
    for _ in range(steps):
        token = int(want[0, -1].argmax())
        got = eng.forward([token])
        with torch.no_grad():
            want, past = ref(torch.tensor([[token]]), past=past)
        cos.append(cosine(got, want[0, -1].numpy()))
    return cos


def program_var(param: str) -> str:
    """The var a compressed torch parameter becomes in the converted program (the wrapper holds the model as `llama`)."""
    return "llama_" + param.replace(".", "_") + "_to_fp16_quantized"


def dequantized_torch(model: Llama, replay: Replay) -> tuple[Llama, int]:
    """A copy of the torch model carrying the weights the compressed program decodes to."""
    clone = Llama(model.config)
    clone.load_state_dict(model.state_dict())
    produced = {op.outputs[0].name: op.op_type for op in replay.function.operations}
    swapped = 0
    for name, p in clone.named_parameters():
        var = program_var(name)
        if p.ndim == 2:
            assert produced.get(var, "").startswith("constexpr_"), f"{name} is not compressed in the program"
            p.data = torch.from_numpy(replay.weight(var).astype(np.float32))
            swapped += 1
    return clone.eval(), swapped


# --- the default, stateful bundle ------------------------------------------------------------------------

def test_bundle_holds_package_tokenizer_and_checksummed_manifest(fp16_bundle, tmp_path):
    m = read_manifest(fp16_bundle)  # verifies every sha256
    assert (m.graph.kind, m.graph.form, m.graph.file) == ("coreml", "coreml-stateful", "model.mlpackage")
    assert m.dtype == "fp16" and m.context_length == CTX and m.quantization is None
    package_files = {p.relative_to(fp16_bundle).as_posix() for p in (fp16_bundle / "model.mlpackage").rglob("*") if p.is_file()}
    assert len(package_files) >= 3 and package_files <= set(m.files)
    assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= set(m.files)
    assert m.extras["verification"]["max_abs_logit_diff"] < 0.05 and m.extras["verification"]["greedy_agreement"] == 1.0
    copy = tmp_path / "b"
    shutil.copytree(fp16_bundle, copy)
    weights = next(p for p in (copy / "model.mlpackage").rglob("weight.bin"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x01")
    with pytest.raises(EdgeLlamaError, match="weight.bin is corrupt"):
        read_manifest(copy)


def test_stateful_spec_is_what_swift_transformers_loads(fp16_bundle):
    spec = Replay(fp16_bundle / "model.mlpackage").spec
    d = spec.description
    assert spec.specificationVersion == 9  # iOS 18 / macOS 15: the first with states
    assert [f.name for f in d.input] == ["inputIds", "causalMask"]
    assert [f.name for f in d.output] == ["logits"] and [f.name for f in d.state] == ["keyCache", "valueCache"]
    ids, mask = d.input
    assert ids.type.multiArrayType.dataType == ids.type.multiArrayType.INT32
    assert [(r.lowerBound, r.upperBound) for r in ids.type.multiArrayType.shapeRange.sizeRanges] == [(1, 1), (1, CTX)]
    assert mask.type.multiArrayType.dataType == mask.type.multiArrayType.FLOAT16
    assert [(r.lowerBound, r.upperBound) for r in mask.type.multiArrayType.shapeRange.sizeRanges] == \
        [(1, 1), (1, 1), (1, CTX), (1, CTX)]
    for state in d.state:
        arr = state.type.stateType.arrayType
        assert list(arr.shape) == [2, 1, 2, CTX, 16] and arr.dataType == arr.FLOAT16
    ops = CE.program_op_types(spec)
    assert "scaled_dot_product_attention" in ops  # fused: the graph passes no scale=
    assert {"read_state", "write_state", "slice_update"} <= ops
    assert CE.check_program(spec, True, TINY, CTX) == []
    # The same check fails where it should: iOS 17 has neither states nor the fused attention.
    problems = " ".join(CE.check_program(spec, False, TINY, CTX))
    assert "scaled_dot_product_attention" in problems and "keyCache" in problems


def test_fp16_replay_matches_torch_over_prefill_and_decode(fp16_bundle, model):
    cos = compare(engine(fp16_bundle), model)
    assert len(cos) == len(PROMPT) + 5 and min(cos) >= 0.9999


def test_fp16_greedy_tokens_equal_torch_over_16_steps(fp16_bundle, model):
    eng = engine(fp16_bundle)
    logits = eng.forward(PROMPT)
    mine, ref = [], []
    with torch.no_grad():
        out, past = model(torch.tensor([PROMPT]))
        for _ in range(16):
            mine.append(int(logits.argmax()))
            ref.append(int(out[0, -1].argmax()))
            logits = eng.forward([mine[-1]])
            out, past = model(torch.tensor([[ref[-1]]]), past=past)
    assert mine == ref and eng.pos == len(PROMPT) + 16


def test_engine_rewind_reset_and_context_limit(fp16_bundle):
    eng = engine(fp16_bundle)
    first = eng.forward(PROMPT)
    eng.forward([5, 6, 7])
    eng.rewind(len(PROMPT) - 1)  # stale rows beyond the position must be masked, then overwritten
    assert np.allclose(eng.forward(PROMPT[-1:]), first, atol=2e-3)
    eng.reset()
    assert eng.pos == 0 and np.allclose(eng.forward(PROMPT), first, atol=2e-3)
    with pytest.raises(EdgeLlamaError, match="cannot rewind"):
        eng.rewind(eng.pos + 1)
    with pytest.raises(EdgeLlamaError, match="context is full"):
        eng.forward([3] * (CTX - eng.pos + 1))


def test_engine_refuses_off_macos_and_says_what_was_checked(fp16_bundle, monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    with pytest.raises(EdgeLlamaError) as err:
        CoreMLEngine(fp16_bundle, read_manifest(fp16_bundle))
    msg = str(err.value)
    assert "macOS" in msg and "torch wrapper" in msg and "iOS18 op set" in msg and "\n" not in msg


def test_runtime_never_imports_coremltools_or_torch():
    code = ("import sys, edgellama.runtime.coreml_engine; "
            "bad = [m for m in ('coremltools', 'torch', 'transformers', 'onnx') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_export_is_deterministic(ckpt, fp16_bundle, tmp_path):
    again = tmp_path / "again"
    CE.export_coreml(ckpt, again, CE.CoreMLOptions(max_context=CTX), log=lambda m: None)
    assert read_manifest(again).files == read_manifest(fp16_bundle).files


# --- compression ---------------------------------------------------------------------------------------------

def smoothed_model(ckpt) -> tuple[Llama, object]:
    """The torch model the int4 program was traced from (smoothing folded in), and the quantizer's policy."""
    plan = CE.quant_plan({"bits": 4}, stateful=True)
    src, em = CE.int4_weights(load_source(ckpt), plan, log=lambda m: None)
    return Llama.from_source(src), (src, em)


def test_int4_holds_the_onnx_default_quantizer_s_tensors(int4_bundle, fp16_bundle, ckpt):
    """Every matrix becomes a constexpr of exactly the codes, scales and offsets our quantizer gives it:
    asymmetric int4 (uint4 codes and offsets) in blocks of 32, q/k in blocks of 16, symmetric int8 for
    v/o, the tied table and the heaviest-tailed down_proj."""
    from coremltools.converters.mil.mil import types

    replay = Replay(int4_bundle / "model.mlpackage")
    model, (src, em) = smoothed_model(ckpt)
    seen, int8 = 0, set()
    for op in replay.function.operations:
        if op.op_type != "constexpr_blockwise_shift_scale":
            continue
        var = op.outputs[0].name
        name = next(n[: -len(".weight")] for n, p in model.named_parameters() if program_var(n) == var)
        qt = em.quantize_tensor(name, src.tensors.get(name + ".weight"))
        data, scale, offset = op.inputs["data"], op.inputs["scale"], op.inputs.get("offset")
        n, k = data.shape
        assert tuple(scale.shape) == (n, k // qt.block_size)
        if qt.bits == 4:
            assert data.dtype == types.uint4 and offset is not None and offset.dtype == types.uint4
            assert np.array_equal(data.val, qt.codes[:, :k]) and np.array_equal(offset.val, qt.zero_points)
            assert qt.block_size == (16 if name.endswith(("q_proj", "k_proj")) else 32)
        else:
            assert data.dtype == types.int8 and offset is None and qt.block_size == 32
            assert np.array_equal(data.val.astype(np.int16) + 128, qt.codes[:, :k])
            int8.add(name.rsplit(".", 1)[-1])
        assert np.array_equal(scale.val, qt.scales.astype(np.float16))
        decoded = replay.weight(var)
        assert np.array_equal(decoded, op.materialized_val_inference())  # our decoder == coremltools'
        assert np.allclose(decoded, qt.dequantize(), rtol=2e-3, atol=1e-6)  # fp16 rounding only
        seen += 1
    assert seen == 1 + 7 * TINY.num_hidden_layers  # tied embedding + every projection, K/V too
    assert {"embed_tokens", "v_proj", "o_proj"} <= int8 and "q_proj" not in int8
    m = read_manifest(int4_bundle)
    q = m.quantization
    assert q["bits"] == 4 and q["method"] == "mixed" and q["tensors"] == seen and q["smoothing"]["groups"] > 0
    assert q["calibration"].startswith("random") and q["qk_block_size"] == 16
    assert (q["embeddings"], q["scale_dtype"], q["activation"]) == ("int8", "float16", "fp16")
    size = lambda b: next((b / "model.mlpackage").rglob("weight.bin")).stat().st_size
    assert size(int4_bundle) < 0.5 * size(fp16_bundle)


def test_int4_program_equals_torch_with_its_dequantized_weights(int4_bundle, fp16_bundle, ckpt, model):
    replay = Replay(int4_bundle / "model.mlpackage")
    smoothed, _ = smoothed_model(ckpt)
    assert min(compare(engine(fp16_bundle), smoothed)) >= 0.9999  # smoothing keeps the function
    ref, swapped = dequantized_torch(smoothed, replay)
    assert swapped == 1 + 7 * TINY.num_hidden_layers
    cos = compare(CoreMLEngine(int4_bundle, read_manifest(int4_bundle), backend=replay), ref)
    assert min(cos) >= 0.9999
    assert min(compare(engine(int4_bundle), model)) < 0.9999  # the weights did change: int4 is lossy


def test_int4_takes_calib_text_and_no_smooth(ckpt, model, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"w{i % 900}" for i in range(0, 5000, 7)))
    calibrated = tmp_path / "calibrated"
    assert main(["export", str(ckpt), "--format", "coreml", "-o", str(calibrated), "--max-context", str(CTX),
                 "--quant", "int4", "--calib", str(text)]) == 0
    q = read_manifest(calibrated).quantization
    assert q["calibration"] == "calib.txt" and q["smoothing"]["groups"] > 0 and "calib" not in q
    plain = tmp_path / "plain"
    assert main(["export", str(ckpt), "--format", "coreml", "-o", str(plain), "--max-context", str(CTX),
                 "--quant", "int4", "--no-smooth"]) == 0
    q = read_manifest(plain).quantization
    assert q["calibration"] is None and q["smoothing"] is None and q["int8_tensors"]
    replay = Replay(plain / "model.mlpackage")
    ref, _ = dequantized_torch(model, replay)  # unsmoothed: the original norms
    assert min(compare(CoreMLEngine(plain, read_manifest(plain), backend=replay), ref)) >= 0.9999


def test_int4_rtn_is_coremltools_linear_symmetric_on_every_matrix(ckpt, model, tmp_path):
    """`--method rtn`: the smaller, less faithful int4 (every matrix int4, symmetric, blocks of 32)."""
    from coremltools.converters.mil.mil import types

    out = tmp_path / "rtn"
    assert main(["export", str(ckpt), "--format", "coreml", "-o", str(out), "--max-context", str(CTX),
                 "--quant", "int4", "--method", "rtn"]) == 0
    plan = read_manifest(out).quantization
    assert plan["method"] == "rtn" and plan["symmetric"] and plan["block_size"] == 32 and "smoothing" not in plan
    replay = Replay(out / "model.mlpackage")
    weights = {program_var(n): p.detach().numpy() for n, p in model.named_parameters() if p.ndim == 2}
    seen = 0
    for op in replay.function.operations:
        if op.op_type != "constexpr_blockwise_shift_scale":
            continue
        data, scale = op.inputs["data"], op.inputs["scale"]
        assert data.dtype == types.int4 and op.inputs.get("offset") is None  # linear symmetric
        n, k = data.shape
        assert tuple(scale.shape) == (n, k // 32)
        decoded = replay.weight(op.outputs[0].name)
        original = weights[op.outputs[0].name]
        step = np.repeat(scale.val.astype(np.float32), 32, axis=1)
        assert np.all(np.abs(decoded - original) <= step / 2 + np.abs(original) * 2e-3 + 1e-6)  # round to nearest
        seen += 1
    assert seen == len(weights) == plan["tensors"] == 1 + 7 * TINY.num_hidden_layers


def test_int8_per_channel_on_ios18(fp16_bundle, model, tmp_path):
    import coremltools as ct

    plan = CE.quant_plan({"bits": 8}, stateful=True)
    assert plan["granularity"] == "per_channel"
    package = tmp_path / "int8.mlpackage"
    CE.compress(ct.models.MLModel(str(fp16_bundle / "model.mlpackage"), skip_model_load=True), plan).save(str(package))
    replay = Replay(package)
    shifts = [op for op in replay.function.operations if op.op_type == "constexpr_blockwise_shift_scale"]
    assert len(shifts) == plan["tensors"] == 15
    assert all(op.inputs["scale"].shape[1] == 1 for op in shifts)  # one scale per output channel
    ref, _ = dequantized_torch(model, replay)
    assert min(compare(CoreMLEngine(fp16_bundle, read_manifest(fp16_bundle), backend=replay), ref)) >= 0.9999


def test_stateless_int8_runs_kv_in_kv_out_on_ios17(stateless_int8_bundle, model):
    replay = Replay(stateless_int8_bundle / "model.mlpackage")
    spec = replay.spec
    assert spec.specificationVersion == 8  # iOS 17 / macOS 14
    d = spec.description
    assert [f.name for f in d.input] == ["inputIds", "causalMask", "keyCache", "valueCache"]
    assert [f.name for f in d.output] == ["logits", "presentKeys", "presentValues"] and not d.state
    assert list(d.input[2].type.multiArrayType.shape) == [2, 1, 2, CTX, 16]
    assert CE.check_program(spec, False, TINY, CTX) == []
    assert "constexpr_affine_dequantize" in replay.op_types and "scaled_dot_product_attention" not in replay.op_types
    m = read_manifest(stateless_int8_bundle)
    assert m.graph.form == "coreml-stateless" and [s.name for s in m.graph.outputs][1:] == ["presentKeys", "presentValues"]
    ref, swapped = dequantized_torch(model, replay)
    assert swapped == 15
    assert min(compare(CoreMLEngine(stateless_int8_bundle, m, backend=replay), ref)) >= 0.9999


# --- the replay itself, against coremltools' own numpy code ----------------------------------------------

def test_replay_numpy_ops_equal_coremltools_value_inference(fp16_bundle, stateless_int8_bundle):
    for bundle in (fp16_bundle, stateless_int8_bundle):
        outs = []
        for fast in (True, False):
            eng = CoreMLEngine(bundle, read_manifest(bundle), backend=Replay(bundle / "model.mlpackage", fast=fast))
            outs.append(eng.forward(PROMPT[:4], all_logits=True))
        assert np.array_equal(outs[0], outs[1])


def test_replay_decoders_match_coremltools():
    from coremltools.converters.mil.mil.ops.defs.iOS16.constexpr_ops import constexpr_affine_dequantize
    from coremltools.converters.mil.mil.ops.defs.iOS18.compression import (
        constexpr_blockwise_shift_scale,
        constexpr_lut_to_dense,
    )

    rng = np.random.default_rng(1)
    data = rng.integers(-8, 8, (6, 64)).astype(np.int8)
    scale = rng.uniform(0.01, 0.1, (6, 4)).astype(np.float16)
    offset = rng.integers(-2, 2, (6, 4)).astype(np.int8)
    for off in (None, offset):
        assert np.array_equal(blockwise_shift_scale(data, scale, off),
                              constexpr_blockwise_shift_scale.decompress(data, scale, off))
    q = rng.integers(0, 255, (5, 7)).astype(np.uint8)
    zp, sc = rng.integers(0, 255, 5).astype(np.uint8), rng.uniform(0.01, 0.1, 5).astype(np.float16)
    assert np.allclose(affine_dequantize(q, zp, sc, 0), constexpr_affine_dequantize.decompress(q, zp, sc, 0), rtol=1e-3)
    indices = rng.integers(0, 16, (6, 8)).astype(np.uint8)
    lut = rng.standard_normal((2, 1, 16, 1)).astype(np.float16)
    assert np.array_equal(lut_to_dense(indices, lut), constexpr_lut_to_dense.decompress(indices, lut, None))


# --- bad input ---------------------------------------------------------------------------------------------

@pytest.fixture
def not_llama(tmp_path) -> Path:
    folder = tmp_path / "mistral"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}))
    return folder


@pytest.mark.parametrize("extra, message", [
    (["--stateless", "--quant", "int4"], "iOS 18"),
    (["--max-context", "4096"], "outside the model's range"),
    (["--dtype", "fp32"], "fp16"),
    (["--portable"], "onnx only"),
    (["--device", "iphone-15-pro"], "onnx only"),
    (["--quant", "int4", "--block-size", "24"], "power of two"),
    (["--quant", "int4", "--method", "rtn", "--block-size", "24"], "does not divide"),
    (["--quant", "int8", "--method", "hqq"], "does not apply"),
    (["--quant", "int4", "--method", "rtn", "--calib", "x.txt"], "does not apply"),
    (["--quant", "int8", "--no-smooth"], "--no-smooth"),
])
def test_bad_options_are_one_line_errors(ckpt, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.setattr(CE, "convert", lambda *a: pytest.fail("bad options must be refused before converting"))
    out = tmp_path / "out"
    assert main(["export", str(ckpt), "--format", "coreml", "-o", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgellama: error:") and message in err and "\n" not in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_non_llama_source_is_refused(not_llama, tmp_path, capsys):
    assert main(["export", str(not_llama), "--format", "coreml", "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgellama: error: unsupported architecture 'MistralForCausalLM'") and "\n" not in err


def test_failed_conversion_leaves_no_bundle(ckpt, tmp_path, monkeypatch):
    def boom(*args):
        raise RuntimeError("converter crashed")

    monkeypatch.setattr(CE, "convert", boom)
    with pytest.raises(RuntimeError):
        CE.export_coreml(ckpt, tmp_path / "out", CE.CoreMLOptions(max_context=CTX), log=lambda m: None)
    assert list(tmp_path.iterdir()) == []


# --- SmolLM2: a real checkpoint ----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("quant", [None, 8, 4])
def test_smollm2_replay_matches_torch(tmp_path, quant):
    src = load_source("smollm2-135m-instruct")
    # int4 traces the smoothed model (the same function; its weights are what the program quantizes)
    ref = Llama.from_source(CE.int4_weights(src, CE.quant_plan({"bits": 4}, True), print)[0] if quant == 4 else src)
    out = tmp_path / "smol"
    report = CE.export_coreml(src, out, CE.CoreMLOptions(max_context=256, quant={"bits": quant} if quant else None))
    print(f"SmolLM2 Core ML {'fp16' if not quant else f'int{quant}'}: model.mlpackage {report.package_bytes / 1e6:.1f} MB")
    replay = Replay(out / "model.mlpackage")
    if quant:
        ref, swapped = dequantized_torch(ref, replay)
        assert swapped == 1 + 7 * 30
    cos = compare(CoreMLEngine(out, read_manifest(out), backend=replay), ref)
    print(f"min cosine {min(cos):.6f}")
    assert min(cos) >= 0.9999
