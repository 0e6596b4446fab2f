"""Per-rank GPU memory of one training step: weights, gradients, optimizer state, FSDP's gathered
copies, activations, the loss over the vocabulary, the distillation teacher and its KD chunk.

:func:`step_memory` is a pure function of the student's and teacher's configs and a
:class:`StepSettings`; it returns the parts by name so a plan can say what dominates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmshearing.models.config import ModelConfig
from llmshearing.planning import memory as mem
from llmshearing.planning.memory import FP32, Dtypes, Kernels

SHARDED = ("FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD", "_HYBRID_SHARD_ZERO2")
ADAM_STATES = 2  # AdamW's two fp32 moments per parameter


@dataclass(frozen=True)
class StepSettings:
    """What a step's memory depends on besides the model's shape.

    ``shards``: ranks one copy of the weights is sharded over (1 without FSDP or with ``NO_SHARD``);
    ``strategy``: FSDP's sharding strategy (``None`` without FSDP); ``l0_families``: the pruned mask
    families (empty outside pruning); ``kd_chunk``: positions per KD chunk when distilling.
    """

    micro_batch: int
    seq_len: int
    dtypes: Dtypes
    checkpointing: bool = False
    shards: int = 1
    strategy: str | None = None
    kernels: Kernels = field(default_factory=Kernels)
    l0_families: tuple[str, ...] = ()
    kd_chunk: int | None = None
    accumulating: bool = False  # several micro-batches per step: gradients exist in every backward

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len


def weight_bytes(config: ModelConfig, settings: StepSettings) -> dict[str, int]:
    """Master weights, gradients and AdamW state (fp32, sharded over ``settings.shards``), the L0
    module (whole on every rank) and the low-precision copies mixed precision gathers or caches."""
    n, s, dt = config.num_params(), settings.shards, settings.dtypes
    parts = {
        "weights (fp32 master)": FP32 * n // s,
        "gradients (fp32)": FP32 * n // s,
        "optimizer (AdamW, 2 x fp32)": ADAM_STATES * FP32 * n // s,
    }
    if settings.l0_families:
        l0 = mem.l0_params(config, settings.l0_families)
        parts["L0 module (weights, grads, AdamW)"] = (1 + 1 + ADAM_STATES) * FP32 * l0
    block, outside = mem.block_params(config), mem.embedding_params(config)
    strategy = settings.strategy
    if strategy is None:
        if dt.autocast_weight_copies:
            parts["autocast bf16 weight copies"] = dt.matmul * n
        return parts
    if strategy == "NO_SHARD" or s == 1:
        gathered = n  # the whole model in the compute dtype
    elif strategy in ("SHARD_GRAD_OP", "_HYBRID_SHARD_ZERO2"):
        gathered = n  # every block stays gathered from its forward to its backward
    else:
        gathered = outside + 2 * block  # the root (embeddings, head) and two blocks (one prefetched)
    if dt.params != FP32 or s > 1:
        parts["FSDP gathered weights"] = dt.params * gathered
    # a unit's unsharded gradient in the compute dtype and its fp32 copy for the reduce-scatter
    parts["FSDP gradient reduction"] = (dt.params + FP32) * max(block, outside) if s > 1 else 0
    return parts


def activation_bytes(config: ModelConfig, settings: StepSettings) -> dict[str, int]:
    """What the forward keeps for the backward until the blocks' own backward: every block's saved
    tensors (or, checkpointed, its input) and the logits."""
    dt, tokens = settings.dtypes, settings.tokens
    masks = frozenset(settings.l0_families)
    if settings.checkpointing:
        kept = config.n_layers * mem.checkpointed_block_bytes(config, tokens, dt)
        label = f"activations ({config.n_layers} block inputs, checkpointed)"
    else:
        kept = config.n_layers * mem.block_activation_bytes(config, tokens, dt, masks, settings.kernels)
        label = f"activations ({config.n_layers} blocks)"
    return {label: kept, "logits": mem.logits_bytes(config, tokens, dt)}


@dataclass(frozen=True)
class StepEstimate:
    """One rank's peak in a training step: the parts alive at the peak, by name, and where it falls."""

    parts: dict[str, int]
    phase: str

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def step_memory(
    config: ModelConfig, settings: StepSettings, teacher: ModelConfig | None = None
) -> StepEstimate:
    """Every part of one rank's peak memory in a training step (bytes; their sum is the peak).

    The peak is the largest of the step's phases: the backward of the loss over the vocabulary
    (gradients exist only when micro-batches accumulate), the backward of the last block (every
    gradient, one block's recomputed activations and its gradients), and, when distilling, the
    teacher's forward and the KD loss's chunks.
    """
    dt, tokens = settings.dtypes, settings.tokens
    weights = weight_bytes(config, settings)
    grads = weights.pop("gradients (fp32)")
    reduction = weights.pop("FSDP gradient reduction", 0)
    kept = activation_bytes(config, settings)
    if teacher is not None:
        t, s = dt.teacher, settings.shards
        blocks = teacher.n_layers * mem.block_params(teacher)
        weights["teacher weights"] = t * (blocks // s + mem.embedding_params(teacher))
    masks = frozenset(settings.l0_families)
    recompute = (
        mem.block_activation_bytes(config, tokens, dt, masks, settings.kernels)
        if settings.checkpointing
        else 0
    )
    accumulated = grads if settings.accumulating else 0
    outside = mem.outside_block_bytes(config, tokens, dt, masks)
    phases: dict[str, dict[str, int]] = {
        "backward of the loss": {
            "gradients (fp32)": accumulated,
            "activations outside the blocks": outside,
            "loss over the vocabulary (fp32)": mem.loss_peak_bytes(config, tokens, dt),
        },
        "backward of the last block": {
            "gradients (fp32)": grads,
            "FSDP gradient reduction": reduction,
            "block backward"
            + (" (recomputed activations, gradients)" if recompute else " (gradients)"): recompute
            + mem.block_backward_bytes(config, tokens, dt),
        },
    }
    # DecoupledAdamW steps one parameter at a time; its denominator takes two temporaries of the largest
    step_temporaries = 2 * FP32 * -(-mem.largest_param(config) // settings.shards)
    phases["optimizer step"] = {"gradients (fp32)": grads, "optimizer step temporaries": step_temporaries}
    if config.tie_word_embeddings and settings.shards == 1:
        # the embedding's gradient is made whole and added to the head's, already in .grad
        embedding = FP32 * config.vocab_size * config.d_model
        phases["backward of the tied embedding"] = {
            "gradients (fp32)": grads,
            "tied embedding gradient": embedding,
        }
    if teacher is not None:
        hidden = tokens * teacher.d_model * dt.teacher
        held, chunk = mem.kd_bytes(config, tokens, settings.kd_chunk or tokens, dt)
        # the KD backward scales its buffer into a new tensor and frees it; the sum with the
        # cross-entropy's gradient accumulates in place
        phases["backward of the loss"].update({"teacher hidden states": hidden, "KD gradient buffer": held})
        phases["backward of the last block"]["teacher hidden states"] = hidden
        gathered = dt.teacher * mem.block_params(teacher) if settings.shards > 1 else 0
        phases["teacher forward"] = {
            "gradients (fp32)": accumulated,
            "activations outside the blocks": outside,
            "teacher gathered block": gathered,
            "teacher forward working set": mem.forward_working_bytes(
                teacher, tokens, dt.teacher, settings.kernels.flash
            ),
        }
        phases["KD loss chunk"] = {
            "gradients (fp32)": accumulated,
            "activations outside the blocks": outside,
            "teacher hidden states": hidden,
            "KD gradient buffer": held,
            f"KD chunk ({min(settings.kd_chunk or tokens, tokens)} positions)": chunk,
        }
    phase, extra = max(phases.items(), key=lambda item: sum(item[1].values()))
    state = dict(list(weights.items())[:1])
    state["gradients (fp32)"] = extra.pop("gradients (fp32)", 0)
    parts = {**state, **weights, **kept, **extra}
    return StepEstimate({name: value for name, value in parts.items() if value}, phase)
