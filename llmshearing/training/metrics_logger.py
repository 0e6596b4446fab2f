"""A Composer logger that appends every logged metric to ``<run folder>/metrics.jsonl``.

The file's format and its reader: :mod:`llmshearing.training.metrics_log`.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch
from composer.core import State
from composer.loggers import Logger, LoggerDestination
from composer.utils import dist

from llmshearing.config_base import is_number
from llmshearing.training.metrics_log import METRICS_FILENAME


def _scalar(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None
        value = value.detach().float().item()
    if is_number(value):
        return float(value) if math.isfinite(float(value)) else None
    return None


class MetricsJSONLLogger(LoggerDestination):
    """Write scalar metrics from global rank 0 as JSON lines into ``folder``."""

    def __init__(self, folder: str) -> None:
        self.path = os.path.join(folder, METRICS_FILENAME)
        self._file = None
        self._state: State | None = None

    def init(self, state: State, logger: Logger) -> None:
        del logger
        self._state = state
        if dist.get_global_rank() == 0:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if self._file is None:
            return
        if step is None and self._state is not None:
            step = int(self._state.timestamp.batch)
        record: dict[str, Any] = {"step": step}
        for name, value in metrics.items():
            scalar = _scalar(value)
            if scalar is not None:
                record[name] = scalar
        if len(record) > 1:
            self._file.write(json.dumps(record) + "\n")

    def batch_end(self, state: State, logger: Logger) -> None:
        del state, logger
        if self._file is not None:
            self._file.flush()

    def eval_end(self, state: State, logger: Logger) -> None:
        self.batch_end(state, logger)

    def close(self, state: State, logger: Logger) -> None:
        del state, logger
        if self._file is not None:
            self._file.close()
            self._file = None
