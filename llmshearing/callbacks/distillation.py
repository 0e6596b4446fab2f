"""``TeacherTimeMonitor``: logs the distillation teacher's share of each training step's wall time."""

from __future__ import annotations

import time

from composer.core import Callback, State
from composer.loggers import Logger


class TeacherTimeMonitor(Callback):
    """Logs ``distill/teacher_seconds`` and ``distill/teacher_time_share`` (teacher time / step time).

    Teacher time is the forward to its final hidden states plus its output head over the KD chunks,
    as measured by the model's ``Teacher``; a model without a teacher logs nothing.
    """

    def __init__(self) -> None:
        self._started: float | None = None

    def batch_start(self, state: State, logger: Logger) -> None:
        del logger
        teacher = _teacher_of(state)
        if teacher is not None:
            teacher.take_seconds()  # drop time spent outside training (e.g. nothing, or a first eval)
        self._started = time.perf_counter()

    def batch_end(self, state: State, logger: Logger) -> None:
        teacher = _teacher_of(state)
        if teacher is None or self._started is None:
            return
        step = time.perf_counter() - self._started
        seconds = teacher.take_seconds()
        logger.log_metrics(
            {"distill/teacher_seconds": seconds, "distill/teacher_time_share": seconds / max(step, 1e-12)}
        )


def _teacher_of(state: State):
    model = state.model
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "teacher", None)
