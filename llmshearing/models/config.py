"""Shape and behaviour of a LLaMA-family decoder (LLaMA-1/2/3, Mistral, Qwen2, SmolLM)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

FAMILIES = ("llama", "mistral", "qwen2")
ATTN_IMPLS = ("auto", "sdpa", "flash")


@dataclass
class ModelConfig:
    """Everything the decoder needs to know; pruned models are the same class with smaller shapes."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_seq_len: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    sliding_window: int | None = None
    family: str = "llama"
    attn_impl: str = "auto"
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "head_dim",
            "intermediate_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"model.{name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model.n_heads ({self.n_heads}) must be divisible by model.n_kv_heads ({self.n_kv_heads}): "
                "every KV group serves the same number of query heads"
            )
        if self.family not in FAMILIES:
            raise ValueError(f"model.family must be one of {FAMILIES}, got {self.family!r}")
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"model.attn_impl must be one of {ATTN_IMPLS}, got {self.attn_impl!r}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(
                f"model.sliding_window must be a positive integer or null, got {self.sliding_window}"
            )

    @property
    def heads_per_group(self) -> int:
        """Query heads served by one KV group."""
        return self.n_heads // self.n_kv_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; valid keys are {sorted(known)}")
        missing = sorted(
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.name not in values
        )
        if missing:
            raise ValueError(f"model config is missing required keys {missing}")
        return cls(**dict(values))

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (e.g. the pruned shape)."""
        return dataclasses.replace(self, **changes)

    def layer_params(self) -> int:
        """Parameters of one decoder block, norms and biases included."""
        d, hd = self.d_model, self.head_dim
        attn = d * hd * (2 * self.n_heads + 2 * self.n_kv_heads)
        if self.qkv_bias:
            attn += hd * (self.n_heads + 2 * self.n_kv_heads)
        return attn + 3 * d * self.intermediate_size + 2 * d

    def num_params(self, include_embeddings: bool = True) -> int:
        """Total parameter count of the decoder (final norm included)."""
        total = self.n_layers * self.layer_params() + self.d_model
        if include_embeddings:
            total += self.vocab_size * self.d_model * (1 if self.tie_word_embeddings else 2)
        return total

    def matmul_params(self) -> int:
        """Parameters taking part in matrix multiplies: all but the embedding lookup (the output head
        counts, tied or not; norms are counted too, as the convention does)."""
        return self.num_params(include_embeddings=False) + self.vocab_size * self.d_model

    def train_flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (PaLM appendix B): ``6 N`` over the matmul parameters plus
        ``12 L H hd T`` for attention scores and values over a ``seq_len``-token context."""
        attention = 12 * self.n_layers * self.n_heads * self.head_dim * seq_len
        return 6 * self.matmul_params() + attention
