"""A run's metrics log, ``<run folder>/metrics.jsonl``, and its reader.

One JSON object per line: ``{"step": <batch>, "<metric name>": <value>, ...}``, appended by the run's logger
(:mod:`llmshearing.training.metrics_logger`). A resumed run appends to the same file; :func:`read_metrics` keeps
the last value logged for each (step, name), so the steps replayed after a resume simply overwrite the earlier
ones. ``llmshearing report`` reads it; nothing here imports Composer.
"""

from __future__ import annotations

import json
from typing import Any

from llmshearing.config_base import is_number

METRICS_FILENAME = "metrics.jsonl"


_RECORD_START = '{"step":'


def _parse_record(line: str, where: str, last: bool) -> dict[str, Any] | None:
    """The record of one line; ``None`` for the partial line of a run killed mid-write (the file's
    unterminated last line, or the start of a line that a resumed run continued after it)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        resumed = line.rfind(_RECORD_START)
        if resumed > 0:
            return _parse_record(line[resumed:], where, last)
        if last:
            return None
        raise ValueError(
            f"{where}: not JSON ({err.msg} at column {err.colno}); each line must be an object "
            '{"step": N, "<metric>": number, ...}: repair or delete that line'
        ) from None
    if not isinstance(record, dict):
        raise ValueError(
            f"{where}: expected a JSON object, got {type(record).__name__}; repair or delete that line"
        )
    for name, value in record.items():
        if value is not None and not is_number(value):
            raise ValueError(f"{where}: {name!r} is {value!r}, not a number; repair or delete that line")
    step = record.get("step")
    if step is not None and (not float(step).is_integer() or step < 0):
        raise ValueError(f"{where}: 'step' is {step!r}, not a batch number; repair or delete that line")
    return record


def read_metrics(path: str) -> dict[str, list[tuple[int, float]]]:
    """Series per metric name, sorted by step, keeping the last value logged at each step.

    A line that is not a record (other than the partial line of a run killed mid-write) is a
    ``ValueError`` naming the file and line.
    """
    latest: dict[str, dict[int, float]] = {}
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().split("\n")  # the last item: an unterminated line, or ""
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not UTF-8 text (byte {err.start}): it is not a run's metrics log"
        ) from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        record = _parse_record(line.strip(), f"{path}:{number}", last=number == len(lines))
        if record is None or record.get("step") is None:
            continue
        step = int(record.pop("step"))
        for name, value in record.items():
            if value is not None:
                latest.setdefault(name, {})[step] = float(value)
    return {name: sorted(points.items()) for name, points in latest.items()}
