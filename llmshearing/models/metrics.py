"""Per-domain language-modelling metrics."""

from __future__ import annotations

import torch
from composer.metrics.nlp import LanguageCrossEntropy
from torch import Tensor


class DomainLanguageCrossEntropy(LanguageCrossEntropy):
    """Token-weighted cross-entropy over the rows of one data domain.

    States are sums (``sum_loss``, ``total_items``), reduced by summing across ranks. A domain
    with no tokens anywhere computes to 0.0, never NaN; ``tokens`` holds the token count behind
    the last ``compute()`` (summed over ranks) so consumers can tell "absent" from "zero loss".
    In training, ``llmshearing.callbacks.domain_metrics.AbsentDomainMetrics`` keeps the metric of a
    domain absent from a batch out of that batch's logged metrics.
    """

    def __init__(self, domain_index: int, dist_sync_on_step: bool = False, ignore_index: int = -100) -> None:
        super().__init__(dist_sync_on_step=dist_sync_on_step, ignore_index=ignore_index)
        self.domain_index = domain_index
        self.tokens = 0

    def update(self, output: Tensor, target: Tensor, domain: Tensor | None = None) -> None:  # type: ignore[override]
        """Add the rows of ``output`` [B, T, V] / ``target`` [B, T] whose ``domain`` [B] is this domain."""
        if domain is None:
            return
        rows = domain.to(target.device) == self.domain_index
        if not bool(rows.any()):
            return
        super().update(output[rows], target[rows])

    def compute(self) -> Tensor:
        self.tokens = int(self.total_items)
        if self.tokens == 0:
            return torch.zeros((), dtype=self.sum_loss.dtype, device=self.sum_loss.device)
        return self.sum_loss / self.total_items

    def reset(self) -> None:
        super().reset()
        self.tokens = 0
