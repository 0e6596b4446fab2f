"""The demo's plan (``llmshearing.demo``): which pruning method, and how many steps each path trains.

The whole demo runs in ``make demo`` (minutes); its reuse of finished runs is tested in
``test_train_bad_input.py``.
"""

from __future__ import annotations

import shutil

import pytest
from omegaconf import OmegaConf

from llmshearing import demo


def test_both_methods_train_the_same_tokens_after_the_source():
    prune, cont = (OmegaConf.load(r).max_duration for r in (demo.PRUNE_RECIPE, demo.CONTINUE_RECIPE))
    assert (demo.recipe_steps(demo.PRUNE_RECIPE), demo.recipe_steps(demo.CONTINUE_RECIPE)) == (
        int(prune.removesuffix("ba")),
        int(cont.removesuffix("ba")),
    )
    l0 = demo.recipe_steps(demo.PRUNE_RECIPE) + demo.continued_steps("l0")
    assert demo.continued_steps("oneshot") == l0  # the one-shot path has no pruning run to spend steps on
    assert demo.continued_steps("l0") == demo.recipe_steps(demo.CONTINUE_RECIPE)
    with pytest.raises(ValueError, match="unknown method 'magnitude'"):
        demo.continued_steps("magnitude")


def test_recipe_steps_needs_a_number_of_batches(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("max_duration: 1ep\n")
    with pytest.raises(ValueError, match="recipe.yaml: max_duration must be a number of batches"):
        demo.recipe_steps(recipe)
    recipe.write_text("seed: 1\n")
    with pytest.raises(Exception, match="max_duration"):
        demo.recipe_steps(recipe)


def test_method_flag(capsys):
    with pytest.raises(SystemExit):
        demo.main(["--method", "magnitude"])
    assert "invalid choice: 'magnitude'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        demo.main(["--help"])
    assert "--method {oneshot,l0}" in capsys.readouterr().out


def test_summary_shows_downstream_accuracy_of_each_stage(tmp_path, monkeypatch, capsys):
    """The demo's downstream steps on a tiny model: tasks from a test split, scored through lm-eval, and the
    summary's table beside the test losses (the real run is ``make demo``)."""
    from conftest import byte_split, write_byte_source

    from llmshearing.harness.heldout import CLOZE, MC

    out, work = tmp_path / "out", tmp_path / "out" / "oneshot"
    source = out / "source"
    write_byte_source(source, max_seq_len=1024)
    work.mkdir()
    shutil.copytree(source, work / "pruned")
    items = demo.downstream_tasks(byte_split(tmp_path / "mds", source), source, out / "tasks")
    assert items == {CLOZE: 20, MC: 20}  # every item is a test item (scored 0-shot)
    monkeypatch.setattr(demo, "DOWNSTREAM_LIMIT", 3)
    scores = demo._downstream(work / "pruned", out / "tasks", source)
    assert set(scores) == {"cloze acc", "mc acc", "mc acc_norm"}
    assert all(0.0 <= value <= 1.0 for value in scores.values())
    assert CLOZE in capsys.readouterr().out  # lm-eval's table of the step

    losses = {stage: {"code": 3.0, "docs": 4.0} for stage in ("source", "pruned")}
    downstream = {"source": {name: 0.5 for name in scores}, "pruned": scores}
    text = demo.summary(out, work, losses, "sample", demo.Steps(), downstream, items)
    lines = text.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("downstream accuracy"))
    assert f"{CLOZE} 3 items, {MC} 3 items" in lines[head]  # the limit is said
    assert lines[head + 1].split() == ["metric", "source", "pruned"]
    rows = {line[:12].strip(): line[12:].split() for line in lines[head + 2 : head + 5]}
    assert rows == {name: ["0.500", f"{scores[name]:.3f}"] for name in ("cloze acc", "mc acc", "mc acc_norm")}
    assert (
        lines.index("per-domain test loss (held-out documents that neither training nor the data mix reads):")
        < head
    )
    # no downstream scores: no table
    assert "downstream accuracy" not in demo.summary(out, work, losses, "sample", demo.Steps())


def test_floor_notes_name_a_domain_held_at_its_floor(tmp_path):
    """The summary says when the dynamic mix held a domain at its floor to the end (``make demo``'s continued
    run: docs at 0.5 x 0.5 from the first update), and says nothing of a domain that left it."""
    from llmshearing.checkpoint.run_config import write_run_description

    section = {
        "dynamic": True,
        "set_names": ["code", "docs"],
        "proportion": [0.5, 0.5],
        "target_loss": [1.0, 2.0],
    }
    write_run_description(str(tmp_path), {"train": {"callbacks": {"data_loading": section}}})
    held = {"code": [(0, 0.6), (8, 0.75), (16, 0.75)], "docs": [(0, 0.4), (8, 0.25), (16, 0.25)]}
    notes = demo.floor_notes(tmp_path, held)
    assert len(notes) == 1 and notes[0].startswith(
        "  docs sat at its floor 0.250 (min_proportion 0.5 x 0.500)"
    )
    assert "from ba8 to the end" in notes[0]
    left = {"code": [(0, 0.75), (8, 0.6)], "docs": [(0, 0.25), (8, 0.4)]}
    assert demo.floor_notes(tmp_path, left) == []
    write_run_description(
        str(tmp_path), {"train": {"callbacks": {"data_loading": {**section, "min_proportion": 0}}}}
    )
    assert demo.floor_notes(tmp_path, held) == []  # no floor


def test_a_second_run_lists_the_steps_it_reused(tmp_path, capsys):
    steps = demo.Steps()
    steps.reuse("3. prepare MDS data", tmp_path)
    assert f"reusing the output of an earlier run in {tmp_path}" in capsys.readouterr().out
    assert steps.timings == [("3. prepare MDS data (reused)", 0.0)]


def test_a_step_runs_once_and_is_reused_when_its_output_is_finished(tmp_path, capsys):
    steps, out, calls = demo.Steps(), tmp_path / "pruned", []
    steps.run_once(out, "4. prune", func=lambda: calls.append(1))  # no config.json yet: it runs
    out.mkdir()
    steps.run_once(out, "4. prune", func=lambda: calls.append(2))  # a folder without config.json: unfinished
    (out / "config.json").write_text("{}")
    steps.run_once(out, "4. prune", func=lambda: calls.append(3))
    steps.run_once(tmp_path, "1. corpus", func=lambda: calls.append(4), done=None)  # exists: reused
    assert calls == [1, 2]
    assert [title for title, _ in steps.timings] == [
        "4. prune",
        "4. prune",
        "4. prune (reused)",
        "1. corpus (reused)",
    ]
    assert f"reusing the output of an earlier run in {out}" in capsys.readouterr().out
