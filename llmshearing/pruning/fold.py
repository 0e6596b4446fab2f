"""Fold deterministic masks into a decoder's weights and slice it to the smaller, uniform shape.

The result has the same architecture and parameter names with smaller sizes; its unmasked forward
equals the source decoder's forward with the masks applied (both combine the masks with
:func:`llmshearing.models.schema.combine_masks`). Folding rules (``[out, in]`` layouts):

* ``hidden``: embedding columns, both block norms and the ``wo``/``w2`` output rows are scaled; the
  final norm is scaled only when the embeddings are untied (tied: the scaled embedding already acts
  as the output head); the output head itself is never scaled. Every ``d``-sized axis is then sliced.
* per query head ``head * kv_head * head_layer * layer`` scales that head's ``wo`` columns; removed
  heads lose their ``wq`` rows and ``wo`` columns, KV groups without a kept head their ``wk``/``wv`` rows.
* ``intermediate`` scales ``w3`` rows, ``mlp * layer`` the ``w2`` rows; removed dims are sliced away.
* layers left without attention and MLP are dropped and the rest renumbered consecutively.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from llmshearing.models.config import ModelConfig
from llmshearing.models.decoder import Decoder
from llmshearing.models.schema import combine_masks, state_shapes

NON_UNIFORM_HINT = (
    "a pruned model needs the same shape in every layer: use the deterministic masks of the L0 module at the "
    "exact target (eval_target_model / prune-model), and drop whole layers with the 'layer' family rather "
    "than with separate 'head_layer'/'mlp' masks"
)


@dataclass(frozen=True)
class KeptStructure:
    """Indices that survive the masks, and the folding factors."""

    layers: list[int]
    heads: dict[int, Tensor]  # per kept layer: kept query-head indices (ascending)
    groups: dict[int, Tensor]  # per kept layer: kept KV-group indices (ascending)
    intermediate: dict[int, Tensor]  # per kept layer: kept intermediate indices
    hidden: Tensor  # kept hidden dims
    head_factor: Tensor  # [L, H]
    mlp_factor: Tensor  # [L]
    intermediate_factor: Tensor  # [L, I]
    hidden_factor: Tensor | None  # [d]

    def pruned_config(self, config: ModelConfig) -> ModelConfig:
        first = self.layers[0]
        return config.replace(
            d_model=int(self.hidden.numel()),
            n_layers=len(self.layers),
            n_heads=int(self.heads[first].numel()),
            n_kv_heads=int(self.groups[first].numel()),
            intermediate_size=int(self.intermediate[first].numel()),
        )


def kept_structure(config: ModelConfig, masks: Mapping[str, Tensor]) -> KeptStructure:
    """What the masks keep; raises ``ValueError`` if the result would not be a uniform model."""
    L, hpg = config.n_layers, config.heads_per_group
    factors = combine_masks(config, {k: v.detach().float().cpu() for k, v in masks.items()})
    head_factor = _dense(factors.heads, (L, config.n_heads))
    mlp_factor = _dense(factors.mlp, (L,))
    intermediate_factor = _dense(factors.intermediate, (L, config.intermediate_size))
    hidden_factor = factors.dims
    hidden = torch.arange(config.d_model) if hidden_factor is None else torch.nonzero(hidden_factor).flatten()
    if hidden.numel() == 0:
        raise ValueError("the hidden mask removes every hidden dimension; nothing would be left of the model")

    layers, heads, groups, inter = [], {}, {}, {}
    for i in range(L):
        kept_heads = torch.nonzero(head_factor[i]).flatten()
        kept_inter = torch.nonzero(intermediate_factor[i] * mlp_factor[i]).flatten()
        if kept_heads.numel() == 0 and kept_inter.numel() == 0:
            continue  # the whole layer is gone
        if kept_heads.numel() == 0 or kept_inter.numel() == 0:
            kept, gone = ("MLP", "attention") if kept_heads.numel() == 0 else ("attention", "MLP")
            raise ValueError(
                f"the masks keep the {kept} of layer {i} but remove its {gone}; {NON_UNIFORM_HINT}"
            )
        kept_groups, per_group = torch.unique(kept_heads // hpg, return_counts=True)
        if per_group.min() != per_group.max():
            raise ValueError(
                f"layer {i} keeps {per_group.tolist()} query heads in its KV groups {kept_groups.tolist()}; "
                f"every kept group must keep the same number of heads; {NON_UNIFORM_HINT}"
            )
        layers.append(i)
        heads[i], groups[i], inter[i] = kept_heads, kept_groups, kept_inter
    if not layers:
        raise ValueError("the masks remove every layer; nothing would be left of the model")
    first = layers[0]
    for i in layers[1:]:
        for what, kept in (("query heads", heads), ("KV groups", groups), ("intermediate dims", inter)):
            if kept[i].numel() != kept[first].numel():
                raise ValueError(
                    f"layer {i} keeps {kept[i].numel()} {what} but layer {first} keeps {kept[first].numel()}; "
                    f"{NON_UNIFORM_HINT}"
                )
    return KeptStructure(
        layers, heads, groups, inter, hidden, head_factor, mlp_factor, intermediate_factor, hidden_factor
    )


def _dense(factor: Tensor | None, shape: tuple[int, ...]) -> Tensor:
    """A combined mask factor at its full shape (ones where no mask applies)."""
    return torch.ones(shape) if factor is None else factor.expand(shape)


def _block_rows(indices: Tensor, block: int) -> Tensor:
    """Row indices of whole ``block``-sized blocks (heads of ``head_dim`` rows)."""
    return (indices[:, None] * block + torch.arange(block)[None, :]).flatten()


def prune_state_dict(
    state_dict: Mapping[str, Tensor], config: ModelConfig, masks: Mapping[str, Tensor], progress: bool = False
) -> tuple[dict[str, Tensor], ModelConfig]:
    """Fold ``masks`` into a decoder state dict and slice it; returns the new state dict and config."""
    from tqdm.auto import tqdm

    kept = kept_structure(config, masks)
    new_config = kept.pruned_config(config)
    expected = set(state_shapes(config))
    missing, extra = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or extra:
        raise ValueError(
            f"state dict does not match the model config: missing {missing[:5]}, unexpected {extra[:5]}; "
            "pass the decoder's own state dict (without the l0_module) and its config"
        )
    hd, hid, hf = config.head_dim, kept.hidden, kept.hidden_factor

    def scaled(name: str, rows: Tensor | None = None, cols: Tensor | None = None) -> Tensor:
        w = state_dict[name].detach().float().cpu()
        if rows is not None:
            w = w * rows[:, None] if w.dim() == 2 else w * rows
        if cols is not None:
            w = w * cols[None, :]
        return w

    def out(w: Tensor, like: str) -> Tensor:
        return w.to(dtype=state_dict[like].dtype).contiguous()

    new: dict[str, Tensor] = {}
    new["tok_embeddings.weight"] = out(
        scaled("tok_embeddings.weight", cols=hf)[:, hid], "tok_embeddings.weight"
    )
    norm_scale = hf if not config.tie_word_embeddings else None
    new["norm.weight"] = out(scaled("norm.weight", rows=norm_scale)[hid], "norm.weight")
    if not config.tie_word_embeddings:
        new["output.weight"] = out(scaled("output.weight")[:, hid], "output.weight")

    for j, i in enumerate(tqdm(kept.layers, desc="folding masks", unit="layer", disable=not progress)):
        src, dst = f"layers.{i}.", f"layers.{j}."
        q_rows, kv_rows = _block_rows(kept.heads[i], hd), _block_rows(kept.groups[i], hd)
        for norm in ("attention_norm", "ffn_norm"):
            new[f"{dst}{norm}.weight"] = out(
                scaled(f"{src}{norm}.weight", rows=hf)[hid], f"{src}{norm}.weight"
            )
        for proj, rows in (("wq", q_rows), ("wk", kv_rows), ("wv", kv_rows)):
            name = f"{src}attention.{proj}"
            new[f"{dst}attention.{proj}.weight"] = out(
                scaled(f"{name}.weight")[rows][:, hid], f"{name}.weight"
            )
            if config.qkv_bias:
                new[f"{dst}attention.{proj}.bias"] = out(scaled(f"{name}.bias")[rows], f"{name}.bias")
        head_cols = kept.head_factor[i].repeat_interleave(hd)
        wo = scaled(f"{src}attention.wo.weight", rows=hf, cols=head_cols)
        new[f"{dst}attention.wo.weight"] = out(wo[hid][:, q_rows], f"{src}attention.wo.weight")
        inter = kept.intermediate[i]
        ff = f"{src}feed_forward."
        new[f"{dst}feed_forward.w1.weight"] = out(scaled(f"{ff}w1.weight")[inter][:, hid], f"{ff}w1.weight")
        w3 = scaled(f"{ff}w3.weight", rows=kept.intermediate_factor[i])
        new[f"{dst}feed_forward.w3.weight"] = out(w3[inter][:, hid], f"{ff}w3.weight")
        down_rows = kept.mlp_factor[i] * (hf if hf is not None else torch.ones(config.d_model))
        w2 = scaled(f"{ff}w2.weight", rows=down_rows)
        new[f"{dst}feed_forward.w2.weight"] = out(w2[hid][:, inter], f"{ff}w2.weight")
    return new, new_config


def prune_decoder(decoder: Decoder, masks: Mapping[str, Tensor]) -> Decoder:
    """A new, physically smaller ``Decoder`` equal to ``decoder`` run with ``masks``."""
    weights = decoder.tok_embeddings.weight
    state, config = prune_state_dict(decoder.state_dict(), decoder.config, masks)
    pruned = Decoder(config).to(weights.device)
    pruned.load_state_dict(state, strict=True)
    return pruned.train(decoder.training)
