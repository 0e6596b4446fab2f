"""The least-squares start's record (``prune-oneshot --compensate --start-out DIR``) and the warnings of a run
from DIR whose settings do not start from its cut or read the cut as the source."""

from __future__ import annotations

import os

import pytest
import torch

from llmshearing.pruning.importance import ImportanceScores
from llmshearing.pruning.start_record import (
    CUT_SCORES_NAME,
    START_RECORD_NAME,
    read_start_record,
    start_overrides,
    start_warnings,
    write_start_files,
)


def _scores() -> ImportanceScores:
    rows = {"layer": 2, "head_layer": 2, "mlp": 2}
    return ImportanceScores(
        **{name: torch.rand(n) for name, n in rows.items()},
        head=torch.rand(2, 4),
        kv_head=torch.rand(2, 2),
        intermediate=torch.rand(2, 8),
        hidden=torch.rand(6),
    )


@pytest.fixture
def start(tmp_path):
    directory = tmp_path / "start"
    directory.mkdir()
    write_start_files(directory, _scores(), tmp_path / "source", 0.001)
    return directory


def test_the_record_names_the_source_and_the_cut_scores(start, tmp_path):
    record = read_start_record(start)
    assert record == {"source": str(tmp_path / "source"), "damping": 0.001}
    assert ImportanceScores.load(start / CUT_SCORES_NAME).intermediate.shape == (2, 8)
    assert start_overrides(start, "SRC") == [
        f"model.path={start}",
        f"model.l0_module.init_from={start / CUT_SCORES_NAME}",
        "model.distillation.teacher=SRC",
    ]
    assert read_start_record(tmp_path) is None  # not a start
    (start / START_RECORD_NAME).write_text("{not json")
    assert read_start_record(start) is None  # unreadable: the run goes on without the warnings


def test_a_run_set_as_prune_oneshot_prints_has_no_warning(start, tmp_path):
    scores = str(start / CUT_SCORES_NAME)
    assert start_warnings(start, True, scores, str(tmp_path / "source"), None) == []
    assert start_warnings(start, True, scores, None, [2.0, 3.0]) == []  # no distillation, explicit losses
    relative = os.path.relpath(scores)  # paths compare as files, however written
    assert start_warnings(start, True, relative, None, None) == []
    assert start_warnings(tmp_path, True, None, str(tmp_path), "source") == []  # not a start: nothing to say


def test_each_setting_that_misreads_the_start_gets_a_line_naming_the_key_and_the_fix(start, tmp_path):
    source = str(tmp_path / "source")
    lines = start_warnings(start, True, "importance", str(start), "source")
    assert len(lines) == 3 and all(
        f"model.path={start} is the least-squares start of {source}" in line for line in lines
    )
    init, teacher, reference = lines
    assert (
        "from importance, not its cut" in init
        and f"model.l0_module.init_from={start / CUT_SCORES_NAME}" in init
    )
    assert "teaches the cut" in teacher and f"model.distillation.teacher={source}" in teacher
    assert (
        "callbacks.data_loading.target_loss" in reference
        and f"llmshearing evaluate {source} DATA" in reference
    )
    assert "the default init" in start_warnings(start, True, None, None, None)[0]
    assert start_warnings(start, False, None, None, None) == []  # a continued run has no masks to start
