"""One downloadable archive per bundle, and the check an app runs before loading one.

    pack("llama1b", "llama1b.zip")      # deterministic zip: same bundle, same bytes
    verify("llama1b.zip")               # or a bundle directory; raises EdgeLlamaError naming the bad file

Every file is checked against the manifest's sha256 list, and nothing may be missing or extra.
The manifest protects itself with `extras["manifest_sha256"]`: the sha256 of the manifest's own
bytes with that value replaced by 64 zeros, so a changed byte anywhere in it is caught too.
Standard library only: this runs on devices.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import IO

from edgellama.errors import EdgeLlamaError
from edgellama.runtime import bundle as B

SEAL = "manifest_sha256"
_ZERO = "0" * 64
_SEAL_RE = re.compile(rb'"' + SEAL.encode() + rb'": "([0-9a-f]{64})"')
# 1980-01-01, the earliest time a zip entry can hold: archives do not depend on file mtimes.
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
# Every entry is stored, not deflated. Weights barely compress, a stored entry can be read (or
# mapped) in place at its offset, and each archive byte of a file is that file's byte, so the
# sha256 sees every change: deflate tolerates some (a flipped BFINAL bit decodes the same bytes).
_CHUNK = 1 << 22
MAX_MANIFEST_BYTES = 64 << 20  # a manifest is kilobytes (chat template included); refuse to read a bomb


def _seal_field(digest: str) -> bytes:
    return f'"{SEAL}": "{digest}"'.encode()  # json.dumps(indent=...) writes ": " between key and value


def sealed_manifest(manifest: B.Manifest) -> bytes:
    """The manifest's JSON bytes with its self-checksum filled in (sets manifest.extras[SEAL] too)."""
    manifest.extras[SEAL] = _ZERO
    raw = manifest.to_json().encode("utf-8")
    digest = hashlib.sha256(raw).hexdigest()
    manifest.extras[SEAL] = digest
    # Inside JSON strings quotes are escaped, so the unescaped field occurs exactly once: as the key.
    return raw.replace(_seal_field(_ZERO), _seal_field(digest), 1)


def parse_manifest(raw: bytes) -> B.Manifest:
    """Check the manifest's self-checksum, then parse it."""
    found = _SEAL_RE.findall(raw)
    if not found and f'"{SEAL}"'.encode() not in raw:
        raise EdgeLlamaError(f"{B.MANIFEST} has no self-checksum ({SEAL}): it is corrupt, or older than "
                             f"this edgellama (re-export the bundle)")
    if len(found) != 1:
        raise EdgeLlamaError(f"{B.MANIFEST} is corrupt or altered (its self-checksum {SEAL} is missing or damaged)")
    digest = found[0].decode()
    if hashlib.sha256(raw.replace(_seal_field(digest), _seal_field(_ZERO), 1)).hexdigest() != digest:
        raise EdgeLlamaError(f"{B.MANIFEST} is corrupt or altered (sha256 mismatch)")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # undecodable, not JSON, nested too deep (the seal is no signature)
        raise EdgeLlamaError(f"{B.MANIFEST} is corrupt (not JSON)") from None
    manifest = B.Manifest.from_dict(data)
    if manifest.extras.get(SEAL) != digest:
        raise EdgeLlamaError(f"{B.MANIFEST} is corrupt or altered (its self-checksum is misplaced)")
    for rel in manifest.files:
        _check_name(rel, f"{B.MANIFEST} lists")
    return manifest


def _check_name(name: str, where: str) -> None:
    """A bundle-relative POSIX path: no absolute paths, drive letters, backslashes, '..' or '.' parts."""
    p = PurePosixPath(name)
    if (not name or p.is_absolute() or "\\" in name or ":" in name or "\x00" in name
            or any(part in ("", ".", "..") for part in name.split("/"))):
        raise EdgeLlamaError(f"{where} an unsafe path {name!r}")


def _hash_stream(f: IO[bytes]) -> str:
    h = hashlib.sha256()
    while block := f.read(_CHUNK):
        h.update(block)
    return h.hexdigest()


def _compare(manifest: B.Manifest, present: list[str], where: str) -> None:
    extra = sorted(set(present) - set(manifest.files))
    if extra:
        raise EdgeLlamaError(f"{where} holds {extra[0]}, which the manifest does not list")
    missing = sorted(set(manifest.files) - set(present))
    if missing:
        raise EdgeLlamaError(f"bundle file {missing[0]} is missing")


def _corrupt(rel: str) -> EdgeLlamaError:
    return EdgeLlamaError(f"bundle file {rel} is corrupt or altered (sha256 mismatch)")


def _dir_manifest(root: Path) -> B.Manifest:
    """The directory's sealed manifest, once the files present are exactly the files it lists."""
    if not (root / B.MANIFEST).is_file():
        raise EdgeLlamaError(f"{root} is not a bundle: {B.MANIFEST} is missing")
    if (root / B.MANIFEST).stat().st_size > MAX_MANIFEST_BYTES:
        raise EdgeLlamaError(f"{B.MANIFEST} is corrupt (far too large for a manifest)")
    manifest = parse_manifest((root / B.MANIFEST).read_bytes())
    _compare(manifest, B.bundle_files(root), str(root))
    return manifest


def verify_dir(bundle: str | os.PathLike) -> B.Manifest:
    root = Path(bundle)
    manifest = _dir_manifest(root)
    for rel, digest in sorted(manifest.files.items()):
        with open(root / rel, "rb") as f:
            if _hash_stream(f) != digest:
                raise _corrupt(rel)
    return manifest


def _entries(zf: zipfile.ZipFile, where: str) -> dict[str, zipfile.ZipInfo]:
    """The archive's file entries by name; refuses unsafe names, links and duplicates."""
    out: dict[str, zipfile.ZipInfo] = {}
    for info in zf.infolist():
        name = info.filename
        _check_name(name.rstrip("/") if info.is_dir() else name, f"{where} holds")
        if stat.S_ISLNK(info.external_attr >> 16):
            raise EdgeLlamaError(f"{where} holds a symbolic link {name!r}")
        if info.is_dir():
            continue
        if name in out:
            raise EdgeLlamaError(f"{where} holds {name!r} twice")
        out[name] = info
    return out


def verify_zip(archive: str | os.PathLike) -> B.Manifest:
    where = str(archive)
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise EdgeLlamaError(f"{where} is not a readable zip archive ({exc})") from None
    with zf:
        entries = _entries(zf, where)
        if B.MANIFEST not in entries:
            raise EdgeLlamaError(f"{where} is not a bundle archive: {B.MANIFEST} is not at its top level")
        info = entries[B.MANIFEST]
        if info.file_size > MAX_MANIFEST_BYTES:
            raise EdgeLlamaError(f"{B.MANIFEST} in {where} is corrupt ({info.file_size} bytes is far too large)")
        manifest = parse_manifest(_read_entry(zf, info, B.MANIFEST, hashing=False))
        _compare(manifest, [n for n in entries if n != B.MANIFEST], where)
        for rel, digest in sorted(manifest.files.items()):
            if _read_entry(zf, entries[rel], rel, hashing=True) != digest:
                raise _corrupt(rel)
    return manifest


def _read_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo, rel: str, *, hashing: bool):
    """An entry's sha256 (hashing) or its bytes; damage the zip layer notices (CRC, deflate) names the file."""
    try:
        with zf.open(info) as f:
            return _hash_stream(f) if hashing else f.read()
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as exc:
        raise EdgeLlamaError(f"bundle file {rel} is corrupt or altered ({exc})") from None


def verify(path: str | os.PathLike) -> B.Manifest:
    """Check a bundle directory or a packed archive; returns its manifest or raises EdgeLlamaError."""
    p = Path(path)
    if p.is_dir():
        return verify_dir(p)
    if p.is_file():
        return verify_zip(p)
    raise EdgeLlamaError(f"{p} not found (expected a bundle directory or a .zip archive)")


def pack(bundle: str | os.PathLike, out: str | os.PathLike, *, force: bool = False) -> Path:
    """Write the bundle as one zip: manifest first, then the files in sorted order, all stored, fixed timestamps.

    Each file is hashed as it is copied: an archive never carries a file the manifest disowns.
    """
    root, out = Path(bundle), Path(out)
    if not root.is_dir():
        raise EdgeLlamaError(f"bundle {root} not found (expected a directory)")
    if out.resolve().is_relative_to(root.resolve()):
        raise EdgeLlamaError(f"the archive {out} must not be written inside the bundle it packs")
    if out.exists() and not force:
        raise EdgeLlamaError(f"{out} already exists: pass --force to replace it")
    if out.is_dir():
        raise EdgeLlamaError(f"{out} is a directory")
    manifest = _dir_manifest(root)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", allowZip64=True) as zf:
            _add(zf, root / B.MANIFEST, B.MANIFEST)
            for rel, digest in sorted(manifest.files.items()):
                if _add(zf, root / rel, rel) != digest:
                    raise _corrupt(rel)
        os.replace(tmp, out)
    except BaseException:
        os.unlink(tmp)
        raise
    return out


def _add(zf: zipfile.ZipFile, path: Path, rel: str) -> str:
    """Copy one file into the archive as a stored entry; returns its sha256."""
    info = zipfile.ZipInfo(rel, date_time=ZIP_EPOCH)
    info.create_system = 3  # unix, whatever the host: the attributes below are unix mode bits
    info.external_attr = (stat.S_IFREG | 0o644) << 16
    info.compress_type = zipfile.ZIP_STORED
    size = path.stat().st_size
    info.file_size = size
    h = hashlib.sha256()
    with open(path, "rb") as src, zf.open(info, "w", force_zip64=size >= zipfile.ZIP64_LIMIT) as dst:
        while block := src.read(_CHUNK):
            h.update(block)
            dst.write(block)
    return h.hexdigest()


def unpack(archive: str | os.PathLike, out: str | os.PathLike, *, force: bool = False) -> B.Manifest:
    """Verify an archive, then extract it into the directory `out` (atomically: all or nothing)."""
    from edgellama.fsutil import atomic_dir

    manifest = verify_zip(archive)
    with zipfile.ZipFile(archive) as zf, atomic_dir(out, force=force) as tmp:
        entries = _entries(zf, str(archive))
        for rel in [B.MANIFEST, *sorted(manifest.files)]:
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(entries[rel]) as src, open(dest, "wb") as dst:
                while block := src.read(_CHUNK):
                    dst.write(block)
        verify_dir(tmp)  # the archive could have changed between the two reads
    return manifest
