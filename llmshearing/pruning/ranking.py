"""Rank the units of every pruned family by activation importance, for one-shot pruning and L0 initialisation.

Units compete within a row of their family (a layer; for query heads, their KV group, or the whole layer
of a multi-head source pruned by ``head`` alone). :func:`oneshot_masks` keeps the top-ranked units at
exactly the target shape; :func:`importance_log_alpha` turns the same ranking into initial log-alphas of
an ``L0Module`` (``model.l0_module.init_from``, applied by :func:`initialize_from_importance`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llmshearing.models.config import ModelConfig
from llmshearing.models.decoder import Decoder
from llmshearing.models.schema import mask_shapes
from llmshearing.pruning.importance import (
    ImportanceScores,
    calibration_batches,
    compute_importance,
    scores_by_family,
    stream_calibration_batches,
)
from llmshearing.pruning.targets import PREFIX, L0Config, TargetPlan

DEFAULT_MARGIN = 0.25


def _rows(family: str, tensor: Tensor, config: ModelConfig, plan: TargetPlan) -> Tensor:
    """Arrange a family's tensor (shaped like its mask) into rows: units compete within the last dim.

    Query heads compete within blocks of ``plan.head_block`` heads: their KV group, or the whole layer
    for a multi-head-attention source pruned by ``head`` alone.
    """
    if family == "head":
        return tensor.reshape(config.n_layers, -1, plan.head_block)
    return tensor


def _ranks(scores: Tensor) -> Tensor:
    """Rank of each unit within its row (0 = highest score); ties go to the lower index."""
    order = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    positions = torch.arange(scores.shape[-1]).expand_as(order)
    return ranks.scatter_(-1, order, positions)


def surviving_group_scores(head: Tensor, config: ModelConfig, kept_heads: int) -> Tensor:
    """Score [L, Hkv] of each KV group: the sum of its ``kept_heads`` best query-head scores.

    Only those heads survive in a kept group, so a group is worth what it keeps, not all its heads.
    """
    grouped = head.float().reshape(config.n_layers, config.n_kv_heads, config.heads_per_group)
    return torch.sort(grouped, dim=-1, descending=True).values[..., :kept_heads].sum(-1)


def ranking_scores(
    scores: ImportanceScores | Mapping[str, Tensor], config: ModelConfig, plan: TargetPlan
) -> dict[str, Tensor]:
    """The score that ranks each family of ``plan``, shaped like the family's mask.

    * ``kv_head``: :func:`surviving_group_scores` with the query heads per group the target keeps;
    * ``head_layer`` and ``mlp`` (pruned together): both rank layers by the sum of the two branch
      influences, so they drop the same layers (as the L0 module's deterministic masks do);
    * every other family: its own importance score.
    """
    by_family = scores_by_family(scores)
    ranked = {family: _checked(family, by_family[family], config) for family in plan.families}
    if "kv_head" in ranked:
        kept_heads = plan.keep.get("head", config.heads_per_group)  # all of them when heads are not pruned
        ranked["kv_head"] = surviving_group_scores(
            _checked("head", by_family["head"], config), config, kept_heads
        )
    if plan.blocks_tied:
        ranked["head_layer"] = ranked["mlp"] = ranked["head_layer"].float() + ranked["mlp"].float()
    return ranked


def oneshot_masks(
    scores: ImportanceScores | Mapping[str, Tensor], config: ModelConfig, plan: TargetPlan
) -> dict[str, Tensor]:
    """0/1 masks that keep exactly ``plan.keep`` top-ranked units per row of each family in ``plan``.

    Units are ranked by :func:`ranking_scores`; heads are chosen within their KV group (or layer, see
    :class:`TargetPlan`); heads of a dropped KV group are dropped with it.
    """
    if plan.target is None:
        raise ValueError("one-shot pruning needs an exact target shape (target_model), not a target_sparsity")
    masks = {}
    for family, score in ranking_scores(scores, config, plan).items():
        masks[family] = (
            (_ranks(_rows(family, score, config, plan)) < plan.keep[family]).float().reshape(score.shape)
        )
    if "head" in masks and "kv_head" in masks:
        masks["head"] = masks["head"] * masks["kv_head"].repeat_interleave(config.heads_per_group, dim=1)
    return masks


def scores_of_cut(
    scores: ImportanceScores, masks: Mapping[str, Tensor], config: ModelConfig, plan: TargetPlan
) -> ImportanceScores:
    """``scores`` with every neuron and query head that ``masks`` drop scored -1, below any measured score
    (activation scores are >= 0), so that their one-shot ranking keeps exactly ``masks``' units: a cut chosen
    another way (least squares) as a ranked start for L0 masks (``init_from``). Layers, KV groups and hidden
    dims keep their scores; raises if the ranking of the result is not ``masks``."""
    replaced = {}
    for family in ("intermediate", "head"):
        score = getattr(scores, family).clone().float()
        if family in masks:
            score[masks[family].to(score.device) == 0] = -1.0
        replaced[family] = score
    cut = ImportanceScores(**{**scores.as_dict(), **replaced}, samples=scores.samples, tokens=scores.tokens)
    ranked = oneshot_masks(cut, config, plan)
    differ = [f for f in ranked if f in masks and not torch.equal(ranked[f].cpu(), masks[f].float().cpu())]
    if differ:
        raise RuntimeError(f"the scores of the cut rank {differ} differently from the cut (ties at score 0?)")
    return cut


def importance_log_alpha(
    scores: ImportanceScores | Mapping[str, Tensor],
    model_config: ModelConfig,
    l0_config: L0Config | Mapping[str, Any],
    margin: float = DEFAULT_MARGIN,
) -> dict[str, Tensor]:
    """Initial log-alphas for an ``L0Module`` from an importance ranking, one tensor per pruned family.

    Within each row (per layer; per KV group, or per layer for a multi-head source pruned by ``head``
    alone) units are ranked by :func:`ranking_scores`. The units the target keeps start at ``+bound``
    (best) down to ``+(1 - margin) * bound``; the others from ``-(1 - margin) * bound`` down to ``-bound``
    (worst), linearly in rank, so the values are strictly monotone in the score, the L0 module's
    deterministic masks at the target keep exactly the top-ranked units, and every unit sits near a
    bound, which starts the expected sparsity near the target (``P(z > 0)`` at ``-bound`` is 0.047 for
    the default bound ``log 100``, 1e-6 for 16). ``bound`` is ``init_scale`` when set, else
    ``log_alpha_clamp`` (``init_log_alpha`` when unclamped). With a ``target_sparsity`` instead of a
    target shape every unit lies above the cut-off.
    """
    l0 = L0Config.from_dict(l0_config)
    plan = l0.resolve(model_config)
    values = {}
    for family, score in ranking_scores(scores, model_config, plan).items():
        rows = _rows(family, score, model_config, plan)
        table = ranked_start_table(rows.shape[-1], plan.keep.get(family, rows.shape[-1]), l0, margin)
        values[family] = table[_ranks(rows)].reshape(score.shape)
    return values


def ranked_start_table(count: int, keep: int, l0_config: L0Config, margin: float = DEFAULT_MARGIN) -> Tensor:
    """The log-alphas of one row of a ranked start, best unit first (see :func:`importance_log_alpha`)."""
    if not 0.0 < margin < 1.0:
        raise ValueError(f"margin must be in (0, 1), got {margin}")
    l0 = l0_config
    bound = float(l0.log_alpha_clamp if l0.log_alpha_clamp is not None else l0.init_log_alpha)
    if l0.init_scale is not None:  # a ranked start inside the bound (the interior, where samples move)
        bound = float(l0.init_scale)
    if bound <= 0:
        raise ValueError(
            f"{PREFIX}.init_log_alpha must be > 0 to place kept units above the cut-off, got {bound}"
        )
    inner = (1.0 - margin) * bound
    return torch.cat([_spread(bound, inner, keep), _spread(-inner, -bound, count - keep)])


def ranked_start_log_alpha(model_config: ModelConfig, l0_config: L0Config) -> dict[str, Tensor]:
    """The log-alphas every ranked start of ``l0_config`` holds, with the units of each row in rank order.

    Any ranking permutes these values within rows, and every expected size per row and per family is the
    same under such permutations, so this gives the expected sparsity a ranked start begins at without the
    scores (the L0 module warms its target up from there). The expected parameter count is too, except
    where ``layer`` is pruned with ``head_layer`` / ``mlp``: it pairs their values per layer, which the
    rankings decide (a difference of about 1e-4 in sparsity).
    """
    plan = l0_config.resolve(model_config)
    shapes = mask_shapes(model_config)
    values = {}
    for family in plan.families:
        rows = _rows(family, torch.zeros(shapes[family]), model_config, plan)
        table = ranked_start_table(rows.shape[-1], plan.keep.get(family, rows.shape[-1]), l0_config)
        values[family] = table.expand(rows.shape).reshape(shapes[family]).clone()
    return values


def initialize_from_importance(
    l0_module: Any,
    decoder: Decoder,
    data_dir: str | Path | None = None,
    batch_size: int = 8,
    *,
    dataset: Any = None,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> ImportanceScores:
    """Set ``l0_module``'s log-alphas from an importance ranking (``model.l0_module.init_from``).

    With ``init_from: importance`` the scores are measured on ``init_samples`` sequences of the train
    split (never the held-out eval split) with ``decoder`` (the source model): read through the
    training run's ``dataset`` when given (each of ``world_size`` ranks calibrates on its share and
    the sums are all-reduced, so every rank must call this), else from ``data_dir`` directly.
    Otherwise ``init_from`` names a scores file written by ``prune-oneshot --scores-out``.
    """
    config = l0_module.l0_config
    if config.init_from == "importance":
        if dataset is not None:
            _, total, batches = stream_calibration_batches(
                dataset, config.init_samples, batch_size, rank=rank, world_size=world_size
            )
            scores = compute_importance(
                decoder, batches, total=total, progress=progress, across_ranks=world_size > 1
            )
        elif data_dir is None:
            raise ValueError(
                f"{PREFIX}.init_from: importance needs the data root (data_local) for calibration"
            )
        else:
            total, batches = calibration_batches(data_dir, config.init_samples, batch_size, split="train")
            scores = compute_importance(decoder, batches, total=total, progress=progress)
    else:
        path = Path(str(config.init_from))
        if not path.is_file():
            raise FileNotFoundError(
                f"{PREFIX}.init_from = {path} does not exist; write it with `llmshearing prune-oneshot ... --scores-out FILE`"
            )
        scores = ImportanceScores.load(path)
    values = importance_log_alpha(scores, l0_module.model_config, config)
    with torch.no_grad():
        for family, value in values.items():
            l0_module.log_alpha[family].copy_(value.to(l0_module.log_alpha[family]))
    return scores


def _spread(first: float, last: float, count: int) -> Tensor:
    if count == 1:
        return torch.tensor([first])
    return torch.linspace(first, last, count)


def _checked(family: str, score: Tensor, config: ModelConfig) -> Tensor:
    """The family's score, which must be shaped like the decoder's mask of that name."""
    expected = mask_shapes(config)[family]
    if tuple(score.shape) != expected:
        raise ValueError(
            f"importance score {family!r} has shape {tuple(score.shape)}, expected {expected} for this model; "
            "compute the scores on the same model"
        )
    return score
