"""``SampleLog``: record which samples every training batch consumed (``callbacks.sample_log``).

Each rank appends ``{"batch": <batch number>, "idx": [...], "domain": [...]}`` lines to
``<folder>/samples-rank<r>.jsonl``. After a crash and resume the batches replayed since the last
checkpoint are logged again; :func:`read_sample_log` keeps the last record per batch, so the log
of an interrupted-and-resumed run can be compared batch by batch with an uninterrupted one.
"""

from __future__ import annotations

import json
import os

from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist


class SampleLog(Callback):
    """Append the ``idx`` (and ``domain``) of every sample of each batch to a per-rank JSONL file."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self._file = None

    def fit_start(self, state: State, logger: Logger) -> None:
        del state, logger
        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, f"samples-rank{dist.get_global_rank()}.jsonl")
        self._file = open(path, "a", encoding="utf-8")

    def after_dataloader(self, state: State, logger: Logger) -> None:
        del logger
        if self._file is None or "idx" not in state.batch:
            return
        record = {"batch": int(state.timestamp.batch) + 1, "idx": state.batch["idx"].tolist()}
        if "domain" in state.batch:
            record["domain"] = state.batch["domain"].tolist()
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def fit_end(self, state: State, logger: Logger) -> None:
        del state, logger
        if self._file is not None:
            self._file.close()
            self._file = None


def read_sample_log(path: str) -> dict[int, list[int]]:
    """Sample ids per batch number, the last record of each batch winning (replays after a resume)."""
    batches: dict[int, list[int]] = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a process killed mid-write leaves a partial last line
                continue
            batches[int(record["batch"])] = list(record["idx"])
    return batches
