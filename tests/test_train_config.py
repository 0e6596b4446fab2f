"""Training config: recipes load, overrides apply, and every bad value is named before anything runs."""

from __future__ import annotations

import glob

import pytest
from omegaconf import OmegaConf

from llmshearing.training.config import SCHEMA, ConfigError, check_keys, load_config, validate_config


@pytest.fixture()
def recipe(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "model").mkdir()
    path = tmp_path / "recipe.yaml"
    path.write_text(
        f"""
run_name: t
max_seq_len: 32
data_local: {tmp_path / "data"}
model: {{path: {tmp_path / "model"}}}
max_duration: 10ba
eval_interval: 5ba
global_train_batch_size: 8
device_train_microbatch_size: 4
train_loader:
  dataset:
    shuffle_seed: ${{seed}}
"""
    )
    return str(path)


def test_defaults_overrides_and_interpolation(recipe):
    values = validate_config(load_config(recipe, ["seed=3", "optimizer.lr=0.5"]))
    assert values["seed"] == 3
    assert values["train_loader"]["dataset"]["shuffle_seed"] == 3
    assert values["optimizer"]["lr"] == 0.5
    assert values["optimizer"]["betas"] == [0.9, 0.95]  # default kept
    assert values["compile_config"] is None  # eager unless asked
    compiled = validate_config(load_config(recipe, ["compile_config.mode=max-autotune"]))
    assert compiled["compile_config"] == {"mode": "max-autotune"}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optimizer.lrr=1"], "unknown config key 'optimizer.lrr'; did you mean optimizer.lr?"),
        (["max_duraton=3ba"], "did you mean max_duration?"),
        (["global_train_batch_size=6"], "device_train_microbatch_size (4) must divide"),
        (["max_duration=2ep"], "max_duration must be given in batches"),
        (["data_local=/nonexistent/data"], "data_local '/nonexistent/data' is not a directory"),
        (["model.path=/nonexistent/model"], "model.path '/nonexistent/model' does not exist"),
        (["eval_interval=null"], "config key 'eval_interval' is required"),
        (["bad-override"], "overrides must look like key=value"),
        (["compile_config=true"], "compile_config must be a mapping of torch.compile arguments"),
    ],
)
def test_bad_config_names_the_key(recipe, overrides, message):
    with pytest.raises(ConfigError) as err:
        validate_config(load_config(recipe, overrides))
    assert message in str(err.value)


def test_batch_must_divide_across_processes(recipe):
    with pytest.raises(ConfigError, match=r"divisible by the number of processes \(3\)"):
        validate_config(load_config(recipe), world_size=3)


def test_missing_recipe():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent.yaml")


@pytest.mark.parametrize("path", sorted(glob.glob("yamls/**/*.yaml", recursive=True)))
def test_shipped_recipes_use_only_known_keys(path):
    values = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    check_keys(values, SCHEMA)
    assert values["max_duration"].endswith("ba") and values["eval_interval"].endswith("ba")
