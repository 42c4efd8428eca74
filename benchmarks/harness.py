"""edgellama vs llama.cpp vs onnxruntime-genai, side by side on this machine, in one run.

    python benchmarks/harness.py                          # build what is missing, measure, write RESULTS.md
    python benchmarks/harness.py --repeat 1 --workloads smollm2  # a quick smoke

Two workloads (SmolLM2-135M-Instruct, and random weights in Llama-3.2-1B's shapes), five
systems each: edgellama's default int4 bundle, llama.cpp Q4_0 and Q4_K_M (llama-cpp-python,
compiled here with GGML_NATIVE), onnxruntime-genai's model-builder int4 CPU build as built and
tuned. Every run is its own subprocess (clean peak RSS, read from wait4), all get the same
prompt ids, greedy, stop ids ignored; rounds are interleaved A B C A B C so slow phases of
the shared memory bus hit every system alike. Medians are reported. Every artifact is cached
under benchmarks/work/, so a rerun only measures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / "work"
RESULTS = HERE / "RESULTS.md"
sys.path.insert(0, str(HERE))

import bench_genai  # noqa: E402
import bench_llamacpp  # noqa: E402


def log(msg: str) -> None:
    print(f"harness: {msg}", file=sys.stderr, flush=True)


# -- workloads: one HF folder each, the common source of every system's artifact -------------------
@dataclass
class Workload:
    name: str
    title: str
    gguf_pre: str  # llama.cpp's pre-tokenizer name for this vocabulary
    hf: Path  # the HF folder every system's artifact is built from
    make_hf: Callable[[Path], Path]

    @property
    def dir(self) -> Path:
        return WORK / self.name


def smollm2_hf(out: Path) -> Path:
    """SmolLM2-135M-Instruct as a HF folder, from the GGUF edgellama ships an alias for (Q4_1, dequantized)."""
    stamp = out / "source.json"
    if stamp.is_file():
        return out
    from edgellama.export.safetensors_io import save_file
    from edgellama.export.sources import load_source

    src = load_source("smollm2-135m-instruct")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({n: src.tensors.get(n) for n in src.tensors.names()}, tmp / "model.safetensors")
    (tmp / "config.json").write_text(json.dumps(src.config.to_hf(), indent=2) + "\n")
    (tmp / "tokenizer.json").write_text(json.dumps(src.tokenizer_json, ensure_ascii=False), encoding="utf-8")
    tok_cfg = dict(src.tokenizer_config or {})
    if src.chat_template:
        tok_cfg["chat_template"] = src.chat_template
    (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if src.generation_config:
        (tmp / "generation_config.json").write_text(json.dumps(src.generation_config, indent=2) + "\n")
    (tmp / stamp.name).write_text(json.dumps({"source": src.description}) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def shape_hf(which: str) -> Callable[[Path], Path]:
    def make(out: Path) -> Path:
        from make_shape import make_shape

        return make_shape(which, out, log=log)
    return make


WORKLOADS = {
    "smollm2": Workload("smollm2", "SmolLM2-135M-Instruct", "smollm", WORK / "smollm2-135m-instruct-hf", smollm2_hf),
    "1b": Workload("1b", "Llama-3.2-1B shape (random weights)", "llama-bpe", WORK / "llama-3.2-1b-shape", shape_hf("1b")),
    # The laptop sizes: not in the default run (the 8B's checkpoint is 16 GB; onnxruntime-genai's
    # builder needs more memory than this machine has for it): name them with --workloads.
    "3b": Workload("3b", "Llama-3.2-3B shape (random weights)", "llama-bpe", WORK / "llama-3.2-3b-shape", shape_hf("3b")),
    "8b": Workload("8b", "Llama-3.1-8B shape (random weights)", "llama-bpe", WORK / "llama-3.1-8b-shape", shape_hf("8b")),
}
DEFAULT_WORKLOADS = "smollm2,1b"


# -- systems: how each builds its artifact from the HF folder, and the command that measures it --------
@dataclass
class System:
    name: str
    build: Callable[[Workload, Path, "Config"], Path]
    command: Callable[[Path, Path, "Config"], list[str]]
    files: Callable[[Path], list[Path]]  # the weight files (what "file MB" counts)
    recipe: Callable[[Workload, "Config"], str]  # the build, as commands a reader can rerun


@dataclass
class Config:
    prompt_tokens: int = 128
    new_tokens: int = 128
    threads: int = 2
    repeat: int = 3


def _vm_hwm_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), 0)
    except OSError:
        return 0


def _wait_peak(proc: subprocess.Popen) -> tuple[int, float]:
    """Wait for proc: its exit code and its own peak RSS in MB.

    wait4's ru_maxrss starts from this process's high-water mark when it forked (Linux carries it
    through fork and exec): after an in-process GGUF write it says GB for a child that took MB. A
    figure above our own peak is the child's; otherwise the child's VmHWM, polled while it ran."""
    hwm_kb = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        hwm_kb = max(hwm_kb, _vm_hwm_kb(proc.pid))
        time.sleep(0.1)
    maxrss_kb = usage.ru_maxrss / 1024 if sys.platform == "darwin" else usage.ru_maxrss  # bytes on macOS
    own_kb = maxrss_kb if maxrss_kb > _vm_hwm_kb(os.getpid()) or not hwm_kb else hwm_kb
    return os.waitstatus_to_exitcode(status), own_kb / 1024


def _run_logged(cmd: list[str], logfile: Path, **kw) -> None:
    log("$ " + " ".join(map(str, cmd)))
    t0 = time.perf_counter()
    with open(logfile, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, **kw)
        proc.returncode, peak_mb = _wait_peak(proc)
    with open(logfile, "a") as f:
        f.write(f"harness: {time.perf_counter() - t0:.1f} s, peak RSS {peak_mb:.0f} MB\n")
    if proc.returncode != 0:
        tail = logfile.read_text(errors="replace").strip().splitlines()[-5:]
        raise SystemExit(f"harness: failed ({proc.returncode}): {' '.join(map(str, cmd))}\n  " + "\n  ".join(tail))


def edgellama_build(preset: str) -> Callable[[Workload, Path, "Config"], Path]:
    """`edgellama export --quant PRESET` of the workload's HF folder (quantize/presets.py)."""
    def build(w: Workload, hf: Path, cfg: Config) -> Path:
        out = w.dir / f"edgellama-{preset}"
        if not (out / "edgellama.json").is_file():
            shutil.rmtree(out, ignore_errors=True)
            _run_logged([sys.executable, "-m", "edgellama", "export", str(hf), "-o", str(out), "--quant", preset],
                        w.dir / f"edgellama-{preset}.log")
        return out

    return build


def edgellama_recipe(preset: str) -> Callable[[Workload, "Config"], str]:
    return lambda w, c: f"edgellama export {w.hf} -o {w.dir / f'edgellama-{preset}'} --quant {preset}"


def edgellama_command(bundle: Path, prompt_file: Path, cfg: Config) -> list[str]:
    # edgellama bench builds the same prompt ids itself (bench.bundle_prompt), so prompt_file is not passed.
    return [sys.executable, "-m", "edgellama", "bench", str(bundle), "--json", "--repeat", "1",
            "--prompt-tokens", str(cfg.prompt_tokens), "--new-tokens", str(cfg.new_tokens), "--threads", str(cfg.threads)]


def gguf_f16(w: Workload, hf: Path) -> Path:
    out = w.dir / "model-f16.gguf"
    if not out.is_file():
        from bench_gguf import write_gguf

        log(f"writing {out.name} from {hf.name}")
        write_gguf(hf, out, pre=w.gguf_pre, name=hf.name)
    return out


def llamacpp_build(ftype: str) -> Callable[[Workload, Path, Config], Path]:
    def build(w: Workload, hf: Path, cfg: Config) -> Path:
        out = w.dir / f"model-{ftype.lower()}.gguf"
        py = bench_llamacpp.ensure_venv(log)  # also when the GGUF exists: the runs need a build for this CPU
        if not out.is_file():
            src = gguf_f16(w, hf)
            _run_logged([str(py), str(HERE / "bench_llamacpp.py"), "quantize", str(src), str(out), ftype],
                        w.dir / f"quantize-{ftype.lower()}.log")
        return out

    return build


def llamacpp_command(model: Path, prompt_file: Path, cfg: Config) -> list[str]:
    return [str(bench_llamacpp.venv_python()), str(HERE / "bench_llamacpp.py"), "run", str(model), str(prompt_file),
            "--new-tokens", str(cfg.new_tokens), "--threads", str(cfg.threads)]


def llamacpp_recipe(ftype: str) -> Callable[[Workload, Config], str]:
    def recipe(w: Workload, cfg: Config) -> str:
        f16, out = w.dir / "model-f16.gguf", w.dir / f"model-{ftype.lower()}.gguf"
        lines = [f"python benchmarks/bench_gguf.py {w.hf} {f16} --pre {w.gguf_pre}"] if ftype == "Q4_0" else []
        lines.append(f"{bench_llamacpp.venv_python()} benchmarks/bench_llamacpp.py quantize {f16} {out} {ftype}")
        qlog = w.dir / f"quantize-{ftype.lower()}.log"
        fallback = [l for l in qlog.read_text(errors="replace").splitlines() if "fallback" in l] if qlog.is_file() else []
        if fallback:  # K-quants need rows in multiples of 256; llama.cpp substitutes other types where they are not
            lines[-1] += f"  # llama.cpp: {fallback[-1].split(':', 1)[-1].strip()}"
        return "\n".join(lines)

    return recipe


def genai_build(tuned: bool) -> Callable[[Workload, Path, Config], Path]:
    def build(w: Workload, hf: Path, cfg: Config) -> Path:
        return bench_genai.build(hf, w.dir / ("genai-int4-tuned" if tuned else "genai-int4"), tuned=tuned,
                                 threads=cfg.threads, log=log)

    return build


def genai_command(model: Path, prompt_file: Path, cfg: Config) -> list[str]:
    return [sys.executable, str(HERE / "bench_genai.py"), "run", str(model), str(prompt_file),
            "--new-tokens", str(cfg.new_tokens)]


def genai_recipe(tuned: bool) -> Callable[[Workload, Config], str]:
    def recipe(w: Workload, cfg: Config) -> str:
        out = w.dir / ("genai-int4-tuned" if tuned else "genai-int4")
        cmd = " ".join(bench_genai.builder_command(w.hf, out, w.dir / "cache", tuned)[1:])
        cmd = "python " + cmd
        return cmd + (f"  # then genai_config.json: intra_op_num_threads = {cfg.threads}" if tuned else "")

    return recipe


def _onnx_files(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.name.startswith("model.onnx"))


SYSTEMS = [
    # The first system is the baseline of every ratio; the presets are quantize/presets.py's.
    System("edgellama int4", edgellama_build("int4"), edgellama_command, _onnx_files, edgellama_recipe("int4")),
    System("edgellama int4-fast", edgellama_build("int4-fast"), edgellama_command, _onnx_files,
           edgellama_recipe("int4-fast")),
    System("edgellama int8", edgellama_build("int8"), edgellama_command, _onnx_files, edgellama_recipe("int8")),
    System("llama.cpp Q4_0", llamacpp_build("Q4_0"), llamacpp_command, lambda p: [p], llamacpp_recipe("Q4_0")),
    System("llama.cpp Q4_K_M", llamacpp_build("Q4_K_M"), llamacpp_command, lambda p: [p], llamacpp_recipe("Q4_K_M")),
    System("llama.cpp Q8_0", llamacpp_build("Q8_0"), llamacpp_command, lambda p: [p], llamacpp_recipe("Q8_0")),
    System("ort-genai int4 (as built)", genai_build(False), genai_command, bench_genai.weight_files, genai_recipe(False)),
    System("ort-genai int4 (tuned)", genai_build(True), genai_command, bench_genai.weight_files, genai_recipe(True)),
]


# -- measuring ---------------------------------------------------------------------------------------
def measure(cmd: list[str]) -> dict:
    """Run one measuring subprocess; its JSON answer plus its own peak RSS (_wait_peak: no other child counts)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        proc.returncode, peak = _wait_peak(proc)
        if proc.returncode != 0:
            err.seek(0)
            tail = err.read().decode(errors="replace").strip().splitlines()[-5:]
            raise SystemExit(f"harness: {' '.join(cmd)} failed ({proc.returncode}):\n  " + "\n  ".join(tail))
        out.seek(0)
        text = out.read().decode().strip()
    try:
        result = json.loads(text)  # edgellama bench --json: one indented object
    except json.JSONDecodeError:
        result = json.loads(text.splitlines()[-1])  # the runners: one line, last
    result["peak_rss_mb"] = peak  # the same yardstick for every system
    if "runs" in result:  # edgellama bench's answer: its one run's generated ids
        result["token_ids"] = result["runs"][0]["token_ids"]
    return result


def prompt_file(w: Workload, bundle: Path, cfg: Config) -> Path:
    """The ids edgellama bench feeds itself, written for the other runners."""
    from edgellama.runtime.bench import bundle_prompt
    from edgellama.runtime.bundle import read_manifest
    from edgellama.runtime.tokenizer import Tokenizer

    ids = bundle_prompt(read_manifest(bundle, verify=False), Tokenizer.from_dir(bundle), cfg.prompt_tokens)
    path = w.dir / f"prompt-{cfg.prompt_tokens}.json"
    path.write_text(json.dumps(ids) + "\n")
    return path


@dataclass
class Row:
    system: str
    file_bytes: int
    runs: list[dict] = field(default_factory=list)

    def median(self, key: str) -> float:
        return statistics.median(r[key] for r in self.runs)


def agreement(a: list[int], b: list[int]) -> int:
    """Leading generated tokens two systems agree on: a sanity check of the conversions, not a quality score."""
    from edgellama.runtime.generate import common_prefix

    return common_prefix(a, b)


# -- planner calibration -----------------------------------------------------------------------------
def calibrate(tables: dict[str, list[Row]], write: bool) -> list[str]:
    """Check `edgellama plan`'s decode prediction for each edgellama bundle on `host` against the measurement.

    The planner's model is tok/s = efficiency x bandwidth / bytes read per token, so each workload
    implies an efficiency; the geometric mean of them is the single figure that minimises the worst
    relative error over the workloads. With write, it is stored in the host profile.
    """
    from dataclasses import replace

    from edgellama.devices.catalog import HOST, get_profile
    from edgellama.devices.probe import write_host_profile
    from edgellama.runtime.bench import markdown_table

    host = get_profile(HOST)
    points = []  # (workload, layers, predicted at the current efficiency, measured, plan's bytes per token)
    for name, rows in tables.items():
        if name not in WORKLOADS:  # the long-prompt tables: the planner models the short workload
            continue
        runs = rows[0].runs
        pred = runs[0].get("predicted_decode_tok_s")
        if not pred:
            return ["Planner check skipped: the host profile has no probed bandwidth (run without --no-probe).", ""]
        layers = json.loads((WORKLOADS[name].hf / "config.json").read_text())["num_hidden_layers"]
        read = host.efficiency * host.memory_bandwidth_gbs * 1e9 / pred
        points.append((name, layers, pred, rows[0].median("decode_tok_s"), read))
    effs = [host.efficiency * m / p for _, _, p, m, _ in points]
    best = min(1.0, statistics.geometric_mean(effs))
    body = [[WORKLOADS[n].title, f"{p:.2f}", f"{m:.2f}", f"{e:.3f}", f"{p * best / host.efficiency:.2f}",
             f"{100 * (p * best / host.efficiency / m - 1):+.0f}%"] for (n, _, p, m, _), e in zip(points, effs)]
    lines = ["## Planner check (`edgellama plan`, device `host`, each edgellama bundle's quantization)", "",
             markdown_table(["workload", f"predicted at efficiency {host.efficiency:.3f}", "measured tok/s",
                             "implied efficiency", f"predicted at {best:.3f}", "error"], body), ""]
    if len(points) == 2:
        # Two unknowns fit exactly: 1/tok_s = read / (efficiency x bandwidth) + layers x per-layer cost.
        (_, l1, _, m1, r1), (_, l2, _, m2, r2) = points
        det = r1 * l2 - r2 * l1
        if det:
            x = (l2 / m1 - l1 / m2) / det
            c = (r1 / m2 - r2 / m1) / det
            if x > 0 and c > 0:
                lines += [f"A per-layer fixed cost would fit both exactly: efficiency "
                          f"{1 / (x * host.memory_bandwidth_gbs * 1e9):.3f} plus {1e6 * c:.1f} µs per layer per token.", ""]
    if write:
        note = (f"calibrated: benchmarks/harness.py on {time.strftime('%Y-%m-%d')}, geometric mean of "
                + ", ".join(f"{WORKLOADS[n].title} {e:.3f}" for (n, *_), e in zip(points, effs))
                + f" at {host.memory_bandwidth_gbs:.1f} GB/s")
        path = write_host_profile(replace(host, efficiency=round(best, 3), sources={**host.sources, "efficiency": note}))
        lines += [f"Stored efficiency {best:.3f} in {path}.", ""]
        log(f"host efficiency {host.efficiency:.3f} -> {best:.3f} ({path})")
    return lines


# -- report ------------------------------------------------------------------------------------------
def _sh(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine() -> dict[str, str]:
    lscpu = dict(line.split(":", 1) for line in _sh(["lscpu"]).splitlines() if ":" in line)
    mem = next((l.split()[1] for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")), "0")
    return {
        "cpu": lscpu.get("Model name", platform.processor()).strip(),
        "cores": f"{len(os.sched_getaffinity(0))} usable CPUs ({lscpu.get('Core(s) per socket', '?').strip()} cores/socket, "
                 f"{lscpu.get('Thread(s) per core', '?').strip()} threads/core)",
        "ram": f"{int(mem) / (1 << 20):.1f} GiB",
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


def versions() -> dict[str, str]:
    from importlib.metadata import version

    out = {}
    for pkg in ("edgellama", "onnxruntime", "onnxruntime-genai", "numpy", "gguf"):
        try:
            out[pkg] = version(pkg)
        except Exception:  # noqa: BLE001 - a missing package is reported, not fatal
            out[pkg] = "not installed"
    out["llama-cpp-python"] = bench_llamacpp.version() if bench_llamacpp.venv_python().exists() else "not built"
    return out


def host_line() -> str:
    from edgellama.devices.catalog import HOST, get_profile

    h = get_profile(HOST)
    return (f"host profile: {h.memory_bandwidth_gbs:.1f} GB/s read bandwidth ({h.sources['memory_bandwidth_gbs']}); "
            f"efficiency {h.efficiency:.2f} ({h.sources['efficiency']})")


def _show(text: str) -> str:
    """A command as a reader reruns it from the repository root."""
    return text.replace(sys.executable, "python").replace(str(REPO) + os.sep, "")


LONG_PROMPT = 2048  # --long: the same systems after a prompt of this many tokens (decode at that depth)


def table_title(key: str, cfg: Config) -> str:
    """Tables are keyed by workload name, and "name@N" for the long-prompt run of the same workload."""
    name, _, n = key.partition("@")
    return f"{WORKLOADS[name].title}, {n or cfg.prompt_tokens}-token prompt"


def per_round(row: Row, base: Row, key: str) -> str:
    """min-max over rounds of row's figure / the baseline's in the same round (interleaved, so same conditions)."""
    ratios = sorted(a[key] / b[key] for a, b in zip(row.runs, base.runs))
    return f"{ratios[0]:.2f}-{ratios[-1]:.2f}"


def frontier_plot(tables: dict[str, list[Row]], kld: dict[str, float], cfg: Config, out: Path) -> str | None:
    """Decode tok/s against KLD (marker area ~ peak RSS), one panel per table; None without matplotlib or KLDs."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        log("frontier plot skipped: matplotlib is not installed (pip install 'edgellama[bench]')")
        return None
    keys = [k for k, rows in tables.items() if any(r.system in kld for r in rows)]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for r in tables[key]:
            if r.system not in kld:
                continue
            ours = r.system.startswith("edgellama")
            ax.scatter(kld[r.system], r.median("decode_tok_s"), s=r.median("peak_rss_mb") / 4, alpha=0.6,
                       color="tab:blue" if ours else "tab:gray", edgecolors="black")
            ax.annotate(r.system, (kld[r.system], r.median("decode_tok_s")), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("mean KLD vs fp32, de-gridded SmolLM2 (log; left is better)")
        ax.set_ylabel("decode tok/s (up is better)")
        ax.set_title(table_title(key, cfg), fontsize=9)
        ax.grid(True, alpha=0.3)
    fig.suptitle("speed/quality frontier (marker area ~ peak RSS)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out.name


def dominated(rows: list[Row], kld: dict[str, float]) -> list[str]:
    """Peers both faster (median decode) and more accurate (KLD) than some edgellama preset."""
    ours = [r for r in rows if r.system.startswith("edgellama") and r.system in kld]
    return [f"{p.system} beats {o.system}" for p in rows if not p.system.startswith("edgellama") and p.system in kld
            for o in ours if p.median("decode_tok_s") > o.median("decode_tok_s") and kld[p.system] < kld[o.system]]


def write_results(tables: dict[str, list[Row]], cfg: Config, recipes: dict[str, list[str]], started: float,
                  loads: tuple[str, str], commands: dict[str, list[str]], calibration: list[str],
                  results: Path = RESULTS, kld: dict[str, float] | None = None) -> str:
    from edgellama.runtime.bench import markdown_table

    m, v = machine(), versions()
    lines = [
        "# Side-by-side decode benchmark", "",
        f"Written by `python benchmarks/harness.py` on {time.strftime('%Y-%m-%d %H:%M', time.localtime(started))} "
        f"({(time.time() - started) / 60:.1f} min). {cfg.prompt_tokens}-token prompt, {cfg.new_tokens} new tokens, "
        f"greedy, stop ids ignored, {cfg.threads} threads; {cfg.repeat} interleaved round(s) "
        "(every system once per round, each run its own subprocess); medians.", "",
        "## Machine", "",
        *[f"- {k}: {val}" for k, val in m.items()],
        f"- load average at start / end: {loads[0]} / {loads[1]} (the machine may be shared: compare within a table)",
        f"- {host_line()}", "",
        "## Versions", "", *[f"- {k} {val}" for k, val in v.items()], "",
        "## Results", "",
        "TTFT is prefill of the prompt plus picking the first token; decode tok/s counts the "
        f"{cfg.new_tokens - 1} steps after it; peak RSS is the measuring subprocess's ru_maxrss (Python "
        "interpreter and imports included, alike for all). File MB counts the weight files only. "
        "`× edgellama` is the system's figure over edgellama's (decode: >1 is faster; TTFT: >1 is slower). "
        "`agree` counts the leading generated tokens identical to edgellama's: a sanity check of the "
        "conversions (the int4 schemes differ, so greedy paths part after a few tokens; random weights give "
        "flat logits, so expect fewer there).", "",
    ]
    for name, rows in tables.items():
        base = rows[0]
        head = ["system", "file MB", "TTFT ms", "prefill tok/s", "decode tok/s", "peak RSS MB",
                "decode × edgellama", "per round", "TTFT × edgellama", "per round ", "agree"]
        if kld:
            head.append("KLD")
        body = []
        for r in rows:
            body.append([r.system, f"{r.file_bytes / 1e6:.1f}", f"{1000 * r.median('ttft_s'):.1f}",
                         f"{r.median('prefill_tok_s'):.1f}", f"{r.median('decode_tok_s'):.2f}",
                         f"{r.median('peak_rss_mb'):.0f}", f"{r.median('decode_tok_s') / base.median('decode_tok_s'):.2f}",
                         per_round(r, base, "decode_tok_s"), f"{r.median('ttft_s') / base.median('ttft_s'):.2f}",
                         per_round(r, base, "ttft_s"),
                         f"{agreement(r.runs[0]['token_ids'], base.runs[0]['token_ids'])}/{cfg.new_tokens}"])
            if kld:
                body[-1].append(f"{kld[r.system]:.4f}" if r.system in kld else "")
        lines += [f"### {table_title(name, cfg)}", "", markdown_table(head, body), ""]
        if kld:
            beaten = dominated(rows, kld)
            lines += ["Peers faster and more accurate than an edgellama preset: "
                      + ("; ".join(beaten) if beaten else "none") + ".", ""]
    if kld:
        png = frontier_plot(tables, kld, cfg, results.with_suffix(".png"))
        lines += [f"KLD: mean KL divergence from the fp32 model on de-gridded SmolLM2 (docs/quantization.md), the "
                  "same figure on every table (quality is a property of the format, not the prompt)."
                  + (f" Frontier plot: [{png}]({png})." if png else ""), ""]
    if calibration:
        lines += calibration
    lines += ["## How each artifact was built", ""]
    for name, rs in recipes.items():
        lines += [f"{WORKLOADS[name].title}:", "", "```", *map(_show, rs), "```", ""]
    lines += ["## Measuring commands (one subprocess per run)", ""]
    for name, cs in commands.items():
        lines += [f"{table_title(name, cfg)}:", "", "```", *map(_show, cs), "```", ""]
    text = "\n".join(lines)
    results.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default=DEFAULT_WORKLOADS,
                    help=f"comma-separated: {', '.join(WORKLOADS)} (default {DEFAULT_WORKLOADS})")
    ap.add_argument("--systems", default=None, help="comma-separated substrings of system names (edgellama always runs)")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prepare-only", action="store_true", help="build every artifact, measure nothing")
    ap.add_argument("--no-probe", action="store_true", help="keep the host profile's bandwidth instead of re-probing")
    ap.add_argument("--calibrate", action="store_true",
                    help="store the decode efficiency that fits the edgellama measurements in the host profile")
    ap.add_argument("--long", action="store_true",
                    help=f"also measure every system after a {LONG_PROMPT}-token prompt (prefill, then decode at that depth)")
    ap.add_argument("--kld", type=Path, default=None,
                    help="JSON {system name: mean KLD on de-gridded SmolLM2}: adds the KLD column and the frontier PNG")
    ap.add_argument("--results", type=Path, default=RESULTS, help="markdown file to write (a partial run: elsewhere)")
    ap.add_argument("--json", type=Path, default=None, help="also write every run's figures here")
    args = ap.parse_args(argv)
    cfg = Config(args.prompt_tokens, args.new_tokens, args.threads, args.repeat)
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        raise SystemExit(f"harness: unknown workload(s) {unknown}; known: {', '.join(WORKLOADS)}")
    systems = SYSTEMS if not args.systems else [SYSTEMS[0]] + [
        s for s in SYSTEMS[1:] if any(p.strip().lower() in s.name.lower() for p in args.systems.split(","))]
    started, load0 = time.time(), " ".join(f"{x:.1f}" for x in os.getloadavg())

    # Build everything first, sequentially: the heavy steps (1B exports) must never overlap.
    artifacts: dict[str, list[tuple[System, Path]]] = {}
    prompts: dict[str, Path] = {}
    recipes: dict[str, list[str]] = {}
    for name in names:
        w = WORKLOADS[name]
        w.dir.mkdir(parents=True, exist_ok=True)
        hf = w.make_hf(w.hf)
        artifacts[name] = [(s, s.build(w, hf, cfg)) for s in systems]
        prompts[name] = prompt_file(w, artifacts[name][0][1], cfg)
        recipes[name] = [s.recipe(w, cfg) for s in systems]
    if args.prepare_only:
        log("every artifact is built")
        return 0
    if not args.no_probe:
        _run_logged([sys.executable, "-m", "edgellama", "devices", "probe"], WORK / "probe.log")

    tables: dict[str, list[Row]] = {}
    commands: dict[str, list[str]] = {}
    runs = [(name, cfg) for name in names]
    if args.long:
        from dataclasses import replace

        runs += [(name, replace(cfg, prompt_tokens=LONG_PROMPT)) for name in names]
    for name, c in runs:
        key = name if c is cfg else f"{name}@{c.prompt_tokens}"
        prompt = prompts[name] if c is cfg else prompt_file(WORKLOADS[name], artifacts[name][0][1], c)
        rows = [Row(s.name, sum(f.stat().st_size for f in s.files(a))) for s, a in artifacts[name]]
        cmds = [s.command(a, prompt, c) for s, a in artifacts[name]]
        commands[key] = [" ".join(x) for x in cmds]
        for r in range(cfg.repeat):
            for row, cmd in zip(rows, cmds):
                res = measure(cmd)
                row.runs.append(res)
                log(f"{key} round {r + 1}/{cfg.repeat} {row.system}: TTFT {1000 * res['ttft_s']:.0f} ms, "
                    f"decode {res['decode_tok_s']:.2f} tok/s, RSS {res['peak_rss_mb']:.0f} MB")
        tables[key] = rows
    load1 = " ".join(f"{x:.1f}" for x in os.getloadavg())
    calibration = calibrate(tables, args.calibrate)
    print(write_results(tables, cfg, recipes, started, (load0, load1), commands, calibration, args.results,
                        json.loads(args.kld.read_text()) if args.kld else None))
    if args.json:
        args.json.write_text(json.dumps({name: [{"system": r.system, "file_bytes": r.file_bytes,
                                                 "runs": [{k: v for k, v in run.items() if k not in ("token_ids", "runs")}
                                                          for run in r.runs]} for r in rows]
                                         for name, rows in tables.items()}, indent=1))
    log(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
