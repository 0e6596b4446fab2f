"""``bench/quality/downstream.py``: lm-eval task lists and presets in the quality benchmark."""

from __future__ import annotations

import importlib.util
import statistics
import sys
from pathlib import Path

import pytest
from conftest import write_byte_source

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def downstream():
    sys.path.insert(0, str(BENCH))
    try:
        from quality import downstream as module

        yield module
    finally:
        sys.path.remove(str(BENCH))


def test_local_tasks_score_in_percent_with_their_average(downstream, tmp_path):
    source = tmp_path / "source"
    write_byte_source(source, max_seq_len=256)
    downstream.check_lm_eval("local_mc,local_cloze")
    scores = downstream.score_lm_eval(source, "local_mc,local_cloze", limit=4, batch_size=4)
    assert set(scores["tasks"]) == {"local_mc", "local_cloze"}
    assert all(
        0.0 <= v <= 100.0 and (v * 4 / 100).is_integer() for v in scores["tasks"].values()
    )  # of 4 items
    assert scores["average"] == pytest.approx(statistics.fmean(scores["tasks"].values()))

    rows = {
        "source": {"title": "source model", "lm_eval": scores},
        "l0-distill": {
            "title": "arm 3",
            "lm_eval": {"tasks": {"local_mc": 50.0, "local_cloze": None}, "average": None},
            "repeats": [{"lm_eval": {"tasks": {"local_mc": 25.0, "local_cloze": 0.0}, "average": 12.5}}],
        },
        "scratch": {"title": "not scored"},
    }
    table = downstream.lm_eval_table(rows, "local_mc,local_cloze", 4)
    assert (
        table[1]
        == "## lm-eval tasks (local_mc,local_cloze; the first 4 items of each task; percent, higher is better)"
    )
    assert table[3] == "| model | average | average: seeds | local_mc | local_cloze |"
    assert table[6] == "| l0-distill: arm 3 | - | - | 50.0 | - |"  # one seed with an average: no spread
    assert len(table) == 7 and downstream.lm_eval_table({"scratch": {}}, "x", None) == []


def test_preset_members_use_the_preset_metric(downstream):
    results = {
        "results": {
            "arc_challenge": {"acc,none": 0.25, "acc_norm,none": 0.5},
            "sciq": {"acc,none": 0.75, "acc_norm,none": 0.9},
            "local_mc": {"acc,none": 0.25, "acc_norm,none": 0.5},
        }
    }
    scores = downstream.lm_eval_scores(results, "sheared-llama,local_mc")
    assert scores["tasks"]["arc_challenge"] == 50.0 and scores["tasks"]["sciq"] == 75.0  # acc_norm / acc
    assert scores["tasks"]["local_mc"] == 50.0  # outside a preset: acc_norm first
    assert scores["tasks"]["piqa"] is None and scores["average"] is None  # not every task scored: no average


def test_unreadable_task_data_stops_the_benchmark_before_it_prepares(tmp_path, monkeypatch, capsys):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    for module, name in ((datasets.config, "HF_HUB_OFFLINE"), (huggingface_hub.constants, "HF_HUB_OFFLINE")):
        monkeypatch.setattr(module, name, getattr(module, name))  # put back what going offline sets
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")  # empty caches
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    spec = importlib.util.spec_from_file_location("bench_quality_tasks", BENCH / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = quality
    try:
        spec.loader.exec_module(quality)
        out = tmp_path / "work"
        assert quality.main(["--quick", "--lm-eval-tasks", "sciq", "--out", str(out)]) == 2
    finally:
        sys.modules.pop(spec.name, None)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --lm-eval-tasks sciq: task sciq") and "Hub" in err[0]
    assert list(out.iterdir()) == []  # nothing converted or prepared
