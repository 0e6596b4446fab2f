"""A LLaMA-family decoder that optionally takes structured-pruning masks as inputs.

Without masks it is a plain dense LLaMA / Mistral / Qwen2 / SmolLM. With masks, every structure
the pruning learns is scaled in place, and the masked model equals the physically smaller model
obtained by folding the masks into the weights and slicing (``models/schema.py`` defines the keys,
their shapes and how they combine; each block receives its share as a :class:`LayerMasks`):

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

import contextlib
import functools
import importlib.util
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llmshearing.models.config import ModelConfig
from llmshearing.models.schema import combine_masks

Rope = tuple[Tensor, Tensor]  # (cos, sin) position tables [T, hd]


class AttentionKernelError(ImportError, ValueError):
    """``model.attn_impl=flash`` cannot run here; the message says why and what to use instead."""


@functools.cache
def import_flash_attn() -> tuple[Callable[..., Tensor] | None, str]:
    """Import FlashAttention-2's kernel once: ``(flash_attn_func, "")``, or ``(None, why it is unusable)``.

    Finding the package is not enough: a wheel built for another torch or CUDA fails only when its
    extension loads (e.g. an undefined symbol), so the kernel is imported here, at model build.
    """
    if importlib.util.find_spec("flash_attn") is None:
        return None, "not installed"
    try:
        from flash_attn import flash_attn_func
    except Exception as err:  # ImportError, OSError, RuntimeError: whatever a broken extension raises
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return None, f"{type(err).__name__}: {reason}" if reason else type(err).__name__
    return flash_attn_func, ""


def flash_attn_available(cuda: bool | None = None) -> bool:
    """FlashAttention-2 is usable: a CUDA device exists and the kernel imports."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    return cuda and import_flash_attn()[0] is not None


@functools.cache
def _fallback_notice(reason: str) -> None:
    """Say once per process (on rank 0) that attention falls back to SDPA, and why."""
    if os.environ.get("RANK", "0") == "0":
        print(
            f"llmshearing: flash-attn is installed but does not import ({reason}); attention runs on torch SDPA",
            file=sys.stderr,
            flush=True,
        )


def resolve_attn_impl(requested: str, cuda: bool | None = None) -> str:
    """Pick the attention kernel before the model is built.

    ``auto`` is FlashAttention-2 on a CUDA machine where it imports, else SDPA (a flash-attn that is
    installed but does not import is reported in one line); ``flash`` where it cannot run is an
    :class:`AttentionKernelError`.
    """
    if requested not in ("auto", "flash"):
        return requested
    cuda = torch.cuda.is_available() if cuda is None else cuda
    kernel, reason = import_flash_attn() if cuda else (None, "no CUDA device")
    if kernel is not None:
        return "flash"
    if requested == "flash":
        fix = (
            "pip install 'llmshearing[gpu]'"
            if reason == "not installed"
            else "reinstall flash-attn for this torch"
        )
        raise AttentionKernelError(
            f"model.attn_impl=flash needs FlashAttention-2 on a CUDA device, and here it cannot run ({reason}); "
            f"{fix}, or use attn_impl=auto or sdpa"
        )
    if reason not in ("not installed", "no CUDA device"):
        _fallback_notice(reason)
    return "sdpa"


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


@dataclass(frozen=True)
class LayerMasks:
    """What one block multiplies in; a field left ``None`` leaves that structure unmasked.

    ``dims`` [d] is the hidden-dimension mask (in the activations' dtype) and ``n_kept`` its number of
    kept dims (fp32); ``heads`` [H] (or [1]) scales each query head's context; ``ffn`` [I] (or [1])
    scales the SwiGLU product.
    """

    dims: Tensor | None = None
    n_kept: Tensor | None = None
    heads: Tensor | None = None
    ffn: Tensor | None = None

    def keep_dims(self, x: Tensor) -> Tensor:
        """``x`` [..., d] with the masked hidden dims scaled (zeroed)."""
        return x if self.dims is None else x * self.dims


NO_MASKS = LayerMasks()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, dims: Tensor | None = None, n_kept: Tensor | None = None) -> Tensor:
        """Normalise ``x``; with a ``dims`` mask the statistics cover the ``n_kept`` kept dims only."""
        xf = x.float()
        if dims is None:
            variance = xf.pow(2).mean(-1, keepdim=True)
        else:  # masked dims of x are zero, so the sum over all dims is the sum over the kept ones
            variance = xf.pow(2).sum(-1, keepdim=True) / n_kept
        y = self.weight * (xf * torch.rsqrt(variance + self.eps)).to(x.dtype)
        return y if dims is None else y * dims


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

    def forward(self, x: Tensor, rope: Rope, head_scale: Tensor | None = None) -> Tensor:
        B, T, _ = x.shape
        cos, sin = rope
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
            flash_attn_func, _ = import_flash_attn()  # imported (and checked) when the model was built
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

    def forward(self, x: Tensor, rope: Rope, masks: LayerMasks | None = None) -> Tensor:
        masks = masks or NO_MASKS
        h = self.attention(self.attention_norm(x, masks.dims, masks.n_kept), rope, masks.heads)
        x = x + masks.keep_dims(h)
        h = self.feed_forward(self.ffn_norm(x, masks.dims, masks.n_kept), masks.ffn)
        return x + masks.keep_dims(h)


def is_block(module: nn.Module) -> bool:
    """FSDP wrapping and activation checkpointing unit: one decoder block."""
    return isinstance(module, Block)


@torch.no_grad()
def init_module(module: nn.Module, init_std: float) -> None:
    """(Re-)initialise the tensors owned directly by ``module`` (not its children).

    Linears and embeddings: normal(0, init_std), zero biases; RMSNorm: ones; the decoder's RoPE
    frequencies are recomputed. A module still on the meta device is first materialised on the CPU.
    """
    own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
    if any(t.is_meta for t in own):
        module.to_empty(device="cpu", recurse=False)
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=init_std)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, RMSNorm):
        nn.init.ones_(module.weight)
    elif isinstance(module, Decoder):
        module.reset_rope()


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
        self.reset_rope()

    # The RoPE inverse frequencies are a plain fp32 attribute, not a buffer: FSDP1's mixed precision
    # (DEFAULT, PURE) casts floating buffers to bf16, which would put a phase error of radians into the
    # rotations of late positions. Nothing that casts or moves buffers reaches this tensor; each device
    # gets its own fp32 copy on first use.
    def reset_rope(self) -> None:
        """Recompute the RoPE inverse frequencies (fp32, on the CPU) from the config."""
        inv_freq, self.rope_attention_scaling = rope_inverse_frequencies(self.config)
        self._inv_freq = inv_freq.float()
        self._inv_freq_on: dict[torch.device, Tensor] = {}

    @property
    def inv_freq(self) -> Tensor:
        """The RoPE inverse frequencies [hd / 2] (fp32, CPU)."""
        return self._inv_freq

    def _inv_freq_for(self, device: torch.device) -> Tensor:
        cached = self._inv_freq_on.get(device)
        if cached is None:
            cached = self._inv_freq_on[device] = self._inv_freq.to(device)
        return cached

    def init_weights(self) -> None:
        """Random initialisation of every module (see :func:`init_module`)."""
        for module in self.modules():
            init_module(module, self.config.init_std)

    # Composer's FSDP (1 and 2), activation checkpointing and meta-device init read these hooks.
    def fsdp_wrap_fn(self, module: nn.Module) -> bool:
        return is_block(module)

    def activation_checkpointing_fn(self, module: nn.Module) -> bool:
        return is_block(module)

    def param_init_fn(self, module: nn.Module) -> None:
        init_module(module, self.config.init_std)

    def rope_tables(self, seq_len: int, dtype: torch.dtype, device: torch.device | None = None) -> Rope:
        """Position tables ``(cos, sin)`` [T, hd], computed in fp32 on ``device`` and returned in ``dtype``."""
        device = self.tok_embeddings.weight.device if device is None else torch.device(device)
        inv_freq = self._inv_freq_for(device)
        positions = torch.arange(seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)
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
        rope = self.rope_tables(input_ids.shape[1], x.dtype, x.device)
        layer_masks = self.layer_masks(masks or {}, x.dtype)
        shared = layer_masks[0]  # the hidden-dims mask is the same in every layer
        x = shared.keep_dims(x)
        for layer, masks_of_layer in zip(self.layers, layer_masks, strict=True):
            x = layer(x, rope, masks_of_layer)
        x = self.norm(x, shared.dims, shared.n_kept)
        return self.head(x) if apply_head else x

    def layer_masks(self, masks: Mapping[str, Tensor], dtype: torch.dtype) -> list[LayerMasks]:
        """One :class:`LayerMasks` per layer from the mask dict (validated and combined by the schema)."""
        if not masks:
            return [NO_MASKS] * len(self.layers)
        factors = combine_masks(self.config, masks)
        dims, n_kept = factors.dims, None
        if dims is not None:
            n_kept = torch.count_nonzero(dims).clamp(min=1).to(torch.float32)
            dims = dims.to(dtype)
        heads, ffn = factors.heads, factors.ffn
        return [
            LayerMasks(
                dims=dims,
                n_kept=n_kept,
                heads=None if heads is None else heads[i],
                ffn=None if ffn is None else ffn[i],
            )
            for i in range(len(self.layers))
        ]


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create module parameters on the meta device (no memory, no init); buffers stay real."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]
