"""Training configuration: YAML + dot-list overrides (omegaconf), defaults and validation.

Validation runs before anything heavy: every key is checked against the schema below (a
misspelt key is reported with the closest valid name), paths must exist, batch sizes must
divide, and the data-loading and pruning sections are checked by their own validators.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from llmshearing.config_base import ConfigError
from llmshearing.recipe_file import first_line, read_recipe

ANY = object()  # a free-form value (or a free-form mapping) the schema does not look into

SCHEMA: dict[str, Any] = {
    "variables": ANY,
    "run_name": ANY,
    "seed": ANY,
    "max_seq_len": ANY,
    "data_local": ANY,
    "data_remote": ANY,
    "model": {
        "path": ANY,
        "allow_new_source": ANY,  # a resumed run may take another model.path / source dtype
        "init_device": ANY,  # cpu (every rank reads the source) or mixed (rank 0 reads it; FSDP broadcasts)
        "attn_impl": ANY,
        "l0_module": ANY,  # validated by llmshearing.pruning
        "distillation": {  # validated by validate_distillation
            "teacher": ANY,
            "alpha": ANY,
            "temperature": ANY,
            "kind": ANY,
            "top_k": ANY,
            "chunk_size": ANY,
        },
    },
    "train_loader": ANY,  # validated by llmshearing.data.loaders
    "eval_loader": ANY,
    "optimizer": {"name": ANY, "lr": ANY, "betas": ANY, "eps": ANY, "weight_decay": ANY},
    "scheduler": {"name": ANY, "t_warmup": ANY, "alpha_f": ANY, "t_max": ANY},
    "algorithms": {"gradient_clipping": {"clipping_type": ANY, "clipping_threshold": ANY}},
    "callbacks": {
        "data_loading": ANY,  # validated by llmshearing.dynamic_loading.config
        "speed_monitor": ANY,
        "lr_monitor": ANY,
        "memory_monitor": ANY,
        "runtime_estimator": ANY,
        "optimizer_monitor": ANY,
        "sample_log": ANY,  # record the sample ids of every batch (audits resumption)
    },
    # metrics.jsonl is always written (report, demo and resume read it): it has no key to turn it off
    "loggers": {"file": ANY, "wandb": ANY, "mlflow": ANY, "tensorboard": ANY},
    "max_duration": ANY,
    "eval_interval": ANY,
    "eval_first": ANY,
    "eval_subset_num_batches": ANY,
    "eval_tasks": ANY,  # downstream tasks through lm-eval at eval intervals: llmshearing.callbacks.eval_tasks
    "global_train_batch_size": ANY,
    "device_train_microbatch_size": ANY,
    "device_eval_batch_size": ANY,
    "precision": ANY,
    "fsdp_config": ANY,
    "compile_config": ANY,  # torch.compile keyword arguments ({} for the defaults); null: eager
    "save_folder": ANY,
    "save_interval": ANY,
    "save_num_checkpoints_to_keep": ANY,
    "save_overwrite": ANY,
    "save_weights_only": ANY,
    "autoresume": ANY,
    "load_path": ANY,
    "load_weights_only": ANY,
    "progress_bar": ANY,
    "log_to_console": ANY,
    "console_log_interval": ANY,
    "python_log_level": ANY,
    "dist_timeout": ANY,
    "device": ANY,
}

DEFAULTS: dict[str, Any] = {
    "run_name": "llmshearing",
    "seed": 17,
    "data_remote": None,
    "model": {
        "allow_new_source": False,
        "init_device": "cpu",
        "attn_impl": "auto",
        "l0_module": None,
        "distillation": None,
    },
    "optimizer": {
        "name": "decoupled_adamw",
        "lr": 1e-4,
        "betas": [0.9, 0.95],
        "eps": 1e-8,
        "weight_decay": 0.0,
    },
    "scheduler": {"name": "cosine_with_warmup", "t_warmup": "0ba", "alpha_f": 0.1},
    "algorithms": {},
    "callbacks": {},
    "loggers": {},
    "eval_first": False,
    "eval_subset_num_batches": -1,
    "eval_tasks": None,
    "device_train_microbatch_size": 1,
    "device_eval_batch_size": 8,
    "precision": "amp_bf16",
    "fsdp_config": None,
    "compile_config": None,
    "save_folder": "runs/{run_name}",
    "save_interval": "1000ba",
    "save_num_checkpoints_to_keep": -1,
    "save_overwrite": False,
    "save_weights_only": False,
    "autoresume": False,
    "load_path": None,
    "load_weights_only": False,
    "progress_bar": True,
    "log_to_console": False,
    "console_log_interval": "1ba",
    "python_log_level": None,
    "dist_timeout": 1800.0,
    "device": None,
}

REQUIRED = ("data_local", "max_seq_len", "max_duration", "eval_interval", "global_train_batch_size")


def load_config(yaml_path: str, overrides: Sequence[str] = ()) -> DictConfig:
    """Read a recipe, apply ``key=value`` overrides, fill defaults and resolve interpolations."""
    if not os.path.isfile(yaml_path):
        raise ConfigError(f"recipe {yaml_path!r} does not exist; pass the path of a YAML file (see yamls/)")
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like key=value (dot-list), got {bad}")
    recipe = read_recipe(yaml_path)
    for override in overrides:  # one at a time, so that an error names the override
        try:
            OmegaConf.from_dotlist([override])
        except Exception as err:  # omegaconf's grammar errors
            raise ConfigError(
                f"override {override!r} cannot be parsed ({first_line(err)}); write key=value, quoting "
                "values with brackets or braces"
            ) from None
    cli = OmegaConf.from_dotlist(list(overrides))
    try:
        merged = OmegaConf.merge(OmegaConf.create(DEFAULTS), recipe, cli)
    except Exception as err:  # a value of the wrong kind (a mapping where a number belongs, ...)
        raise ConfigError(f"{yaml_path}: {first_line(err)}; compare the key with yamls/") from None
    try:
        OmegaConf.resolve(merged)
    except Exception as err:  # omegaconf's interpolation errors carry the key
        raise ConfigError(f"{yaml_path}: cannot resolve an interpolation: {err}") from err
    return merged


def check_keys(values: Any, schema: Any, prefix: str = "") -> None:
    """Reject keys the schema does not know, naming the closest valid key."""
    if schema is ANY or not isinstance(values, dict):
        return
    for key, value in values.items():
        path = f"{prefix}{key}"
        if key not in schema:
            close = difflib.get_close_matches(str(key), [str(k) for k in schema], n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys here: {sorted(schema)}"
            raise ConfigError(f"unknown config key {path!r}{hint}")
        check_keys(value, schema[key], f"{path}.")


def validate_config(cfg: DictConfig, world_size: int = 1, check_paths: bool = True) -> dict[str, Any]:
    """Validate a resolved config; returns it as a plain dict.

    ``check_paths=False`` skips what needs the run's files (model.path, data_local, the teacher and
    its vocabulary), for planning a run on another machine (``llmshearing plan``)."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            f"the recipe leaves {', '.join(missing)} to be set (???); pass {missing[0]}=... on the command line"
        )
    values = OmegaConf.to_container(cfg, resolve=True)
    check_keys(values, SCHEMA)
    for key in REQUIRED:
        if values.get(key) is None:
            raise ConfigError(f"config key {key!r} is required")
    if not values["model"].get("path"):
        raise ConfigError(
            "config key 'model.path' is required: the source checkpoint from "
            "`llmshearing convert hf-to-composer` or a `llmshearing prune-model` output"
        )
    if check_paths and not os.path.exists(values["model"]["path"]):
        raise ConfigError(
            f"model.path {values['model']['path']!r} does not exist; convert a checkpoint first "
            "(`llmshearing convert hf-to-composer SRC OUT`) and point model.path at OUT"
        )
    if check_paths and values.get("data_remote") is None and not os.path.isdir(values["data_local"]):
        raise ConfigError(
            f"data_local {values['data_local']!r} is not a directory; prepare data with "
            "`llmshearing prepare-data --output DIR ...` and set data_local=DIR"
        )
    try:
        str(values["save_folder"]).format(run_name=values["run_name"])
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(
            f"save_folder {values['save_folder']!r} cannot be formatted ({type(err).__name__}: {err}); only "
            "{run_name} may stand in braces"
        ) from None
    global_batch = values["global_train_batch_size"]
    micro = values["device_train_microbatch_size"]
    if not isinstance(global_batch, int) or global_batch <= 0:
        raise ConfigError(f"global_train_batch_size must be a positive integer, got {global_batch!r}")
    if global_batch % world_size:
        raise ConfigError(
            f"global_train_batch_size ({global_batch}) must be divisible by the number of processes ({world_size})"
        )
    device_batch = global_batch // world_size
    if micro != "auto" and (not isinstance(micro, int) or micro <= 0 or device_batch % micro):
        raise ConfigError(
            f"device_train_microbatch_size ({micro}) must divide the per-device batch "
            f"global_train_batch_size / processes = {device_batch}"
        )
    compile_config = values["compile_config"]
    if compile_config is not None and not isinstance(compile_config, dict):
        raise ConfigError(
            f"compile_config must be a mapping of torch.compile arguments ({{}} for the defaults, e.g. "
            f"compile_config={{}} or compile_config.mode=max-autotune) or null for eager; got {compile_config!r}"
        )
    for key in ("max_duration", "eval_interval"):
        if not str(values[key]).endswith("ba"):
            raise ConfigError(f"{key} must be given in batches, e.g. {key}=100ba (got {values[key]!r})")
    validate_distillation(values["model"], check_paths)
    from llmshearing.callbacks.eval_tasks import parse_eval_tasks

    parse_eval_tasks(values["eval_tasks"], check_paths)
    from llmshearing.training.value_checks import check_init_device, check_l0_target, check_run_values

    check_run_values(values)
    check_init_device(values, world_size)
    check_l0_target(values["model"])
    return values


def validate_distillation(model: dict[str, Any], check_paths: bool = True) -> None:
    """Check ``model.distillation`` and fill in its teacher (the source ``model.path`` when pruning);
    ``check_paths=False`` leaves the teacher's existence and vocabulary unchecked."""
    section = model.get("distillation")
    if section is None:
        return
    if not isinstance(section, dict):
        raise ConfigError(
            f"model.distillation must be a mapping (teacher, alpha, temperature, kind, top_k, chunk_size) "
            f"or null to train without a teacher, got {section!r}"
        )
    from llmshearing.checkpoint.loading import checkpoint_vocab_size
    from llmshearing.models.teacher import DistillationConfig

    teacher = section.get("teacher") or (model["path"] if model.get("l0_module") else None)
    if teacher is None:
        raise ConfigError(
            "model.distillation.teacher is required outside pruning: set it to the checkpoint directory the "
            "student was pruned from (`llmshearing convert hf-to-composer` output)"
        )
    if not isinstance(teacher, str) or (check_paths and not os.path.exists(teacher)):
        raise ConfigError(
            f"model.distillation.teacher {teacher!r} does not exist; point it at a checkpoint directory "
            "(`llmshearing convert hf-to-composer SRC OUT` writes one)"
        )
    try:
        config = DistillationConfig.from_dict({**section, "teacher": teacher})
        teacher_vocab = checkpoint_vocab_size(teacher)
        student_vocab = checkpoint_vocab_size(model["path"])
        if teacher_vocab is not None and student_vocab is not None:
            config.check_vocab(student_vocab, teacher_vocab)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from err
    model["distillation"] = config.to_dict()
