"""The `edgellama` command: each verb is a thin shim over a library function.

Verbs are registered by each subpackage's `cli` module, which imports its heavy
dependencies only inside the handler, so `edgellama run` never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from edgellama import __version__
from edgellama.errors import EdgeLlamaError

# Each module defines register(subparsers) and sets `func` on its parsers.
VERB_MODULES = (
    "edgellama.export.cli",
    "edgellama.quantize.cli",
    "edgellama.runtime.cli",
    "edgellama.devices.cli",
    "edgellama.serve.cli",
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own usage errors, in our one-line form
        # main() prints "edgellama: error: "; a verb's parser adds only the verb ("run: ...").
        verb = self.prog.removeprefix("edgellama").strip()
        raise EdgeLlamaError(f"{verb}: {message}" if verb else message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="edgellama", description="Llama 3 checkpoints to verified edge bundles.")
    parser.add_argument("--version", action="version", version=f"edgellama {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    for name in VERB_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # a subpackage that has no verbs yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help(sys.stderr)
            return 2
        result = args.func(args)
        return int(result or 0)
    except EdgeLlamaError as exc:
        # One line whatever the message quotes (a key or file name may hold a newline).
        print(f"edgellama: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgellama: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
