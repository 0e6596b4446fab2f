"""The demo's plan (``llmshearing.demo``): which pruning method, and how many steps each path trains.

The whole demo runs in ``make demo`` (minutes); its reuse of finished runs is tested in
``test_train_bad_input.py``.
"""

from __future__ import annotations

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
