"""``TeacherTimeMonitor``: logs the distillation teacher's share of each training step's wall time."""

from __future__ import annotations

import time

import torch
from composer.core import Callback, State
from composer.loggers import Logger


class TeacherTimeMonitor(Callback):
    """Logs ``distill/teacher_seconds`` and ``distill/teacher_time_share`` (teacher time / step time).

    Teacher time is the forward to its final hidden states plus its output head over the KD chunks,
    the spans its :class:`~llmshearing.models.teacher.SpanClock` took within the step (CUDA events on a
    GPU). The step is the time between two marks, at ``batch_start`` and ``batch_end``; each mark
    first waits for the device once, so the step holds exactly its own work, whatever was queued before
    it, and the teacher's events have completed when they are read. A model without a teacher logs
    nothing.
    """

    def __init__(self) -> None:
        self._started: float | None = None
        self.last_step: tuple[float, float] | None = None  # the marks of the last step, for inspection

    @staticmethod
    def synchronize(device: torch.device) -> None:
        """Wait for the device's queued work (nothing to wait for on the CPU)."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def batch_start(self, state: State, logger: Logger) -> None:
        del logger
        teacher = _teacher_of(state)
        if teacher is None:
            return
        self.synchronize(teacher.device())
        teacher.take_seconds()  # drop time spent outside training (e.g. a first evaluation)
        self._started = time.perf_counter()

    def batch_end(self, state: State, logger: Logger) -> None:
        teacher = _teacher_of(state)
        if teacher is None or self._started is None:
            return
        self.synchronize(teacher.device())
        ended = time.perf_counter()
        self.last_step = (self._started, ended)
        seconds = teacher.take_seconds()
        logger.log_metrics(
            {
                "distill/teacher_seconds": seconds,
                "distill/teacher_time_share": seconds / max(ended - self._started, 1e-12),
            }
        )


def _teacher_of(state: State):
    model = state.model
    model = getattr(model, "module", model)  # DDP
    return getattr(model, "teacher", None)
