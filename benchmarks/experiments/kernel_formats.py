"""What one decode step's matmul costs in each MatMulNBits weight format, on this CPU.

Builds one-node graphs (a single activation row against an N x K weight of random codes) for
4-bit and 8-bit weights, blocks of 16..128, with and without zero points, all at
accuracy_level 4 (int8 activations, the bundles' default), and times them interleaved:
every format once per round, best round kept. The table is what a quantization format costs
the kernel, apart from its quality: docs/performance.md reads it.

    python benchmarks/experiments/kernel_formats.py [--shape 2048x8192 --shape 576x1536] [--rounds 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

FORMATS = [(4, 16, True), (4, 16, False), (4, 32, True), (4, 32, False), (4, 64, True), (4, 64, False),
           (4, 128, True), (4, 128, False), (8, 32, False), (8, 32, True), (8, 128, False)]


def one_node_model(k: int, n: int, bits: int, block: int, zero_points: bool) -> bytes:
    rng = np.random.default_rng(0)
    n_blocks = -(-k // block)
    inits = [numpy_helper.from_array(rng.integers(0, 256, (n, n_blocks, block * bits // 8), dtype=np.uint8), "B"),
             numpy_helper.from_array(rng.random(n * n_blocks, dtype=np.float32) * 0.01 + 0.001, "S")]
    inputs = ["x", "B", "S"]
    if zero_points:
        per_row = -(-n_blocks // 2) if bits == 4 else n_blocks  # 4-bit zero points pack two per byte
        inits.append(numpy_helper.from_array(rng.integers(0, 256, n * per_row, dtype=np.uint8), "Z"))
        inputs.append("Z")
    node = helper.make_node("MatMulNBits", inputs, ["y"], name="matmul", domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=4)
    graph = helper.make_graph([node], "one", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, n])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    return model.SerializeToString()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", action="append", help="KxN (input x output features); repeatable")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=100, help="calls per format per round")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in (args.shape or ["2048x8192", "576x1536"])]
    so = ort.SessionOptions()
    so.intra_op_num_threads = args.threads
    print(f"onnxruntime {ort.__version__}, {args.threads} threads, accuracy_level 4, one activation row; "
          f"best of {args.rounds} interleaved rounds of {args.calls} calls")
    for k, n in shapes:
        x = np.random.default_rng(1).standard_normal((1, 1, k)).astype(np.float32)
        sessions = {f: ort.InferenceSession(one_node_model(k, n, *f), so) for f in FORMATS}
        best = {f: float("inf") for f in FORMATS}
        for s in sessions.values():
            s.run(None, {"x": x})
        for _ in range(args.rounds):
            for f, s in sessions.items():
                t = time.perf_counter()
                for _ in range(args.calls):
                    s.run(None, {"x": x})
                best[f] = min(best[f], (time.perf_counter() - t) / args.calls)
        ref = best[(4, 32, False)]
        print(f"\nK={k} N={n}\n")
        print("| bits | block | zero points | file bits/weight | µs per call | × int4 b32 symmetric |")
        print("|---:|---:|---|---:|---:|---:|")
        for bits, block, zp in FORMATS:
            stored = bits + 16 / block + (bits / block if zp else 0)  # codes + float16 scale + zero point
            print(f"| {bits} | {block} | {'yes' if zp else 'no'} | {stored:.2f} | {best[(bits, block, zp)] * 1e6:.0f} | "
                  f"{best[(bits, block, zp)] / ref:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
