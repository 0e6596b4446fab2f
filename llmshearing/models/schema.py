"""The decoder's schema: its state-dict keys and shapes, its masks, and how the masks combine.

Everything that must agree with :class:`~llmshearing.models.decoder.Decoder` (checkpoint readers and
writers, the L0 module, the fold) reads these definitions. :func:`combine_masks` is the one rule by
which the masks scale the model, so the masked decoder and the folded, sliced one stay equal:

* per query head: ``head * kv_head`` (repeated over the heads of its KV group) ``* head_layer * layer``
* per intermediate dim: ``intermediate``, and the whole MLP branch ``mlp * layer``
* per hidden dim: ``hidden`` (embedding output, every norm output and every branch output)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor

from llmshearing.models.config import ModelConfig

MASK_KEYS = ("hidden", "layer", "head_layer", "head", "kv_head", "mlp", "intermediate")


def state_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of a ``Decoder`` built from ``config`` with its shape, in a stable order."""
    d, hd, inter = config.d_model, config.head_dim, config.intermediate_size
    q_dim, kv_dim = config.n_heads * hd, config.n_kv_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (config.vocab_size, d)}
    for i in range(config.n_layers):
        prefix = f"layers.{i}."
        shapes[prefix + "attention_norm.weight"] = (d,)
        shapes[prefix + "attention.wq.weight"] = (q_dim, d)
        shapes[prefix + "attention.wk.weight"] = (kv_dim, d)
        shapes[prefix + "attention.wv.weight"] = (kv_dim, d)
        if config.qkv_bias:
            shapes[prefix + "attention.wq.bias"] = (q_dim,)
            shapes[prefix + "attention.wk.bias"] = (kv_dim,)
            shapes[prefix + "attention.wv.bias"] = (kv_dim,)
        shapes[prefix + "attention.wo.weight"] = (d, q_dim)
        shapes[prefix + "ffn_norm.weight"] = (d,)
        shapes[prefix + "feed_forward.w1.weight"] = (inter, d)
        shapes[prefix + "feed_forward.w3.weight"] = (inter, d)
        shapes[prefix + "feed_forward.w2.weight"] = (d, inter)
    shapes["norm.weight"] = (d,)
    if not config.tie_word_embeddings:
        shapes["output.weight"] = (config.vocab_size, d)
    return shapes


def mask_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of each mask the decoder accepts (and of each L0 family's log-alphas), in ``MASK_KEYS`` order."""
    L = config.n_layers
    return {
        "hidden": (config.d_model,),
        "layer": (L,),
        "head_layer": (L,),
        "head": (L, config.n_heads),
        "kv_head": (L, config.n_kv_heads),
        "mlp": (L,),
        "intermediate": (L, config.intermediate_size),
    }


def check_masks(config: ModelConfig, masks: Mapping[str, Tensor]) -> None:
    """Raise ``ValueError`` for a mask key the decoder does not know or a mask of the wrong shape."""
    unknown = sorted(set(masks) - set(MASK_KEYS))
    if unknown:
        raise ValueError(f"unknown mask keys {unknown}; valid keys are {list(MASK_KEYS)}")
    expected = mask_shapes(config)
    for key, mask in masks.items():
        if tuple(mask.shape) != expected[key]:
            raise ValueError(f"mask {key!r} has shape {tuple(mask.shape)}, expected {expected[key]}")


@dataclass(frozen=True)
class MaskFactors:
    """The masks combined into one factor per structure; ``None`` where no mask applies.

    ``heads`` is [L, H], or [L, 1] when only whole-layer masks are given; ``intermediate`` [L, I];
    ``mlp`` [L] scales the whole MLP branch; ``dims`` [d] is the hidden-dimension mask.
    """

    heads: Tensor | None
    intermediate: Tensor | None
    mlp: Tensor | None
    dims: Tensor | None

    @property
    def ffn(self) -> Tensor | None:
        """Per intermediate dim of every layer: ``intermediate * mlp`` ([L, I], or [L, 1])."""
        mlp = None if self.mlp is None else self.mlp[:, None]
        return _product([self.intermediate, mlp])


def combine_masks(config: ModelConfig, masks: Mapping[str, Tensor]) -> MaskFactors:
    """Check ``masks`` (see :func:`check_masks`) and combine them as the module docstring states."""
    check_masks(config, masks)
    layer, kv_head = masks.get("layer"), masks.get("kv_head")
    kv_per_query_head = None if kv_head is None else kv_head.repeat_interleave(config.heads_per_group, dim=1)
    per_layer = [m[:, None] for m in (masks.get("head_layer"), layer) if m is not None]
    return MaskFactors(
        heads=_product([masks.get("head"), kv_per_query_head, *per_layer]),
        intermediate=masks.get("intermediate"),
        mlp=_product([masks.get("mlp"), layer]),
        dims=masks.get("hidden"),
    )


def _product(factors: list[Tensor | None]) -> Tensor | None:
    """The product of the factors that are present, in order; ``None`` if none is."""
    present = [f for f in factors if f is not None]
    if not present:
        return None
    result = present[0]
    for factor in present[1:]:
        result = result * factor
    return result
