"""What an app checks before it loads a bundle: every byte against the manifest (pack/verify), and
whether the bundle fits the device at all (the manifest's devices hint)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import struct
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from edgellama.devices.catalog import BUILTIN_PATH, HOST, builtin_profiles
from edgellama.devices.plan import ModelShape, plan
from edgellama.errors import EdgeLlamaError
from edgellama.export.onnx_export import ExportOptions, devices_hint, export_onnx
from edgellama.runtime import bundle as B
from edgellama.runtime.pack import SEAL, pack, parse_manifest, sealed_manifest, unpack, verify
from helpers import assert_one_line_error, leftovers, run_cli


@pytest.fixture(scope="module")
def bundle(exported, tmp_path_factory) -> Path:
    """A private copy of an exported bundle that tests may damage (and must repair)."""
    dst = tmp_path_factory.mktemp("pack") / "bundle"
    shutil.copytree(exported("gqa4", "fast").dir, dst)
    return dst


@pytest.fixture(scope="module")
def archive(bundle, tmp_path_factory) -> Path:
    return pack(bundle, tmp_path_factory.mktemp("zip") / "bundle.zip")


def every_file(root: Path) -> list[str]:
    return [B.MANIFEST, *B.bundle_files(root)]


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x01]))  # a single bit: the smallest change there is


def positions(n: int) -> list[int]:
    return sorted({0, n // 2, n - 1})


def expect_error(path: Path, *fragments: str) -> str:
    with pytest.raises(EdgeLlamaError) as exc:
        verify(path)
    msg = str(exc.value)
    assert "\n" not in msg
    for frag in fragments:
        assert frag in msg, msg
    return msg


# -- the manifest's self-checksum ------------------------------------------------------------------


def test_exported_manifest_is_sealed(bundle):
    raw = (bundle / B.MANIFEST).read_bytes()
    m = parse_manifest(raw)
    digest = m.extras[SEAL]
    zeroed = raw.replace(digest.encode(), b"0" * 64)
    assert hashlib.sha256(zeroed).hexdigest() == digest
    # Sealing the parsed manifest again reproduces the file byte for byte.
    assert sealed_manifest(m) == raw


def test_manifest_edit_that_stays_valid_json_is_caught(bundle, tmp_path):
    """Changing a value (still valid JSON, still a valid manifest) breaks the seal."""
    d = tmp_path / "b"
    shutil.copytree(bundle, d)
    text = (d / B.MANIFEST).read_text()
    data = json.loads(text)
    (d / B.MANIFEST).write_text(text.replace(json.dumps(data["source"]), json.dumps(data["source"] + "x")))
    expect_error(d, B.MANIFEST, "corrupt or altered")
    data = json.loads((bundle / B.MANIFEST).read_text())
    del data["extras"][SEAL]  # a manifest without a seal (written by hand, or by an older edgellama)
    (d / B.MANIFEST).write_text(json.dumps(data))
    expect_error(d, B.MANIFEST, SEAL)


def test_resealed_manifest_with_unsafe_path_is_refused(bundle, tmp_path):
    d = tmp_path / "b"
    shutil.copytree(bundle, d)
    m = parse_manifest((d / B.MANIFEST).read_bytes())
    m.files["../outside.txt"] = "0" * 64
    (d / B.MANIFEST).write_bytes(sealed_manifest(m))
    expect_error(d, "unsafe path", "../outside.txt")


# -- one flipped byte in every file -----------------------------------------------------------------


def test_verify_passes_an_intact_bundle_and_archive(bundle, archive):
    assert verify(bundle).files == verify(archive).files == parse_manifest((bundle / B.MANIFEST).read_bytes()).files


def test_flipped_byte_in_every_file_of_a_directory(bundle):
    names = every_file(bundle)
    assert {B.MANIFEST, "model.onnx", "tokenizer.json", "genai_config.json"} <= set(names)
    for rel in names:
        path = bundle / rel
        for offset in positions(path.stat().st_size):
            flip(path, offset)
            try:
                expect_error(bundle, rel, "corrupt")
            finally:
                flip(path, offset)
    verify(bundle)  # repaired


def test_every_manifest_byte_is_covered(bundle):
    """Not only the JSON syntax: a flip anywhere in the manifest, in values too, is caught."""
    path = bundle / B.MANIFEST
    for offset in range(0, path.stat().st_size, 7):
        flip(path, offset)
        try:
            expect_error(bundle, B.MANIFEST)
        finally:
            flip(path, offset)


def _data_span(archive: Path, name: str) -> tuple[int, int]:
    """Where an entry's (compressed) bytes lie in the archive."""
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo(name)
    with open(archive, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    start = info.header_offset + 30 + name_len + extra_len
    return start, start + info.compress_size


def test_flipped_byte_in_every_file_of_an_archive(archive):
    with zipfile.ZipFile(archive) as zf:
        names = zf.namelist()
    assert names[0] == B.MANIFEST and len(names) == len(set(names))
    for rel in names:
        start, end = _data_span(archive, rel)
        for offset in positions(end - start):
            flip(archive, start + offset)
            try:
                expect_error(archive, rel, "corrupt")
            finally:
                flip(archive, start + offset)
    verify(archive)


def _rezip(src: Path, dst: Path, edit) -> None:
    """Copy an archive entry by entry; edit(name, data) returns new bytes, or None to drop the entry.

    The zip layer stays consistent (fresh CRCs): only the manifest can tell what changed.
    """
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = edit(info.filename, zin.read(info))
            if data is not None:
                zout.writestr(info, data)


def test_archive_rebuilt_with_altered_files_is_caught(archive, tmp_path):
    with zipfile.ZipFile(archive) as zf:
        names = zf.namelist()
    for rel in names:
        out = tmp_path / f"{rel}.zip"
        _rezip(archive, out, lambda n, d: d[:-1] + bytes([d[-1] ^ 1]) if n == rel else d)
        expect_error(out, rel, "corrupt or altered")
        out.unlink()


def test_missing_and_extra_files(bundle, archive, tmp_path):
    d = tmp_path / "b"
    shutil.copytree(bundle, d)
    (d / "notes.txt").write_text("not part of the bundle")
    expect_error(d, "notes.txt", "does not list")
    (d / "notes.txt").unlink()
    (d / "generation_config.json").unlink()
    expect_error(d, "generation_config.json", "missing")

    extra = tmp_path / "extra.zip"
    _rezip(archive, extra, lambda n, d: d)
    with zipfile.ZipFile(extra, "a") as zf:
        zf.writestr("notes.txt", b"x")
    expect_error(extra, "notes.txt", "does not list")
    missing = tmp_path / "missing.zip"
    _rezip(archive, missing, lambda n, d: None if n == "tokenizer.json" else d)
    expect_error(missing, "tokenizer.json", "missing")
    nested = tmp_path / "nested.zip"  # a folder zipped by hand: the manifest is not at the top
    with zipfile.ZipFile(archive) as zin, zipfile.ZipFile(nested, "w") as zout:
        for info in zin.infolist():
            zout.writestr("bundle/" + info.filename, zin.read(info))
    expect_error(nested, B.MANIFEST, "top level")


def _small_zip(archive: Path, path: Path, info: zipfile.ZipInfo, data: bytes) -> Path:
    """The archive's manifest plus one crafted entry."""
    with zipfile.ZipFile(archive) as zin, zipfile.ZipFile(path, "w") as zout:
        zout.writestr(B.MANIFEST, zin.read(B.MANIFEST))
        zout.writestr(info, data)
    return path


@pytest.mark.parametrize("name", ["../evil.txt", "/abs/evil.txt", "sub/../../evil.txt", "..\\evil.txt", "C:/evil.txt"])
def test_zip_slip_is_refused(archive, tmp_path, name):
    bad = _small_zip(archive, tmp_path / "bad.zip", zipfile.ZipInfo(name), b"pwned")
    expect_error(bad, "unsafe path")
    with pytest.raises(EdgeLlamaError, match="unsafe path"):
        unpack(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path.parent / "evil.txt").exists()
    assert not (tmp_path / "evil.txt").exists() and leftovers(tmp_path, "out") == []


def test_symlink_entries_and_non_zips_are_refused(archive, tmp_path):
    info = zipfile.ZipInfo("link")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    bad = _small_zip(archive, tmp_path / "link.zip", info, b"/etc/passwd")
    expect_error(bad, "symbolic link")
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"PK\x03\x04 not really a zip")
    expect_error(junk, "not a readable zip")
    expect_error(tmp_path / "nowhere", "not found")


# -- pack ---------------------------------------------------------------------------------------


def test_pack_is_deterministic(bundle, archive, tmp_path):
    for p in bundle.iterdir():  # new mtimes must not change a byte of the archive
        os.utime(p, (1_700_000_000, 1_700_000_000))
    again = pack(bundle, tmp_path / "again.zip")
    assert again.read_bytes() == archive.read_bytes()
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
    names = [i.filename for i in infos]
    assert names == [B.MANIFEST, *sorted(names[1:])]
    assert all(i.date_time == (1980, 1, 1, 0, 0, 0) for i in infos)
    assert all(i.compress_type == zipfile.ZIP_STORED for i in infos)  # an archive byte is a file byte


def test_pack_refuses_a_damaged_bundle_and_unsafe_outputs(bundle, archive, tmp_path):
    path = bundle / "tokenizer_config.json"
    flip(path, 3)
    try:
        with pytest.raises(EdgeLlamaError, match="tokenizer_config.json is corrupt"):
            pack(bundle, tmp_path / "x.zip")
    finally:
        flip(path, 3)
    assert sorted(os.listdir(tmp_path)) == []  # no archive, no temp file
    with pytest.raises(EdgeLlamaError, match="inside the bundle"):
        pack(bundle, bundle / "self.zip")
    with pytest.raises(EdgeLlamaError, match="already exists"):
        pack(bundle, archive)


def test_unpack_round_trips(archive, bundle, tmp_path):
    m = unpack(archive, tmp_path / "out")
    assert m.files == verify(tmp_path / "out").files
    for rel in every_file(bundle):
        assert (tmp_path / "out" / rel).read_bytes() == (bundle / rel).read_bytes()
    B.read_manifest(tmp_path / "out")  # and the runtime's own loader accepts it


def test_cli_pack_and_verify(bundle, tmp_path, capsys):
    out = tmp_path / "b.zip"
    r = run_cli(["pack", bundle, "-o", out], capsys)
    assert r.code == 0
    assert r.out.split()[0] == hashlib.sha256(out.read_bytes()).hexdigest()
    for target in (bundle, out):
        r = run_cli(["verify", target], capsys)
        assert r.code == 0 and r.out.startswith("OK"), r
    start, _ = _data_span(out, "genai_config.json")
    flip(out, start + 5)
    r = run_cli(["verify", out], capsys)
    assert r.code == 2 and r.out == ""
    assert_one_line_error(r.err, "genai_config.json")
    r = run_cli(["pack", bundle, "-o", out], capsys)
    assert r.code == 2
    assert_one_line_error(r.err, "already exists")


# -- the devices hint ---------------------------------------------------------------------------

LLAMA31_8B = {
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "tie_word_embeddings": False,
    "max_position_embeddings": 131072,
}


def _profiles():
    return [p for name, p in builtin_profiles().items() if name != HOST]


def test_exported_bundle_records_where_it_fits(exported):
    m = exported("gqa4", "fast").manifest
    hint = m.extras["devices"]
    assert hint["context"] == m.context_length == 256 and hint["quant"] == "fp32" and hint["kv_dtype"] == "fp32"
    shape = ModelShape.from_hf_config(m.architecture)
    want = plan(shape, replace(_profiles()[0], format="onnx"), quant="fp32", max_context=256, kv_dtype="fp32")
    assert hint["expected_rss_bytes"] == want.total_bytes
    assert hint["planned_for"] == [p.name for p in _profiles() if p.app_memory_bytes >= want.total_bytes]
    assert hint["planned_for"]  # a tiny model fits every device


def test_devices_hint_follows_the_bundle_precision():
    hints = {q: devices_hint(LLAMA31_8B, "fp32" if q == "int4" else q, {"bits": 4, "block_size": 32,
                                                                          "embeddings": "int8"} if q == "int4" else None, 8192)
             for q in ("fp32", "fp16", "int4")}
    rss = {q: h["expected_rss_bytes"] for q, h in hints.items()}
    assert rss["int4"] < rss["fp16"] < rss["fp32"]
    for q, h in hints.items():
        assert h["planned_for"] == [p.name for p in _profiles() if p.app_memory_bytes >= rss[q]], q
    assert hints["fp32"]["planned_for"] == []  # 32 GB of weights fit no profile
    assert set(hints["fp16"]["planned_for"]) <= set(hints["int4"]["planned_for"])
    small = min(_profiles(), key=lambda p: p.app_memory_bytes)
    assert small.name not in hints["int4"]["planned_for"] and hints["int4"]["planned_for"]
    with pytest.raises(EdgeLlamaError, match=f"would not fit {small.name}"):
        devices_hint(LLAMA31_8B, "fp16", None, 8192, small.name)
    assert devices_hint(LLAMA31_8B, "fp32", {"bits": 4, "block_size": 32, "embeddings": "int4"}, 4096,
                        "x86-laptop-16gb")["planned_for"] == ["x86-laptop-16gb"]
    with pytest.raises(EdgeLlamaError, match="unknown device"):
        devices_hint(LLAMA31_8B, "fp32", None, 8192, "no-such-phone")


def test_export_for_a_named_device(tiny_llama, tmp_path, monkeypatch):
    folder = tiny_llama("gqa4").folder
    out = tmp_path / "b"
    export_onnx(folder, out, ExportOptions(max_context=128, verify=False, device="iphone-13"), log=lambda m: None)
    m = B.read_manifest(out)
    assert m.extras["devices"]["planned_for"] == ["iphone-13"] and m.extras["devices"]["context"] == 128

    # A device too small for it: refused before anything is written. The host's memory is read
    # from the OS, so the OS is what says this one is small.
    import edgellama.devices.probe as probe

    host = json.loads(BUILTIN_PATH.read_text())
    entry = next(p for p in host["profiles"] if p["name"] == HOST)
    entry["sources"]["memory_bandwidth_gbs"] = "measured: test"
    (tmp_path / "host.json").write_text(json.dumps(entry))
    monkeypatch.setenv("EDGELLAMA_HOST_PROFILE", str(tmp_path / "host.json"))
    monkeypatch.setattr(probe, "total_ram_bytes", lambda: 64 << 20)
    monkeypatch.setattr(probe, "app_memory_bytes", lambda total: 32 << 20)
    with pytest.raises(EdgeLlamaError, match="would not fit host"):
        export_onnx(folder, tmp_path / "small", ExportOptions(max_context=128, verify=False, device=HOST),
                    log=lambda m: None)
    assert not (tmp_path / "small").exists() and leftovers(tmp_path, "small") == []
