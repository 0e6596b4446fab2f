"""Reading a recipe (YAML + dot-list overrides, omegaconf) and validating it, once, into a ``RunConfig``.

``RunConfig`` (:mod:`llmshearing.training.run_config`) is one dataclass tree whose fields are the recipe's
keys: ``SCHEMA``, ``DEFAULTS``, ``REQUIRED`` and the message for a misspelt key (it names the closest valid
one) are derived from its fields. ``validate_config`` runs before anything heavy, Composer's import included (only
the callbacks' and loggers' settings, checked last, need it): every key is checked, paths must exist, batch sizes
must divide, the scalars are checked by :mod:`llmshearing.training.value_checks`, and the sections other
parts of the package own are parsed once, each into its own dataclass: ``model.l0_module`` an
``L0Config``, ``model.distillation`` a ``DistillationConfig``, ``callbacks.data_loading`` a
``DataLoadingConfig``. The builders, the planner and the entry point take the typed sections;
``RunConfig.to_dict()`` is the recipe as read (the ``train`` part of a run's ``config.json``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from omegaconf import DictConfig, OmegaConf

from llmshearing.config_base import ConfigError, check_keys, section_from_mapping
from llmshearing.dynamic_loading.config import KEY as DATA_LOADING_KEY
from llmshearing.dynamic_loading.config import DataLoadingConfig
from llmshearing.models.teacher import DistillationConfig
from llmshearing.recipe_file import first_line, read_recipe
from llmshearing.training.run_config import (
    DEFAULTS,
    REQUIRED,
    SCHEMA,
    CallbackSettings,
    ModelSettings,
    RunConfig,
)
from llmshearing.training.value_checks import (
    check_component_settings,
    check_init_device,
    check_l0_target,
    check_run_values,
)

__all__ = [
    "DEFAULTS",
    "REQUIRED",
    "SCHEMA",
    "ConfigError",
    "RunConfig",
    "check_keys",
    "load_config",
    "validate_config",
]


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
    try:
        base = OmegaConf.merge(OmegaConf.create(DEFAULTS), recipe)
    except Exception as err:  # a value of the wrong kind (a mapping where a number belongs, ...)
        raise ConfigError(f"{yaml_path}: {first_line(err)}; compare the key with yamls/") from None
    try:
        merged = OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides)))
    except Exception:  # an override that does not fit the ones before it or the recipe
        raise _override_error(list(overrides), base, recipe) from None
    try:
        OmegaConf.resolve(merged)
    except Exception as err:  # omegaconf's interpolation errors carry the key
        raise ConfigError(f"{yaml_path}: cannot resolve an interpolation: {err}") from err
    return merged


_MISSING_HINTS = {  # where the value of a key a recipe leaves ??? comes from
    "model.distillation.teacher": "the source model's checkpoint",
    f"{DATA_LOADING_KEY}.target_loss": "the source's per-domain eval losses in set_names order, the loss "
    "column of `llmshearing evaluate SOURCE DATA`, e.g. [1.05,2.31]",
}


def _override_error(overrides: list[str], base: DictConfig, recipe: DictConfig) -> ConfigError:
    """The error naming the first override that fails, applied with those before it onto ``base`` (the
    defaults merged with ``recipe``), and why: a list on the override's path, else OmegaConf's reason."""
    for count, override in enumerate(overrides, 1):
        key = override.split("=", 1)[0]
        try:
            cli = OmegaConf.from_dotlist(overrides[:count])
        except Exception as err:  # a key under a list set by an earlier override
            before = OmegaConf.from_dotlist(overrides[: count - 1])
            found = _list_on_path(before, key, indexable=True)
            if found is None:
                return ConfigError(
                    f"override {override!r} does not fit the overrides before it ({first_line(err)})"
                )
            setters = [o for o in overrides[: count - 1] if _covers(o.split("=", 1)[0], found)]
            setter = setters[-1] if setters else ""
            return ConfigError(
                f"override {override!r} does not fit: {found} is a list there (set by {repr(setter) if setter else 'an earlier override'}), "
                f"which takes no key {key[len(found) + 1 :].split('.')[0]!r}; {_set_whole(found, setter, override)}"
            )
        try:
            OmegaConf.merge(base, cli)
        except Exception as err:  # a key under a list of the recipe or the defaults
            found = _list_on_path(base, key, indexable=False)
            if found is None:
                return ConfigError(f"override {override!r} does not fit the recipe ({first_line(err)})")
            where = "the recipe" if OmegaConf.is_list(_select(recipe, found)) else "the defaults"
            return ConfigError(
                f"override {override!r} does not fit the recipe: {found} is a list in {where}, which an override "
                f"cannot reach into; {_set_whole(found, None, override)}"
            )
    return ConfigError(
        f"the overrides {' '.join(overrides)} do not fit the recipe; compare the keys with yamls/"
    )


def _select(cfg: DictConfig, key: str) -> object:
    """The node at dotted ``key`` of ``cfg`` (None where absent, missing or not resolvable)."""
    return OmegaConf.select(cfg, key, default=None, throw_on_missing=False, throw_on_resolution_failure=False)


def _list_on_path(cfg: DictConfig, key: str, indexable: bool) -> str | None:
    """The first prefix of dotted ``key`` that is a list in ``cfg`` and that the rest of ``key`` cannot
    go through: any list when ``indexable`` is false, else one whose next part is not an index."""
    parts = key.split(".")
    for depth in range(1, len(parts)):
        prefix = ".".join(parts[:depth])
        if OmegaConf.is_list(_select(cfg, prefix)) and not (indexable and parts[depth].isdigit()):
            return prefix
    return None


def _covers(key: str, prefix: str) -> bool:
    """Whether setting ``key`` sets ``prefix`` (the same key, or one above it)."""
    return prefix == key or prefix.startswith(key + ".")


def _set_whole(key: str, setter: str | None, override: str) -> str:
    """The fix for ``override`` reaching into the list at ``key`` (set by the override ``setter``, or by the
    recipe when None): set the list whole or, where a bare list stands for one key of a mapping
    (``eval_tasks: [...]`` for ``eval_tasks.tasks``), give the mapping."""
    from llmshearing.callbacks.eval_tasks import KEY as EVAL_TASKS_KEY
    from llmshearing.callbacks.eval_tasks import LIST_STANDS_FOR

    field = {EVAL_TASKS_KEY: LIST_STANDS_FOR}.get(key)
    whole = f"set {key} whole ({key}=[...])"
    if field is None:
        return whole
    if setter is None:  # an override cannot turn the recipe's list into a mapping
        return f"{whole}, or write it in the recipe as a mapping ({key}: {{{field}: [...], ...}})"
    listed = setter.split("=", 1)[1] if setter.startswith(f"{key}=") else "[...]"
    return f"{whole}, or give it as a mapping: {key}.{field}={listed} {override}"


def validate_config(
    cfg: DictConfig, world_size: int = 1, check_paths: bool = True, check_components: bool = True
) -> RunConfig:
    """Validate a resolved config and parse it, once, into a ``RunConfig``.

    ``check_paths=False`` skips what needs the run's files (model.path, data_local, the teacher and
    its vocabulary), for planning a run on another machine (``llmshearing plan``);
    ``check_components=False`` skips the callbacks' and loggers' keyword arguments, the one check that
    imports Composer (seconds), which the run itself makes before anything heavy."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        hints = "; ".join(f"{key}: {_MISSING_HINTS[key]}" for key in missing if key in _MISSING_HINTS)
        raise ConfigError(
            f"the recipe leaves {', '.join(missing)} to be set (???); pass "
            f"{' '.join(f'{key}=...' for key in missing)} on the command line"
            + (f" ({hints})" if hints else "")
        )
    values = OmegaConf.to_container(cfg, resolve=True)
    check_keys(values, SCHEMA)
    for key in REQUIRED:
        if values.get(key) is None:
            raise ConfigError(f"config key {key!r} is required")
    run = section_from_mapping(RunConfig, values)
    if not run.model.path:
        raise ConfigError(
            "config key 'model.path' is required: the source checkpoint from "
            "`llmshearing convert hf-to-composer` or a `llmshearing prune-model` output"
        )
    if check_paths and not os.path.exists(run.model.path):
        raise ConfigError(
            f"model.path {run.model.path!r} does not exist; convert a checkpoint first "
            "(`llmshearing convert hf-to-composer SRC OUT`) and point model.path at OUT"
        )
    if check_paths and run.data_remote is None and not os.path.isdir(run.data_local):
        raise ConfigError(
            f"data_local {run.data_local!r} is not a directory; prepare data with "
            "`llmshearing prepare-data --output DIR ...` and set data_local=DIR"
        )
    try:
        str(run.save_folder).format(run_name=run.run_name)
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(
            f"save_folder {run.save_folder!r} cannot be formatted ({type(err).__name__}: {err}); only "
            "{run_name} may stand in braces"
        ) from None
    global_batch = run.global_train_batch_size
    micro = run.device_train_microbatch_size
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
    compile_config = run.compile_config
    if compile_config is not None and not isinstance(compile_config, dict):
        raise ConfigError(
            f"compile_config must be a mapping of torch.compile arguments ({{}} for the defaults, e.g. "
            f"compile_config={{}} or compile_config.mode=max-autotune) or null for eager; got {compile_config!r}"
        )
    for key in ("max_duration", "eval_interval"):
        if not str(getattr(run, key)).endswith("ba"):
            raise ConfigError(f"{key} must be given in batches, e.g. {key}=100ba (got {getattr(run, key)!r})")
    validate_distillation(run.model, check_paths)
    from llmshearing.callbacks.eval_tasks import parse_eval_tasks

    parse_eval_tasks(run.eval_tasks, check_paths)
    check_run_values(run)
    check_init_device(run, world_size)
    check_l0_target(run.model)
    parse_data_loading(run.callbacks)
    check_loaders(run, check_paths)
    if check_components:
        check_component_settings(run)  # imports Composer: last
    return run


def validate_distillation(model: ModelSettings, check_paths: bool = True) -> None:
    """Parse ``model.distillation`` into a ``DistillationConfig``, its teacher filled in (the source
    ``model.path`` when pruning); ``check_paths=False`` leaves the teacher's existence and vocabulary unchecked."""
    section = model.distillation
    if section is None:
        return
    if not isinstance(section, dict):
        raise ConfigError(
            f"model.distillation must be a mapping (teacher, alpha, temperature, kind, top_k, chunk_size) "
            f"or null to train without a teacher, got {section!r}"
        )
    from llmshearing.checkpoint.loading import checkpoint_vocab_size

    teacher = section.get("teacher") or (model.path if model.l0_module else None)
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
        student_vocab = checkpoint_vocab_size(model.path)
        if teacher_vocab is not None and student_vocab is not None:
            config.check_vocab(student_vocab, teacher_vocab)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from err
    model.put("distillation", config)  # config.json keeps the settings with the teacher filled in


def check_loaders(run: RunConfig, check_paths: bool) -> None:
    """Fill each loader's data root from the top level (``data_local``, ``data_remote``, ``max_seq_len``, where
    its ``dataset`` leaves them out) and check its keys and, with ``check_paths``, the data against
    ``callbacks.data_loading.set_names``, as building the loaders would, before anything is imported."""
    from llmshearing.data.loaders import check_loader_config

    for section in ("train_loader", "eval_loader"):
        if getattr(run, section) is None:
            run.put(section, {})
        loader = getattr(run, section)
        dataset = loader.setdefault("dataset", {}) if isinstance(loader, dict) else None
        if isinstance(dataset, dict):
            dataset.setdefault("local", run.data_local)
            dataset.setdefault("remote", run.data_remote)
            dataset.setdefault("max_seq_len", run.max_seq_len)
    data_loading = run.callbacks.data_loading
    if not isinstance(data_loading, DataLoadingConfig):
        return  # the run says the section is required
    names_key = f"{DATA_LOADING_KEY}.set_names"
    for section, train in (("train_loader", True), ("eval_loader", False)):
        try:
            check_loader_config(
                getattr(run, section),
                data_loading.set_names,
                train=train,
                where=section,
                names_key=names_key,
                check_paths=check_paths,
            )
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(str(err)) from None


def parse_data_loading(callbacks: CallbackSettings) -> None:
    """Parse ``callbacks.data_loading`` into a ``DataLoadingConfig`` (an empty section stays None: the run
    then says it is required)."""
    section = callbacks.data_loading
    if isinstance(section, DataLoadingConfig):
        return
    if section is None:
        return
    if not section:  # given but empty: kept as written, and None for the run to say it is required
        callbacks.put("data_loading", None, raw=section)
        return
    try:
        config = DataLoadingConfig.from_dict(section)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    callbacks.put("data_loading", config, raw=section)
