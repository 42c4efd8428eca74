"""Checkpoint -> Core ML bundle (model.mlpackage + tokenizer + manifest), written atomically.

source --Llama.from_source--> torch wrapper (coreml_model) --torch.jit.trace--> ct.convert
(fp16, iOS 18 states, or iOS 17 KV in/out) --> optional int4/int8 weight compression -->
model.mlpackage --> tokenizer files, config.json --> checks --> edgellama.json --> rename.

Linux has no Core ML runtime, so the export checks what it can: the traced torch wrapper
against the reference model, and the saved program's interface and op set against its
deployment target. tests/coreml_replay.py replays the saved program in numpy.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgellama import __version__
from edgellama.errors import EdgeLlamaError
from edgellama.export.onnx_export import ExportReport, finish_manifest, write_tokenizer_files
from edgellama.export.sources import Source, load_source
from edgellama.export.tokenizer_prep import prepare_tokenizer
from edgellama.fsutil import atomic_dir
from edgellama.runtime import bundle as B
from edgellama.runtime.coreml_engine import (
    CAUSAL_MASK,
    INPUT_IDS,
    KEY_CACHE,
    LOGITS,
    PRESENT_KEYS,
    PRESENT_VALUES,
    VALUE_CACHE,
    causal_mask,
    coreml_unavailable_message,  # noqa: F401 (re-exported: the exporter's word on what Linux verified)
)

# A phone holds the whole KV state for the context the model is built for (SmolLM2 at 8192: 190 MB).
DEFAULT_COREML_CONTEXT = 2048
DEFAULT_INT4_BLOCK = 32
TARGETS = {True: ("iOS18", "iOS 18 / macOS 15"), False: ("iOS17", "iOS 17 / macOS 14")}  # by statefulness
# coremltools lowers its coreml_update_state op to write_state (+ read_state), an iOS 18 op it
# serializes but does not register as a core op.
SERIALIZED_ONLY_OPS = {"iOS18": {"write_state"}}


@dataclass
class CoreMLReport(ExportReport):
    package_bytes: int = 0  # model.mlpackage alone


@dataclass
class CoreMLOptions:
    stateful: bool = True  # False: KV in/out for iOS 17 / macOS 14
    dtype: str = "fp16"
    max_context: int | None = None
    quant: dict[str, Any] | None = None  # {"bits": 4 | 8, "block_size": n}
    verify: bool = True
    force: bool = False


def coremltools():
    """Import coremltools quietly: off macOS it logs that its runtime is missing, which we know."""
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    try:
        import coremltools as ct
    except ImportError:
        raise EdgeLlamaError("Core ML export needs coremltools: pip install 'edgellama[coreml]'") from None
    return ct


def quant_plan(quant: dict[str, Any] | None, stateful: bool) -> dict[str, Any] | None:
    """Validate --quant options for Core ML; returns the manifest's quantization record.

    int4 is the ONNX default's policy and quantizer (smoothing, hqq-fitted asymmetric blocks, q/k
    in blocks of 16, int8 for v/o, the table and the heaviest-tailed down_proj), written as iOS 18
    constexpr ops. `--method rtn` (int4) and int8 are coremltools' linear symmetric quantizer on every
    weight matrix: a smaller int4 file (SmolLM2: 77 against 104 MB) that is far less faithful
    (docs/ios.md)."""
    if not quant:
        return None
    quant = dict(quant)
    preset = quant.pop("preset", None)
    if preset not in (None, "int4", "int8"):
        raise EdgeLlamaError(f"--quant {preset} is an onnxruntime format (MatMulNBits): Core ML takes --quant int4 or int8")
    ours = quant.get("bits") == 4 and quant.get("method") in (None, "mixed")
    allowed = ("bits", "block_size", "method", "calib", "smooth") if ours else ("bits", "block_size")
    unsupported = sorted(k for k, v in quant.items()
                         if k not in allowed and v is not None and (k, v) != ("method", "rtn"))
    if unsupported:
        flag = "no-smooth" if unsupported[0] == "smooth" else unsupported[0].replace("_", "-")
        raise EdgeLlamaError(f"--{flag} does not apply to a Core ML {'int4' if quant.get('bits') == 4 else 'int8'} "
                             "export with these options (Core ML int4 takes --block-size, --calib and --no-smooth; "
                             "--method rtn and int8 take --block-size)")
    bits = quant.get("bits")
    if bits not in (4, 8):
        raise EdgeLlamaError(f"unsupported quantization bits {bits!r} (4 or 8)")
    block = quant.get("block_size")
    if block is not None and (not isinstance(block, int) or block < 1):
        raise EdgeLlamaError(f"--block-size must be a positive integer, got {block!r}")
    if bits == 4 and block is None:
        block = DEFAULT_INT4_BLOCK
    if not stateful and block is not None:
        raise EdgeLlamaError(f"{'int4' if bits == 4 else 'block-wise int8'} needs iOS 18's per-block weights, but "
                             "--stateless targets iOS 17: use --quant int8 without --block-size, or drop --stateless")
    if bits == 4 and quant.get("method") != "rtn":
        if block < 16 or block & (block - 1):
            raise EdgeLlamaError(f"--block-size must be a power of two >= 16, got {block}")
        plan = {"bits": 4, "block_size": block, "granularity": "per_block", "method": "mixed", "symmetric": False,
                "tool": "edgellama (constexpr_blockwise_shift_scale)", "smooth": quant.get("smooth", True) is not False}
        if quant.get("calib") is not None:
            plan["calib"] = str(quant["calib"])
        return plan
    return {"bits": bits, "block_size": block, "granularity": "per_block" if block else "per_channel",
            "method": "rtn", "symmetric": True, "tool": "coremltools.optimize.coreml.linear_quantize_weights"}


def convert(model, max_context: int, stateful: bool):
    """Trace the Core ML wrapper of a torch Llama and convert it to an fp16 ML program."""
    import torch

    from edgellama.export.coreml_model import StatefulLlama, StatelessLlama, cache_shape

    ct = coremltools()
    from coremltools.converters.mil.converter import _reset_conversion_state

    # coremltools names ops from process-wide counters and resets them only after a conversion;
    # anything built with its op builder before (a replay, a compression) would shift every name.
    _reset_conversion_state()
    wrapper = (StatefulLlama if stateful else StatelessLlama)(model, max_context).eval()
    shape = cache_shape(model, max_context)
    example = [torch.zeros(1, 2, dtype=torch.int32), torch.zeros(1, 1, 2, 3)]
    inputs = [ct.TensorType(name=INPUT_IDS, shape=(1, ct.RangeDim(1, max_context)), dtype=np.int32),
              ct.TensorType(name=CAUSAL_MASK, shape=(1, 1, ct.RangeDim(1, max_context), ct.RangeDim(1, max_context)),
                            dtype=np.float16)]
    outputs = [ct.TensorType(name=LOGITS, dtype=np.float16)]
    states = []
    if stateful:
        states = [ct.StateType(wrapped_type=ct.TensorType(shape=shape, dtype=np.float16), name=n)
                  for n in (KEY_CACHE, VALUE_CACHE)]
    else:
        example += [torch.zeros(shape, dtype=torch.float16)] * 2
        inputs += [ct.TensorType(name=n, shape=shape, dtype=np.float16) for n in (KEY_CACHE, VALUE_CACHE)]
        outputs += [ct.TensorType(name=n, dtype=np.float16) for n in (PRESENT_KEYS, PRESENT_VALUES)]
    # torch.jit.trace, not torch.export: with dynamic q/end, torch.export + coremltools 9 fail on constraints.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(wrapper, tuple(example), check_trace=False)
        return ct.convert(traced, inputs=inputs, outputs=outputs, states=states or None,
                          minimum_deployment_target=getattr(ct.target, TARGETS[stateful][0]),
                          compute_precision=ct.precision.FLOAT16, convert_to="mlprogram", skip_model_load=True)


def weight_consts(spec) -> dict[str, tuple[int, ...]]:
    """Const weight matrices feeding linear/matmul/gather, by const op name: what gets compressed.

    Read from the serialized spec, so it works as well on a model loaded from disk."""
    slots = {"linear": ("weight",), "matmul": ("x", "y"), "gather": ("x",)}
    consts, used = {}, set()
    for fn in spec.mlProgram.functions.values():
        for block in fn.block_specializations.values():
            for op in block.operations:
                if op.type == "const":
                    dims = tuple(d.constant.size for d in op.outputs[0].type.tensorType.dimensions)
                    consts[op.outputs[0].name] = (op.attributes["name"].immediateValue.tensor.strings.values[0], dims)
                for slot in slots.get(op.type, ()):
                    if slot in op.inputs:
                        used.update(arg.name for arg in op.inputs[slot].arguments if arg.name)
    return {consts[v][0]: consts[v][1] for v in sorted(used) if v in consts and len(consts[v][1]) == 2}


def check_block_size(block: int | None, widths: dict[str, int]) -> None:
    """Blocks must tile every weight row: coremltools would skip (leave fp16) a weight they do not."""
    bad = [(name, w) for name, w in widths.items() if block and w % block]
    if bad:
        raise EdgeLlamaError(f"--block-size {block} does not divide the {bad[0][0]} ({bad[0][1]}): "
                             "pick a divisor of every layer's input width (e.g. 32)")


def compress(mlmodel, plan: dict[str, Any]):
    """int8 with coremltools' linear symmetric quantizer: every weight matrix (embedding and K/V included)."""
    coremltools()
    import coremltools.optimize.coreml as cto

    weights = weight_consts(mlmodel.get_spec())
    block = plan["block_size"]
    check_block_size(block, {name: shape[1] for name, shape in weights.items()})
    kw = {"granularity": "per_block", "block_size": block} if block else {"granularity": "per_channel"}
    # weight_threshold=0: by element count the K/V projections of small models fall under the
    # default threshold (2048) and would silently stay fp16; the selection is by name instead.
    op_config = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype=f"int{plan['bits']}", weight_threshold=0,
                                            **kw)
    config = cto.OptimizationConfig(global_config=None, op_name_configs={name: op_config for name in weights})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = cto.linear_quantize_weights(mlmodel, config)
    plan["tensors"] = len(weights)
    return out


def int4_weights(src: Source, plan: dict[str, Any], log: Callable[[str], None]):
    """The ONNX int4 default's work, for Core ML: calibrate on seeded random tokens, rank the
    down projections, fold the smoothing scales into the source. Returns (smoothed source, the
    quantizer that knows each tensor's precision and block). Smoothing leaves the float model's
    function unchanged, so the program is traced from the smoothed source."""
    from edgellama.export.calibration import calibrate, rank_int8_layers, smooth_source
    from edgellama.quantize.onnx_weights import make_emitter

    smooth = plan.get("smooth", True)
    calib = plan.pop("calib", None)  # the record keeps the text's name (calibration), not a local path
    cal = None  # as for ONNX: --no-smooth without --calib calibrates nothing
    if smooth or calib:
        cal = calibrate(src, Path(calib) if calib else None, keep_inputs=False, log=log)
    em, _ = make_emitter(src.config, {"bits": 4, "block_size": plan["block_size"],
                                      "act_scales": cal.act_scales if cal else None}, form="fast", fallback=None)
    rank_int8_layers(src, em)
    smoothed, record = smooth_source(src, em, log) if smooth else (src, None)
    plan.update(calibration=cal.source if cal else None, smoothing=record)
    return smoothed, em


def _weight_names(src: Source) -> dict[str, str]:
    """Program const name -> HF tensor module name, for every 2-D weight the wrapper holds (as `llama`)."""
    return {"llama_" + n.replace(".", "_") + "_to_fp16": n[: -len(".weight")]
            for n in src.tensors.names() if n.endswith(".weight") and not n.endswith("norm.weight")}


def compress_int4(mlmodel, src: Source, em, plan: dict[str, Any]):
    """Replace every weight const of the program with our quantized tensor, decoded by Core ML at load
    (iOS 18 constexpr_blockwise_shift_scale: int4 codes with uint4 offsets, int8 symmetric codes)."""
    coremltools()
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil import types
    from coremltools.converters.mil.mil.passes.graph_pass import AbstractGraphPass
    from coremltools.converters.mil.mil.passes.helper import block_context_manager
    from coremltools.models.utils import _apply_graph_pass

    consts = weight_consts(mlmodel.get_spec())
    names = _weight_names(src)
    missing = sorted(set(consts) - set(names))
    if missing:
        raise EdgeLlamaError(f"the Core ML program holds a weight edgellama cannot place: {missing[0]}")
    encoded: dict[str, tuple] = {}
    for const, shape in consts.items():
        qt = em.quantize_tensor(names[const], src.tensors.get(names[const] + ".weight"))
        n, k = qt.shape
        if (n, k) != tuple(shape) or k % qt.block_size:
            raise EdgeLlamaError(f"{names[const]}: {k} inputs do not split into blocks of {qt.block_size}")
        scale = qt.scales.astype(np.float16)
        if qt.bits == 4 and not qt.symmetric:
            encoded[const] = (qt.codes[:, :k].astype(types.np_uint4_dtype), scale,
                              qt.zero_points.astype(types.np_uint4_dtype))
        else:  # symmetric: unsigned codes around 2^(bits-1) become signed ones, no offset
            signed = qt.codes[:, :k].astype(np.int16) - (1 << (qt.bits - 1))
            encoded[const] = (signed.astype(types.np_int4_dtype if qt.bits == 4 else np.int8), scale, None)

    class _Replace(AbstractGraphPass):
        def apply(self, prog):
            @block_context_manager
            def apply_block(block):
                for op in list(block.operations):
                    if op.op_type == "const" and op.name in encoded:
                        data, scale, offset = encoded[op.name]
                        new = mb.constexpr_blockwise_shift_scale(data=data, scale=scale, offset=offset, before_op=op,
                                                                 name=op.name + "_quantized")
                        block.replace_uses_of_var_after_op(anchor_op=op, old_var=op.outputs[0], new_var=new,
                                                           no_check_var_types=True)
                        block.remove_ops([op])

            for f in prog.functions.values():
                apply_block(f)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = _apply_graph_pass(mlmodel, _Replace(), skip_model_load=True)
    summary = em.summary()  # the ONNX record's fields for the same tensors
    plan.update({k: summary[k] for k in ("qk_block_size", "int8_block_size", "int8_tensors", "embeddings", "lm_head",
                                         "scale_dtype") if k in summary})
    plan["activation"] = "fp16"  # Core ML decodes the weights to fp16 and computes in fp16
    plan["tensors"] = len(encoded)
    return out


def check_program(spec, stateful: bool, cfg, ctx: int) -> list[str]:
    """The saved model's interface and op set, against what its target and swift-transformers expect."""
    target_name = TARGETS[stateful][0]
    problems = []
    d = spec.description
    want_in = [INPUT_IDS, CAUSAL_MASK] + ([] if stateful else [KEY_CACHE, VALUE_CACHE])
    want_out = [LOGITS] + ([] if stateful else [PRESENT_KEYS, PRESENT_VALUES])
    want_states = [KEY_CACHE, VALUE_CACHE] if stateful else []
    named = (("inputs", d.input, want_in), ("outputs", d.output, want_out), ("states", d.state, want_states))
    for what, features, want in named:
        got = [f.name for f in features]
        if got != want:
            problems.append(f"{what} are {got}, expected {want}")
    kv = [cfg.num_hidden_layers, 1, cfg.num_key_value_heads, ctx, cfg.head_dim]
    for f in list(d.input) + list(d.state):
        arr = f.type.stateType.arrayType if f.type.HasField("stateType") else f.type.multiArrayType
        dtype = type(arr).ArrayDataType.Name(arr.dataType)
        if dtype != ("INT32" if f.name == INPUT_IDS else "FLOAT16"):
            problems.append(f"{f.name} is {dtype}")
        if f.name in (KEY_CACHE, VALUE_CACHE) and list(arr.shape) != kv:
            problems.append(f"{f.name} has shape {list(arr.shape)}, expected {kv}")
    for f in d.input:
        if f.name in (INPUT_IDS, CAUSAL_MASK):
            ranges = [(r.lowerBound, r.upperBound) for r in f.type.multiArrayType.shapeRange.sizeRanges]
            want = [(1, 1), (1, ctx)] if f.name == INPUT_IDS else [(1, 1), (1, 1), (1, ctx), (1, ctx)]
            if ranges != want:
                problems.append(f"{f.name} accepts shapes {ranges}, expected {want}")
    unsupported = sorted(program_op_types(spec) - allowed_ops(target_name))
    if unsupported:
        problems.append(f"ops outside the {target_name} op set: {unsupported}")
    return problems


def program_op_types(spec) -> set[str]:
    """Every op type in the serialized program, nested blocks included."""
    found: set[str] = set()

    def walk(block):
        for op in block.operations:
            found.add(op.type)
            for nested in op.blocks:
                walk(nested)

    for fn in spec.mlProgram.functions.values():
        for block in fn.block_specializations.values():
            walk(block)
    return found


def allowed_ops(target_name: str) -> set[str]:
    """Op types Core ML accepts at a deployment target, from coremltools' op registry."""
    ct = coremltools()
    from coremltools.converters.mil.mil.ops.registry import SSAOpRegistry

    target = getattr(ct.target, target_name)
    ops = {name for name, versions in SSAOpRegistry.core_ops.items() if any(v <= target for v in versions)}
    return ops | SERIALIZED_ONLY_OPS.get(target_name, set())


def verify_wrapper(model, ctx: int, stateful: bool, steps: int = 4) -> dict[str, Any]:
    """The traced wrapper (fp16 cache, RoPE tables, folded GQA) against Llama.forward, in torch fp32."""
    import torch

    from edgellama.export.coreml_model import StatefulLlama, StatelessLlama, cache_shape

    n_prompt = max(1, min(8, ctx - steps))
    steps = min(steps, ctx - n_prompt)
    prompt = torch.randint(0, model.config.vocab_size, (1, n_prompt), generator=torch.Generator().manual_seed(0))
    wrapper = (StatefulLlama if stateful else StatelessLlama)(model, ctx).eval()
    kv = [torch.zeros(cache_shape(model, ctx), dtype=torch.float16) for _ in range(2)]

    def run(ids: torch.Tensor, end: int) -> torch.Tensor:
        mask = torch.from_numpy(causal_mask(ids.shape[1], end).astype(np.float32))
        if stateful:
            return wrapper(ids.int(), mask)
        logits, k, v = wrapper(ids.int(), mask, *kv)
        kv[0][:, :, :, end - ids.shape[1]:end], kv[1][:, :, :, end - ids.shape[1]:end] = k, v
        return logits

    diffs, agree = [], []
    with torch.no_grad():
        ref, past = model(prompt)
        got = run(prompt, n_prompt)
        for i in range(steps + 1):
            diffs.append(float((got - ref).abs().max()))
            agree.append(bool(got[0, -1].argmax() == ref[0, -1].argmax()))
            if i < steps:  # teacher-forced: both continue with the reference's greedy token
                token = ref[:, -1:].argmax(-1)
                ref, past = model(token, past=past)
                got = run(token, n_prompt + i + 1)
    return {"max_abs_logit_diff": max(diffs), "greedy_agreement": sum(agree) / len(agree)}


def _pin_package(package: Path):
    """Make the package reproducible: protobuf writes maps in arbitrary order, and Manifest.json's
    item ids are random UUIDs; rewrite the spec with sorted maps and derive the ids from paths.
    Returns the spec as saved."""
    from coremltools.proto import Model_pb2

    path = package / "Manifest.json"
    m = json.loads(path.read_text())
    spec_file = package / "Data" / m["itemInfoEntries"][m["rootModelIdentifier"]]["path"]
    spec = Model_pb2.Model()
    spec.ParseFromString(spec_file.read_bytes())
    spec_file.write_bytes(spec.SerializeToString(deterministic=True))
    ids = {old: str(uuid.uuid5(uuid.NAMESPACE_URL, "edgellama:" + item["path"])) for old, item in m["itemInfoEntries"].items()}
    m["itemInfoEntries"] = {ids[old]: item for old, item in m["itemInfoEntries"].items()}
    m["rootModelIdentifier"] = ids[m["rootModelIdentifier"]]
    path.write_text(json.dumps(m, indent=4, sort_keys=True) + "\n")
    return spec


def export_coreml(
    source: str | Source,
    out: str | Path,
    opts: CoreMLOptions | None = None,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
) -> CoreMLReport:
    opts = opts or CoreMLOptions()
    t0 = time.perf_counter()
    if opts.dtype != "fp16":
        raise EdgeLlamaError(f"Core ML bundles are fp16 (the KV-cache states are fp16), not {opts.dtype}: drop --dtype")
    plan = quant_plan(opts.quant, opts.stateful)
    src = source if isinstance(source, Source) else load_source(source)
    cfg = src.config
    ctx = opts.max_context or min(cfg.max_position_embeddings, DEFAULT_COREML_CONTEXT)
    if ctx < 1 or ctx > cfg.max_position_embeddings:
        raise EdgeLlamaError(f"--max-context {ctx} is outside the model's range (1..{cfg.max_position_embeddings})")
    warns: list[str] = []

    def warn(msg: str) -> None:
        warns.append(msg)
        log(f"edgellama: warning: {msg}")

    if plan:
        check_block_size(plan["block_size"], {"hidden size": cfg.hidden_size, "intermediate size": cfg.intermediate_size,
                                              "attention width": cfg.num_attention_heads * cfg.head_dim})
    tok = prepare_tokenizer(src, cfg, warn)
    from edgellama.export.model import Llama

    em = None
    if plan and plan["method"] == "mixed":
        src, em = int4_weights(src, plan, log)
    model = Llama.from_source(src)
    stateful = opts.stateful
    target_name, target_text = TARGETS[stateful]
    with atomic_dir(out, force=opts.force) as tmp:
        log(f"export: converting to a Core ML program ({target_text}, context {ctx})")
        mlmodel = convert(model, ctx, stateful)
        if plan:
            log(f"export: compressing weights to int{plan['bits']} ({plan['granularity']})")
            mlmodel = compress_int4(mlmodel, src, em, plan) if em is not None else compress(mlmodel, plan)
        meta = mlmodel.user_defined_metadata
        meta.pop("com.github.apple.coremltools.conversion_date", None)  # a date would make every export differ
        meta["co.edgellama.version"] = __version__
        meta["co.edgellama.context_length"] = str(ctx)
        kind = "stateful KV cache" if stateful else "KV cache in/out"
        mlmodel.short_description = f"Llama ({src.description}) for edgellama, {kind}"
        package = tmp / B.COREML_MODEL
        mlmodel.save(str(package))
        spec = _pin_package(package)
        problems = check_program(spec, stateful, cfg, ctx)
        if problems:
            raise EdgeLlamaError(f"the converted Core ML model is not what was asked for: {problems[0]}")
        T = B.TensorSpec
        kv_shape = [cfg.num_hidden_layers, 1, cfg.num_key_value_heads, ctx, cfg.head_dim]
        inputs = [T(INPUT_IDS, "int32", [1, "q"]), T(CAUSAL_MASK, "float16", [1, 1, "q", "end"])]
        outputs = [T(LOGITS, "float16", [1, "q", cfg.vocab_size])]
        states = [T(n, "float16", kv_shape) for n in (KEY_CACHE, VALUE_CACHE)]
        if not stateful:
            inputs += states
            outputs += [T(n, "float16", kv_shape[:3] + ["q", cfg.head_dim]) for n in (PRESENT_KEYS, PRESENT_VALUES)]
        graph = B.GraphInfo(kind="coreml", file=B.COREML_MODEL, form="coreml-stateful" if stateful else "coreml-stateless",
                            attention="sdpa", past_present_share_buffer=stateful, logits="all",
                            opset=spec.specificationVersion, inputs=inputs, outputs=outputs)
        manifest = B.Manifest(
            source=src.description, architecture=cfg.to_hf(), dtype="fp16", graph=graph, context_length=ctx,
            tokens=tok.tokens, chat_template=tok.chat_template, quantization=plan,
            created_by=f"edgellama {__version__}",
            extras={"coreml": {"target": target_text, "minimum_deployment_target": target_name,
                               "specification_version": spec.specificationVersion,
                               "states": [asdict(s) for s in states] if stateful else [],
                               "ops": sorted(program_op_types(spec))}},
        )
        write_tokenizer_files(tmp, tok)
        (tmp / B.HF_CONFIG).write_text(json.dumps(cfg.to_hf(), indent=2) + "\n")
        verification = None
        if opts.verify:
            verification = verify_wrapper(model, ctx, stateful)
            verification["summary"] = (f"the traced torch wrapper against the reference model (max |Δlogit| "
                                       f"{verification['max_abs_logit_diff']:.1e}) and the program's interface and "
                                       f"{target_name} op set")
            manifest.extras["verification"] = verification
        finish_manifest(tmp, manifest)
        size = sum((tmp / f).stat().st_size for f in manifest.files) + (tmp / B.MANIFEST).stat().st_size
        package_size = sum(p.stat().st_size for p in package.rglob("*") if p.is_file())
    return CoreMLReport(out=str(out), seconds=time.perf_counter() - t0, size_bytes=size, verification=verification,
                        warnings=warns, package_bytes=package_size)


def export_coreml_cli(args) -> int:
    from edgellama.export.cli import quant_options

    for flag in ("--portable", "--threads", "--device"):
        if getattr(args, flag[2:], None):
            raise EdgeLlamaError(f"{flag} applies to --format onnx only")
    opts = CoreMLOptions(stateful=not getattr(args, "stateless", False), dtype=args.dtype or "fp16",
                         max_context=args.max_context, quant=quant_options(args), verify=not args.no_verify,
                         force=args.force)
    report = export_coreml(args.source, args.output, opts)
    print(f"wrote {report.out} ({report.size_bytes / 1e6:.1f} MB, {B.COREML_MODEL} "
          f"{report.package_bytes / 1e6:.1f} MB) in {report.seconds:.1f} s", file=sys.stderr)
    return 0
