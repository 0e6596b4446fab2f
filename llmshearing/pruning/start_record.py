"""The least-squares start that ``prune-oneshot --compensate --start-out DIR`` writes, and what a run from it
must set.

DIR is the source with ``w2`` / ``wo`` re-fitted to the compensated cut and the removed units' columns zero:
as a model it computes the cut, not the source. An L0 run from it (``model.path=DIR``) starts at the cut only
with ``model.l0_module.init_from=DIR/cut_scores.safetensors``; distilling from DIR, or taking the dynamic
mix's reference losses from it (``callbacks.data_loading.reference=source``), would take the cut's losses for
the source's. ``DIR/least_squares_start.json`` names the source, so a run can say so before it loads anything.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

CUT_SCORES_NAME = "cut_scores.safetensors"  # the scores whose one-shot ranking is exactly the compensated cut
START_RECORD_NAME = "least_squares_start.json"


def write_start_files(directory: Path, cut_scores: Any, source: str | Path, damping: float) -> None:
    """DIR's files beside its re-fitted weights (inside the staging directory of DIR's write): the scores
    (:class:`~llmshearing.pruning.importance.ImportanceScores`) ranking the cut, and the record naming the source."""
    cut_scores.save(Path(directory) / CUT_SCORES_NAME)
    record = {"source": os.path.abspath(source), "damping": damping}
    (Path(directory) / START_RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def start_overrides(start: str | Path, source: str | Path) -> list[str]:
    """The settings of an L0 run from the start DIR: its weights, masks from its cut, the source as teacher."""
    return [
        f"model.path={start}",
        f"model.l0_module.init_from={Path(start) / CUT_SCORES_NAME}",
        f"model.distillation.teacher={source}",
    ]


def read_start_record(model_path: str | Path) -> dict[str, Any] | None:
    """DIR's record, or None when ``model_path`` is not a least-squares start (or its record cannot be read)."""
    path = Path(model_path) / START_RECORD_NAME
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("source"), str) else None


def _same_path(a: str | Path | None, b: str | Path) -> bool:
    return a is not None and os.path.realpath(a) == os.path.realpath(b)


def start_warnings(
    model_path: str | Path, pruning: bool, init_from: str | None, teacher: str | None, reference: Any
) -> list[str]:
    """One line for each setting of a run from a least-squares start that does not start from its cut (a
    pruning run's ``init_from``) or reads the cut as the source (empty when ``model_path`` is not such a
    start, or all is set)."""
    record = read_start_record(model_path)
    if record is None:
        return []
    start, source = Path(model_path), record["source"]
    _, set_init, set_teacher = start_overrides(start, source)
    named = f"model.path={start} is the least-squares start of {source} (prune-oneshot --start-out)"
    lines = []
    if pruning and not _same_path(init_from, start / CUT_SCORES_NAME):
        lines.append(
            f"{named}, but the masks start from {init_from or 'the default init'}, not its cut: set {set_init}"
        )
    if _same_path(teacher, start):
        lines.append(f"{named}: distilling from it teaches the cut, not the source; set {set_teacher}")
    if reference == "source":
        lines.append(
            f"{named}: callbacks.data_loading.reference=source would take the cut's losses for the source's; "
            f"set callbacks.data_loading.target_loss to {source}'s eval losses (llmshearing evaluate {source} DATA)"
        )
    return lines
