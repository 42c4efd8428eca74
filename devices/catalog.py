"""Device profiles: the built-in catalog (profiles.json) plus the measured `host` profile.

The host profile lives in a user file written by `edgellama devices probe`; it
overrides the built-in placeholder. EDGELLAMA_HOST_PROFILE points elsewhere.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from edgellama.errors import EdgeLlamaError

# Best quality first; the planner walks them in this order. int4-fast: quantize/presets.py's fast preset.
QUANTS = ("fp32", "fp16", "int8", "int4", "int4-fast")
CLASSES = ("phone", "laptop", "edge", "desktop")
OSES = ("ios", "android", "macos", "linux", "windows")
FORMATS = ("onnx", "coreml")
COREML_COMPUTE_UNITS = ("ALL", "CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE")  # coremltools.ComputeUnit names
# Numbers that drive the planner; each must say where it came from.
FIGURES = ("total_ram_bytes", "app_memory_bytes", "memory_bandwidth_gbs", "cores", "efficiency", "layer_cost_us")
HOST = "host"
BUILTIN_PATH = Path(__file__).with_name("profiles.json")


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    device_class: str  # "class" in JSON
    os: str
    total_ram_bytes: int
    app_memory_bytes: int  # what one app may really allocate before the OS kills it
    memory_bandwidth_gbs: float
    cores: int
    format: str  # onnx | coreml
    accelerator: str  # onnxruntime execution provider, or Core ML compute units
    default_context: int
    default_quant: str
    efficiency: float  # fraction of the bandwidth roofline reached in decode
    # Time per layer per decoded token that does not scale with bytes read (op dispatch, attention,
    # norms): a third of a SmolLM2 step on the host, so a pure roofline over-predicts small models.
    layer_cost_us: float = 0.0
    sources: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["class"] = out.pop("device_class")
        return {key: out[key] for key in _JSON_KEYS}


_JSON_KEYS = tuple("class" if f.name == "device_class" else f.name for f in fields(DeviceProfile))
_INTS = ("total_ram_bytes", "app_memory_bytes", "cores", "default_context")
_FLOATS = ("memory_bandwidth_gbs", "efficiency")
_OPTIONAL = {"layer_cost_us": 0.0}  # host files written before the field existed lack it
_CHOICES = {"class": CLASSES, "os": OSES, "format": FORMATS, "default_quant": QUANTS}


def profile_from_dict(data: Any, origin: str) -> DeviceProfile:
    """Validate one profile (as stored in JSON); every problem names the profile and the field."""
    if not isinstance(data, dict):
        raise EdgeLlamaError(f"{origin}: a device profile must be a JSON object, got {type(data).__name__}")
    name = data.get("name")
    where = f"device profile {name!r} in {origin}" if isinstance(name, str) else f"a device profile in {origin}"

    def bad(key: str, why: str) -> EdgeLlamaError:
        return EdgeLlamaError(f"{where}: field {key!r} {why}")

    unknown = sorted(set(data) - set(_JSON_KEYS))
    if unknown:
        raise bad(unknown[0], f"is unknown (known fields: {', '.join(_JSON_KEYS)})")
    data = {**_OPTIONAL, **data}
    for key in _JSON_KEYS:
        if key not in data:
            raise bad(key, "is missing")
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name):
        raise bad("name", f"must be a lowercase slug like 'iphone-15-pro', got {name!r}")
    for key, choices in _CHOICES.items():
        if data[key] not in choices:
            raise bad(key, f"must be one of {', '.join(choices)}, got {data[key]!r}")
    for key in _INTS:
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise bad(key, f"must be a positive integer, got {value!r}")
    for key in _FLOATS:
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise bad(key, f"must be a positive number, got {value!r}")
    cost = data["layer_cost_us"]
    if isinstance(cost, bool) or not isinstance(cost, (int, float)) or not math.isfinite(cost) or cost < 0:
        raise bad("layer_cost_us", f"must be a number >= 0, got {cost!r}")
    if data["efficiency"] > 1:
        raise bad("efficiency", f"is a fraction of the roofline and must be <= 1, got {data['efficiency']!r}")
    if data["app_memory_bytes"] > data["total_ram_bytes"]:
        raise bad("app_memory_bytes", f"({data['app_memory_bytes']}) exceeds total_ram_bytes ({data['total_ram_bytes']})")
    accel = data["accelerator"]
    if data["format"] == "coreml" and accel not in COREML_COMPUTE_UNITS:
        raise bad("accelerator", f"must be Core ML compute units ({', '.join(COREML_COMPUTE_UNITS)}), got {accel!r}")
    if data["format"] == "onnx" and not (isinstance(accel, str) and accel.endswith("ExecutionProvider")):
        raise bad("accelerator", f"must be an onnxruntime execution provider like 'CPUExecutionProvider', got {accel!r}")
    sources = data["sources"]
    if not isinstance(sources, dict):
        raise bad("sources", "must be an object mapping field names to source notes")
    for key, note in sources.items():
        if key not in _JSON_KEYS or key in ("name", "sources"):
            raise bad("sources", f"has a note for unknown field {key!r}")
        if not isinstance(note, str) or not note.strip():
            raise bad("sources", f"has an empty note for {key!r}")
    for key in FIGURES:
        if key not in sources and key not in _OPTIONAL:
            raise bad("sources", f"lacks a source note for {key!r}")
    return DeviceProfile(
        name=name,
        device_class=data["class"],
        os=data["os"],
        total_ram_bytes=data["total_ram_bytes"],
        app_memory_bytes=data["app_memory_bytes"],
        memory_bandwidth_gbs=float(data["memory_bandwidth_gbs"]),
        cores=data["cores"],
        format=data["format"],
        accelerator=accel,
        default_context=data["default_context"],
        default_quant=data["default_quant"],
        efficiency=float(data["efficiency"]),
        layer_cost_us=float(cost),
        sources={**({"layer_cost_us": "not given: 0"} if "layer_cost_us" not in sources else {}), **sources},
    )


def host_profile_path() -> Path:
    env = os.environ.get("EDGELLAMA_HOST_PROFILE")
    if env:
        return Path(env)
    from edgellama.assets import cache_dir

    return cache_dir() / "host_profile.json"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EdgeLlamaError(f"cannot read device profiles from {path}: {exc}") from None


def builtin_profiles() -> dict[str, DeviceProfile]:
    """The shipped catalog, without the measured host profile."""
    data = _read_json(BUILTIN_PATH)
    entries = data.get("profiles") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise EdgeLlamaError(f"{BUILTIN_PATH}: expected an object with a 'profiles' list")
    catalog: dict[str, DeviceProfile] = {}
    for entry in entries:
        profile = profile_from_dict(entry, str(BUILTIN_PATH))
        if profile.name in catalog:
            raise EdgeLlamaError(f"{BUILTIN_PATH}: device profile {profile.name!r} is defined twice")
        catalog[profile.name] = profile
    return catalog


def load_catalog() -> dict[str, DeviceProfile]:
    """The built-in profiles and `host`: this machine's RAM, free memory and cores read from the OS
    now, with the bandwidth and speed figures of the host file (placeholders until a probe)."""
    catalog = builtin_profiles()
    path = host_profile_path()
    host = catalog[HOST]
    if path.is_file():
        host = profile_from_dict(_read_json(path), str(path))
        if host.name != HOST:
            raise EdgeLlamaError(f"device profile {host.name!r} in {path}: field 'name' must be {HOST!r}")
        # A stored speed constant that nobody calibrated on this machine (an estimate the probe carried over, or a
        # file from before the field) follows the built-in one, so a better shipped fit reaches existing caches.
        builtin = catalog[HOST]
        for field in ("efficiency", "layer_cost_us"):
            source = host.sources.get(field, "")
            if source == "not given: 0" or source.startswith("estimate"):
                host = replace(host, **{field: getattr(builtin, field)},
                               sources={**host.sources, field: builtin.sources[field]})
    catalog[HOST] = live_host(host)
    return catalog


def live_host(host: DeviceProfile) -> DeviceProfile:
    """`host` with what the OS says now: memory comes and goes, so a stored figure would go stale."""
    from edgellama.devices.probe import app_memory_bytes, physical_cores, total_ram_bytes

    total = total_ram_bytes()
    return replace(host, total_ram_bytes=total, app_memory_bytes=app_memory_bytes(total), cores=physical_cores(),
                   sources={**host.sources,
                            "total_ram_bytes": "measured: MemTotal in /proc/meminfo (sysconf elsewhere)",
                            "app_memory_bytes": "measured: MemAvailable now, capped by the cgroup memory limit",
                            "cores": "measured: physical cores among the usable CPUs"})


def is_probed(profile: DeviceProfile) -> bool:
    return not profile.sources.get("memory_bandwidth_gbs", "").startswith("placeholder")


def get_profile(name: str, *, probe: bool = True) -> DeviceProfile:
    """One profile by name. `host` is probed on first use (a second or two, then cached in the host
    file) unless probe=False, which returns its placeholder bandwidth instead."""
    catalog = load_catalog()
    if name not in catalog:
        raise EdgeLlamaError(f"unknown device {name!r}; known devices: {', '.join(catalog)}")
    profile = catalog[name]
    if name == HOST and probe and not is_probed(profile):
        import sys

        from edgellama.devices.probe import probe_host, write_host_profile

        print("edgellama: measuring this machine's memory bandwidth once (`edgellama devices probe` redoes it)...",
              file=sys.stderr, flush=True)
        profile = probe_host(repeats=4)
        path = write_host_profile(profile)
        print(f"edgellama: {profile.memory_bandwidth_gbs:.1f} GB/s, stored in {path}", file=sys.stderr, flush=True)
    return profile
