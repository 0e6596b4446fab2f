"""Bytes a training step holds on one rank, derived from the decoder's shapes (no tensor is created).

Every figure is a pure function of a :class:`ModelConfig` and the step's settings. The activation
counts follow ``llmshearing/models/decoder.py`` tensor by tensor: what each block saves for its
backward (the RMSNorm's fp32 input and normalised copy, the inputs of every linear, the attention
kernel's q, k, v, output and log-sum-exp, the SwiGLU's gate, up and product, and the extra inputs
the pruning masks' multiplications keep), then the output head's logits and the cross-entropy's
fp32 log-probabilities over the vocabulary, and the distillation loss's gradient buffer and chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmshearing.models.config import ModelConfig
from llmshearing.models.schema import mask_shapes

FP32 = 4
# families whose masks scale each query head's context (Attention.forward's head_scale)
HEAD_SCALE_FAMILIES = frozenset({"head", "kv_head", "head_layer", "layer"})
# families whose masks scale the SwiGLU product (FeedForward.forward's scale)
FFN_SCALE_FAMILIES = frozenset({"intermediate", "mlp", "layer"})
# fp32 tensors of the KD loss alive at once per chunk position and vocabulary entry (distill.py: both
# log-softmaxes and a scaled input, p = exp(log p), the masked difference, the chunk's gradient), besides
# the teacher's logits of the chunk
KD_CHUNK_FP32_TENSORS = 6


@dataclass(frozen=True)
class Dtypes:
    """Bytes per element of the tensors a step makes.

    ``params``: the weights as the forward sees them (2 when FSDP's mixed precision gathers them in
    bf16, else 4); ``matmul``: linear and attention outputs (2 under autocast); ``residual``: the stream
    between blocks (bf16 once the embedding is bf16, fp32 when autocast leaves the embedding fp32);
    ``teacher``: the frozen teacher's weights and activations.
    """

    params: int
    matmul: int
    residual: int
    teacher: int

    @property
    def autocast_weight_copies(self) -> bool:
        """Autocast keeps a bf16 copy of every weight it casts (fp32 weights, low-precision compute)."""
        return self.params == FP32 and self.matmul < FP32


def step_dtypes(precision: str, mixed_precision: str | None) -> Dtypes:
    """The dtypes of a step at ``precision`` (``fp32``, ``amp_bf16``, ``amp_fp16``) with FSDP's
    ``mixed_precision`` (``DEFAULT``, ``PURE``, ``FULL``; ``None`` without FSDP)."""
    if not precision.startswith("amp_"):
        return Dtypes(FP32, FP32, FP32, FP32)
    if mixed_precision in ("DEFAULT", "PURE"):
        return Dtypes(2, 2, 2, 2)
    return Dtypes(FP32, 2, FP32, 2)


@dataclass(frozen=True)
class Kernels:
    """How attention runs: FlashAttention-2 keeps k and v per KV group and its output contiguous; SDPA
    (the CPU and the fallback) repeats k and v to every query head and copies the context once."""

    flash: bool = False


def block_params(config: ModelConfig) -> int:
    return config.layer_params()


def embedding_params(config: ModelConfig) -> int:
    """Embeddings, output head (untied) and final norm: the parameters outside the blocks."""
    return config.num_params() - config.n_layers * config.layer_params()


def largest_param(config: ModelConfig) -> int:
    """Elements of the largest single weight (the embedding, or an MLP matrix)."""
    q = config.n_heads * config.head_dim
    return max(config.vocab_size, config.intermediate_size, q) * config.d_model


def l0_params(config: ModelConfig, families: tuple[str, ...] | list[str]) -> int:
    """Log-alphas of the pruned families plus their Lagrange multipliers (two per family)."""
    shapes = mask_shapes(config)
    total = 0
    for family in families:
        size = 1
        for dim in shapes[family]:
            size *= dim
        total += size + 2
    return total


def block_activation_bytes(
    config: ModelConfig,
    tokens: int,
    dtypes: Dtypes,
    masks: frozenset[str] = frozenset(),
    kernels: Kernels = Kernels(),
) -> int:
    """Bytes one decoder block saves for its backward over ``tokens`` positions (micro-batch x length)."""
    d, inter, heads = config.d_model, config.intermediate_size, config.n_heads
    q = heads * config.head_dim
    kv = (config.n_kv_heads if kernels.flash else heads) * config.head_dim  # SDPA repeats k, v per head
    m, r = dtypes.matmul, dtypes.residual
    norm = d * (FP32 + r + m)  # fp32 input of the statistics, normalised copy, linear input
    per_token = 2 * norm
    per_token += m * (2 * q + 2 * kv) + FP32 * heads  # q, k, v, output; log-sum-exp per head
    if masks & HEAD_SCALE_FAMILIES:
        per_token += m * q  # the context scaled per head (the kernels' output is laid out [B, T, H, hd])
    per_token += 4 * inter * m  # gate pre-activation, silu, up, product
    if masks & FFN_SCALE_FAMILIES:
        per_token += inter * m  # the product before its scale (the scaled one is w2's input)
    if "hidden" in masks:
        per_token += 2 * d * r + 2 * d * m  # both norms' unmasked outputs, both branches' outputs
    return tokens * per_token


def checkpointed_block_bytes(config: ModelConfig, tokens: int, dtypes: Dtypes) -> int:
    """What a block under activation checkpointing keeps until its backward: its input."""
    return tokens * config.d_model * dtypes.residual


def outside_block_bytes(config: ModelConfig, tokens: int, dtypes: Dtypes, masks: frozenset[str]) -> int:
    """Saved outside the blocks, before the head: token ids, the final norm's tensors, the masked
    embedding output."""
    d, m, r = config.d_model, dtypes.matmul, dtypes.residual
    per_token = 8 + d * (FP32 + r + m)
    if "hidden" in masks:
        per_token += 2 * d * r
    return tokens * per_token


def logits_bytes(config: ModelConfig, tokens: int, dtypes: Dtypes) -> int:
    """The head's logits [tokens, V] (held by the step's outputs until the backward is done)."""
    return tokens * config.vocab_size * dtypes.matmul


def loss_peak_bytes(config: ModelConfig, tokens: int, dtypes: Dtypes) -> int:
    """Beyond the logits, at the cross-entropy's backward: its fp32 log-probabilities, the fp32
    gradients of the loss and of the log-softmax (the second cast to the logits' dtype when lower)."""
    last = FP32 if dtypes.matmul == FP32 else dtypes.matmul
    return tokens * config.vocab_size * (FP32 + FP32 + last)


def kd_bytes(config: ModelConfig, tokens: int, chunk_size: int, dtypes: Dtypes) -> tuple[int, int]:
    """``(held, chunk)``: the KD loss's per-position gradient buffer [tokens, V] in the logits' dtype
    (saved for the backward, where it is scaled and added to the cross-entropy's), and the fp32
    working set of one chunk of positions."""
    held = tokens * config.vocab_size * dtypes.matmul
    chunk = min(chunk_size, tokens) * config.vocab_size * (KD_CHUNK_FP32_TENSORS * FP32 + dtypes.teacher)
    return held, chunk


def forward_working_bytes(config: ModelConfig, tokens: int, dtype_bytes: int, flash: bool = False) -> int:
    """The largest set of tensors a block's forward holds at once without autograd (a frozen
    teacher, an evaluation): its input, the normalised input, then q, k, v and the output, or the
    MLP's gate, up and product."""
    d, inter = config.d_model, config.intermediate_size
    q = config.n_heads * config.head_dim
    kv = (config.n_kv_heads if flash else config.n_heads) * config.head_dim
    attention = 2 * d + 2 * q + 2 * kv
    mlp = 2 * d + 3 * inter
    return tokens * max(attention, mlp) * dtype_bytes + tokens * d * FP32


def block_backward_bytes(config: ModelConfig, tokens: int, dtypes: Dtypes) -> int:
    """Gradients a block's backward makes at once beyond what it saved: two of the MLP's
    intermediate tensors and two of the residual stream."""
    return tokens * (2 * config.intermediate_size * dtypes.matmul + 2 * config.d_model * FP32)
