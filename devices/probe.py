"""Measure this machine: cores, RAM, and memory read bandwidth as numpy sees it.

Decode is a streaming read of every weight per token, so the figure that matters
is read bandwidth from DRAM: we reduce a buffer far larger than the last-level
cache, single-threaded and with one thread per core, each reading its own slice
(numpy releases the GIL inside reductions and BLAS calls).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import platform
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from edgellama.devices.catalog import (HOST, DeviceProfile, builtin_profiles, host_profile_path, live_host, load_catalog,
                                       profile_from_dict)
from edgellama.errors import EdgeLlamaError

MiB = 1 << 20
DEFAULT_BUFFER_BYTES = 512 * MiB
_ROW = 4096  # float32 columns per gemv row: 16 KiB rows keep the ones-vector in L1
_OS_NAMES = {"Linux": "linux", "Darwin": "macos", "Windows": "windows"}


def _meminfo() -> dict[str, int]:
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key] = int(parts[0]) * 1024  # /proc/meminfo reports kB
    return out


def total_ram_bytes() -> int:
    info = _meminfo()
    if "MemTotal" in info:
        return info["MemTotal"]
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        raise EdgeLlamaError("cannot tell this machine's RAM size (no /proc/meminfo, no sysconf)") from None


def _cgroup_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # cgroup v1 spells "no limit" as a huge number
            return int(text)
    return None


def app_memory_bytes(total: int) -> int:
    """What a new process may allocate now: MemAvailable, capped by a container's cgroup limit."""
    available = _meminfo().get("MemAvailable")
    if available is None:
        try:
            available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            available = total // 2  # no way to ask: assume the OS and other apps hold half
    limit = _cgroup_limit()
    return max(1, min(total, available, limit if limit is not None else total))


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def physical_cores() -> int:
    """Distinct (package, core) pairs among the CPUs we may run on; SMT siblings count once."""
    try:
        allowed = os.sched_getaffinity(0)
        blocks = Path("/proc/cpuinfo").read_text().split("\n\n")
    except (AttributeError, OSError):
        return os.cpu_count() or 1
    cores = set()
    for block in blocks:
        fields = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        if "core id" not in fields or int(fields.get("processor", -1)) not in allowed:
            continue
        cores.add((fields.get("physical id", "0"), fields["core id"]))
    return len(cores) or len(allowed)  # ARM cpuinfo has no core ids


def _openblas_thread_setter() -> tuple[Callable[[int], None], Callable[[], int]] | None:
    """openblas_{set,get}_num_threads of the BLAS numpy loaded, if it is OpenBLAS on Linux."""
    try:
        libs = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines() if "openblas" in line.lower()}
    except OSError:
        return None
    for path in sorted(libs):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in (("scipy_openblas_", "64_"), ("scipy_openblas_", ""), ("openblas_", "64_"), ("openblas_", "")):
            setter = getattr(lib, f"{prefix}set_num_threads{suffix}", None)
            getter = getattr(lib, f"{prefix}get_num_threads{suffix}", None)
            if setter is not None and getter is not None:
                return setter, getter
    return None


@contextlib.contextmanager
def _one_blas_thread_per_caller() -> Iterator[bool]:
    """Pin BLAS to one thread so a gemv measures the calling thread alone; False if we cannot."""
    found = _openblas_thread_setter()
    if found is None:
        yield False
        return
    setter, getter = found
    before = getter()
    setter(1)
    try:
        yield True
    finally:
        setter(before)


def _best_seconds(parts: list[np.ndarray], kernel: Callable[[np.ndarray], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        workers = [threading.Thread(target=kernel, args=(p,)) for p in parts]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = min(best, time.perf_counter() - start)
    return best


def measure_read_bandwidth(buffer: np.ndarray, threads: int, repeats: int = 5) -> tuple[float, str]:
    """Best read bandwidth (GB/s) over `repeats` passes, `threads` threads each on its own slice; and the kernel used.

    Two kernels, best one wins: numpy's SIMD max-reduce over uint8, and a float32
    gemv against a ones vector (only when BLAS can be pinned to one thread per caller,
    else its own thread pool would blur the thread count).
    """
    raw = buffer.view(np.uint8).reshape(-1)
    parts = np.array_split(raw[: len(raw) - len(raw) % (threads * _ROW * 4)], threads)
    nbytes = sum(p.nbytes for p in parts)
    if nbytes == 0:
        raise EdgeLlamaError(f"bandwidth buffer of {raw.nbytes} bytes is too small for {threads} threads")
    results = {"numpy uint8 max-reduce": _best_seconds(parts, np.max, repeats)}
    with _one_blas_thread_per_caller() as pinned:
        if pinned:
            ones = np.ones(_ROW, dtype=np.float32)
            rows = [p.view(np.float32).reshape(-1, _ROW) for p in parts]
            results["float32 gemv, BLAS pinned to 1 thread"] = _best_seconds(rows, lambda m: m @ ones, repeats)
    kernel = min(results, key=results.get)
    return nbytes / results[kernel] / 1e9, kernel


def probe_host(*, buffer_bytes: int | None = None, repeats: int = 8) -> DeviceProfile:
    """Measure this machine into a `host` profile (not written; see write_host_profile)."""
    total = total_ram_bytes()
    if buffer_bytes is None:
        buffer_bytes = min(DEFAULT_BUFFER_BYTES, total // 8)
    if buffer_bytes < MiB:
        raise EdgeLlamaError(f"bandwidth buffer must be at least 1 MiB, got {buffer_bytes} bytes")
    threads = usable_cpus()
    # Written, not just allocated: untouched pages would all read the shared zero page from cache.
    buffer = np.ones(buffer_bytes // 4, dtype=np.float32)
    single, single_kernel = measure_read_bandwidth(buffer, 1, repeats)
    multi, multi_kernel = measure_read_bandwidth(buffer, threads, repeats) if threads > 1 else (single, single_kernel)
    del buffer
    try:
        previous = load_catalog()[HOST]
    except EdgeLlamaError:  # a corrupt host file is what a fresh probe replaces
        previous = builtin_profiles()[HOST]
    placeholder = builtin_profiles()[HOST]
    size = f"{buffer_bytes / MiB:.0f} MiB"
    # RAM, free memory and cores are read from the OS whenever the profile is loaded (live_host).
    return live_host(replace(
        placeholder,
        os=_OS_NAMES.get(platform.system(), placeholder.os),
        memory_bandwidth_gbs=round(max(single, multi), 2),
        # Keep a calibrated speed model across re-probes: only a benchmark changes it.
        efficiency=previous.efficiency,
        layer_cost_us=previous.layer_cost_us,
        sources={
            "memory_bandwidth_gbs": (
                f"measured: read of a {size} buffer, best of {repeats}; {threads} threads {multi:.1f} GB/s "
                f"({multi_kernel}), 1 thread {single:.1f} GB/s ({single_kernel})"
            ),
            "efficiency": previous.sources["efficiency"],
            "layer_cost_us": previous.sources["layer_cost_us"],
        },
    ))


def write_host_profile(profile: DeviceProfile) -> Path:
    """Write the host profile atomically to host_profile_path() and return that path."""
    profile = profile_from_dict(profile.to_dict(), "the probed host profile")  # never write what we could not read back
    if profile.name != HOST:
        raise EdgeLlamaError(f"the host profile must be named {HOST!r}, got {profile.name!r}")
    path = host_profile_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".host_profile.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(profile.to_dict(), f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path
