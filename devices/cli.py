"""`edgellama devices [probe]` and `edgellama plan`."""

from __future__ import annotations

import argparse
import json

from edgellama.devices.catalog import QUANTS
from edgellama.errors import EdgeLlamaError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("devices", help="list device profiles, or measure this machine with `devices probe`")
    p.add_argument("action", nargs="?", choices=("list", "probe"), default="list")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--buffer-mb", type=int, default=None, help="probe: bandwidth buffer size (default 512, RAM/8 at most)")
    p.set_defaults(func=_devices)

    p = subparsers.add_parser("plan", help="will a model fit a device, with how much context, how fast")
    p.add_argument("source", help="bundle dir, HF folder, config.json, GGUF file or hub id")
    p.add_argument("--device", required=True, help="device profile name (see `edgellama devices`)")
    p.add_argument("--quant", choices=QUANTS, default=None, help="default: the device's")
    p.add_argument("--max-context", type=int, default=None, help="context to plan for (default: the device's)")
    p.add_argument("--block-size", type=int, default=32, help="int4 quantization block size")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=_plan)


def _table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table, as llama.cpp prints them: paste-able into an issue."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(header), "| " + " | ".join("-" * w for w in widths) + " |", *map(line, rows)])


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _profile_rows(profiles) -> list[list[str]]:
    return [
        [p.name, p.device_class, p.os, _gib(p.total_ram_bytes), _gib(p.app_memory_bytes), f"{p.memory_bandwidth_gbs:.1f}",
         str(p.cores), p.format, p.accelerator, str(p.default_context), p.default_quant, f"{p.efficiency:.2f}"]
        for p in profiles
    ]


_PROFILE_HEADER = ["device", "class", "os", "RAM", "app memory", "GB/s", "cores", "format", "accelerator",
                   "context", "quant", "efficiency"]


def _devices(args: argparse.Namespace) -> int:
    from edgellama.devices.catalog import load_catalog

    if args.action == "list":
        if args.buffer_mb is not None:
            raise EdgeLlamaError("--buffer-mb only applies to `edgellama devices probe`")
        profiles = list(load_catalog().values())
        if args.json:
            print(json.dumps([p.to_dict() for p in profiles], indent=2))
        else:
            print(_table(_PROFILE_HEADER, _profile_rows(profiles)))
        return 0

    from edgellama.devices.probe import probe_host, write_host_profile

    buffer = None if args.buffer_mb is None else args.buffer_mb << 20
    profile = probe_host(buffer_bytes=buffer)
    path = write_host_profile(profile)
    if args.json:
        print(json.dumps(profile.to_dict(), indent=2))
        return 0
    values = {"total_ram_bytes": _gib(profile.total_ram_bytes), "app_memory_bytes": _gib(profile.app_memory_bytes),
              "memory_bandwidth_gbs": f"{profile.memory_bandwidth_gbs:.1f} GB/s", "cores": str(profile.cores),
              "efficiency": f"{profile.efficiency:.2f}"}
    print(_table(["figure", "value", "source"], [[k, v, profile.sources[k]] for k, v in values.items()]))
    print(f"wrote {path}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from edgellama.devices.catalog import get_profile
    from edgellama.devices.plan import ModelShape, plan, read_model_config

    device = get_profile(args.device)
    config = read_model_config(args.source)
    if config is None:
        try:
            from edgellama.export.sources import load_source
        except ModuleNotFoundError as exc:
            raise EdgeLlamaError(
                f"{args.source!r} is not a bundle, a folder with config.json or a config.json; reading GGUF files "
                f"and hub ids needs the export extra (pip install 'edgellama[export]'): missing {exc.name}"
            ) from None
        config = load_source(args.source).config.to_hf()
    shape = ModelShape.from_hf_config(config)
    quant = args.quant or device.default_quant
    weights = _weight_format(args.source, config, quant, args.block_size)
    result = plan(shape, device, quant=quant, max_context=args.max_context, block_size=args.block_size,
                  weights=weights)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
        return 0
    tied = "tied" if shape.tie_word_embeddings else "untied"
    rows = [
        ["model", f"{shape.param_count() / 1e9:.2f}B params, {shape.num_hidden_layers} layers, hidden {shape.hidden_size}, "
                  f"vocab {shape.vocab_size} ({tied})"],
        ["device", f"{device.name} ({device.format}, {device.accelerator})"],
        ["quant", weights.label if weights else result.quant + (f" (block {args.block_size})" if result.quant == "int4" else "")],
        ["context", f"{result.context} (KV cache {result.kv_dtype})"],
        ["weights", f"{_mib(result.weights_bytes)} on disk, {_mib(result.weights_memory_bytes)} in memory"],
        ["KV cache", _mib(result.kv_bytes)],
        ["runtime overhead", _mib(result.overhead_bytes)],
        ["total", f"{_mib(result.total_bytes)} (predicted peak RSS)"],
        ["budget", f"{_mib(result.budget_bytes)} (app memory)"],
        ["fits", "yes" if result.fits else "no"],
        ["max context", str(result.max_context)],
        ["decode", f"{result.predicted_decode_tok_s:.1f} tok/s (predicted)"],
    ]
    print(_table(["plan", "value"], rows))
    print(result.recommendation)
    return 0


def _weight_format(source: str, config: dict, quant: str, block_size: int):
    """The exact weight format to price: a quantized bundle's own record, or what an export at `quant`
    would write (the quantizer's policy: int8 parts, q/k blocks); None (uniform) without the export extra."""
    from pathlib import Path

    from edgellama.devices.plan import ModelShape, WeightFormat, preset_weights
    from edgellama.runtime.bundle import MANIFEST

    if (Path(source) / MANIFEST).is_file():
        from edgellama.runtime.bundle import read_manifest

        try:
            m = read_manifest(Path(source), verify=False)
        except EdgeLlamaError:  # an architecture alone (read_model_config took it) plans like a config
            m = None
        if m and m.quantization and quant == f"int{m.quantization['bits']}":
            return WeightFormat.from_record(m.quantization, m.dtype)
    if block_size != 32 and quant in ("int4", "int8"):
        return None  # a uniform format at the asked block size
    return preset_weights(quant, ModelShape.from_hf_config(config))
