"""A LLaMA-family decoder that optionally takes structured-pruning masks as inputs.

Without masks it is a plain dense LLaMA / Mistral / Qwen2 / SmolLM. With masks, every structure
the pruning learns is scaled in place (see ``MASK_KEYS``), and the masked model equals the
physically smaller model obtained by folding the masks into the weights and slicing:

* ``hidden``       [d]       embedding output, every RMSNorm output and every branch output
* ``layer``        [L]       attention and MLP branch of a layer
* ``head_layer``   [L]       attention branch of a layer
* ``head``         [L, H]    each query head's attention context (before ``wo``)
* ``kv_head``      [L, Hkv]  the context of every query head of a KV group
* ``mlp``          [L]       MLP branch of a layer
* ``intermediate`` [L, I]    the SwiGLU product before ``w2``

With a ``hidden`` mask the RMSNorm statistics are taken over the kept dimensions only, which is
what makes the masked model equal to the sliced one.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmshearing.models.config import ModelConfig

MASK_KEYS = ("hidden", "layer", "head_layer", "head", "kv_head", "mlp", "intermediate")


def flash_attn_available() -> bool:
    """FlashAttention-2 is usable: the package is installed and a CUDA device exists."""
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def resolve_attn_impl(requested: str) -> str:
    """Pick the attention kernel before the model is built; never fails on a CPU machine for 'auto'."""
    if requested == "auto":
        return "flash" if flash_attn_available() else "sdpa"
    if requested == "flash" and not flash_attn_available():
        raise ImportError(
            "model.attn_impl=flash needs the flash-attn package and a CUDA device "
            "(pip install 'llmshearing[gpu]'); use attn_impl=auto or sdpa otherwise"
        )
    return requested


def rope_inverse_frequencies(config: ModelConfig) -> tuple[Tensor, float]:
    """RoPE inverse frequencies and attention scaling, computed exactly as transformers does.

    Plain RoPE is computed here (``1 / theta^(2i / hd)``, no scaling); the scaled variants come from
    transformers' own initialisers.
    """
    scaling = dict(config.rope_scaling) if config.rope_scaling else None
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "default":
        exponents = torch.arange(0, config.head_dim, 2, dtype=torch.int64).float() / config.head_dim
        return 1.0 / (config.rope_theta**exponents), 1.0

    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type == "dynamic" or rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(
            f"model.rope_scaling type {rope_type!r} is not supported; use default, linear, llama3 or yarn"
        )
    hf = LlamaConfig(
        hidden_size=config.d_model,
        num_attention_heads=config.n_heads,
        head_dim=config.head_dim,
        rope_theta=config.rope_theta,
        rope_scaling=scaling,
        max_position_embeddings=config.max_seq_len,
    )
    with torch.device("cpu"):  # a real table even while the weights are built on the meta device
        inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](hf, torch.device("cpu"))
    return inv_freq.float(), float(attention_scaling)


def rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate [B, heads, T, hd] by the position tables [T, hd]."""
    return x * cos + rotate_half(x) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, hidden: Tensor | None = None, n_kept: Tensor | None = None) -> Tensor:
        xf = x.float()
        if hidden is None:
            variance = xf.pow(2).mean(-1, keepdim=True)
        else:  # masked dims of x are zero, so the sum over all dims is the sum over the kept ones
            variance = xf.pow(2).sum(-1, keepdim=True) / n_kept
        y = self.weight * (xf * torch.rsqrt(variance + self.eps)).to(x.dtype)
        return y if hidden is None else y * hidden


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, attn_impl: str) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.sliding_window = config.sliding_window
        self.attn_impl = attn_impl
        d, hd = config.d_model, config.head_dim
        self.wq = nn.Linear(d, self.n_heads * hd, bias=config.qkv_bias)
        self.wk = nn.Linear(d, self.n_kv_heads * hd, bias=config.qkv_bias)
        self.wv = nn.Linear(d, self.n_kv_heads * hd, bias=config.qkv_bias)
        self.wo = nn.Linear(self.n_heads * hd, d, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, head_scale: Tensor | None = None) -> Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        context = self._attend(q, k, v)  # [B, T, H, hd]
        if head_scale is not None:
            context = context * head_scale.to(context.dtype)[:, None]
        return self.wo(context.reshape(B, T, self.n_heads * self.head_dim))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        T = q.shape[2]
        window = self.sliding_window if self.sliding_window is not None and self.sliding_window < T else None
        if self.attn_impl == "flash" and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            from flash_attn import flash_attn_func

            out = flash_attn_func(
                q.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
                causal=True,
                window_size=(window - 1, 0) if window else (-1, -1),
            )
            return out
        if self.n_kv_heads != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        if window is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            pos = torch.arange(T, device=q.device)
            distance = pos[:, None] - pos[None, :]
            allowed = (distance >= 0) & (distance < window)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return out.transpose(1, 2)


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.d_model, config.intermediate_size, bias=False)  # gate
        self.w3 = nn.Linear(config.d_model, config.intermediate_size, bias=False)  # up
        self.w2 = nn.Linear(config.intermediate_size, config.d_model, bias=False)  # down

    def forward(self, x: Tensor, scale: Tensor | None = None) -> Tensor:
        h = F.silu(self.w1(x)) * self.w3(x)
        if scale is not None:
            h = h * scale.to(h.dtype)
        return self.w2(h)


class Block(nn.Module):
    """Pre-norm decoder block: x + attention(norm(x)), then x + feed_forward(norm(x))."""

    def __init__(self, config: ModelConfig, attn_impl: str) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.attention = Attention(config, attn_impl)
        self.ffn_norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        hidden: Tensor | None = None,
        n_kept: Tensor | None = None,
        head_scale: Tensor | None = None,
        ffn_scale: Tensor | None = None,
    ) -> Tensor:
        h = self.attention(self.attention_norm(x, hidden, n_kept), cos, sin, head_scale)
        x = x + (h if hidden is None else h * hidden)
        h = self.feed_forward(self.ffn_norm(x, hidden, n_kept), ffn_scale)
        return x + (h if hidden is None else h * hidden)


class Decoder(nn.Module):
    """Token embeddings, ``n_layers`` blocks, a final RMSNorm and the output head (tied or not)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.attn_impl = resolve_attn_impl(config.attn_impl)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, self.attn_impl) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.rms_norm_eps)
        self.output = (
            None if config.tie_word_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        )
        inv_freq, self.rope_attention_scaling = rope_inverse_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def reset_rope(self) -> None:
        """Recompute the RoPE table (needed after materialising the model from the meta device)."""
        inv_freq, self.rope_attention_scaling = rope_inverse_frequencies(self.config)
        device = (
            self.inv_freq.device if self.inv_freq.device.type != "meta" else self.tok_embeddings.weight.device
        )
        self.inv_freq = inv_freq.to(device)

    @torch.no_grad()
    def init_weights(self) -> None:
        """Random initialisation: normal(0, init_std) for linears and embeddings, ones for norms."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def rope_tables(self, seq_len: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        positions = torch.arange(seq_len, device=self.inv_freq.device, dtype=torch.float32)
        freqs = torch.outer(positions, self.inv_freq.float())
        angles = torch.cat((freqs, freqs), dim=-1)
        cos = angles.cos() * self.rope_attention_scaling
        sin = angles.sin() * self.rope_attention_scaling
        return cos.to(dtype), sin.to(dtype)

    def head(self, hidden: Tensor) -> Tensor:
        """The output head: final hidden states [..., d] to logits [..., V] (tied or not)."""
        if self.output is None:
            return F.linear(hidden, self.tok_embeddings.weight)
        return self.output(hidden)

    def forward(
        self, input_ids: Tensor, masks: Mapping[str, Tensor] | None = None, apply_head: bool = True
    ) -> Tensor:
        """Logits [B, T, V] of ``input_ids`` [B, T]; with ``apply_head=False`` the final hidden
        states [B, T, d] (after the last RMSNorm), which :meth:`head` turns into logits."""
        x = self.tok_embeddings(input_ids)
        cos, sin = self.rope_tables(input_ids.shape[1], x.dtype)
        hidden, n_kept, head_scales, ffn_scales = self._prepare_masks(masks or {}, x.dtype)
        if hidden is not None:
            x = x * hidden
        for i, layer in enumerate(self.layers):
            x = layer(
                x,
                cos,
                sin,
                hidden,
                n_kept,
                None if head_scales is None else head_scales[i],
                None if ffn_scales is None else ffn_scales[i],
            )
        x = self.norm(x, hidden, n_kept)
        return self.head(x) if apply_head else x

    def _prepare_masks(
        self, masks: Mapping[str, Tensor], dtype: torch.dtype
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
        """Combine the masks into per-layer head scales [L, H|1] and MLP scales [L, I|1]."""
        unknown = sorted(set(masks) - set(MASK_KEYS))
        if unknown:
            raise ValueError(f"unknown mask keys {unknown}; valid keys are {list(MASK_KEYS)}")
        cfg = self.config
        expected = {
            "hidden": (cfg.d_model,),
            "layer": (cfg.n_layers,),
            "head_layer": (cfg.n_layers,),
            "mlp": (cfg.n_layers,),
            "head": (cfg.n_layers, cfg.n_heads),
            "kv_head": (cfg.n_layers, cfg.n_kv_heads),
            "intermediate": (cfg.n_layers, cfg.intermediate_size),
        }
        for key, mask in masks.items():
            if tuple(mask.shape) != expected[key]:
                raise ValueError(f"mask {key!r} has shape {tuple(mask.shape)}, expected {expected[key]}")
        layer = masks.get("layer")
        head_factors = [masks.get("head")]
        if "kv_head" in masks:
            head_factors.append(masks["kv_head"].repeat_interleave(cfg.heads_per_group, dim=1))
        head_factors += [m[:, None] for m in (masks.get("head_layer"), layer) if m is not None]
        ffn_factors = [masks.get("intermediate")] + [
            m[:, None] for m in (masks.get("mlp"), layer) if m is not None
        ]
        hidden = masks.get("hidden")
        n_kept = None
        if hidden is not None:
            n_kept = torch.count_nonzero(hidden).clamp(min=1).to(torch.float32)
            hidden = hidden.to(dtype)
        return hidden, n_kept, _product(head_factors), _product(ffn_factors)


def _product(factors: list[Tensor | None]) -> Tensor | None:
    present = [f for f in factors if f is not None]
    if not present:
        return None
    result = present[0]
    for factor in present[1:]:
        result = result * factor
    return result
