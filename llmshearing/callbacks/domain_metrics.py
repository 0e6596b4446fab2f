"""Per-domain train metrics are logged only for the domains present in the batch.

Composer computes and logs every train metric after each batch. A domain with no tokens in the
batch (on any rank) would log 0.0, and its loss curve would dip to zero wherever the mix left it
out. ``AbsentDomainMetrics`` sets those metrics aside from ``AFTER_TRAIN_BATCH`` (after the last
update, before Composer computes them) until the next ``BATCH_START`` (or ``EPOCH_END`` /
``FIT_END``, after Composer logs the last batch's metrics again at the end of an epoch), so nothing
is logged for such a domain.
"""

from __future__ import annotations

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist
from torchmetrics import Metric

from llmshearing.models.metrics import DomainLanguageCrossEntropy


def absent_domains(state: State, metrics: dict[str, Metric]) -> list[str]:
    """Names of the per-domain metrics that saw no token on any rank (one all-reduce)."""
    names = [name for name, m in metrics.items() if isinstance(m, DomainLanguageCrossEntropy)]
    if not names:
        return []
    tokens = torch.stack([metrics[n].total_items.detach().double().reshape(()).cpu() for n in names])
    tokens = state.device.tensor_to_device(tokens)
    dist.all_reduce(tokens, reduce_operation="SUM")
    return [name for name, count in zip(names, tokens.cpu().tolist(), strict=True) if count == 0]


class AbsentDomainMetrics(Callback):
    """Hide the train metrics of domains absent from a batch while Composer logs that batch's metrics."""

    def __init__(self) -> None:
        self._order: list[str] = []
        self._held: dict[str, Metric] = {}

    def after_train_batch(self, state: State, logger: Logger) -> None:
        metrics = state.train_metrics
        if not metrics:
            return
        absent = absent_domains(state, metrics)
        if absent:
            self._order = list(metrics)
            self._held = {name: metrics.pop(name) for name in absent}
            for name in absent:  # no stale value of an earlier batch either
                state.train_metric_values.pop(name, None)

    def batch_start(self, state: State, logger: Logger) -> None:
        self._restore(state)

    def epoch_end(self, state: State, logger: Logger) -> None:
        self._restore(state)

    def fit_end(self, state: State, logger: Logger) -> None:
        self._restore(state)

    def _restore(self, state: State) -> None:
        """Put the set-aside metrics back, in their original order (Composer resets them per batch)."""
        if not self._held:
            return
        present = state.train_metrics or {}
        state.train_metrics = {
            name: self._held[name] if name in self._held else present[name]
            for name in self._order
            if name in self._held or name in present
        }
        self._held, self._order = {}, []
