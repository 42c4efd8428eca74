"""Calibration statistics for the quantizer: what each linear layer's inputs look like.

The torch reference runs over some tokens; hooks record, for every linear's input,
  - the mean |x| per input channel (``act_scales``: weights the scale searches' error), and
  - the inputs themselves, a capped number of rows (``act_inputs``: GPTQ's H = X^T X).

Tokens come from a text file (``--calib``) or, by default, from a seeded uniform draw over the
vocabulary. Measured on de-gridded SmolLM2 (docs/quantization.md), random tokens calibrate
almost as well as English prose: the statistics that matter here are which input channels are
large, and those belong to the weights (norm gains, outlier channels), not to the text. Random
tokens keep the default data-free and deterministic.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from edgellama.errors import EdgeLlamaError
from edgellama.export.sources import DerivedStore

CALIB_MAX_TOKENS = 2048  # enough for stable per-channel means; more only costs time
RANDOM_TOKENS = 256  # the default, data-free calibration (512 scored the same on de-gridded SmolLM2, at twice the time)
INPUT_ROWS = 2048  # rows of X kept per linear input for GPTQ: 512 gave it half the gain (float32: 1.9 GB for Llama 3.2 1B)
WINDOW = 512
SEED = 0


@dataclass
class Calibration:
    source: str  # "random:<n>" or the text file's name
    tokens: int
    act_scales: dict[str, np.ndarray] = field(default_factory=dict)  # HF module name -> [K]
    act_inputs: dict[str, np.ndarray] = field(default_factory=dict)  # HF module name -> [rows, K]; shared arrays


def text_ids(src, text_file: Path, max_tokens: int = CALIB_MAX_TOKENS) -> list[int]:
    from edgellama.runtime.tokenizer import Tokenizer

    try:
        text = Path(text_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgeLlamaError(f"cannot read calibration text {text_file}: {exc}") from None
    if src.tokenizer_json is None:
        raise EdgeLlamaError("the source has no tokenizer: cannot calibrate on text")
    tok = Tokenizer.from_json_str(json.dumps(src.tokenizer_json), src.tokenizer_config)
    ids = tok.encode(text)[:max_tokens]
    if len(ids) < 2:
        raise EdgeLlamaError(f"calibration text {text_file} has fewer than 2 tokens")
    return ids


def random_ids(vocab_size: int, n: int = RANDOM_TOKENS, seed: int = SEED) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab_size, size=n).tolist()


def _group(name: str) -> str:
    """Linears that read the same tensor share one record: q/k/v, and gate/up."""
    head, _, leaf = name.rpartition(".")
    if leaf in ("q_proj", "k_proj", "v_proj"):
        return f"{head}.qkv"
    if leaf in ("gate_proj", "up_proj"):
        return f"{head}.gate_up"
    return name


def calibration_batch(src, text_file: Path | None = None) -> tuple[np.ndarray, str]:
    """The calibration tokens as one batch [b, s] of whole windows (BOS first), and what they are."""
    cfg = src.config
    if text_file is not None:
        ids, source = text_ids(src, Path(text_file)), Path(text_file).name
    else:
        # BOS counts towards the RANDOM_TOKENS, so the forward runs exactly that many.
        ids, source = random_ids(cfg.vocab_size, RANDOM_TOKENS - (cfg.bos_token_id is not None)), f"random:{RANDOM_TOKENS}"
    if cfg.bos_token_id is not None:
        ids = [cfg.bos_token_id] + ids
    window = min(WINDOW, cfg.max_position_embeddings)
    if len(ids) > window:
        ids = ids[: len(ids) // window * window]  # whole windows only: one batch, one mask
    s = min(window, len(ids))
    return np.asarray(ids, np.int64).reshape(-1, s), source


class Recorder:
    """Forward pre-hooks on a block's linears: per-channel sums of |x| and (for GPTQ) the first rows of x."""

    def __init__(self, keep_inputs: bool):
        self.keep_inputs = keep_inputs
        self.sums: dict[str, "torch.Tensor"] = {}
        self.rows: dict[str, np.ndarray] = {}
        self.names: dict[str, str] = {}  # linear -> its group's record

    def record(self, name: str, x) -> None:
        key = _group(name)
        self.names[name] = key
        if key in self.sums:
            return  # another member of the group already recorded this same input
        x = x.detach().reshape(-1, x.shape[-1])
        self.sums[key] = x.abs().double().sum(0)
        if self.keep_inputs:
            self.rows[key] = x[:INPUT_ROWS].float().numpy().copy()

    def hook(self, prefix: str, block) -> list:
        import torch

        return [m.register_forward_pre_hook(lambda mod, inp, n=prefix + name: self.record(n, inp[0]))
                for name, m in block.named_modules() if isinstance(m, torch.nn.Linear)]

    def take(self, names: list[str], n_tokens: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(act_scales, act_inputs) of these linears, as calibrate() reports them."""
        scales, inputs, per_key = {}, {}, {}
        for name in names:
            key = self.names.get(name)
            if key is None:
                continue
            if key not in per_key:  # one array per group, shared by its members
                per_key[key] = (self.sums[key] / n_tokens).float().numpy()
            scales[name] = per_key[key]
            if key in self.rows:
                inputs[name] = self.rows[key]
        return scales, inputs


def calibrate(src, text_file: Path | None = None, *, keep_inputs: bool = True,
              log: Callable[[str], None] = lambda m: None) -> Calibration:
    """Run the torch reference over the calibration tokens, one layer at a time, and collect
    per-linear input statistics. Peak memory is one layer plus the activations, not the model."""
    import torch

    from edgellama.export.model import stream_hidden

    batch, source = calibration_batch(src, text_file)
    rec = Recorder(keep_inputs)
    rec.record("lm_head", stream_hidden(src, torch.from_numpy(batch), on_block=rec.hook))
    n = batch.size
    log(f"calibration: {n} tokens ({source})")
    scales, inputs = rec.take(list(rec.names), n)
    return Calibration(source=source, tokens=n, act_scales=scales, act_inputs=inputs)


class ScaledTensors(DerivedStore):
    """A TensorStore whose tensors are rescaled on the way out: columns multiplied, rows or gains divided."""

    fresh_arrays = True

    def __init__(self, base, cols: dict[str, np.ndarray], rows: dict[str, np.ndarray], gains: dict[str, np.ndarray]):
        super().__init__(base)
        self.cols, self.rows, self.gains = cols, rows, gains

    def get(self, name: str) -> np.ndarray:
        t = self.base.get(name)
        if name in self.cols:
            t = t * self.cols[name][None, :]
        if name in self.rows:
            t = t / self.rows[name][:, None]
        if name in self.gains:
            t = t / self.gains[name]
        return np.ascontiguousarray(t, np.float32)


def rank_int8_layers(src, emitter) -> None:
    """Tell the mixed policy which layers' down projections lose most at int4: the heaviest-tailed ones.

    Weight kurtosis, not calibration error: on de-gridded SmolLM2 the layers whose int4 down
    projection costs most KLD (0-2, 9-11, 27-29) are those with the heaviest tails, while the
    relative output error on calibration tokens ranked them last (docs/quantization.md).
    """
    scores = {}
    for i in range(src.config.num_hidden_layers):
        w = src.tensors.get(f"model.layers.{i}.mlp.down_proj.weight")  # float32; sums accumulate in float64
        w = w - np.float32(w.mean(dtype=np.float64))
        w *= w
        var = float(w.mean(dtype=np.float64))
        w *= w
        scores[i] = float(w.mean(dtype=np.float64)) / (var * var) if var > 0 else 0.0
    emitter.rank_layers("down_proj", scores)


def smoothing_groups(cfg, emitter, layer: int | None) -> list[tuple[list[str], str, str]]:
    """The linears that share one input, how 1/s is folded into what produced it ("gains": a norm's
    gain; "rows": up_proj's rows), and that producer: a decoder layer's, or (layer None) the lm_head's."""
    if layer is None:
        untied = not cfg.tie_word_embeddings and emitter.opts.lm_head != "keep"
        return [(["lm_head"], "gains", "model.norm.weight")] if untied else []
    p = f"model.layers.{layer}"
    return [([f"{p}.self_attn.{c}_proj" for c in "qkv"], "gains", f"{p}.input_layernorm.weight"),
            ([f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"], "gains", f"{p}.post_attention_layernorm.weight"),
            ([f"{p}.mlp.down_proj"], "rows", f"{p}.mlp.up_proj.weight")]


def smooth_group(emitter, names: list[str], how: str, target: str, present: set[str],
                 cols: dict[str, np.ndarray], folds: dict[str, dict[str, np.ndarray]]) -> bool:
    """Choose one group's scales from its calibration statistics, record where they fold
    (cols: the linears' weights; folds[how]: the producer), and rescale the emitter's statistics
    to the smoothed inputs. False when the group has no statistics, or a biased producer whose
    bias would need rescaling too."""
    from edgellama.quantize.smoothing import channel_scales

    x, act = emitter.act_inputs.get(names[0]), emitter.act_scales.get(names[0])
    if act is None or (how == "rows" and target.replace(".weight", ".bias") in present):
        return False
    s = channel_scales(act)
    for n in names:
        cols[n + ".weight"] = s
    folds[how][target] = s
    xs, acts = (None if x is None else x / s), act / s
    for n in names:
        emitter.act_scales[n] = acts
        if xs is not None:
            emitter.act_inputs[n] = xs
    return True


def smooth_source(src, emitter, log: Callable[[str], None] = lambda m: None):
    """The source with quantize/smoothing.py's per-channel scales folded in, and the emitter's
    calibration statistics rescaled to match. Returns (source, manifest record)."""
    from dataclasses import replace

    from edgellama.quantize.smoothing import ALPHA

    cfg = src.config
    cols: dict[str, np.ndarray] = {}
    folds: dict[str, dict[str, np.ndarray]] = {"rows": {}, "gains": {}}
    groups = [g for i in [*range(cfg.num_hidden_layers), None] for g in smoothing_groups(cfg, emitter, i)]
    present = set(src.tensors.names())
    done = sum(smooth_group(emitter, names, how, target, present, cols, folds) for names, how, target in groups)
    log(f"smoothing: {done}/{len(groups)} weight groups rescaled (alpha {ALPHA})")
    record = {"alpha": ALPHA, "groups": done}
    if not done:
        return src, record
    return replace(src, tensors=ScaledTensors(src.tensors, cols, folds["rows"], folds["gains"])), record
