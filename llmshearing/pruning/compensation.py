"""Least-squares compensation: keep the units whose loss the others can best make up, and re-fit them.

Two projections write to the residual stream from inputs made of separable units: the MLP's ``w2`` [d, I]
reads the SwiGLU activation ``h`` [I] (one column per neuron) and attention's ``wo`` [d, H * hd] reads the
heads' contexts (``hd`` columns per query head). Removing units ``S`` of such a layer ``W`` and re-fitting
the kept columns ``K`` to the calibration inputs (Optimal Brain Surgeon on the squared output error, with
the Gram matrix ``G = mean_t x_t x_t^T`` of the inputs as its Hessian) gives, per output row ``w``,

    w_K' = w_K + G_KK^-1 G_KS w_S,    error = tr(W_S ((G^-1)_SS)^-1 W_S^T).

:func:`compensated_removal` removes units one at a time, each time the one whose removal (the rest re-fitted)
costs least, and updates ``W`` and ``G^-1`` in place. An importance ranking scores each unit alone; this
sees redundancy: of two neurons (or heads) with the same input one goes and the other takes over its
output, and a pair whose outputs cancel goes whole. ``damping`` (a share of the mean diagonal of ``G``,
added to it) keeps ``G`` invertible. Units compete within rows with a number to keep in each: the query
heads of one KV group (none where the one-shot cut drops the group), the neurons of one layer.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from llmshearing.models.decoder import Decoder
from llmshearing.pruning.targets import TargetPlan

DEFAULT_DAMPING = 0.001  # chosen on the eval split (bench/results/README.md: planted-2026-12-05-damping)
GRAM_FAMILIES = ("head", "intermediate")  # the families whose projection is re-fitted; Gram keys name them


def damped_gram(gram: Tensor, damping: float = DEFAULT_DAMPING) -> Tensor:
    """``G + damping * mean(diag G) * I`` in float64."""
    if damping <= 0:
        raise ValueError(f"damping must be positive (it keeps the Gram matrix invertible), got {damping}")
    g = gram.double()
    scale = float(torch.diagonal(g).mean().clamp(min=1e-12))
    return g + damping * scale * torch.eye(g.shape[0], dtype=g.dtype, device=g.device)


def damped_inverse(gram: Tensor, damping: float = DEFAULT_DAMPING) -> Tensor:
    """``(G + damping * mean(diag G) * I)^-1`` in float64."""
    return torch.cholesky_inverse(torch.linalg.cholesky(damped_gram(gram, damping)))


def compensated_removal(
    weight: Tensor,
    gram: Tensor,
    keep: int | Tensor,
    damping: float = DEFAULT_DAMPING,
    group: int = 1,
    rows: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Greedily remove units (blocks of ``group`` columns) of ``weight`` [d, n * group], re-fitting the rest.

    ``gram`` is [n * group, n * group]. Unit ``u`` competes within row ``rows[u]`` (default: one row), and
    ``keep`` units stay per row (an int, or one count per row). Returns ``(kept, fitted)``: the kept unit
    indices (ascending) and ``weight`` with the removed units' columns zero and the kept ones compensated
    (float64).
    """
    width = weight.shape[1]
    if group <= 0 or width % group:
        raise ValueError(f"{width} columns do not split into units of {group}")
    count = width // group
    if gram.shape != (width, width):
        raise ValueError(f"the Gram matrix has shape {tuple(gram.shape)}, expected {(width, width)}")
    device = weight.device
    rows = torch.zeros(count, dtype=torch.long, device=device) if rows is None else rows.to(device).long()
    sizes = torch.bincount(rows)
    quota = torch.as_tensor(keep, dtype=torch.long, device=device).expand(sizes.shape).clone()
    if rows.shape != (count,) or bool((quota < 0).any()) or bool((quota > sizes).any()):
        raise ValueError(f"keep must be in [0, units per row {sizes.tolist()}], got {quota.tolist()}")
    if bool(quota.sum() == 0):
        raise ValueError("keep must leave at least one unit")
    fitted = weight.detach().double().clone()
    inverse = damped_inverse(gram.to(device), damping)
    alive = torch.ones(count, dtype=torch.bool, device=device)
    left = sizes.clone()
    units = torch.arange(count, device=device)
    eye = torch.eye(group, dtype=fitted.dtype, device=device)
    for _ in range(int((sizes - quota).sum())):
        if group == 1:  # each unit's (G^-1)_uu is a diagonal entry: no block inverses
            solved = 1.0 / torch.diagonal(inverse).masked_fill(~alive, 1.0).clamp(min=1e-30)
            cost = fitted.square().sum(0) * solved
            solved = solved.view(count, 1, 1)
        else:
            blocks = inverse.view(count, group, count, group)[units, :, units, :]  # [n, g, g]: (G^-1)_uu
            solved = torch.linalg.inv(torch.where(alive[:, None, None], blocks, eye))
            parts = fitted.view(-1, count, group)
            cost = torch.einsum("dug,ugh,duh->u", parts, solved, parts)
        open_rows = left > quota
        q = int(torch.argmin(cost.masked_fill(~(alive & open_rows[rows]), float("inf"))))
        cols = slice(q * group, (q + 1) * group)
        step = solved[q] @ inverse[cols]  # [g, width]
        if group == 1:  # rank-1 updates in place (no [width, width] temporary)
            fitted.addr_(fitted[:, q].clone(), step[0], alpha=-1.0)
            inverse.addr_(inverse[:, q].clone(), step[0], alpha=-1.0)
        else:
            fitted -= fitted[:, cols] @ step
            inverse -= inverse[:, cols] @ step
        fitted[:, cols] = 0.0  # exactly: later updates then leave it there, as its rows of the inverse are 0
        inverse[cols] = 0.0
        inverse[:, cols] = 0.0
        alive[q] = False
        left[rows[q]] -= 1
    return torch.nonzero(alive).flatten(), fitted


def least_squares_fit(weight: Tensor, gram: Tensor, kept: Tensor, damping: float = DEFAULT_DAMPING) -> Tensor:
    """``weight`` [d, n] with only the ``kept`` columns, re-fitted in closed form (the result
    :func:`compensated_removal` reaches step by step); the others zero. For checks and for a kept set
    chosen elsewhere."""
    g = damped_gram(gram, damping)
    removed = torch.ones(weight.shape[1], dtype=torch.bool, device=g.device)
    removed[kept] = False
    w = weight.detach().double()
    fitted = torch.zeros_like(w)
    keep_idx, gone_idx = kept.to(g.device), torch.nonzero(removed).flatten()
    shift = torch.linalg.solve(g[keep_idx][:, keep_idx], g[keep_idx][:, gone_idx] @ w[:, gone_idx].T)
    fitted[:, keep_idx] = w[:, keep_idx] + shift.T
    return fitted


def _dropped(masks: Mapping[str, Tensor], layer: int, names: tuple[str, ...]) -> bool:
    return any(name in masks and float(masks[name][layer]) == 0.0 for name in names)


def compensate(
    decoder: Decoder,
    grams: Mapping[str, Tensor],
    masks: Mapping[str, Tensor],
    plan: TargetPlan,
    damping: float = DEFAULT_DAMPING,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Re-choose the one-shot cut's neurons and query heads by :func:`compensated_removal` and write the
    re-fitted ``w2`` / ``wo`` into ``decoder`` (in place); returns ``masks`` with ``intermediate`` / ``head``
    replaced.

    ``grams`` maps ``intermediate`` to [L, I, I] (``w2`` inputs) and ``head`` to [L, H * hd, H * hd] (``wo``
    inputs), as :func:`llmshearing.pruning.importance.compute_importance` with ``grams=True`` measures them
    on the source. Layers, KV groups and hidden dims stay as ``masks`` has them: heads of a dropped KV group
    go (their columns re-fitted into the kept heads'), and inside a kept group the target's number of heads
    stays. Layers the masks drop keep their weights: nothing of them survives the fold.
    """
    config = decoder.config
    width = {"intermediate": config.intermediate_size, "head": config.n_heads * config.head_dim}
    for family, gram in grams.items():
        expected = (config.n_layers, width[family], width[family])
        if tuple(gram.shape) != expected:
            raise ValueError(
                f"the {family} Gram matrices have shape {tuple(gram.shape)}, expected {expected}"
            )
    new = {name: mask.detach().clone().float() for name, mask in masks.items()}
    mlp = "intermediate" in plan.families and "intermediate" in grams
    attention = bool({"head", "kv_head"} & set(plan.families)) and "head" in grams
    from tqdm.auto import tqdm

    layers = tqdm(decoder.layers, desc="compensation", unit="layer", disable=not progress)
    for i, block in enumerate(layers):
        if mlp and not _dropped(masks, i, ("layer", "mlp")):
            w2 = block.feed_forward.w2.weight
            kept, fitted = compensated_removal(
                w2, grams["intermediate"][i], plan.keep["intermediate"], damping
            )
            with torch.no_grad():
                w2.copy_(fitted.to(w2.dtype))
            new["intermediate"][i] = 0.0
            new["intermediate"][i, kept.cpu()] = 1.0
        if attention and not _dropped(masks, i, ("layer", "head_layer")):
            wo = block.attention.wo.weight
            # heads compete within blocks of consecutive heads; with kv_head a block is a KV group, and a
            # dropped group keeps none of its heads
            rows = torch.arange(config.n_heads) // plan.head_block
            quota = torch.full((config.n_heads // plan.head_block,), plan.keep.get("head", plan.head_block))
            if "kv_head" in masks:
                quota = quota * (masks["kv_head"][i].cpu() > 0).long()
            kept, fitted = compensated_removal(
                wo, grams["head"][i], quota, damping, group=config.head_dim, rows=rows
            )
            with torch.no_grad():
                wo.copy_(fitted.to(wo.dtype))
            if "head" in new:
                new["head"][i] = 0.0
                new["head"][i, kept.cpu()] = 1.0
    return new


__all__ = [
    "DEFAULT_DAMPING",
    "GRAM_FAMILIES",
    "compensate",
    "compensated_removal",
    "damped_gram",
    "damped_inverse",
    "least_squares_fit",
]
