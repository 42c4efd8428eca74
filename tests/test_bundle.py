"""What an exported bundle holds: the manifest, checksums, tokenizer files, config.json, genai_config.json."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import onnx
import pytest

from edgellama.errors import EdgeLlamaError
from edgellama.export.config import LlamaConfig
from edgellama.export.onnx_graph import OPSET
from edgellama.runtime import bundle as B
from edgellama.runtime.chat_template import LLAMA3_CHAT_TEMPLATE
from edgellama.runtime.engine import OnnxEngine
from helpers import LLAMA3_BOS, LLAMA3_END_OF_TEXT, LLAMA3_EOM, LLAMA3_EOT, link_folder

FORMS = ["portable", "fast"]
_ONNX_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.INT64: "int64"}


def onnx_signature(path) -> tuple[list, list]:
    g = onnx.load(str(path), load_external_data=False).graph

    def spec(v):
        dims = [d.dim_param if d.dim_param else d.dim_value for d in v.type.tensor_type.shape.dim]
        return [v.name, _ONNX_DTYPES[v.type.tensor_type.elem_type], dims]

    return [spec(v) for v in g.input], [spec(v) for v in g.output]


@pytest.mark.parametrize("form", FORMS)
def test_manifest_records_the_export(exported, form):
    b = exported("gqa4", form)
    m, spec = b.manifest, b.model.spec
    assert m.format == B.FORMAT and m.format_version == B.FORMAT_VERSION
    assert m.source == f"hf:{b.model.folder.resolve()}"
    assert m.created_by.startswith("edgellama ")
    a = m.architecture
    assert (a["num_hidden_layers"], a["hidden_size"], a["num_attention_heads"], a["num_key_value_heads"],
            a["head_dim"], a["vocab_size"], a["intermediate_size"], a["tie_word_embeddings"]) == (
        spec.layers, spec.hidden, spec.heads, spec.kv_heads, spec.head_dim, spec.vocab, spec.intermediate, spec.tied)
    assert LlamaConfig.from_hf(a) == LlamaConfig.from_hf(json.loads((b.model.folder / "config.json").read_text()))
    assert a["rope_parameters"]["rope_type"] == "llama3"
    assert m.dtype == "fp32" and m.quantization is None
    assert m.context_length == 256
    assert m.graph.kind == "onnx" and m.graph.form == form and m.graph.file == B.ONNX_MODEL
    assert m.graph.opset == OPSET and m.graph.logits == "last"
    opsets = {o.domain: o.version for o in onnx.load(str(b.dir / m.graph.file), load_external_data=False).opset_import}
    assert opsets[""] == m.graph.opset


@pytest.mark.parametrize("form", FORMS)
def test_io_signature_matches_the_graph(exported, form):
    b = exported("gqa4", form)
    g, spec = b.manifest.graph, b.model.spec
    inputs, outputs = onnx_signature(b.dir / g.file)
    # Plus, in a last-logits graph, the optional logits_to_keep (an initializer with a default of 1,
    # so not among the inputs every run must feed): speculative decoding's verification; and in a
    # fast graph with the padding row, the optional pad_rows (default 0): speculation's exact steps.
    optional = [["logits_to_keep", "int64", [1]]] if g.logits == "last" else []
    optional += [["pad_rows", "int64", []]] if form == "fast" else []
    assert [[s.name, s.dtype, s.shape] for s in g.inputs] + optional == inputs
    assert [[s.name, s.dtype, s.shape] for s in g.outputs] == outputs

    names = [s.name for s in g.inputs]
    head = ["input_ids", "attention_mask"] + (["position_ids"] if g.attention == "mha" else [])
    kv = [f"past_key_values.{i}.{k}" for i in range(spec.layers) for k in ("key", "value")]
    assert names == head + kv
    assert [s.name for s in g.outputs] == ["logits"] + [f"present.{i}.{k}" for i in range(spec.layers)
                                                       for k in ("key", "value")]
    past = g.inputs[len(head)]
    assert past.shape[1:] == [spec.kv_heads, "max_sequence_length" if g.past_present_share_buffer
                              else "past_sequence_length", spec.head_dim]
    assert g.outputs[0].shape == ["batch_size", 1, spec.vocab]


def test_tokens_stop_ids_and_chat_template(exported):
    b = exported("gqa4", "fast")
    t = b.manifest.tokens
    assert t.bos_id == LLAMA3_BOS and t.add_bos
    assert t.eos_ids[0] == LLAMA3_END_OF_TEXT  # the config's own eos first
    assert {LLAMA3_EOT, LLAMA3_END_OF_TEXT, LLAMA3_EOM} <= set(t.eos_ids)
    assert len(set(t.eos_ids)) == len(t.eos_ids)
    # The 3.2 tokenizer ships no template: the standard Llama 3 one is written, and said so.
    assert b.manifest.chat_template == LLAMA3_CHAT_TEMPLATE
    assert any("chat_template" in w for w in b.report.warnings)
    tcfg = json.loads((b.dir / "tokenizer_config.json").read_text())
    assert tcfg["chat_template"] == LLAMA3_CHAT_TEMPLATE
    gen = json.loads((b.dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == t.eos_ids and gen["bos_token_id"] == LLAMA3_BOS


def test_image_token_beyond_the_vocabulary_is_dropped(exported, llama_tokenizer_dir):
    from tokenizers import Tokenizer

    original = Tokenizer.from_file(str(llama_tokenizer_dir / "tokenizer.json"))
    assert original.token_to_id("<|image|>") == 128256  # the fixture tokenizer really has it
    b = exported("gqa4", "fast")
    warning = [w for w in b.report.warnings if "<|image|>" in w]
    assert len(warning) == 1 and "128256" in warning[0]
    assert any("warning" in line and "<|image|>" in line for line in b.log)
    shipped = Tokenizer.from_file(str(b.dir / "tokenizer.json"))
    assert shipped.token_to_id("<|image|>") is None
    assert shipped.get_vocab_size(with_added_tokens=True) == 128256
    ids = shipped.encode("a picture: <|image|>", add_special_tokens=False).ids
    assert max(ids) < 128256
    assert shipped.token_to_id("<|eot_id|>") == LLAMA3_EOT


@pytest.mark.parametrize("form", FORMS)
def test_every_file_is_checksummed(exported, form):
    b = exported("gqa4", form)
    on_disk = sorted(p.relative_to(b.dir).as_posix() for p in b.dir.rglob("*") if p.is_file() and p.name != B.MANIFEST)
    assert sorted(b.manifest.files) == on_disk
    assert {"model.onnx", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json",
            "genai_config.json"} <= set(on_disk)
    for name, digest in b.manifest.files.items():
        assert hashlib.sha256((b.dir / name).read_bytes()).hexdigest() == digest


def test_config_json_round_trips(exported):
    b = exported("mha", "portable")  # written from an old-spelling config
    written = json.loads((b.dir / "config.json").read_text())
    assert LlamaConfig.from_hf(written) == LlamaConfig.from_hf(json.loads((b.model.folder / "config.json").read_text()))
    assert written["rope_parameters"]["rope_theta"] == written["rope_theta"] == 10000.0
    assert written == b.manifest.architecture


@pytest.mark.parametrize("form", FORMS)
def test_genai_config_runs_in_onnxruntime_genai(exported, form):
    """onnxruntime-genai loads the bundle from genai_config.json and decodes what our engine decodes."""
    import onnxruntime_genai as og  # a dev dependency: the bundle's promise to genai's mobile APIs is tested
    b = exported("gqa4", form)
    conf = json.loads((b.dir / B.GENAI_CONFIG).read_text())
    dec = conf["model"]["decoder"]
    spec = b.model.spec
    assert (dec["head_size"], dec["hidden_size"], dec["num_attention_heads"], dec["num_key_value_heads"],
            dec["num_hidden_layers"]) == (spec.head_dim, spec.hidden, spec.heads, spec.kv_heads, spec.layers)
    assert conf["model"]["eos_token_id"] == b.manifest.tokens.eos_ids
    assert conf["model"]["context_length"] == 256
    assert conf["search"]["past_present_share_buffer"] == b.manifest.graph.past_present_share_buffer
    assert ("position_ids" in dec["inputs"]) == (b.manifest.graph.attention == "mha")

    prompt = [LLAMA3_BOS, 791, 6864, 315, 9822, 374]
    n = 12
    engine = OnnxEngine(b.dir, b.manifest, max_context=64, threads=1)
    logits = engine.forward(prompt)
    first_logits = logits.copy()
    ours = []
    for _ in range(n):
        ours.append(int(logits.argmax()))
        logits = engine.forward([ours[-1]])

    model = og.Model(str(b.dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=64, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    np.testing.assert_allclose(np.asarray(gen.get_output("logits")).reshape(-1), first_logits, atol=1e-3)
    theirs = []
    while len(theirs) < n and not gen.is_done():
        gen.generate_next_token()
        theirs.append(int(gen.get_next_tokens()[0]))
    assert len(set(ours)) > 1  # a non-degenerate continuation
    assert theirs == ours[: len(theirs)] and (len(theirs) == n or theirs[-1] in b.manifest.tokens.eos_ids)


def test_manifest_round_trip(exported):
    m = exported("gqa4", "fast").manifest
    assert B.Manifest.from_dict(json.loads(m.to_json())) == m


def _editable_copy(b, tmp_path, *copy):
    return link_folder(b.dir, tmp_path / "copy", copy=(B.MANIFEST, *copy))


def test_read_manifest_catches_tampering(exported, tmp_path):
    b = exported("gqa4", "fast")
    d = _editable_copy(b, tmp_path, "tokenizer_config.json", "genai_config.json")
    B.read_manifest(d)  # the untouched copy verifies
    with open(d / "tokenizer_config.json", "a") as f:
        f.write(" ")
    with pytest.raises(EdgeLlamaError, match="tokenizer_config.json is corrupt or altered"):
        B.read_manifest(d)
    B.read_manifest(d, verify=False)  # inspect reads it without hashing
    (d / "tokenizer_config.json").unlink()
    shutil.copy(b.dir / "tokenizer_config.json", d)
    (d / "genai_config.json").unlink()
    with pytest.raises(EdgeLlamaError, match="genai_config.json is missing"):
        B.read_manifest(d)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(format_version=B.FORMAT_VERSION + 1), "newer than this edgellama supports"),
    (lambda m: m.update(format="something-else"), "not an edgellama manifest"),
    (lambda m: m["files"].update({"../escape.txt": "0" * 64}), "unsafe path"),
    (lambda m: m.pop("graph"), "malformed"),
    (lambda m: m.update(context_length=0), "context_length"),
])
def test_malformed_manifests_are_refused(exported, tmp_path, edit, message):
    d = _editable_copy(exported("gqa4", "fast"), tmp_path)
    data = json.loads((d / B.MANIFEST).read_text())
    edit(data)
    (d / B.MANIFEST).unlink()
    (d / B.MANIFEST).write_text(json.dumps(data))
    with pytest.raises(EdgeLlamaError, match=message):
        B.read_manifest(d)


def test_manifest_not_json_is_refused(tmp_path):
    (tmp_path / B.MANIFEST).write_text("{")
    with pytest.raises(EdgeLlamaError, match="corrupt"):
        B.read_manifest(tmp_path)
