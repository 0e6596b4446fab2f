"""``llmshearing search-shape`` on the tiny source and data: a ranked search whose YAML prune-oneshot takes,
a rerun that continues an interrupted search, and bad budgets refused before anything loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmshearing import cli
from llmshearing.checkpoint.reading import load_checkpoint
from llmshearing.pruning.budget import enumerate_shapes, parse_budget, scoring_candidates
from llmshearing.pruning.targets import SHAPE_KEYS
from llmshearing.recipe_file import read_recipe
from llmshearing.shape_search.search import STATE_NAME, STATE_VERSION, Score, SearchResult, SearchSettings

BUDGET = "params=16000,tolerance=0.1"  # the tiny source has 26,368
FAST = [
    "--multiple",
    "8",
    "--steps",
    "2",
    "--samples",
    "8",
    "--eval-batches",
    "1",
    "--batch-size",
    "2",
    "--no-progress",
]


def search(source: str, data: str, out: Path, *extra: str) -> int:
    return cli.main(
        ["search-shape", source, "--budget", BUDGET, "--data", data, "--out", str(out), *FAST, *extra]
    )


@pytest.mark.slow
def test_search_writes_a_ranked_target_that_prune_oneshot_takes(
    tiny_source, tiny_mds, tmp_path, capsys
) -> None:
    out = tmp_path / "target.yaml"
    assert search(tiny_source, tiny_mds, out, "--candidates", "2", "--json") == 0
    result = json.loads(capsys.readouterr().out)
    losses = [row["eval_loss"] for row in result["ranked"]]
    assert len(losses) == 2 and losses == sorted(losses)
    assert all(
        0.9 * 16000 <= row["params"] <= 16000 and row["tokens"] == 2 * 2 * 16 for row in result["ranked"]
    )
    target = dict(read_recipe(str(out))["target_model"])
    assert target == result["best"] == result["ranked"][0]["shape"]
    pruned = tmp_path / "pruned"
    argv = [
        "prune-oneshot",
        tiny_source,
        str(pruned),
        "--data",
        tiny_mds,
        "--samples",
        "8",
        "--target-config",
        str(out),
    ]
    assert cli.main(argv) == 0
    config = load_checkpoint(pruned)[0]
    assert {key: getattr(config, key) for key in SHAPE_KEYS} == target


@pytest.mark.slow
def test_a_rerun_continues_an_interrupted_search(tiny_source, tiny_mds, tmp_path, capsys) -> None:
    out, work = tmp_path / "target.yaml", tmp_path / "target-search"
    assert search(tiny_source, tiny_mds, out, "--candidates", "1", "--json") == 0
    first = json.loads(capsys.readouterr().out)["ranked"][0]
    importance = (work / "importance.safetensors").stat().st_mtime_ns
    (work / "candidate" / "model").mkdir(parents=True)  # what a run stopped inside its next candidate leaves
    (work / "candidate" / "model" / "half-written.safetensors").write_bytes(b"\0" * 10)
    assert search(tiny_source, tiny_mds, out, "--candidates", "2") == 0
    table = capsys.readouterr().out
    assert "ranked 2: 1 scored in this call, 1 taken from" in table
    state = json.loads((work / "state.json").read_text())
    assert state["scores"][_label(first["shape"])]["eval_loss"] == first["eval_loss"]  # kept, not re-scored
    assert len(state["scores"]) == 2 and not (work / "candidate").exists()
    assert (work / "importance.safetensors").stat().st_mtime_ns == importance  # measured once
    assert search(tiny_source, tiny_mds, out, "--candidates", "1") == 0  # fewer: every stored score ranked
    assert "ranked 2: 0 scored in this call, 2 taken from" in capsys.readouterr().out
    assert search(tiny_source, tiny_mds, out, "--candidates", "2", "--steps", "3") == 2  # other settings
    assert "holds a search with other settings (steps)" in capsys.readouterr().err


def test_a_smaller_rerun_ranks_and_writes_every_stored_score(tiny_source, tiny_mds, tmp_path, capsys) -> None:
    """A rerun with fewer --candidates than the state holds scores nothing, ranks every stored score and writes
    the best of them, not the best of the candidates it picked this time."""
    source = load_checkpoint(tiny_source)[0]
    settings = SearchSettings(
        str(Path(tiny_source).resolve()),
        str(Path(tiny_mds).resolve()),
        BUDGET,
        candidates=2,
        multiple=8,
        steps=2,
        batch_size=2,
        samples=8,
        eval_batches=1,
    )
    found = enumerate_shapes(source, parse_budget(BUDGET, "--budget"), settings.space())
    picked = scoring_candidates(found, 2)
    losses = (5.0, 4.0)  # the second candidate, which --candidates 1 does not pick, scored best
    scores = {
        c.label(): dict(Score(c.shape, c.config.num_params(), c.cost, loss, 1.0, 64).__dict__)
        for c, loss in zip(picked, losses, strict=True)
    }
    state = {"version": STATE_VERSION, "settings": settings.to_dict(), "candidates": [], "scores": scores}
    work = tmp_path / "target-search"
    work.mkdir()
    (work / STATE_NAME).write_text(json.dumps(state))
    out = tmp_path / "target.yaml"
    assert search(tiny_source, tiny_mds, out, "--candidates", "1") == 0
    table = capsys.readouterr().out
    assert f"ranked 2: 0 scored in this call, 2 taken from {work / STATE_NAME}" in table
    ranked = [line.split()[1] for line in table.splitlines() if line.split()[:1] in (["1"], ["2"])]
    assert ranked == [picked[1].label(), picked[0].label()]
    assert dict(read_recipe(str(out))["target_model"]) == picked[1].shape
    assert not (work / "importance.safetensors").exists()  # nothing scored, nothing measured


def test_the_written_shape_says_when_a_recipe_must_prune_kv_groups(tmp_path) -> None:
    """The shipped recipes keep the source's KV groups: a best shape with fewer says what the recipe needs."""
    shape = {"n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "d_model": 32, "intermediate_size": 32}
    score = Score(shape, 15_000, 15_000.0, 4.5, 1.0, 64)
    result = SearchResult(
        parse_budget(BUDGET, "--budget"), "3L/4H/2KV/32d/48I", 4, [score], tmp_path / "t.yaml", tmp_path, 0, 2
    )
    assert result.table().endswith("with kv_head in model.l0_module.pruning_modules (n_kv_heads 2 -> 1)")
    result.source_kv_heads = 1
    assert result.table().endswith("intermediate_size: 32}'")


def _label(shape: dict[str, int]) -> str:
    return "{n_layers}L/{n_heads}H/{n_kv_heads}KV/{d_model}d/{intermediate_size}I".format(**shape)


@pytest.mark.parametrize(
    ("budget", "message"),
    [
        ("params=1e6", "budget params=1e+06 is not below the source (3L/4H/2KV/32d/48I: 26,368 params)"),
        ("params=100", "budget params=100 is below the smallest valid shape"),
        ("params=16000,tolerance=0.0001", "no valid shape costs between"),
        ("bytes=5", "unknown keys ['bytes']"),
    ],
)
def test_bad_budgets_are_one_line_errors_before_anything_runs(
    tiny_source, tiny_mds, tmp_path, capsys, budget, message
):
    out = tmp_path / "target.yaml"
    argv = ["search-shape", tiny_source, "--budget", budget, "--data", tiny_mds, "--out", str(out), *FAST]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert "nearest valid shape" in err or budget.startswith(
        "bytes"
    )  # a budget of no known kind names the kinds
    assert "\n" not in err and "Traceback" not in err
    assert not out.exists() and not (tmp_path / "target-search").exists()
