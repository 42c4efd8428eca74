"""Take weights that came out of a GGUF off their quantization grid.

SmolLM2's only checkpoint here is a Q4_1 GGUF: every 32 consecutive weights of a row sit on
one of 16 evenly spaced levels. Re-quantizing such weights is unrealistically easy (a
4-bit quantizer with block 32 can land exactly on the grid), so tests and benchmarks first
add Gaussian noise of ``ratio`` times each group's grid step, (max - min) / 15, which makes
the weights behave like a real float checkpoint at the same scale.

The noise is about 10% of a weight's norm at ratio 0.33. SmolLM2's token_embd is Q8_0, on a
grid 17x finer than the (max - min) / 15 step: pass ``levels=255`` for it to add noise of
its own grid's size instead.
"""

from __future__ import annotations

import zlib
from typing import Mapping

import numpy as np

from edgellama.errors import EdgeLlamaError
from edgellama.quantize.numerics import blocked, row_chunks

GRID_LEVELS = 16  # Q4_0 / Q4_1


def degrid(
    w: np.ndarray,
    group: int = 32,
    ratio: float = 0.33,
    rng: np.random.Generator | int | None = 0,
    levels: int = GRID_LEVELS,
) -> np.ndarray:
    """``w`` plus N(0, (ratio * step)^2) noise, step = (max - min) / (levels - 1) per group.

    Groups are ``group`` consecutive elements along the last axis of each row (the last
    one may be shorter). Only 2-D weights are on a grid; other arrays come back unchanged.
    Deterministic for a given integer seed or generator state.
    """
    w = np.asarray(w)
    if w.ndim != 2:
        return w
    if group < 1 or ratio < 0 or levels < 2:
        raise EdgeLlamaError(f"degrid needs group >= 1, ratio >= 0, levels >= 2; got {group}, {ratio}, {levels}")
    rng = np.random.default_rng(rng)
    n, k = w.shape
    n_groups = -(-k // group)
    out = np.empty((n, k), np.float32)
    pad = n_groups * group - k
    for rows in row_chunks(n, k):
        wb = blocked(w[rows].astype(np.float32), group)
        if pad:
            # The short last group's step comes from its own elements, not the padding.
            tail = wb[:, -1, : group - pad]
            lo, hi = wb.min(-1), wb.max(-1)
            lo[:, -1], hi[:, -1] = tail.min(-1), tail.max(-1)
        else:
            lo, hi = wb.min(-1), wb.max(-1)
        sigma = (hi - lo) * np.float32(ratio / (levels - 1))
        noise = rng.standard_normal(wb.shape, dtype=np.float32)
        noise *= sigma[..., None]
        noise += wb
        out[rows] = noise.reshape(wb.shape[0], -1)[:, :k]
    return out


def degrid_named(
    tensors: Mapping[str, np.ndarray], seed: int = 0, group: int = 32, ratio: float = 0.33
) -> dict[str, np.ndarray]:
    """``degrid`` every tensor, each with its own stream drawn from (seed, name).

    Seeding by name keeps a tensor's noise the same whatever order (or subset) the
    tensors come in.
    """
    out = {}
    for name, w in tensors.items():
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        out[name] = degrid(w, group, ratio, rng)
    return out
