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
    assert values.seed == 3
    assert values.train_loader["dataset"]["shuffle_seed"] == 3
    assert values.optimizer.lr == 0.5
    assert values.optimizer.betas == [0.9, 0.95]  # default kept
    assert values.compile_config is None  # eager unless asked
    compiled = validate_config(load_config(recipe, ["compile_config.mode=max-autotune"]))
    assert compiled.compile_config == {"mode": "max-autotune"}


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
        (["loggers.metrics_jsonl=false"], "unknown config key 'loggers.metrics_jsonl'"),
    ],
)
def test_bad_config_names_the_key(recipe, overrides, message):
    with pytest.raises(ConfigError) as err:
        validate_config(load_config(recipe, overrides))
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["seed=3", "optimizer.betas.x=1"],  # the defaults' betas: a list
            "override 'optimizer.betas.x=1' does not fit the recipe: optimizer.betas is a list in the defaults, "
            "which an override cannot reach into; set optimizer.betas whole (optimizer.betas=[...])",
        ),
        (
            ["eval_tasks=[local_mc]", "eval_tasks.every=2"],
            "override 'eval_tasks.every=2' does not fit: eval_tasks is a list there (set by 'eval_tasks=[local_mc]'), "
            "which takes no key 'every'; set eval_tasks whole (eval_tasks=[...]), or give it as a mapping: "
            "eval_tasks.tasks=[local_mc] eval_tasks.every=2",
        ),
        (["seed=1", "optimizer.betas=[0.9"], "override 'optimizer.betas=[0.9' cannot be parsed"),
    ],
)
def test_override_that_does_not_fit_is_named(recipe, overrides, message):
    """The override at fault is named with the reason, not the recipe (nor a raw ValueError)."""
    with pytest.raises(ConfigError) as err:
        load_config(recipe, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_override_into_a_list_of_the_recipe_is_named(recipe, tmp_path):
    path = tmp_path / "listed.yaml"
    path.write_text(open(recipe).read() + "eval_tasks: [local_mc]\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(path), ["seed=2", "eval_tasks.every=2"])
    assert str(err.value) == (
        "override 'eval_tasks.every=2' does not fit the recipe: eval_tasks is a list in the recipe, which an "
        "override cannot reach into; set eval_tasks whole (eval_tasks=[...]), or write it in the recipe as a "
        "mapping (eval_tasks: {tasks: [...], ...})"
    )


def test_overrides_that_fit_still_apply(recipe):
    """Naming the failing override changes nothing for overrides that fit: a list an override set may be indexed."""
    assert list(load_config(recipe, ["eval_tasks=[a,b]", "eval_tasks.1=c"]).eval_tasks) == ["a", "c"]
    assert load_config(recipe, ["eval_tasks.tasks=[a]", "eval_tasks.every=2"]).eval_tasks.every == 2


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


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optimizer.lr=.nan"], "optimizer.lr must be a finite number > 0, got nan"),
        (["optimizer.lr=nan"], "optimizer.lr must be a finite number > 0, got 'nan'"),
        (["optimizer.lr=0"], "optimizer.lr must be a finite number > 0"),
        (["optimizer.lr=fast"], "optimizer.lr must be a finite number > 0, got 'fast'"),
        (["optimizer.betas=[0.9,1.0]"], "optimizer.betas[1] must be < 1"),
        (["optimizer.betas=[0.9]"], "optimizer.betas must be a list of two numbers"),
        (["optimizer.eps=-1e-8"], "optimizer.eps must be a finite number > 0"),
        (["optimizer.weight_decay=inf"], "optimizer.weight_decay must be a finite number >= 0"),
        (["optimizer.name=adam"], "optimizer.name must be one of ['decoupled_adamw']"),
        (["scheduler.name=cosine"], "scheduler.name must be one of"),
        (["scheduler.t_warmup=10ba"], "scheduler.t_warmup (10ba) is not shorter than max_duration (10ba)"),
        (["scheduler.t_warmup=2ep"], "scheduler.t_warmup must be given in batches"),
        (["scheduler.t_warmup=1.5dur"], "more than the whole run"),
        (["scheduler.alpha_f=2"], "scheduler.alpha_f must be a finite number >= 0 and <= 1"),
        (["scheduler.t_max=2ba", "scheduler.t_warmup=3ba"], "scheduler.t_max (2ba) must be longer"),
        (
            ["save_interval=500"],
            "save_interval must be a number of batches >= 1 written like save_interval=100ba",
        ),
        (["max_duration=0ba"], "max_duration must be a number of batches >= 1"),
        (["precision=bf16"], "precision must be one of"),
        (["autoresume=yes please"], "autoresume must be true or false"),
        (["eval_subset_num_batches=0"], "eval_subset_num_batches must be -1"),
        (["device_eval_batch_size=0"], "device_eval_batch_size must be an integer >= 1"),
        (
            ["algorithms.gradient_clipping.clipping_threshold=-1"],
            "clipping_threshold must be a finite number > 0",
        ),
        (["algorithms.gradient_clipping.clipping_type=l2"], "clipping_type must be one of"),
        (
            ["callbacks.data_loading.set_names=[a,b]", "callbacks.data_loading.target_loss=[1.0,.nan]"],
            "target_loss[1] (b)",
        ),
        (
            ["callbacks.data_loading.set_names=[a,b]", "callbacks.data_loading.target_loss=[1.0]"],
            "target_loss has 1 values but set_names has 2",
        ),
        (
            ["callbacks.data_loading.set_names=[a,b]", "callbacks.data_loading.target_loss=[1.0,-2]"],
            "must be a finite loss >= 0, got -2",
        ),
        (["callbacks.data_loading.target_loss=3.0"], "target_loss must be a list of losses"),
        (["optimizer=null"], "optimizer must be a mapping"),
        (
            ["callbacks.speed_monitor.windw_size=5"],
            "callbacks.speed_monitor.windw_size is not a setting of SpeedMonitor",
        ),
        (["loggers.file=3"], "loggers.file must be a mapping of settings"),
        (["model.l0_module.target_sparsity=1.5"], "model.l0_module.target_sparsity must be in (0, 1)"),
        (
            [
                "model.l0_module.target_budget={params: 1000}",
                "model.l0_module.budget_shape=learned",
                "model.l0_module.fix_shape_at=10ba",
            ],
            "model.l0_module.fix_shape_at=10ba is not before the end of pruning (max_duration=10ba)",
        ),
        (["model.attn_impl=flash2"], "model.attn_impl must be one of ['auto', 'sdpa', 'flash']"),
        (["model.init_device=rank0"], "model.init_device must be one of ['cpu', 'mixed']"),
        (["model.init_device=meta"], "model.init_device=meta is not available"),
    ],
)
def test_bad_recipe_values_name_the_key(recipe, overrides, message):
    with pytest.raises(ConfigError) as err:
        validate_config(load_config(recipe, overrides))
    assert message in str(err.value)


def test_missing_mandatory_value_is_named(recipe, tmp_path):
    path = tmp_path / "mandatory.yaml"
    path.write_text(open(recipe).read().replace("max_seq_len: 32", "max_seq_len: ???"))
    with pytest.raises(ConfigError, match=r"leaves max_seq_len to be set \(\?\?\?\); pass max_seq_len="):
        validate_config(load_config(str(path)))
    path.write_text(path.read_text().replace("eval_interval: 5ba", "eval_interval: ???"))
    both = r"leaves eval_interval, max_seq_len to be set \(\?\?\?\); pass eval_interval=\.\.\. max_seq_len=\.\.\. on the command line"
    with pytest.raises(ConfigError, match=both):
        validate_config(load_config(str(path)))


def test_demo_continued_recipe_says_where_its_missing_values_come_from(tmp_path):
    """The teacher and the reference losses it leaves ??? are named with where a user gets them."""
    cfg = load_config(
        "yamls/continued/smollm2-135m-demo.yaml", [f"data_local={tmp_path}", f"model.path={tmp_path}"]
    )
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    message = str(err.value)
    assert message.startswith(
        "the recipe leaves callbacks.data_loading.target_loss, model.distillation.teacher to be set (???)"
    )
    assert "target_loss: the source's per-domain eval losses in set_names order" in message
    assert "`llmshearing evaluate SOURCE DATA`" in message
    assert "model.distillation.teacher: the source model's checkpoint" in message


def test_scheduler_t_max_reaches_the_scheduler(recipe):
    from composer.core import Time

    from llmshearing.training.builders import build_scheduler

    values = validate_config(load_config(recipe, ["scheduler.t_warmup=0ba", "scheduler.t_max=5ba"]))
    assert build_scheduler(values.scheduler).t_max == Time.from_timestring("5ba")
    default = validate_config(load_config(recipe, ["scheduler.t_warmup=0ba"]))
    assert build_scheduler(default.scheduler).t_max == Time.from_timestring("1dur")


def test_rank0_loading_needs_fsdp_with_several_ranks(recipe):
    # model.init_device=mixed: rank 0 reads the source, FSDP broadcasts it; without FSDP it is refused
    with pytest.raises(ConfigError, match=r"model.init_device=mixed needs FSDP \(set fsdp_config"):
        validate_config(load_config(recipe, ["model.init_device=mixed"]), 2)
    for overrides, world in ((["model.init_device=mixed"], 1), (["model.init_device=cpu"], 2)):
        validate_config(load_config(recipe, overrides), world)
    sharded = ["model.init_device=mixed", "fsdp_config.sharding_strategy=FULL_SHARD"]
    assert validate_config(load_config(recipe, sharded), 2).model.init_device == "mixed"
