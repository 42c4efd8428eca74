"""Llama 3 architecture numbers, read from a Hugging Face config.json (either RoPE spelling)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from edgellama.errors import EdgeLlamaError

LLAMA_ARCHITECTURES = {"LlamaForCausalLM"}
LLAMA_MODEL_TYPES = {"llama"}
# Guards against configs that would make us allocate absurd amounts before any weight is read.
_LIMITS = {
    "hidden_size": 65536,
    "intermediate_size": 262144,
    "num_hidden_layers": 1024,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "vocab_size": 4_000_000,
    "max_position_embeddings": 16_777_216,
    "head_dim": 4096,
}


@dataclass
class RopeScaling:
    """`rope_type: llama3` frequency scaling (Llama 3.1 / 3.2)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass
class LlamaConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)

    @property
    def group_size(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "LlamaConfig":
        """Validate and read a transformers config dict. Raises EdgeLlamaError on anything we cannot export."""
        if not isinstance(cfg, dict):
            raise EdgeLlamaError("config.json is not a JSON object")
        archs = cfg.get("architectures") or []
        archs = [archs] if isinstance(archs, str) else archs
        model_type = cfg.get("model_type")
        if model_type is None:
            raise EdgeLlamaError("config.json is missing 'model_type'")
        if not isinstance(model_type, str) or not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
            raise EdgeLlamaError("config.json has an invalid 'model_type' or 'architectures'")
        if model_type not in LLAMA_MODEL_TYPES or (archs and not set(archs) & LLAMA_ARCHITECTURES):
            name = ", ".join(archs) if archs else str(model_type)
            raise EdgeLlamaError(f"unsupported architecture {name!r}: edgellama exports Llama models only")

        def need_int(key: str, default: Any = None) -> int:
            value = cfg.get(key, default)
            if value is None:
                raise EdgeLlamaError(f"config.json is missing {key!r}")
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise EdgeLlamaError(f"config.json has an invalid {key!r}: {value!r} (expected a positive integer)")
            if value > _LIMITS[key]:
                raise EdgeLlamaError(f"config.json has an absurd {key!r}: {value} (limit {_LIMITS[key]})")
            return value

        hidden = need_int("hidden_size")
        heads = need_int("num_attention_heads")
        kv_heads = need_int("num_key_value_heads", heads)
        if heads % kv_heads:
            raise EdgeLlamaError(f"num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})")
        if cfg.get("head_dim") is None and hidden % heads:
            raise EdgeLlamaError(f"hidden_size ({hidden}) is not a multiple of num_attention_heads ({heads})")
        head_dim = need_int("head_dim", hidden // heads)
        if head_dim % 2:
            raise EdgeLlamaError(f"head_dim must be even for RoPE, got {head_dim}")

        # transformers 5 keeps RoPE settings in rope_parameters; older configs use rope_theta + rope_scaling.
        rope = cfg.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise EdgeLlamaError("config.json has an invalid 'rope_parameters'")
        scaling = cfg.get("rope_scaling") or rope
        if not isinstance(scaling, dict):
            raise EdgeLlamaError("config.json has an invalid 'rope_scaling'")
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        if not isinstance(theta, (int, float)) or not math.isfinite(theta) or theta <= 0:
            raise EdgeLlamaError(f"config.json has an invalid rope_theta: {theta!r}")
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        rope_scaling = None
        if rope_type == "llama3":
            try:
                rope_scaling = RopeScaling(
                    factor=float(scaling["factor"]),
                    low_freq_factor=float(scaling["low_freq_factor"]),
                    high_freq_factor=float(scaling["high_freq_factor"]),
                    original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise EdgeLlamaError(f"config.json has an incomplete llama3 rope scaling: {exc}") from None
            # rope_inv_freq divides by these: a zero or inverted band would turn frequencies into inf/NaN
            if not (rope_scaling.factor > 0 and rope_scaling.high_freq_factor > rope_scaling.low_freq_factor > 0
                    and rope_scaling.original_max_position_embeddings > 0):
                raise EdgeLlamaError(f"config.json has an invalid llama3 rope scaling: {asdict(rope_scaling)}")
        elif rope_type not in ("default", None):
            raise EdgeLlamaError(f"unsupported rope_type {rope_type!r}: edgellama supports default and llama3 RoPE")

        eps = cfg.get("rms_norm_eps", 1e-5)
        if not isinstance(eps, (int, float)) or not (0 < eps < 1):
            raise EdgeLlamaError(f"config.json has an invalid rms_norm_eps: {eps!r}")
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise EdgeLlamaError("Llama variants with attention or MLP biases are not supported")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise EdgeLlamaError(f"unsupported hidden_act {act!r}: Llama uses silu")

        eos = cfg.get("eos_token_id")
        eos_list = [eos] if isinstance(eos, int) else eos or []
        if not isinstance(eos_list, list) or not all(isinstance(e, int) and not isinstance(e, bool) for e in eos_list):
            raise EdgeLlamaError(f"config.json has an invalid eos_token_id: {eos!r}")
        tied = cfg.get("tie_word_embeddings") or False
        if not isinstance(tied, bool):  # bool("false") is True: a string here would silently tie
            raise EdgeLlamaError(f"config.json has an invalid tie_word_embeddings: {tied!r}")
        bos = cfg.get("bos_token_id")
        return cls(
            hidden_size=hidden,
            intermediate_size=need_int("intermediate_size"),
            num_hidden_layers=need_int("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            vocab_size=need_int("vocab_size"),
            head_dim=head_dim,
            max_position_embeddings=need_int("max_position_embeddings", 2048),
            rms_norm_eps=float(eps),
            rope_theta=float(theta),
            rope_scaling=rope_scaling,
            tie_word_embeddings=tied,
            bos_token_id=bos if isinstance(bos, int) else None,
            eos_token_id=eos_list,
        )

    def to_hf(self) -> dict[str, Any]:
        """A transformers-style config.json (both RoPE spellings, so old and new readers agree)."""
        out: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": "float32",
            "use_cache": True,
        }
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            out["rope_scaling"] = {"rope_type": "llama3", **asdict(self.rope_scaling)}
            rope = {**out["rope_scaling"], "rope_theta": self.rope_theta}
        else:
            out["rope_scaling"] = None
        out["rope_parameters"] = rope
        if self.bos_token_id is not None:
            out["bos_token_id"] = self.bos_token_id
        if self.eos_token_id:
            out["eos_token_id"] = self.eos_token_id if len(self.eos_token_id) > 1 else self.eos_token_id[0]
        return out

    def param_count(self) -> int:
        h, i, l = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        per_layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h
        emb = self.vocab_size * h
        return l * per_layer + h + emb * (1 if self.tie_word_embeddings else 2)


def rope_inv_freq(cfg: LlamaConfig):
    """Inverse frequencies (numpy float64), with llama3 scaling applied. Shared by every graph form."""
    import numpy as np

    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    s = cfg.rope_scaling
    if s is None:
        return inv
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
    mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(mid, (1 - smooth) * inv / s.factor + smooth * inv, scaled)
