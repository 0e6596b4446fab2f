"""`llmshearing report`: metrics.jsonl reading and the rendered plots and summary."""

from __future__ import annotations

import json
import os

import pytest

from llmshearing.cli import main as cli_main
from llmshearing.report import write_report
from llmshearing.training.metrics_log import read_metrics


def _write_metrics(path: str) -> None:
    rows = []
    for step in range(1, 7):
        rows.append(
            {
                "step": step,
                "loss/train/total": 5.0 - 0.1 * step,
                "l0/expected_sparsity/head": 0.05 * step,
                "l0/target_sparsity/head": 0.3,
                "l0/lambda_1/head": -0.01 * step,
            }
        )
        if step % 2 == 0:
            rows.append(
                {
                    "step": step,
                    "data/weight/code": 0.5 - 0.02 * step,
                    "data/weight/docs": 0.5 + 0.02 * step,
                    "data/loss/code": 2.0,
                    "data/loss/docs": 3.0,
                    "data/reference/code": 1.9,
                    "data/reference/docs": 2.5,
                }
            )
    # a resumed run replays step 6 with a different value; the later line wins
    rows.append({"step": 6, "loss/train/total": 4.0})
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
        handle.write('{"step": 7, "loss/tra')  # a run killed mid-write


def test_read_metrics_keeps_last_value_per_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write_metrics(str(path))
    metrics = read_metrics(str(path))
    loss = dict(metrics["loss/train/total"])
    assert loss[6] == 4.0 and loss[1] == pytest.approx(4.9)
    assert [s for s, _ in metrics["data/weight/code"]] == [2, 4, 6]


def test_report_renders_plots_and_summary(tmp_path):
    _write_metrics(str(tmp_path / "metrics.jsonl"))
    paths = write_report(str(tmp_path))
    names = sorted(os.path.basename(p) for p in paths)
    assert names == sorted(
        [
            "domain_weights.png",
            "domain_loss.png",
            "sparsity.png",
            "multipliers.png",
            "train_loss.png",
            "report.md",
        ]
    )
    for path in paths:
        assert os.path.getsize(path) > 0
    with open(paths[0], "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    summary = (tmp_path / "report" / "report.md").read_text()
    assert "| code | 0.4600 | 0.3800 | 2.0000 |" in summary
    assert "| head | 0.3000 | 0.3000 |" in summary


def test_report_cli_errors_on_missing_metrics(tmp_path, capsys):
    assert cli_main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl not found" in err
    assert not (tmp_path / "report").exists()
