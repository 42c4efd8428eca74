"""Llama 3 in plain torch, written for export: readable top to bottom, no framework ceremony.

Covers RMSNorm, grouped-query attention with any heads-to-KV-heads ratio, head_dim
independent of hidden/heads, plain and llama3-scaled RoPE, SwiGLU, and tied or
untied embeddings. The KV cache is explicit (past in, present out) so the same
module serves parity checks, ONNX verification and Core ML tracing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgellama.errors import EdgeLlamaError
from edgellama.export.config import LlamaConfig, rope_inv_freq

KV = list[tuple[Tensor, Tensor]]  # per layer: key, value as [batch, kv_heads, seq, head_dim]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rotate_half(x: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, past: tuple[Tensor, Tensor] | None):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.n_kv, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        present = (k, v)
        rep = self.n_heads // self.n_kv
        if rep > 1:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(b, s, -1)), present


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, past):
        h, present = self.self_attn(self.input_layernorm(x), cos, sin, mask, past)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), present


class LlamaModel(nn.Module):
    """Module names follow Hugging Face's, so checkpoints load by name with no mapping table."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", torch.tensor(rope_inv_freq(cfg), dtype=torch.float32), persistent=False)

    def inv_freq_values(self):
        """RoPE inverse frequencies as numpy (valid even when the module lives on the meta device)."""
        return rope_inv_freq(self.config)

    def lm_head_weight(self) -> Tensor:
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def rope(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        freqs = position_ids[:, None, :, None].float() * self.inv_freq  # [b, 1, s, head_dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        past: KV | None = None,
        attention_mask: Tensor | None = None,
    ) -> tuple[Tensor, KV]:
        """Logits for every position, and the updated cache. attention_mask covers past + new tokens (1 = keep)."""
        b, s = input_ids.shape
        p = past[0][0].shape[2] if past else 0
        if position_ids is None:
            position_ids = torch.arange(p, p + s, device=input_ids.device).expand(b, s)
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope(position_ids, x.dtype)
        q_idx = torch.arange(p, p + s, device=x.device)[:, None]
        allowed = torch.arange(p + s, device=x.device)[None, :] <= q_idx  # causal [s, p+s]
        allowed = allowed[None, None].expand(b, 1, s, p + s)
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, :].bool()
        mask = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(~allowed, torch.finfo(x.dtype).min)
        presents: KV = []
        for i, layer in enumerate(self.model.layers):
            x, present = layer(x, cos, sin, mask, past[i] if past else None)
            presents.append(present)
        x = self.model.norm(x)
        return F.linear(x, self.lm_head_weight()), presents

    @classmethod
    def from_source(cls, source, dtype: torch.dtype = torch.float32) -> "Llama":
        """Build on the meta device, then load tensor by tensor: one copy of the weights, never two."""
        cfg = source.config
        with torch.device("meta"):
            model = cls(cfg)
        expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
        present = set(source.tensors.names())
        missing = [n for n in expected if n not in present]
        if missing:
            raise EdgeLlamaError(f"checkpoint is missing tensor {missing[0]!r} ({len(missing)} missing in all)")
        state = {}
        for name, shape in expected.items():
            got = tuple(source.tensors.shape(name))
            if got != shape:
                raise EdgeLlamaError(f"tensor {name!r} has shape {list(got)} but the config implies {list(shape)}")
            state[name] = torch.from_numpy(source.tensors.get(name)).to(dtype)
        model.load_state_dict(state, assign=True, strict=False)
        model.inv_freq = torch.tensor(rope_inv_freq(cfg), dtype=torch.float32)
        return model.eval()


class LayerStream:
    """Token batches [b, s] carried through the decoder one layer at a time, every row from position 0.

    The caller hands in each layer's weights in turn (run), so it decides when they are read and
    dropped: stream_hidden reads them here, the exporter's one-pass build (layer_pass.py) shares
    its own read with the graph. Peak memory is one layer plus the activations, not the model.
    """

    def __init__(self, cfg: LlamaConfig, embed: Tensor, batches: list[Tensor]):
        self.cfg = cfg
        inv = torch.tensor(rope_inv_freq(cfg), dtype=torch.float32)
        self.xs, self.ropes, self.masks = [], [], []
        with torch.inference_mode():
            for tokens in batches:
                s = tokens.shape[1]
                freqs = torch.arange(s)[None, None, :, None].float() * inv
                emb = torch.cat((freqs, freqs), dim=-1)
                self.xs.append(F.embedding(tokens, embed))
                self.ropes.append((emb.cos(), emb.sin()))
                self.masks.append(torch.full((s, s), torch.finfo(torch.float32).min).triu(1)[None, None])

    def run(self, weights: dict[str, Tensor], on_block=None) -> None:
        """One decoder layer over every batch; `weights` by Block parameter name ("self_attn.q_proj.weight", ...).
        on_block(block, batch index) is called before each batch runs (for forward hooks)."""
        with torch.device("meta"):
            block = Block(self.cfg)
        block.load_state_dict(weights, assign=True)
        with torch.inference_mode():
            for j, (x, (cos, sin), mask) in enumerate(zip(self.xs, self.ropes, self.masks)):
                handles = on_block(block, j) if on_block is not None else []
                self.xs[j], _ = block(x, cos, sin, mask, None)
                for h in handles or []:
                    h.remove()

    def final(self, norm_weight: Tensor) -> list[Tensor]:
        """The final-norm hidden states [b, s, hidden] of every batch."""
        norm = RMSNorm(self.cfg.hidden_size, self.cfg.rms_norm_eps)
        norm.weight = nn.Parameter(norm_weight, requires_grad=False)
        with torch.inference_mode():
            return [norm(x) for x in self.xs]


def block_parameter_names(cfg: LlamaConfig) -> list[str]:
    with torch.device("meta"):
        return [k for k, _ in Block(cfg).named_parameters()]


def stream_hidden(source, tokens: Tensor, on_block=None) -> Tensor:
    """Final-norm hidden states [b, s, hidden] of token ids [b, s], every row starting at position 0.

    Loads one decoder layer at a time from `source.tensors` and drops it after use. `on_block(prefix,
    block)` is called with each layer before it runs (for forward hooks; they go with the block).
    """
    cfg = source.config
    get = lambda name: torch.from_numpy(source.tensors.get(name))  # noqa: E731
    stream = LayerStream(cfg, get("model.embed_tokens.weight"), [tokens])
    names = block_parameter_names(cfg)
    for i in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{i}."
        hook = None if on_block is None else (lambda block, _j, p=prefix: on_block(p, block))
        stream.run({k: get(prefix + k) for k in names}, hook)
    return stream.final(get("model.norm.weight"))[0]
