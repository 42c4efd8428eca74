"""Run a saved Core ML program in numpy, so Linux can check what macOS would compute.

coremltools has no Core ML runtime off macOS, but it reads a .mlpackage back into a MIL
program, and its op classes carry numpy value inference. `Replay` walks the program's ops
in order and computes each one:

- state reads/writes, compressed-weight (constexpr) decoding, and the ops value inference
  lacks or would be slow for (linear, matmul, SDPA, silu, slice_update, scatter) are done here;
  matmuls accumulate in float32 and round to the op's dtype, as Core ML's fp16 kernels do;
- the frequent simple ops (elementwise, reshapes, slices, ...) run as plain numpy, the result
  cast to the dtype the program declares for the op; `Replay(..., fast=False)` computes them
  through coremltools instead, which the tests use to check this path;
- anything else is rebuilt on constant inputs in a scratch MIL function, which makes
  coremltools infer its value.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

import coremltools as ct
from coremltools.converters.mil.frontend.milproto import load as milproto
from coremltools.converters.mil.mil import Builder as mb
from coremltools.converters.mil.mil import Function, types


def load_program(package: str | Path):
    """The MIL program and the model spec of a saved .mlpackage (no Core ML runtime needed)."""
    model = ct.models.MLModel(str(package), skip_model_load=True)
    spec = model.get_spec()
    return milproto.load(spec, spec.specificationVersion, model.weights_dir), spec


# --- compressed weights ---------------------------------------------------------------------------------

def _expand_blocks(small: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Repeat per-block parameters up to the full tensor shape."""
    for axis, (n, m) in enumerate(zip(shape, small.shape)):
        if n % m:
            raise ValueError(f"block parameter shape {small.shape} does not tile {shape}")
        small = np.repeat(small, n // m, axis=axis)
    return small


def blockwise_shift_scale(data: np.ndarray, scale: np.ndarray, offset: np.ndarray | None) -> np.ndarray:
    """constexpr_blockwise_shift_scale (iOS 18): scale * (data - offset), one scale per block."""
    x = data.astype(np.float32)
    if offset is not None:
        x = x - _expand_blocks(offset.astype(np.float32), data.shape)
    return (x * _expand_blocks(scale.astype(np.float32), data.shape)).astype(scale.dtype)


def affine_dequantize(data: np.ndarray, zero_point: np.ndarray, scale: np.ndarray, axis: int) -> np.ndarray:
    """constexpr_affine_dequantize (iOS 16/17): (data - zero_point) * scale, per channel along `axis` or per tensor."""
    def along_axis(v: np.ndarray) -> np.ndarray:
        v = np.asarray(v, dtype=np.float32)
        return v if v.ndim == 0 else v.reshape([-1 if i == axis else 1 for i in range(data.ndim)])

    return ((data.astype(np.float32) - along_axis(zero_point)) * along_axis(scale)).astype(scale.dtype)


def lut_to_dense(indices: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """constexpr_lut_to_dense (iOS 18), scalar palettization: each block of `indices` has its own table."""
    if lut.shape[-1] != 1:
        raise NotImplementedError("vector palettization")
    tables = lut[..., 0]  # [*block grid, entries]
    grid = [np.arange(n) // (n // g) for n, g in zip(indices.shape, tables.shape[: indices.ndim])]
    return tables[np.ix_(*grid) + (indices.astype(np.int64),)]


CONSTEXPR_OPS = {
    "constexpr_blockwise_shift_scale": lambda a: blockwise_shift_scale(a["data"], a["scale"], a.get("offset")),
    "constexpr_affine_dequantize": lambda a: affine_dequantize(a["quantized_data"], a["zero_point"], a["scale"],
                                                               int(a["axis"])),
    "constexpr_lut_to_dense": lambda a: lut_to_dense(a["indices"], a["lut"]),
}


# --- ops computed here ----------------------------------------------------------------------------------

def _f32(x) -> np.ndarray:
    return np.asarray(x).astype(np.float32, copy=False)


def _sdpa(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    scores = _f32(q) @ np.swapaxes(_f32(k), -1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = np.where(mask, scores, -np.inf) if mask.dtype == bool else scores + _f32(mask)
    p = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return (p / p.sum(axis=-1, keepdims=True)) @ _f32(v)


def _linear(a: dict) -> np.ndarray:
    y = _f32(a["x"]) @ _f32(a["weight"]).T
    return y if a.get("bias") is None else y + _f32(a["bias"])


def _matmul(a: dict) -> np.ndarray:
    x, y = _f32(a["x"]), _f32(a["y"])
    if a.get("transpose_x"):
        x = np.swapaxes(x, -1, -2)
    if a.get("transpose_y"):
        y = np.swapaxes(y, -1, -2)
    return x @ y


def _index(a: dict, ndim: int) -> tuple:
    """slice_by_index / slice_update arguments as a numpy index."""
    masks = [a.get(k) for k in ("begin_mask", "end_mask", "squeeze_mask")]
    stride = a.get("stride")
    out: list = []
    for i in range(ndim):
        if masks[2] is not None and masks[2][i]:
            out.append(int(a["begin"][i]))
            continue
        begin = None if masks[0] is not None and masks[0][i] else int(a["begin"][i])
        end = None if masks[1] is not None and masks[1][i] else int(a["end"][i])
        out.append(slice(begin, end, 1 if stride is None else int(stride[i])))
    return tuple(out)


def _slice_update(a: dict) -> np.ndarray:
    out = a["x"].copy()
    where = _index(a, out.ndim)
    out[where] = np.reshape(a["update"], out[where].shape)
    return out


def _scatter(a: dict) -> np.ndarray:
    mode, axis = str(a.get("mode", "add")), int(a.get("axis", 0))
    if mode not in ("update", "add"):
        raise NotImplementedError(f"scatter mode {mode}")
    out = np.moveaxis(a["data"].copy(), axis, 0)
    updates = np.moveaxis(a["updates"], axis, 0)
    idx = np.where(a["indices"] < 0, a["indices"] + out.shape[0], a["indices"])
    if mode == "update":
        out[idx] = updates
    else:
        np.add.at(out, idx, updates)
    return np.moveaxis(out, 0, axis)


def _axes(a: dict) -> tuple[int, ...] | None:
    return None if a.get("axes") is None else tuple(int(i) for i in np.atleast_1d(a["axes"]))


def _split(a: dict) -> list[np.ndarray]:
    x, axis = a["x"], int(a["axis"])
    if a.get("split_sizes") is not None:
        return np.split(x, np.cumsum(a["split_sizes"])[:-1], axis=axis)
    return np.split(x, int(a["num_splits"]), axis=axis)


# Always here: value inference lacks these, or copies whole KV states through them.
COMPUTE_OPS = {
    "linear": _linear,
    "matmul": _matmul,
    "scaled_dot_product_attention": lambda a: _sdpa(a["query"], a["key"], a["value"], a.get("attn_mask")),
    "silu": lambda a: _f32(a["x"]) / (1 + np.exp(-_f32(a["x"]))),
    "slice_update": _slice_update,
    "scatter": _scatter,
}
# Here unless fast=False: plain numpy for the frequent simple ops.
NUMPY_OPS = {
    "add": lambda a: a["x"] + a["y"],
    "sub": lambda a: a["x"] - a["y"],
    "mul": lambda a: a["x"] * a["y"],
    "real_div": lambda a: np.true_divide(a["x"], a["y"]),
    "abs": lambda a: np.abs(a["x"]),
    "sqrt": lambda a: np.sqrt(a["x"]),
    "square": lambda a: np.square(a["x"]),
    "reduce_mean": lambda a: np.mean(a["x"], axis=_axes(a), keepdims=bool(a.get("keep_dims", False))),
    "reduce_max": lambda a: np.max(a["x"], axis=_axes(a), keepdims=bool(a.get("keep_dims", False))),
    "reduce_sum": lambda a: np.sum(a["x"], axis=_axes(a), keepdims=bool(a.get("keep_dims", False))),
    "reshape": lambda a: np.reshape(a["x"], [int(s) for s in a["shape"]]),
    "transpose": lambda a: np.transpose(a["x"], [int(p) for p in a["perm"]]),
    "expand_dims": lambda a: np.expand_dims(a["x"], _axes(a)),
    "concat": lambda a: np.concatenate([np.atleast_1d(v) for v in a["values"]], axis=int(a["axis"])),  # scalars join as [1]
    "split": _split,
    "slice_by_index": lambda a: a["x"][_index(a, a["x"].ndim)],
    "gather": lambda a: np.take(a["x"], a["indices"].astype(np.int64), axis=int(a.get("axis", 0))),
    "cast": lambda a: a["x"],  # the declared output dtype does the cast
    "shape": lambda a: np.array(np.shape(a["x"]), np.int32),
}


class Replay:
    """A saved Core ML model with MLModel's calling convention: predict(data, state=None), make_state()."""

    def __init__(self, package: str | Path, *, fast: bool = True):
        self.program, self.spec = load_program(package)
        self.function = self.program.functions["main"]
        self.opset = self.function.opset_version
        self.state_names = [n for n, v in self.function.inputs.items() if types.is_state(v.sym_type)]
        self.input_names = [n for n in self.function.inputs if n not in self.state_names]
        self.output_names = [v.name for v in self.function.outputs]
        self.op_types = sorted({op.op_type for op in self.function.operations})
        self.numpy_ops = NUMPY_OPS if fast else {}
        self._consts: dict[str, object] = {}
        self._f32: dict[str, np.ndarray] = {}
        for op in self.function.operations:  # weights are decoded once, as Core ML does at load
            if op.op_type == "const":
                self._consts[op.outputs[0].name] = op.outputs[0].val
            elif op.op_type in CONSTEXPR_OPS:
                self._consts[op.outputs[0].name] = CONSTEXPR_OPS[op.op_type](self._args(op, self._consts))

    def make_state(self) -> dict[str, np.ndarray]:
        """Zeroed states, like MLModel.make_state(); predict updates them in place."""
        out = {}
        for name in self.state_names:
            t = self.function.inputs[name].sym_type.wrapped_type()
            out[name] = np.zeros(t.get_shape(), types.nptype_from_builtin(t.get_primitive()))
        return out

    def weight(self, name: str) -> np.ndarray:
        """A weight (decoded if compressed) by the name of the var that holds it."""
        return np.asarray(self._consts[name])

    @staticmethod
    def _args(op, env) -> dict:
        out = {}
        for key, var in op.inputs.items():
            out[key] = tuple(env[v.name] for v in var) if isinstance(var, (list, tuple)) else env[var.name]
        return out

    def predict(self, data: dict[str, np.ndarray], state: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        if sorted(data) != sorted(self.input_names):
            raise ValueError(f"expected inputs {self.input_names}, got {sorted(data)}")
        if bool(state) != bool(self.state_names):
            raise ValueError("a stateful model needs state=make_state(), a stateless one takes none")
        env: dict[str, object] = dict(self._consts)
        for name, value in data.items():  # Core ML converts inputs to the declared type
            env[name] = np.asarray(value, dtype=types.nptype_from_builtin(self.function.inputs[name].dtype))
        for op in self.function.operations:
            kind = op.op_type
            if kind == "const" or kind in CONSTEXPR_OPS:
                continue
            if kind == "read_state":
                results = [state[op.inputs["input"].name].copy()]
            elif kind == "coreml_update_state":
                value = env[op.inputs["value"].name]
                state[op.inputs["state"].name][...] = value
                results = [value]
            elif kind in COMPUTE_OPS or kind in self.numpy_ops:
                args = self._args(op, env)
                if kind == "linear" and op.inputs["weight"].name in self._consts:  # convert each weight once
                    args["weight"] = self._weight_f32(op.inputs["weight"].name)
                out = (COMPUTE_OPS.get(kind) or self.numpy_ops[kind])(args)
                results = [self._as_declared(v, var) for v, var in zip(out if kind == "split" else [out], op.outputs)]
            else:
                results = self._value_inference(kind, self._args(op, env))
            if len(results) != len(op.outputs):
                raise RuntimeError(f"{kind} gave {len(results)} outputs, the program expects {len(op.outputs)}")
            for var, value in zip(op.outputs, results):
                env[var.name] = value
        return {name: np.asarray(env[name]) for name in self.output_names}

    def _weight_f32(self, name: str) -> np.ndarray:
        if name not in self._f32:
            self._f32[name] = _f32(self._consts[name])
        return self._f32[name]

    @staticmethod
    def _as_declared(value, var) -> np.ndarray:
        return np.asarray(value).astype(types.nptype_from_builtin(var.dtype), copy=False)

    def _value_inference(self, op_type: str, args: dict) -> list:
        """Build the op on constant inputs in a scratch function: coremltools computes its value."""
        # numpy bools confuse numpy itself once wrapped (keepdims=np.bool_): hand over plain bools
        args = {k: bool(v) if isinstance(v, np.bool_) else v for k, v in args.items()}
        with Function({}, opset_version=self.opset):
            out = getattr(mb, op_type)(**args)
        values = [v.val for v in (out if isinstance(out, (list, tuple)) else [out])]
        if any(v is None for v in values):
            raise NotImplementedError(f"coremltools has no value inference for {op_type}")
        return [v if isinstance(v, (str, bool)) else np.asarray(v) for v in values]
