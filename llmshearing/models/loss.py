"""The causal language-modelling loss, shared by the Composer model and the benchmarks (torch only)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100


def shifted_targets(batch: Mapping[str, Tensor]) -> Tensor:
    """Next-token targets aligned with the logits: ``targets[:, t] = labels[:, t + 1]``, last column ignored.

    ``labels`` (with ``-100`` on padding) is used when the batch has it, else ``input_ids``.
    """
    labels = batch.get("labels", batch["input_ids"])
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return targets


def lm_loss(
    logits: Tensor,
    batch: Mapping[str, Tensor],
    penalty: Tensor | None = None,
    kd: Tensor | None = None,
    alpha: float = 0.0,
) -> dict[str, Tensor]:
    """Mean next-token cross-entropy (``ce``), mixed with a distillation loss ``kd`` when given, plus the
    L0 module's Lagrangian ``penalty`` when pruning.

    ``total`` (what is minimised) is ``alpha * kd + (1 - alpha) * ce`` with a KD term, else ``ce``, plus
    the penalty. Also returns ``ce`` and, when present, ``kd`` and ``lagrangian``.
    """
    targets = shifted_targets(batch)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)
    total, parts = ce, {"ce": ce}
    if kd is not None:
        total = alpha * kd + (1.0 - alpha) * ce
        parts["kd"] = kd
    if penalty is not None:
        total = total + penalty
        parts["lagrangian"] = penalty
    return {"total": total, **parts}


def domain_token_losses(
    logits: Tensor, batch: Mapping[str, Tensor], num_domains: int
) -> tuple[Tensor, Tensor]:
    """Per-domain sums of next-token cross-entropy and token counts (float64, on the logits' device)."""
    labels = batch.get("labels", batch["input_ids"])
    domain = batch.get("domain")
    if domain is None:
        raise ValueError(
            "loss_source: train needs a 'domain' entry in every batch (DynamicStreamingDataset adds it)"
        )
    targets = labels[:, 1:]
    ce = F.cross_entropy(
        logits[:, :-1].detach().float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(targets.shape)
    rows_loss = ce.sum(dim=1).double()
    rows_tokens = (targets != IGNORE_INDEX).sum(dim=1).double()
    domain = domain.to(logits.device).long()
    sums = torch.zeros(num_domains, dtype=torch.float64, device=logits.device).index_add_(
        0, domain, rows_loss
    )
    tokens = torch.zeros(num_domains, dtype=torch.float64, device=logits.device).index_add_(
        0, domain, rows_tokens
    )
    return sums, tokens
