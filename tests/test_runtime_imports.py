"""A device installs numpy, onnxruntime, tokenizers and jinja2 only: the runtime must never import more.

Each check runs in a fresh interpreter, since this test process has long since imported torch.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys


import edgellama.runtime
from helpers import HEAVY_MODULES

RUNTIME_MODULES = sorted(f"edgellama.runtime.{m.name}" for m in pkgutil.iter_modules(edgellama.runtime.__path__))

_PROBE = """
import importlib, json, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
{then}
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {heavy!r})))
"""


def heavy_imports(*modules: str, then: str = "", heavy: tuple[str, ...] = HEAVY_MODULES) -> list[str]:
    """Heavy packages loaded by importing `modules` (then running `then`) in a fresh interpreter."""
    code = _PROBE.format(heavy=set(heavy), then=then)
    proc = subprocess.run([sys.executable, "-c", code, *modules], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_runtime_modules_are_discovered():
    assert {"edgellama.runtime.bundle", "edgellama.runtime.engine"} <= set(RUNTIME_MODULES)


def test_the_probe_sees_heavy_imports():
    """The check is not vacuous: importing the exporter's model does pull in torch."""
    assert "torch" in heavy_imports("edgellama.export.model")


def test_runtime_imports_no_heavy_framework():
    assert heavy_imports("edgellama.runtime", *RUNTIME_MODULES) == []


def test_cli_parser_imports_no_heavy_framework():
    """Building the CLI loads every verb's parser; handlers import their heavy dependencies lazily."""
    assert heavy_imports("edgellama.cli", then="sys.modules['edgellama.cli'].build_parser()") == []


SERVER_MODULES = ("starlette", "uvicorn", "llguidance")  # the serve extra's: the server alone imports them


def test_runtime_and_cli_import_no_server_package():
    """The serve extra stays optional: the runtime and the CLI parser load none of it until used."""
    assert heavy_imports("edgellama.runtime", *RUNTIME_MODULES, heavy=SERVER_MODULES) == []
    assert heavy_imports("edgellama.cli", then="sys.modules['edgellama.cli'].build_parser()", heavy=SERVER_MODULES) == []
    assert "starlette" in heavy_imports("edgellama.serve.app", heavy=SERVER_MODULES)  # the probe is not vacuous
