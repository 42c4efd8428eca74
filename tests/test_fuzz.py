"""Fuzzing the parsers of untrusted bytes: GGUF headers, safetensors headers, bundle manifests.

Whatever the input, the result is either a clean EdgeLlamaError or a result that keeps the
parser's promises (tensors inside the file, typed manifest fields); never another exception.

CI runs a fixed, derandomized 200 examples per test. A longer, random run:
    EDGELLAMA_FUZZ_EXAMPLES=20000 python -m pytest tests/test_fuzz.py -q
"""

from __future__ import annotations

import itertools
import json
import os
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from edgellama.errors import EdgeLlamaError
from edgellama.export.gguf_reader import GGUFFile
from edgellama.export.safetensors_io import SafetensorsFile, read_header, save_file
from edgellama.runtime import bundle as B

EXAMPLES = int(os.environ.get("EDGELLAMA_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES <= 200, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

_names = itertools.count()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def write(folder: Path, data: bytes, suffix: str) -> Path:
    # A fresh name per example: an earlier result may still hold a memmap of the previous file.
    path = folder / f"case{next(_names)}{suffix}"
    path.write_bytes(data)
    return path


def mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None, insert: bytes) -> bytes:
    buf = bytearray(data)
    for pos, value in edits:
        buf[pos % len(buf)] = value
    if insert:
        at = edits[0][0] % len(buf) if edits else 0
        buf[at:at] = insert
    return bytes(buf[:cut] if cut is not None else buf)


mutations = dict(edits=st.lists(st.tuples(st.integers(0, 2**20), st.integers(0, 255)), max_size=8),
                 cut=st.none() | st.integers(0, 4096), insert=st.binary(max_size=16))


# --- GGUF ---------------------------------------------------------------------------------------

def gguf_outcome(path: Path) -> None:
    """Parse; if accepted, every promise of the reader must hold and every tensor must read."""
    try:
        f = GGUFFile(path)
        size = path.stat().st_size
        for t in f.tensors.values():
            assert f.data_offset <= t.offset and t.offset + t.nbytes <= size
            assert (t.offset - f.data_offset) % f.alignment == 0
            out = f.get(t.name)
            assert out.dtype == np.float32 and out.shape == t.shape
    except EdgeLlamaError as exc:
        assert "\n" not in str(exc)


@pytest.fixture(scope="module")
def valid_gguf(scratch) -> bytes:
    """A small, valid GGUF with metadata of every value type and F32 / F16 / Q8_0 / Q4_K tensors."""
    path = scratch / "valid.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_string("general.name", "fuzz")
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "<s>"])
    w.add_array("tokenizer.ggml.scores", [0.5, -1.0, 0.0])
    w.add_uint64("x.u64", 2**40)
    w.add_int8("x.i8", -3)
    rng = np.random.default_rng(0)
    w.add_tensor("a.weight", rng.standard_normal((4, 32)).astype(np.float32))
    w.add_tensor("b.weight", rng.standard_normal((2, 32)).astype(np.float16))
    q = gguf.GGMLQuantizationType
    w.add_tensor("c.weight", gguf.quants.quantize(rng.standard_normal((2, 64)).astype(np.float32), q.Q8_0),
                 raw_dtype=q.Q8_0)
    w.add_tensor("d.weight", rng.integers(0, 256, (1, 144), dtype=np.uint8), raw_dtype=q.Q4_K)  # one raw block
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert len(GGUFFile(path).tensors) == 4
    return path.read_bytes()


@FUZZ
@given(data=st.binary(max_size=2048))
@example(data=b"GGUF")
@example(data=b"GGUF" + struct.pack("<IQQ", 3, 2**64 - 1, 2**64 - 1))
def test_gguf_arbitrary_bytes(scratch, data):
    gguf_outcome(write(scratch, data, ".gguf"))


@FUZZ
@given(version=st.sampled_from([2, 3]), n_tensors=st.integers(0, 2**64 - 1) | st.integers(0, 4),
       n_kv=st.integers(0, 2**64 - 1) | st.integers(0, 4), body=st.binary(max_size=1024))
def test_gguf_header_with_random_counts(scratch, version, n_tensors, n_kv, body):
    gguf_outcome(write(scratch, b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv) + body, ".gguf"))


def _gguf_string(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


big = st.integers(0, 2**64 - 1)
small = st.integers(0, 64)
tensor_infos = st.lists(st.tuples(st.binary(min_size=1, max_size=8), st.lists(small | big, min_size=0, max_size=5),
                                  st.integers(0, 45), st.sampled_from([0, 32, 64, 96]) | big), max_size=4)


@FUZZ
@given(infos=tensor_infos, data=st.binary(max_size=512))
def test_gguf_random_tensor_tables(scratch, infos, data):
    """Well-formed framing around random names, ranks, dims, types and offsets."""
    body = b""
    for name, dims, ggml_type, offset in infos:
        body += _gguf_string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        body += struct.pack("<IQ", ggml_type, offset)
    head = b"GGUF" + struct.pack("<IQQ", 3, len(infos), 0) + body
    gguf_outcome(write(scratch, head + b"\0" * (-len(head) % 32) + data, ".gguf"))


@FUZZ
@given(**mutations)
def test_gguf_mutated_valid_file(scratch, valid_gguf, edits, cut, insert):
    gguf_outcome(write(scratch, mutate(valid_gguf, edits, cut, insert), ".gguf"))


# --- safetensors --------------------------------------------------------------------------------

def safetensors_outcome(path: Path) -> None:
    try:
        infos, meta, offset = read_header(path)
    except EdgeLlamaError as exc:
        assert "\n" not in str(exc)
        return
    size = path.stat().st_size
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    f = SafetensorsFile(path)
    for name, info in infos.items():
        assert offset + info.end <= size
        assert f.get(name).shape == info.shape


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)
dtypes = st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "Q4", ""])
entries = st.fixed_dictionaries({
    "dtype": dtypes | json_values,
    "shape": st.lists(st.integers(-2, 2**65) | st.integers(0, 8), max_size=4) | json_values,
    "data_offsets": st.lists(st.integers(-2, 2**65) | st.integers(0, 256), max_size=3) | json_values,
})
headers = st.dictionaries(st.text(max_size=6), entries | json_values, max_size=4) | json_values


@FUZZ
@given(data=st.binary(max_size=1024))
@example(data=struct.pack("<Q", 2**64 - 1))
@example(data=struct.pack("<Q", 5000) + b"[" * 5000)  # nesting deeper than the JSON decoder recurses
def test_safetensors_arbitrary_bytes(scratch, data):
    safetensors_outcome(write(scratch, data, ".safetensors"))


@FUZZ
@given(header=headers, meta=json_values, lie=st.integers(-16, 16) | st.none(), data=st.binary(max_size=512))
@example(header={"": {"dtype": [], "shape": [], "data_offsets": [0, 0]}}, meta=None, lie=None, data=b"")
def test_safetensors_random_headers(scratch, header, meta, lie, data):
    if isinstance(header, dict) and meta is not None:
        header = {**header, "__metadata__": meta}
    raw = json.dumps(header).encode()
    n = len(raw) if lie is None else max(0, len(raw) + lie)
    safetensors_outcome(write(scratch, struct.pack("<Q", n) + raw + data, ".safetensors"))


def test_safetensors_huge_integer_in_header(scratch):
    # Python refuses to parse integers of more than 4300 digits: still a corrupt header, not a crash.
    raw = b'{"w": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}'
    with pytest.raises(EdgeLlamaError, match="not JSON"):
        read_header(write(scratch, struct.pack("<Q", len(raw)) + raw + b"\0" * 4, ".safetensors"))


@pytest.fixture(scope="module")
def valid_safetensors(scratch) -> bytes:
    path = scratch / "valid.safetensors"
    rng = np.random.default_rng(0)
    save_file({"a": rng.standard_normal((3, 5)).astype(np.float32), "b": np.arange(6, dtype=np.int64),
               "c": rng.standard_normal(7).astype(np.float16), "empty": np.zeros((0, 4), np.float32)},
              path, metadata={"format": "pt"})
    return path.read_bytes()


@FUZZ
@given(**mutations)
def test_safetensors_mutated_valid_file(scratch, valid_safetensors, edits, cut, insert):
    safetensors_outcome(write(scratch, mutate(valid_safetensors, edits, cut, insert), ".safetensors"))


# --- manifest -----------------------------------------------------------------------------------

def manifest_outcome(value) -> None:
    try:
        m = B.Manifest.from_dict(value)
    except EdgeLlamaError as exc:
        assert "\n" not in str(exc)
        return
    # Accepted: the fields runtimes size buffers and pick files from have their declared types.
    assert isinstance(m.graph, B.GraphInfo) and isinstance(m.tokens, B.TokenInfo)
    assert isinstance(m.graph.file, str) and isinstance(m.graph.kind, str)
    assert all(isinstance(s, B.TensorSpec) and isinstance(s.name, str) for s in m.graph.inputs + m.graph.outputs)
    assert isinstance(m.graph.past_present_share_buffer, bool)
    assert isinstance(m.context_length, int) and m.context_length >= 1
    assert all(isinstance(m.architecture[k], int) and m.architecture[k] > 0 for k in B.ARCH_SIZES)
    vocab = m.architecture["vocab_size"]
    t = m.tokens
    assert all(isinstance(i, int) and 0 <= i < vocab for i in [*t.eos_ids, *(x for x in (t.bos_id, t.pad_id)
                                                                              if x is not None)])
    assert isinstance(t.add_bos, bool)
    assert m.chat_template is None or isinstance(m.chat_template, str)
    assert isinstance(m.session_options, dict) and isinstance(m.extras, dict)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in m.files.items())
    assert B.Manifest.from_dict(json.loads(m.to_json())) == m


def _valid_manifest() -> dict:
    spec = lambda name: {"name": name, "dtype": "float32", "shape": ["batch_size", 2, "seq", 16]}  # noqa: E731
    return {
        "format": B.FORMAT, "format_version": B.FORMAT_VERSION, "source": "hf:/x", "dtype": "fp32",
        "architecture": {"num_hidden_layers": 1, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 300,
                         "hidden_size": 64},
        "graph": {"kind": "onnx", "file": "model.onnx", "form": "fast", "attention": "gqa",
                  "past_present_share_buffer": True, "logits": "last", "opset": 21,
                  "inputs": [spec("input_ids"), spec("past_key_values.0.key")], "outputs": [spec("logits")]},
        "context_length": 64, "tokens": {"bos_id": 1, "eos_ids": [2, 3], "pad_id": None, "add_bos": True},
        "chat_template": "{{ messages }}", "quantization": None, "session_options": {"intra_op_num_threads": 0},
        "files": {"model.onnx": "0" * 64}, "extras": {}, "created_by": "edgellama test",
    }


def test_valid_manifest_is_accepted():
    m = B.Manifest.from_dict(_valid_manifest())
    assert m.graph.inputs[1].name == "past_key_values.0.key" and m.tokens.eos_ids == [2, 3]


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, prefix + (i,))


_MANIFEST_PATHS = [p for p in _paths(_valid_manifest()) if p]


def _replace(d: dict, path: tuple, value) -> None:
    """Set (or, for `...`, delete) d at path, if an earlier change has not removed the way there."""
    node = d
    for key in path[:-1]:
        if isinstance(node, dict) and key in node or (
                isinstance(node, list) and isinstance(key, int) and key < len(node)):
            node = node[key]
        else:
            return
    last = path[-1]
    if isinstance(node, dict):
        if value is ...:
            node.pop(last, None)
        else:
            node[last] = value
    elif isinstance(node, list) and isinstance(last, int) and last < len(node):
        node[last] = None if value is ... else value


@FUZZ
@given(value=json_values)
def test_manifest_arbitrary_json(value):
    manifest_outcome(value)
    manifest_outcome({"format": B.FORMAT, "format_version": 1, **value} if isinstance(value, dict) else value)


@FUZZ
@given(changes=st.lists(st.tuples(st.sampled_from(_MANIFEST_PATHS), json_values | st.just(...)), min_size=1,
                        max_size=3))
@example(changes=[(("graph",), []), (("graph", "kind"), ...)])
@example(changes=[(("graph", "inputs", 1), {"\n": None})])  # the key lands in the message: still one line
def test_manifest_one_field_replaced(changes):
    """A valid manifest with up to three fields replaced by arbitrary JSON (or deleted: `...`)."""
    d = _valid_manifest()
    for path, value in changes:
        _replace(d, path, value)
    manifest_outcome(d)


@FUZZ
@given(data=st.binary(max_size=512) | json_values.map(lambda v: json.dumps(v).encode()))
@example(data=b"[" * 100000)
def test_read_manifest_arbitrary_file(scratch, data):
    folder = scratch / f"bundle{next(_names)}"
    folder.mkdir()
    (folder / B.MANIFEST).write_bytes(data)
    try:
        B.read_manifest(folder)
    except EdgeLlamaError as exc:
        assert "\n" not in str(exc)
