"""The torch modules traced for Core ML: our Llama, rewired around a fixed-size KV cache.

Both forms take `inputIds` [1, q] and an additive `causalMask` [1, 1, q, end] (its q axis may
be 1 and broadcast), where `end` is how many tokens the cache holds after the call: the new
tokens sit at positions end - q .. end - 1. One traced graph serves prefill and decode.

- StatefulLlama keeps `keyCache` / `valueCache` [layers, 1, kv_heads, max_context, head_dim]
  as buffers written in place; the converter turns them into Core ML states (iOS 18).
- StatelessLlama takes the same caches as inputs and returns only the new rows
  (`presentKeys` / `presentValues` [layers, 1, kv_heads, q, head_dim]) for the caller to
  store at end - q .. end - 1: copying q rows per step instead of the whole cache (iOS 17).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgellama.export.model import Llama, rotate_half
from edgellama.runtime.coreml_engine import KEY_CACHE, VALUE_CACHE


def cache_shape(model: Llama, max_context: int) -> tuple[int, int, int, int, int]:
    c = model.config
    return (c.num_hidden_layers, 1, c.num_key_value_heads, max_context, c.head_dim)


def _rms_norm(x: Tensor, norm) -> Tensor:
    # aten::rms_norm, which coremltools lowers with a max-abs prescale: x*x overflows fp16 past 256.
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)


class _CoreMLLlama(nn.Module):
    def __init__(self, model: Llama, max_context: int):
        super().__init__()
        self.llama = model
        cfg = model.config
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        # RoPE as tables sliced by position: fp16 cannot even hold a position like 2049, let alone its angle.
        pos = torch.arange(max_context, dtype=torch.float64)[:, None] * torch.as_tensor(model.inv_freq, dtype=torch.float64)
        angles = torch.cat((pos, pos), dim=-1)
        self.register_buffer("rope_cos", angles.cos().float(), persistent=False)
        self.register_buffer("rope_sin", angles.sin().float(), persistent=False)

    def _run(self, input_ids: Tensor, causal_mask: Tensor, attend_cache) -> Tensor:
        """All layers; attend_cache(i, k, v, start, end) stores the new K/V and returns the K/V to attend to."""
        q_len, end = input_ids.shape[-1], causal_mask.shape[-1]
        start = end - q_len
        m = self.llama.model
        x = m.embed_tokens(input_ids)
        cos, sin = self.rope_cos[start:end], self.rope_sin[start:end]
        rep = self.n_heads // self.n_kv
        # GQA without repeating the cache: a KV group's query heads are folded into the query axis,
        # [1, heads, q, d] -> [1, kv_heads, rep*q, d], so each step reads the cache once, not rep times.
        mask = causal_mask.expand(1, rep, q_len, end).reshape(1, 1, rep * q_len, end)
        for i, layer in enumerate(m.layers):
            a = layer.self_attn
            h = _rms_norm(x, layer.input_layernorm)
            q = a.q_proj(h).view(1, q_len, self.n_heads, self.head_dim).transpose(1, 2)
            k = a.k_proj(h).view(1, q_len, self.n_kv, self.head_dim).transpose(1, 2)
            v = a.v_proj(h).view(1, q_len, self.n_kv, self.head_dim).transpose(1, 2)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            keys, values = attend_cache(i, k, v, start, end)
            q = q.reshape(1, self.n_kv, rep * q_len, self.head_dim)
            # No scale=: the converter emits iOS 18's fused SDPA only at the default 1/sqrt(head_dim).
            y = F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask)
            y = y.reshape(1, self.n_heads, q_len, self.head_dim).transpose(1, 2).reshape(1, q_len, -1)
            x = x + a.o_proj(y)
            x = x + layer.mlp(_rms_norm(x, layer.post_attention_layernorm))
        return F.linear(_rms_norm(x, m.norm), self.llama.lm_head_weight())


class StatefulLlama(_CoreMLLlama):
    def __init__(self, model: Llama, max_context: int):
        super().__init__(model, max_context)
        shape = cache_shape(model, max_context)
        self.register_buffer(KEY_CACHE, torch.zeros(shape, dtype=torch.float16))
        self.register_buffer(VALUE_CACHE, torch.zeros(shape, dtype=torch.float16))

    def forward(self, inputIds: Tensor, causalMask: Tensor) -> Tensor:  # noqa: N803 (Core ML feature names)
        kc, vc = getattr(self, KEY_CACHE), getattr(self, VALUE_CACHE)

        def attend_cache(i, k, v, start, end):
            # In-place slice writes on the buffers: the converter turns them into state slice_updates.
            kc[i : i + 1, :, :, start:end] = k.to(kc.dtype)[None]
            vc[i : i + 1, :, :, start:end] = v.to(vc.dtype)[None]
            return kc[i, :, :, :end], vc[i, :, :, :end]

        return self._run(inputIds, causalMask, attend_cache)


class StatelessLlama(_CoreMLLlama):
    def forward(self, inputIds: Tensor, causalMask: Tensor, keyCache: Tensor, valueCache: Tensor):  # noqa: N803
        new_k, new_v = [], []

        def attend_cache(i, k, v, start, end):
            new_k.append(k.to(keyCache.dtype))
            new_v.append(v.to(valueCache.dtype))
            # Slice-write into a copy rather than concatenate: at start = 0 a concat would
            # take an empty cache slice, and Core ML has no zero-sized tensors.
            keys, values = keyCache[i, :, :, :end].clone(), valueCache[i, :, :, :end].clone()
            keys[:, :, start:end] = new_k[-1]
            values[:, :, start:end] = new_v[-1]
            return keys, values

        logits = self._run(inputIds, causalMask, attend_cache)
        return logits, torch.stack(new_k), torch.stack(new_v)
