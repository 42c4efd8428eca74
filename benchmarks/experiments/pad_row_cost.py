"""What the fast graph's padding row (export/onnx_graph._pad_row) costs plain decode.

    python benchmarks/experiments/pad_row_cost.py BUNDLE [--rounds 6] [--prompt-tokens 128] [--steps 64]

Makes a copy of BUNDLE's graph with the padding bypassed (each attention's Pad and DropPadRow
nodes removed, the count pinned to 0: the graph as it was before exact verification), loads both
in one process and times greedy decode steps after the same random prompt, interleaved, BUNDLE
with every run padded (engine.exact_rows, as speculation runs it); prints each round's tok/s and
the median ratio padded / unpadded. Plain decode runs unpadded: this is what speculating costs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from edgellama.export.onnx_graph import DROP_PAD_ROW_NODE, PAD_ROW_COUNT, PAD_ROW_NODE
from edgellama.runtime.generate import load


def unpadded_copy(bundle: Path, out: Path) -> Path:
    model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    g = model.graph
    bypass, keep = {}, []
    for node in g.node:
        if node.op_type == "Pad" and PAD_ROW_NODE in node.name or node.name.endswith(DROP_PAD_ROW_NODE):
            bypass[node.output[0]] = node.input[0]
        elif node.name == PAD_ROW_COUNT:
            g.initializer.append(numpy_helper.from_array(np.array(0, dtype=np.int64), node.output[0]))
        else:
            keep.append(node)
    if not bypass:
        raise SystemExit(f"{bundle}: no padding row in this graph")
    for node in keep:
        node.input[:] = [bypass.get(name, name) for name in node.input]
    del g.node[:]
    g.node.extend(keep)
    out.mkdir(parents=True)
    for f in bundle.iterdir():
        if f.name != "model.onnx" and f.is_file():
            os.link(f, out / f.name)  # onnxruntime refuses external data outside the model's folder
    onnx.save_model(model, str(out / "model.onnx"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix=".pad-row-", dir=args.bundle.resolve().parent))
    try:
        padded = load(args.bundle, threads=2)
        padded.engine.exact_rows = True  # a bundle with the pad_rows input pads only when asked
        models = {"unpadded": load(unpadded_copy(args.bundle, tmp / "b"), verify=False, threads=2), "padded": padded}
        prompt = [int(t) for t in np.random.default_rng(0).integers(100, 20000, args.prompt_tokens)]
        speed: dict[str, list[float]] = {k: [] for k in models}
        for _ in range(args.rounds):
            for name, m in models.items():
                e = m.engine
                e.reset()
                token = int(e.forward(prompt).argmax())
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    token = int(e.forward([token]).argmax())
                speed[name].append(args.steps / (time.perf_counter() - t0))
        for name, v in speed.items():
            print(f"{name:9s} tok/s: " + " ".join(f"{x:.1f}" for x in v))
        ratio = statistics.median(p / u for p, u in zip(speed["padded"], speed["unpadded"]))
        print(f"median ratio padded / unpadded: {ratio:.3f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
