"""Atomic output directories: a killed export never leaves a half bundle that loads.

Work happens in a sibling `.NAME.tmp-PID-*` directory that is renamed onto NAME only once
complete; replacing an existing NAME swaps the two in one rename where the OS can. The
writer's pid in the sibling's name lets the next run tell a dead writer's leftovers
(removed) from a live concurrent writer's (left alone).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

from edgellama.errors import EdgeLlamaError

_SIBLING = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[^/]*$")


def is_temp_sibling(path: str | os.PathLike) -> bool:
    """Is this the work directory of an unfinished (or killed) atomic write?"""
    return _SIBLING.match(Path(path).name) is not None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's live process, or we cannot tell: leave its files alone
    return True


def clean_stale(out: str | os.PathLike) -> list[Path]:
    """Remove the siblings that killed writers of `out` left; put back a bundle a killed swap moved aside."""
    out = Path(out)
    parent = out.resolve().parent
    if not parent.is_dir():
        return []
    removed = []
    for p in sorted(parent.iterdir()):
        m = _SIBLING.match(p.name)
        if not m or m["name"] != out.name or int(m["pid"]) == os.getpid() or _alive(int(m["pid"])):
            continue
        moved = p / "x"
        if m["kind"] == "old" and moved.is_dir() and not os.path.lexists(out):
            os.replace(moved, out)  # killed between the two renames of the fallback swap
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def check_output_dir(out: str | os.PathLike, force: bool) -> Path:
    out = Path(out)
    clean_stale(out)
    if out.exists() and not force:
        if out.is_dir() and not any(out.iterdir()):
            return out
        raise EdgeLlamaError(f"{out} already exists: pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise EdgeLlamaError(f"{out} exists and is not a directory")
    return out


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one rename (Linux renameat2, macOS renamex_np); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if sys.platform.startswith("linux"):
            rc = libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), 2)  # AT_FDCWD, RENAME_EXCHANGE
        elif sys.platform == "darwin":
            rc = libc.renamex_np(os.fsencode(a), os.fsencode(b), 2)  # RENAME_SWAP
        else:
            return False
    except (OSError, AttributeError):  # no such libc function (old glibc, musl)
        return False
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False  # the filesystem cannot swap: fall back to two renames
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success, rename it to `out` (replacing an old one)."""
    out = check_output_dir(out, force)
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=parent))
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes it 0700; a bundle is an ordinary directory
    try:
        yield tmp
        if not out.exists():
            os.replace(tmp, out)
        elif _exchange(tmp, out):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old bundle
        else:
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=parent))
            os.replace(out, old / "x")  # move aside, then swap in; a kill in between is undone by clean_stale
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
