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


def lm_loss(logits: Tensor, batch: Mapping[str, Tensor], penalty: Tensor | None = None) -> dict[str, Tensor]:
    """Mean next-token cross-entropy (``ce``) plus the L0 module's Lagrangian ``penalty`` when pruning.

    Returns ``total`` (what is minimised), ``ce`` and, with a penalty, ``lagrangian``.
    """
    targets = shifted_targets(batch)
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)
    if penalty is None:
        return {"total": ce, "ce": ce}
    return {"total": ce + penalty, "ce": ce, "lagrangian": penalty}
