"""The Llama-3.2-1B shape with random weights (benchmarks/make_shape.py 1b), under the name the harness imports.

    python benchmarks/make_1b_shape.py            # -> benchmarks/work/llama-3.2-1b-shape
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from make_shape import make_shape


def make_1b_shape(out: str | os.PathLike | None = None, **kw) -> Path:
    return make_shape("1b", out, **kw)


if __name__ == "__main__":
    from make_shape import main

    sys.exit(main(["1b", *sys.argv[1:]]))
