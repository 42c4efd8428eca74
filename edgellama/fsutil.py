"""Atomic output directories: a killed export never leaves a half bundle that loads."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from edgellama.errors import EdgeLlamaError


def check_output_dir(out: str | os.PathLike, force: bool) -> Path:
    out = Path(out)
    if out.exists() and not force:
        if out.is_dir() and not any(out.iterdir()):
            return out
        raise EdgeLlamaError(f"{out} already exists: pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise EdgeLlamaError(f"{out} exists and is not a directory")
    return out


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success, rename it to `out` (replacing an old one)."""
    out = check_output_dir(out, force)
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            os.replace(out, old / "x")  # move aside, then swap in: two renames, never a mix
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
