"""Interrupted and concurrent work.

An export killed with SIGKILL at any moment leaves either no output or the previous complete
bundle (with --force), never a half bundle that loads; its work directory is not mistaken for a
bundle and the next run removes it. Four threads driving four models loaded from one bundle each
get the greedy output they get alone.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edgellama.errors import EdgeLlamaError
from edgellama.fsutil import _exchange, atomic_dir, clean_stale
from edgellama.runtime import bundle as B
from edgellama.runtime.generate import load, stream_generate
from edgellama.runtime.sampling import SamplingParams
from helpers import leftovers

START_TIMEOUT = 300  # seconds one export may take on a loaded machine


def export_cmd(source: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "edgellama", "export", str(source), "-o", str(out), "--no-verify", *extra]


def timed_export(cmd: list[str], out: Path, kill_after: float | None = None, *, from_start: bool = False):
    """Run an export; with kill_after, SIGKILL it that many seconds after its work directory appears
    (after its start, with from_start). Returns (exit code, seconds from the work directory appearing
    to `out` appearing, or None when `out` existed before or did not appear)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    fresh = not out.exists()
    with open(out.parent / f"{out.name}.stderr", "wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
    marker = f".{out.name}.tmp-{proc.pid}-"
    start = time.monotonic()
    t_work = start if from_start else None
    renamed = None
    try:
        while proc.poll() is None:
            now = time.monotonic()
            if now - start > START_TIMEOUT:
                raise AssertionError(f"export still running after {START_TIMEOUT} s")
            if t_work is None and any(p.name.startswith(marker) for p in out.parent.iterdir()):
                t_work = now
            if fresh and renamed is None and t_work is not None and out.exists():
                renamed = now - t_work
            if kill_after is not None and t_work is not None and now - t_work >= kill_after:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return -signal.SIGKILL, renamed
            time.sleep(0.005)
        if fresh and renamed is None and out.exists():
            renamed = time.monotonic() - (t_work or start)
        message = (out.parent / f"{out.name}.stderr").read_text(errors="replace")
        assert proc.returncode == 0 or kill_after is not None, message
        return proc.returncode, renamed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def assert_complete(out: Path) -> B.Manifest:
    m = B.read_manifest(out)  # every checksum verified
    model = load(out, threads=1, max_context=32)
    assert len(model.tokenizer.encode("still works")) > 0
    return m


def assert_leftovers_are_not_bundles(parent: Path, name: str) -> list[str]:
    left = leftovers(parent, name)
    for entry in left:
        with pytest.raises(EdgeLlamaError):
            load(parent / entry, threads=1)
    return left


def test_sigkill_at_random_points_never_leaves_a_half_bundle(tiny_llama, tmp_path):
    source = tiny_llama("gqa3").folder
    old = tmp_path / "bundle"
    # A complete run measures the window from its work directory appearing to the final rename
    # (and is the bundle that killed --force replacements below must not lose).
    code, window = timed_export(export_cmd(source, old, "--max-context", "64"), old)
    assert code == 0 and window is not None and assert_complete(old).context_length == 64

    out = tmp_path / "fresh"
    cmd = export_cmd(source, out, "--max-context", "64")
    # Killed while loading (before any output), then at points spread over the writing window.
    for f, from_start in [(0.5, True), (0.1, False), (0.35, False), (0.6, False), (0.85, False)]:
        for _ in range(3):
            code, renamed = timed_export(cmd, out, f if from_start else f * window, from_start=from_start)
            if not out.exists():
                assert code == -signal.SIGKILL
                break
            # This run beat the last one and renamed before the kill: complete, as it must be.
            # Measure again and retry the point.
            assert_complete(out)
            shutil.rmtree(out)
            window = min(window, renamed)
        else:
            raise AssertionError(f"exports kept finishing before a kill at {f} of the window")
        assert_leftovers_are_not_bundles(tmp_path, out.name)

    # Rerunning succeeds, and sweeps away what the killed runs left.
    code, _ = timed_export(export_cmd(source, out, "--max-context", "64"), out)
    assert code == 0 and assert_complete(out).context_length == 64
    assert leftovers(tmp_path, out.name) == []

    # A killed --force replacement (here a quantizing export) leaves the old bundle or the new one,
    # each complete; never neither, never a mix.
    replace = export_cmd(source, old, "--max-context", "96", "--quant", "int4", "--force")
    killed = 0
    for f in (0.1, 0.5, 0.9):
        code, _ = timed_export(replace, old, f * window)
        killed += code == -signal.SIGKILL
        m = assert_complete(old)
        assert (m.context_length, m.quantization is None) in {(64, True), (96, False)}
        assert_leftovers_are_not_bundles(tmp_path, old.name)
    assert killed >= 2
    code, _ = timed_export(replace, old)
    assert code == 0
    m = assert_complete(old)
    assert m.context_length == 96 and m.quantization["bits"] == 4
    assert leftovers(tmp_path, old.name) == []


def test_stale_work_dirs_are_swept_but_live_ones_kept(tmp_path):
    out = tmp_path / "bundle"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale_tmp = tmp_path / f".bundle.tmp-{dead.pid}-abc"
    stale_tmp.mkdir()
    (stale_tmp / "model.onnx").write_bytes(b"half")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live_tmp = tmp_path / f".bundle.tmp-{live.pid}-def"
        live_tmp.mkdir()
        other = tmp_path / f".other.tmp-{dead.pid}-ghi"  # another output's: not ours to touch
        other.mkdir()
        # A swap killed between its two renames (the fallback where the OS cannot exchange):
        # the previous bundle sits in an `.old-` sibling and `out` is missing.
        moved = tmp_path / f".bundle.old-{dead.pid}-jkl"
        (moved / "x").mkdir(parents=True)
        (moved / "x" / B.MANIFEST).write_text("{}")

        removed = clean_stale(out)
        assert sorted(p.name for p in removed) == sorted([stale_tmp.name, moved.name])
        assert live_tmp.exists() and other.exists() and not stale_tmp.exists()
        assert (out / B.MANIFEST).read_text() == "{}"  # put back where it was
    finally:
        live.kill()
        live.wait()


def test_force_replaces_by_exchanging_directories(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "name").write_text(d.name)
    swapped = _exchange(a, b)  # renameat2(RENAME_EXCHANGE) on Linux, renamex_np(RENAME_SWAP) on macOS
    assert swapped == sys.platform.startswith(("linux", "darwin"))
    assert (a / "name").read_text() == ("b" if swapped else "a")

    out = tmp_path / "bundle"
    out.mkdir()
    (out / "version").write_text("old")
    with atomic_dir(out, force=True) as work:
        (work / "version").write_text("new")
        assert (out / "version").read_text() == "old"  # untouched until the work is complete
    assert (out / "version").read_text() == "new"
    assert leftovers(tmp_path, "bundle") == []
    with pytest.raises(EdgeLlamaError, match="--force"):
        with atomic_dir(out):
            pass


def greedy_ids(model, prompt: str, n: int = 24) -> list[int]:
    params = SamplingParams(max_new_tokens=n)
    return [e.token_id for e in stream_generate(model, prompt, params)]


def test_four_threads_four_models_same_greedy_output(exported):
    bundle = exported("gqa4", "fast").dir
    prompts = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "1, 2, 3, 4,"]
    models = [load(bundle, threads=1, max_context=64) for _ in prompts]
    alone = [greedy_ids(models[0], p) for p in prompts]
    assert len({tuple(a) for a in alone}) > 1  # distinct prompts give distinct outputs: cross-talk would show

    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(prompts))

    def worker(i: int) -> None:
        try:
            barrier.wait()
            for _ in range(2):  # twice: each model's reset between runs must hold too
                results[i] = greedy_ids(models[i], prompts[i])
                assert results[i] == alone[i]
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[0]
    assert [results[i] for i in range(len(prompts))] == alone
