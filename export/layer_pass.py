"""One read of the checkpoint for the whole export: calibration, smoothing, the graph and the
verification reference.

build_llama_graph asks for tensors layer by layer. LayerPass answers from one read of each layer:
at the first tensor of layer i it reads the whole layer, runs it in torch over the calibration
tokens (the quantizer's input statistics) and over the verification text (the reference the
finished bundle is checked against), folds the smoothing scales into the weights, and serves them.
Calibration, the build and the verification each used to read the checkpoint on their own: three
reads of 7-10 s each for the Llama-3.2-1B shape's bf16 safetensors.

The torch side (calibration.Recorder, model.LayerStream) is the same code the stand-alone
calibrate() and the reference model use, so the statistics and the reference logits are the same.
"""

from __future__ import annotations

import re

import numpy as np

from edgellama.export.calibration import Recorder, smooth_group, smoothing_groups
from edgellama.export.sources import DerivedStore

EMBED, NORM, HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class LayerPass(DerivedStore):
    """A TensorStore over `src.tensors` for build_llama_graph's one pass (layers asked in order).

    calib:   calibration tokens [b, s] (None: the emitter's statistics, if any, were handed in)
    verify:  token ids whose reference logits to compute (None: no verification)
    emitter: the quantizing emitter whose act_scales / act_inputs this fills; smooth: fold scales in
    After the pass: reference_logits [len(verify), vocab], smoothed (groups rescaled), and the
    scales in cols / rows / gains (what calibration.ScaledTensors holds, for LoRA slots' record).
    """

    def __init__(self, src, emitter=None, *, calib: np.ndarray | None = None, keep_inputs: bool = False,
                 smooth: bool = False, verify: list[int] | None = None):
        super().__init__(src.tensors)
        self.cfg, self.emitter, self.calib, self.smooth, self.verify = src.config, emitter, calib, smooth, verify
        self.recorder = Recorder(keep_inputs) if calib is not None else None
        self.present = set(self.base.names())
        self.cols: dict[str, np.ndarray] = {}
        self.rows: dict[str, np.ndarray] = {}
        self.gains: dict[str, np.ndarray] = {}
        self.smoothed = self.groups = 0
        self.reference_logits: np.ndarray | None = None
        self._stream = None  # model.LayerStream, once the embedding is read (when torch has work to do)
        self._layer = -1
        self._served: dict[str, np.ndarray] = {}
        from edgellama.export.model import block_parameter_names  # export always has torch

        self._block_names = block_parameter_names(self.cfg)

    @property
    def runs_torch(self) -> bool:
        return self.calib is not None or self.verify is not None

    def get(self, name: str) -> np.ndarray:
        m = _LAYER.match(name)
        if m:
            layer = int(m[1])
            if layer != self._layer:
                if layer < self._layer:  # build_llama_graph's order; anything else would read twice
                    raise RuntimeError(f"LayerPass: layer {layer} asked for after layer {self._layer}")
                self._read_layer(layer)
            return self._served[name] if name in self._served else self.base.get(name)
        if name == EMBED:
            return self._embedding()
        if name in (NORM, HEAD):
            self._finish()
            if name == HEAD and self.cfg.tie_word_embeddings:  # the table again (a quantized tied head): one read
                table = self._served.pop(HEAD, None)                # for it and the reference logits, if any
                return self.base.get(EMBED) if table is None else table
            return self._served.get(name) if name in self._served else self.base.get(name)
        return self.base.get(name)

    # -- the pass ----------------------------------------------------------------------------
    def _embedding(self) -> np.ndarray:
        table = self.base.get(EMBED)
        if self._stream is None and self.runs_torch:
            import torch

            from edgellama.export.model import LayerStream

            batches = [torch.from_numpy(np.asarray(b, np.int64)) for b in
                       ([] if self.calib is None else [self.calib]) + ([] if self.verify is None else [[self.verify]])]
            self._stream = LayerStream(self.cfg, torch.from_numpy(table), batches)
        return table

    def _read_layer(self, i: int) -> None:
        prefix = f"model.layers.{i}."
        self._served = {}  # the previous layer's arrays go before this one's are read
        self._served = {prefix + k: self.base.get(prefix + k) for k in self._block_names}
        self._layer = i
        if self._stream is not None:
            import torch

            weights = {k: torch.from_numpy(self._served[prefix + k]) for k in self._block_names}
            rec = self.recorder
            hook = None if rec is None else (lambda block, j: rec.hook(prefix, block) if j == 0 else [])
            self._stream.run(weights, hook)  # before smoothing rescales the arrays in place
        if self.recorder is not None:  # the linears its hooks saw in this layer
            self._take_statistics([n for n in self.recorder.names if n.startswith(prefix)])
        self._smooth(i)

    def _finish(self) -> None:
        """At the final norm: the lm_head's statistics and smoothing, and the reference logits."""
        if self._layer == self.cfg.num_hidden_layers:
            return
        self._layer = self.cfg.num_hidden_layers
        self._served = {}
        self._served = {NORM: self.base.get(NORM)}
        if not self.cfg.tie_word_embeddings:
            self._served[HEAD] = self.base.get(HEAD)
        if self._stream is not None:
            import torch

            hidden = self._stream.final(torch.from_numpy(self._served[NORM]))
            if self.recorder is not None:
                self.recorder.record("lm_head", hidden[0])
                self._take_statistics(["lm_head"])
            if self.verify is not None:
                if HEAD not in self._served:  # tied: read the table again, kept only until get(HEAD)
                    self._served[HEAD] = self.base.get(EMBED)
                head = self._served[HEAD]
                with torch.inference_mode():
                    self.reference_logits = torch.nn.functional.linear(hidden[-1], torch.from_numpy(head))[0].numpy()
                del head
            self._stream = None
        self._smooth(None)

    def release(self) -> None:
        """Drop what was served last once the graph is built: an untied lm_head stays here otherwise
        (2.1 GB of float32 on the 8B shape) while the export's verification loads the bundle."""
        self._served = {}

    def _take_statistics(self, names: list[str]) -> None:
        scales, inputs = self.recorder.take(names, int(self.calib.size))
        self.emitter.act_scales.update(scales)
        for name in [n for n in self.emitter.act_inputs if n not in names]:
            del self.emitter.act_inputs[name]  # GPTQ's rows of earlier layers are spent: keep one layer's
        self.emitter.act_inputs.update(inputs)

    def _smooth(self, layer: int | None) -> None:
        """Fold the smoothing scales of a layer's groups (None: the lm_head's) into the served weights."""
        if not (self.smooth and self.emitter is not None and self.emitter.act_scales):
            return
        folds = {"rows": self.rows, "gains": self.gains}
        for names, how, target in smoothing_groups(self.cfg, self.emitter, layer):
            self.groups += 1
            if smooth_group(self.emitter, names, how, target, self.present, self.cols, folds):
                self.smoothed += 1
                in_place = getattr(self.base, "fresh_arrays", False)  # else a store may keep what it handed out
                for n in names:
                    self._scale(n + ".weight", self.cols[n + ".weight"][None, :], np.multiply, in_place)
                s = folds[how][target]
                self._scale(target, s[:, None] if how == "rows" else s, np.divide, in_place)

    def _scale(self, name: str, s: np.ndarray, op, in_place: bool) -> None:
        w = self._served[name]
        if in_place and w.dtype == np.float32 and w.flags.writeable:
            op(w, s, out=w)  # a 1B-shape export spent 4.9 s allocating fresh pages for copies
        else:
            self._served[name] = np.ascontiguousarray(op(w, s), np.float32)
