"""A run resumed from a checkpoint saved at the end of an epoch (the train loader's epoch is one evaluation
interval, so that is where checkpoints usually fall): Composer re-enters the finished epoch, finds no batch
left, warns that no batches were trained ("this may cause other issues or crashes down the line") and computes
the train metrics that saw no update (torchmetrics warns once for each), then starts the next epoch. Nothing is
wrong; the ``QuietEpochEndResume`` callback keeps those warnings of that one empty epoch off the console.
"""

from __future__ import annotations

import warnings

from composer.core import Callback, Event, State
from composer.loggers import Logger

# the warnings of the empty epoch, by the start of their text
EMPTY_EPOCH_WARNINGS = (
    r"No batches were trained for global rank",
    r"The ``compute`` method of metric .* was called before the ``update`` method",
)


class QuietEpochEndResume(Callback):
    """Silences the empty epoch's warnings when a run resumes at an epoch's end, until the next epoch starts."""

    def __init__(self) -> None:
        self._quiet: warnings.catch_warnings | None = None

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        del logger  # unused
        if event == Event.FIT_START and self._at_epoch_end(state):
            self._quiet = warnings.catch_warnings()
            self._quiet.__enter__()
            for message in EMPTY_EPOCH_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
        elif event in (Event.EPOCH_START, Event.FIT_END) and self._quiet is not None:
            self._quiet.__exit__(None, None, None)
            self._quiet = None

    @staticmethod
    def _at_epoch_end(state: State) -> bool:
        batches = state.dataloader_len
        done = int(state.timestamp.batch_in_epoch)
        return batches is not None and done > 0 and done >= int(batches)
