"""`llmshearing report`: metrics.jsonl reading and the rendered plots and summary."""

from __future__ import annotations

import json
import os
import re

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
                    "l0/units_moved": 3 * step,  # at each mask snapshot of a run with a ranked start
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
            "units_moved.png",
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


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            "{oops",
            r"metrics\.jsonl:2: not JSON \(Expecting property name enclosed in double quotes at column 2\)",
        ),
        ("[1, 2]", r"metrics\.jsonl:2: expected a JSON object, got list"),
        (
            '{"step": 2, "loss/train/total": "low"}',
            r"metrics\.jsonl:2: 'loss/train/total' is 'low', not a number",
        ),
        ('{"step": 2.5, "loss/train/total": 1.0}', r"metrics\.jsonl:2: 'step' is 2\.5, not a batch number"),
        ('{"step": true, "loss/train/total": 1.0}', r"metrics\.jsonl:2: 'step' is True, not a number"),
    ],
)
def test_report_names_a_bad_line(tmp_path, capsys, line, message):
    good = json.dumps({"step": 1, "loss/train/total": 2.0})
    (tmp_path / "metrics.jsonl").write_text(f"{good}\n{line}\n{good}\n")
    assert cli_main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llmshearing report: error: ")
    assert re.search(message, err[0]) and "repair or delete that line" in err[0]
    assert not (tmp_path / "report").exists()


def test_report_reads_a_run_killed_mid_write_and_resumed(tmp_path):
    rows = [json.dumps({"step": s, "loss/train/total": 3.0 - 0.1 * s}) for s in (1, 2)]
    partial = '{"step": 3, "loss/tr'  # the killed run's last write; the resumed run appends after it
    resumed = json.dumps({"step": 3, "loss/train/total": 2.5})
    (tmp_path / "metrics.jsonl").write_text(f"{rows[0]}\n{rows[1]}\n{partial}{resumed}\n")
    assert read_metrics(str(tmp_path / "metrics.jsonl"))["loss/train/total"] == [(1, 2.9), (2, 2.8), (3, 2.5)]


def test_report_refuses_a_binary_file(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_bytes(b'{"step": 1}\n\xff\xfe\x00binary')
    assert cli_main(["report", str(tmp_path)]) == 2
    assert "metrics.jsonl is not UTF-8 text (byte 12)" in capsys.readouterr().err


def test_report_keeps_a_directory_it_did_not_write(tmp_path, capsys):
    _write_metrics(str(tmp_path / "metrics.jsonl"))
    elsewhere = tmp_path / "documents"
    elsewhere.mkdir()
    (elsewhere / "thesis.tex").write_text("keep me")
    assert cli_main(["report", str(tmp_path), "--out", str(elsewhere)]) == 2
    assert "holds files a report does not write (thesis.tex)" in capsys.readouterr().err
    assert (elsewhere / "thesis.tex").read_text() == "keep me"
    first = write_report(str(tmp_path))  # an earlier report is replaced
    (tmp_path / "report" / "report.md").write_text("stale")
    assert write_report(str(tmp_path)) == first
    assert (tmp_path / "report" / "report.md").read_text().startswith("# Run report")
