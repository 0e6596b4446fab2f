"""``bench/compensation_damping.py``: its rows are what ``prune-oneshot`` writes and ``evaluate`` scores."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
TARGET = "n_layers=2,n_heads=2,n_kv_heads=1,intermediate_size=24"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("compensation_damping", BENCH / "compensation_damping.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def held_out(model_dir: Path, data: str, split: str) -> float:
    from llmshearing.evaluate import domain_losses, load_model_fn

    rows = domain_losses(load_model_fn(str(model_dir)), data, split=split, progress=False)
    return sum(r.loss for r in rows) / len(rows)


def test_rows_are_the_cuts_prune_oneshot_writes(bench, tiny_source, tiny_mds, tmp_path, capsys):
    from llmshearing.pruning.oneshot import prune_oneshot

    args = bench.parse_args(
        [tiny_source, "--data", tiny_mds, "--target", TARGET, "--dampings", "0.01", "0.001", "--samples", "4"]
        + ["--batch-size", "2", "--no-write"]
    )
    rows = bench.measure(args)
    assert [r["damping"] for r in rows] == [None, 0.01, 0.001]
    for row in rows:
        out = tmp_path / f"cut-{row['damping']}"
        compensated = row["damping"] is not None
        prune_oneshot(
            tiny_source,
            out,
            tiny_mds,
            args.targets[0],
            samples=4,
            batch_size=2,
            compensate=compensated,
            damping=row["damping"],
            progress=False,
        )
        for split in ("eval", "test"):
            assert row[split] == pytest.approx(held_out(out, tiny_mds, split), abs=1e-5), (
                row["damping"],
                split,
            )
    assert rows[1]["eval"] != rows[2]["eval"]  # the damping reaches the fit
    table = bench.markdown(args, rows, "python bench/compensation_damping.py ...", "abc")
    assert "| 2L/2H/1KV/32d/24I | compensated, damping 0.001 |" in table and table.count("\n| 2L") == 3


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--target", TARGET, "--dampings", "0"], "--dampings must be positive numbers, got [0.0]"),
        (["--target", "n_layer=2"], "unknown key 'n_layer'"),
    ],
)
def test_bad_options_are_refused_before_anything_loads(bench, argv, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["SRC", "--data", "DATA", *argv])
    assert message in capsys.readouterr().err
