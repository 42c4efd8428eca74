"""The bad-input corpus, through the real CLI: every case ends in exactly one `edgellama: error: ...`
line and exit status 2, with no traceback, no hang and nothing written to the output path.

Every input is generated here from the tiny checkpoint and its bundle (no stored binaries). Most
cases call `edgellama.cli.main` in-process under a deadline; a representative subset runs as real
processes under a timeout and `RLIMIT_AS` of 1 GiB, which proves that lying sizes are refused
before anything is allocated from them. (test_cli_basic.py holds the first export corpus: lying
safetensors, configs, argument errors; this one adds dtypes, GGUF, tokenizers, bundles and run.)
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from edgellama.runtime import bundle as B
from helpers import (
    assert_one_line_error,
    corrupt_safetensors,
    edit_config,
    link_folder,
    rewrite_safetensors_header,
    run_cli,
    write_pickle_checkpoint,
)

AS_LIMIT = 1 << 30  # bytes of address space a real-process case may map
PROCESS_TIMEOUT = 180  # seconds; generous for a loaded CI machine, finite so a hang fails
IN_PROCESS_DEADLINE = 120


@dataclass(frozen=True)
class Case:
    make: Callable[[Path, Path], list]  # (the tiny checkpoint folder or bundle, a scratch dir) -> argv
    fragments: tuple[str, ...]  # what the one error line must mention
    process: bool = False  # run as a real process under RLIMIT_AS
    stdin: bytes = b""


def out_path(tmp: Path) -> Path:
    return tmp / "out" / "bundle"


def export(source, tmp: Path, *extra) -> list:
    return ["export", source, "-o", out_path(tmp), "--max-context", "32", "--no-verify", *extra]


# --- checkpoints --------------------------------------------------------------------------------

def source_variant(src: Path, tmp: Path, *copy: str) -> Path:
    return link_folder(src, tmp / "src", copy=("config.json", *copy))


def with_header(edit) -> Callable[[Path, Path], list]:
    def make(src, tmp):
        folder = source_variant(src, tmp, "model.safetensors")
        rewrite_safetensors_header(folder / "model.safetensors", edit)
        return export(folder, tmp)
    return make


def with_config(**changes) -> Callable[[Path, Path], list]:
    def make(src, tmp):
        folder = source_variant(src, tmp)
        edit_config(folder, **changes)
        return export(folder, tmp)
    return make


def with_file(name: str, content: bytes) -> Callable[[Path, Path], list]:
    def make(src, tmp):
        folder = source_variant(src, tmp)
        if (folder / name).exists():
            (folder / name).unlink()
        (folder / name).write_bytes(content)
        return export(folder, tmp)
    return make


def truncated(src, tmp):
    folder = source_variant(src, tmp, "model.safetensors")
    corrupt_safetensors(folder / "model.safetensors", "truncate")
    return export(folder, tmp)


def header_length_past_the_end(src, tmp):
    folder = source_variant(src, tmp)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"{}")
    return export(folder, tmp)


def pickle_only(suffix: str):
    def make(src, tmp):
        folder = tmp / "src"
        folder.mkdir()
        (folder / "config.json").write_text((src / "config.json").read_text())
        write_pickle_checkpoint(folder / f"model{suffix}", tmp / "unpickled.marker")
        return export(folder / f"model{suffix}", tmp)
    return make


def shard_outside(src, tmp):
    folder = source_variant(src, tmp)
    index = {"weight_map": {"w": "../../elsewhere.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return export(folder, tmp)


# GGUF files written field by field (GGUF v3, little-endian), lying where the case says.

def gguf_str(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<Q", len(raw)) + raw


def gguf_file(n_tensors: int, n_kv: int, body: bytes = b"", data: bytes = b"\0" * 64) -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + body
    return head + b"\0" * (-len(head) % 32) + data


def gguf_tensor(name: str, dims: list[int], ggml_type: int = 0, offset: int = 0) -> bytes:
    return gguf_str(name) + struct.pack(f"<I{len(dims)}Q", len(dims), *dims) + struct.pack("<IQ", ggml_type, offset)


def gguf(data: bytes, name: str = "model.gguf") -> Callable[[Path, Path], list]:
    def make(src, tmp):
        path = tmp / name
        path.write_bytes(data)
        return export(path, tmp)
    return make


def gguf_truncated_mid_tensor(src, tmp):
    import gguf as gg
    import numpy as np

    path = tmp / "full.gguf"
    w = gg.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.ones((64, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    cut = tmp / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:-4096])
    return export(cut, tmp)


EXPORT_CASES = {
    # safetensors
    "truncated safetensors": Case(truncated, ("model.safetensors", "truncated"), process=True),
    "header length past the end": Case(header_length_past_the_end, ("exceeds file size",), process=True),
    "integer weights": Case(with_header(lambda h: h["model.norm.weight"].update(dtype="I32")),
                            ("model.norm.weight", "I32", "floating-point")),
    "unknown dtype": Case(with_header(lambda h: h["model.norm.weight"].update(dtype="F8_E4M3")),
                          ("model.norm.weight", "F8_E4M3")),
    "dtype halves, shape doubles": Case(with_header(lambda h: h["model.norm.weight"].update(
        dtype="F16", shape=[2 * h["model.norm.weight"]["shape"][0]])), ("model.norm.weight", "shape")),
    "dtype that is not a string": Case(with_header(lambda h: h["model.norm.weight"].update(dtype=["F32"])),
                                       ("unsupported dtype",)),
    "header nested too deep": Case(with_file("model.safetensors", struct.pack("<Q", 10**5) + b"[" * 10**5),
                                   ("corrupt safetensors header",)),
    "shard outside the folder": Case(shard_outside, ("outside the checkpoint folder",)),
    "pickle .pt refused": Case(pickle_only(".pt"), ("pickle", "never unpickles")),
    "pickle .ckpt refused": Case(pickle_only(".ckpt"), ("pickle", "never unpickles")),
    # config.json
    "negative hidden size": Case(with_config(hidden_size=-64), ("hidden_size", "-64")),
    "zero heads": Case(with_config(num_attention_heads=0), ("num_attention_heads",)),
    "absurd vocabulary": Case(with_config(vocab_size=10**12), ("absurd", "vocab_size")),
    "absurd intermediate size": Case(with_config(intermediate_size=10**15), ("absurd", "intermediate_size")),
    "size as a string": Case(with_config(hidden_size="64"), ("hidden_size",)),
    "size as a float": Case(with_config(num_hidden_layers=2.0), ("num_hidden_layers",)),
    "tied as a string": Case(with_config(tie_word_embeddings="false"), ("tie_word_embeddings",)),
    "model_type as a list": Case(with_config(model_type=["llama"]), ("model_type",)),
    "qwen2": Case(with_config(model_type="qwen2", architectures=["Qwen2ForCausalLM"]), ("Qwen2ForCausalLM",)),
    "yarn rope": Case(with_config(rope_parameters={"rope_type": "yarn", "factor": 4.0}), ("yarn",)),
    "config is a list": Case(with_file("config.json", b"[1, 2]"), ("config.json", "object")),
    # tokenizer files of the checkpoint
    "tokenizer.json not JSON": Case(with_file("tokenizer.json", b"{nope"), ("tokenizer.json",)),
    "tokenizer.json not a tokenizer": Case(with_file("tokenizer.json", b'{"model": {"type": "BPE"}}'),
                                           ("tokenizer.json",)),
    "tokenizer_config.json a list": Case(with_file("tokenizer_config.json", b"[]"), ("tokenizer_config.json",)),
    # GGUF
    "gguf bad magic": Case(gguf(b"GGML" + gguf_file(0, 0)[4:]), ("bad magic",)),
    "gguf sniffed by magic, bad version": Case(gguf(b"GGUF" + struct.pack("<IQQ", 99, 0, 0), "weights.bin.x"),
                                               ("version 99",)),
    "gguf truncated mid tensor": Case(gguf_truncated_mid_tensor, ("token_embd.weight", "truncated")),
    "gguf tensor count 2^63": Case(gguf(gguf_file(2**63, 0)), ("tensor count",), process=True),
    "gguf metadata count 2^64-1": Case(gguf(gguf_file(0, 2**64 - 1)), ("metadata count",), process=True),
    "gguf array of 2^61 floats": Case(gguf(gguf_file(0, 1, gguf_str("k") + struct.pack("<IIQ", 9, 6, 2**61))),
                                      ("more than the file can hold",), process=True),
    "gguf dims overflow int64": Case(gguf(gguf_file(1, 0, gguf_tensor("w", [2**40] * 4))), ("overflow",),
                                     process=True),
    "gguf dims beyond the file": Case(gguf(gguf_file(1, 0, gguf_tensor("w", [2**20, 2**20]))),
                                      ("beyond the end",), process=True),
    "gguf string length 2^62": Case(gguf(gguf_file(0, 1, struct.pack("<Q", 2**62) + b"key")), ("runs past the end",)),
}


# --- bundles and run ----------------------------------------------------------------------------

def bundle_copy(bundle: Path, tmp: Path, *copy: str, name: str = "bundle") -> Path:
    return link_folder(bundle, tmp / name, copy=(B.MANIFEST, *copy))


def edit_manifest(folder: Path, edit) -> None:
    m = json.loads((folder / B.MANIFEST).read_text())
    edit(m)
    (folder / B.MANIFEST).write_text(json.dumps(m))


def rehash(folder: Path) -> None:
    """Checksums that match again: the case reaches what lies behind verification."""
    edit_manifest(folder, lambda m: m.update(files=B.checksum_tree(folder)))


def run(folder, *extra) -> list:
    return ["run", folder, "-p", "Hello there", "--max-new-tokens", "4", "--threads", "1", *extra]


def manifest_edit(edit, *, chat: bool = False) -> Callable[[Path, Path], list]:
    def make(bundle, tmp):
        d = bundle_copy(bundle, tmp)
        edit_manifest(d, edit)
        return run(d, *(["--chat"] if chat else []))
    return make


def flipped(name: str):
    def make(bundle, tmp):
        d = bundle_copy(bundle, tmp, name)
        data = bytearray((d / name).read_bytes())
        data[len(data) // 2] ^= 0x01
        (d / name).write_bytes(bytes(data))
        return run(d)
    return make


def removed(name: str, *, rehashed: bool = False):
    def make(bundle, tmp):
        d = bundle_copy(bundle, tmp)
        (d / name).unlink()
        if rehashed:
            rehash(d)
        return run(d)
    return make


def replaced(name: str, content: bytes):
    def make(bundle, tmp):
        d = bundle_copy(bundle, tmp)
        (d / name).unlink()
        (d / name).write_bytes(content)
        rehash(d)
        return run(d)
    return make


def other_graph(bundle, tmp):
    """A valid ONNX graph whose inputs and outputs are not the manifest's (checksums updated to match)."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["tokens"], ["scores"])], "other",
                              [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["n"])],
                              [helper.make_tensor_value_info("scores", TensorProto.INT64, ["n"])])
    d = bundle_copy(bundle, tmp)
    (d / B.ONNX_MODEL).unlink()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(d / B.ONNX_MODEL))
    rehash(d)
    return run(d)


def template_in_tokenizer_config(template: str):
    def make(bundle, tmp):
        d = bundle_copy(bundle, tmp, "tokenizer_config.json")
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        cfg["chat_template"] = template
        (d / "tokenizer_config.json").unlink()
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
        edit_manifest(d, lambda m: m.update(chat_template=None))
        rehash(d)
        return run(d, "--chat")
    return make


def unfinished_export(bundle, tmp):
    d = bundle_copy(bundle, tmp, name=".bundle.tmp-4242-x1y2z3")  # even complete, a work dir is no bundle
    return run(d)


HOSTILE_TEMPLATES = {
    # test_chat_template.py holds the full list of escapes; these go through bundle, CLI and chat path.
    "class of a string": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "globals of a helper": "{{ cycler.__init__.__globals__['os'].system('touch pwned') }}",
    "message internals": "{% for m in messages %}{{ m.__class__.__base__ }}{% endfor %}",
    "a gigabyte string": "{{ 'a' * 10**9 }}",
    "a huge power": "{{ 7 ** 100000000 }}",
}

RUN_CASES = {
    "missing bundle": Case(lambda b, t: run(t / "nowhere"), ("not found",)),
    "not a bundle": Case(lambda b, t: run(t), ("edgellama.json is missing",)),
    "unfinished export directory": Case(unfinished_export, ("unfinished export",)),
    "missing tokenizer_config.json": Case(removed("tokenizer_config.json"), ("tokenizer_config.json", "missing")),
    "missing graph": Case(removed(B.ONNX_MODEL), ("model.onnx", "missing")),
    "flipped byte in the graph": Case(flipped(B.ONNX_MODEL), ("model.onnx", "sha256"), process=True),
    "flipped byte in tokenizer.json": Case(flipped("tokenizer.json"), ("tokenizer.json", "sha256")),
    "manifest not JSON": Case(lambda b, t: _write_manifest(b, t, b"{\"format\": "), ("not JSON",)),
    "manifest from another tool": Case(manifest_edit(lambda m: m.update(format="optimum")),
                                       ("not an edgellama manifest",)),
    "newer format version": Case(manifest_edit(lambda m: m.update(format_version=B.FORMAT_VERSION + 1)),
                                 ("newer", "upgrade"), process=True),
    "graph I/O disagrees with the manifest": Case(other_graph, ("disagree with the manifest",)),
    "architecture claims a million layers": Case(manifest_edit(lambda m: m["architecture"].update(
        num_hidden_layers=10**6)), ("disagrees with the ONNX graph",), process=True),
    "architecture claims wider heads": Case(manifest_edit(lambda m: m["architecture"].update(head_dim=4096)),
                                            ("disagrees with the ONNX graph",)),
    "architecture missing": Case(manifest_edit(lambda m: m.update(architecture={})), ("architecture",)),
    "graph outside the bundle": Case(manifest_edit(lambda m: m["graph"].update(file="../elsewhere/model.onnx")),
                                     ("not a path inside the bundle",)),
    "graph without a checksum": Case(manifest_edit(lambda m: m["files"].pop(B.ONNX_MODEL)), ("no checksum",)),
    "token id beyond the vocabulary": Case(manifest_edit(lambda m: m["tokens"].update(bos_id=10**9)),
                                           ("outside the vocabulary",)),
    "token ids of the wrong type": Case(manifest_edit(lambda m: m["tokens"].update(eos_ids="<|eot_id|>")),
                                        ("tokens", "wrong type")),
    "threads of the wrong type": Case(manifest_edit(lambda m: m["session_options"].update(intra_op_num_threads="4")),
                                      ("session_options",)),
    "tokenizer.json removed, checksums updated": Case(removed("tokenizer.json", rehashed=True), ("no tokenizer.json",)),
    "tokenizer.json not JSON": Case(replaced("tokenizer.json", b"{]"), ("malformed", "tokenizer.json")),
    "tokenizer.json not a tokenizer": Case(replaced("tokenizer.json", b'{"model": {"type": "BPE"}}'),
                                           ("malformed", "tokenizer.json")),
    "tokenizer_config.json nested too deep": Case(replaced("tokenizer_config.json", b"[" * 10**5),
                                                  ("malformed", "tokenizer_config.json")),
    **{f"hostile template: {k}": Case(manifest_edit(lambda m, t=t: m.update(chat_template=t), chat=True),
                                      ("chat template",), process=k == "a gigabyte string")
       for k, t in HOSTILE_TEMPLATES.items()},
    "hostile template in tokenizer_config.json": Case(
        template_in_tokenizer_config("{{ lipsum.__globals__['os'].popen('id').read() }}"), ("sandbox",)),
    "prompt past the context": Case(lambda b, t: run(b, "--max-context", "16", "-p", "word " * 40),
                                    ("does not fit the context of 16",)),
    "context beyond the bundle's": Case(lambda b, t: run(b, "--max-context", "100000"), ("100000", "256")),
    "negative temperature": Case(lambda b, t: run(b, "--temperature", "-0.5"), ("temperature",)),
    "temperature nan": Case(lambda b, t: run(b, "--temperature", "nan"), ("temperature",)),
    "top-p zero": Case(lambda b, t: run(b, "--top-p", "0"), ("top_p",)),
    "top-p above one": Case(lambda b, t: run(b, "--top-p", "1.5"), ("top_p",)),
    "negative top-k": Case(lambda b, t: run(b, "--top-k", "-3"), ("top_k",)),
    "min-p above one": Case(lambda b, t: run(b, "--min-p", "2"), ("min_p",)),
    "zero repetition penalty": Case(lambda b, t: run(b, "--repetition-penalty", "0"), ("repetition_penalty",)),
    "zero new tokens": Case(lambda b, t: run(b, "--max-new-tokens", "0"), ("max_new_tokens",)),
    "negative seed": Case(lambda b, t: run(b, "--temperature", "0.7", "--seed", "-1"), ("seed",)),
    "empty stop string": Case(lambda b, t: run(b, "--stop", ""), ("stop",)),
    "zero threads": Case(lambda b, t: run(b, "--threads", "0"), ("threads",)),
    "temperature not a number": Case(lambda b, t: run(b, "--temperature", "warm"), ("--temperature", "warm")),
    "unknown execution provider": Case(lambda b, t: run(b, "--provider", "tpu9000"), ("tpu9000", "not available"),
                                       process=True),
    "empty prompt": Case(lambda b, t: run(b, "-p", " \n "), ("empty",)),
    "stdin prompt not UTF-8": Case(lambda b, t: ["run", b, "--threads", "1"], ("not valid UTF-8",), process=True,
                                   stdin=b"caf\xe9 \xff\xfe"),
}


def _write_manifest(bundle, tmp, data: bytes) -> list:
    d = bundle_copy(bundle, tmp)
    (d / B.MANIFEST).write_bytes(data)
    return run(d)


# --- running the cases --------------------------------------------------------------------------

@pytest.fixture
def deadline():
    """An in-process case that hangs fails after IN_PROCESS_DEADLINE seconds instead of stalling the suite."""
    def expire(signum, frame):
        raise TimeoutError(f"case still running after {IN_PROCESS_DEADLINE} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(IN_PROCESS_DEADLINE)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def run_process(argv: list, stdin: bytes) -> subprocess.CompletedProcess:
    code = ("import resource, sys\n"
            f"resource.setrlimit(resource.RLIMIT_AS, ({AS_LIMIT}, {AS_LIMIT}))\n"
            "from edgellama.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code, *map(str, argv)], input=stdin, capture_output=True,
                          env=env, timeout=PROCESS_TIMEOUT)


def check_case(case: Case, asset: Path, tmp: Path, capsys) -> None:
    argv = case.make(asset, tmp)
    if case.process:
        proc = run_process(argv, case.stdin)
        code, out, err = proc.returncode, proc.stdout.decode(), proc.stderr.decode("utf-8", "replace")
    else:
        r = run_cli(argv, capsys)
        code, out, err = r.code, r.out, r.err
    assert code == 2, err
    assert_one_line_error(err, *case.fragments)
    assert out == ""  # no partial text, no half-printed result


@pytest.mark.parametrize("name", list(EXPORT_CASES))
def test_export_corpus(name, tiny_llama, tmp_path, capsys, deadline):
    check_case(EXPORT_CASES[name], tiny_llama("gqa4").folder, tmp_path, capsys)
    assert not out_path(tmp_path).exists()
    assert not out_path(tmp_path).parent.exists() or list(out_path(tmp_path).parent.iterdir()) == []
    assert not (tmp_path / "unpickled.marker").exists()


@pytest.mark.parametrize("name", list(RUN_CASES))
def test_run_corpus(name, exported, tmp_path, capsys, deadline, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where `touch pwned` would land
    bundle = exported("gqa4", "fast").dir
    before = {p.name: p.read_bytes() for p in bundle.iterdir() if p.stat().st_size < 1 << 20}
    check_case(RUN_CASES[name], bundle, tmp_path, capsys)
    assert not (tmp_path / "pwned").exists()
    # The shared bundle itself is never what a case edits.
    assert {p.name: p.read_bytes() for p in bundle.iterdir() if p.stat().st_size < 1 << 20} == before


def test_the_corpus_runs_both_ways():
    """The subset in real processes covers each kind of input, and most cases stay in-process."""
    process = [n for n, c in {**EXPORT_CASES, **RUN_CASES}.items() if c.process]
    assert {"truncated safetensors", "gguf dims beyond the file", "flipped byte in the graph",
            "stdin prompt not UTF-8", "hostile template: a gigabyte string"} <= set(process)
    assert len(process) < len(EXPORT_CASES) + len(RUN_CASES) - len(process)
