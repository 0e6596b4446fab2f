"""Types and ranges of the recipe's scalar values, checked before anything heavy runs.

Each check names the key, what it got and what it accepts: a NaN learning rate or target loss, a
warm-up longer than the run or an interval Composer would read in epochs is refused at start-up
rather than found a few batches into training.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any

from llmshearing.config_base import (
    CLIPPING_TYPES,
    DEVICES,
    INIT_DEVICES,
    LOG_LEVELS,
    OPTIMIZERS,
    PRECISIONS,
    SCHEDULERS,
    ConfigError,
    batches,
    check_int,
    duration_in_batches,
    is_number,
)
from llmshearing.dynamic_loading.config import check_target_loss
from llmshearing.models.config import ATTN_IMPLS
from llmshearing.pruning.targets import PREFIX, L0Config, check_loadable_shape, target_config
from llmshearing.training.fsdp_settings import fsdp_enabled
from llmshearing.training.registries import callback_classes, logger_classes
from llmshearing.training.run_config import (
    AlgorithmSettings,
    ModelSettings,
    OptimizerSettings,
    RunConfig,
    SchedulerSettings,
)

BOOLEANS = (
    "eval_first",
    "save_overwrite",
    "save_weights_only",
    "autoresume",
    "load_weights_only",
    "progress_bar",
    "log_to_console",
)


def check_number(key: str, value: Any, low: float, high: float = math.inf, low_open: bool = False) -> float:
    """``value`` is a finite number in ``[low, high]`` (``(low, high]`` when ``low_open``)."""
    in_range = is_number(value) and math.isfinite(value) and low <= value <= high
    if not in_range or (low_open and value == low):
        bound = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if high != math.inf else "")
        raise ConfigError(f"{key} must be a finite number {bound}, got {value!r}")
    return float(value)


def check_choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {list(choices)}, got {value!r}")


def check_optimizer(optimizer: OptimizerSettings) -> None:
    check_choice("optimizer.name", optimizer.name, OPTIMIZERS)
    check_number("optimizer.lr", optimizer.lr, 0.0, low_open=True)
    betas = optimizer.betas
    if not isinstance(betas, list) or len(betas) != 2:
        raise ConfigError(f"optimizer.betas must be a list of two numbers in [0, 1), got {betas!r}")
    for i, beta in enumerate(betas):
        if check_number(f"optimizer.betas[{i}]", beta, 0.0, 1.0) == 1.0:
            raise ConfigError(f"optimizer.betas[{i}] must be < 1, got {beta!r}")
    check_number("optimizer.eps", optimizer.eps, 0.0, low_open=True)
    check_number("optimizer.weight_decay", optimizer.weight_decay, 0.0)


def check_scheduler(scheduler: SchedulerSettings, total: int) -> None:
    """Name, warm-up shorter than the run (``total`` batches), final factor and ``t_max``."""
    check_choice("scheduler.name", scheduler.name, SCHEDULERS)
    warmup = duration_in_batches("scheduler.t_warmup", scheduler.t_warmup, total)
    if warmup >= total:
        raise ConfigError(
            f"scheduler.t_warmup ({scheduler.t_warmup}) is not shorter than max_duration ({total}ba): "
            "the learning rate would never leave its warm-up; shorten the warm-up"
        )
    if scheduler.alpha_f is not None:
        check_number("scheduler.alpha_f", scheduler.alpha_f, 0.0, 1.0)
    if scheduler.t_max is not None:
        if duration_in_batches("scheduler.t_max", scheduler.t_max, total) <= warmup:
            raise ConfigError(
                f"scheduler.t_max ({scheduler.t_max}) must be longer than scheduler.t_warmup "
                f"({scheduler.t_warmup})"
            )


def check_clipping(algorithms: AlgorithmSettings) -> None:
    clipping = algorithms.gradient_clipping
    if not clipping:
        return
    check_choice(
        "algorithms.gradient_clipping.clipping_type", clipping.get("clipping_type", "norm"), CLIPPING_TYPES
    )
    check_number(
        "algorithms.gradient_clipping.clipping_threshold",
        clipping.get("clipping_threshold", 1.0),
        0.0,
        low_open=True,
    )


def check_settings(section: str, entries: dict[str, Any], classes: dict[str, type]) -> None:
    """Each entry of ``callbacks``/``loggers`` is null, false or a mapping of its class's arguments."""
    for name, settings in entries.items():
        if name not in classes or settings is None or settings is False:
            continue
        if not isinstance(settings, dict):
            raise ConfigError(
                f"{section}.{name} must be a mapping of settings ({{}} for the defaults) or false, got {settings!r}"
            )
        parameters = inspect.signature(classes[name]).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            continue
        valid = sorted(p for p in parameters if p != "self")
        for key in settings:
            if key not in valid:
                raise ConfigError(
                    f"{section}.{name}.{key} is not a setting of {classes[name].__name__}; valid: {valid}"
                )


def check_init_device(run: RunConfig, world_size: int = 1) -> None:
    """``model.init_device``: ``cpu`` (every rank reads the source, the default) or ``mixed`` (llm-foundry's
    name: rank 0 reads the source and the teacher, the other ranks build them on ``meta`` and receive their
    shards from rank 0 once FSDP has wrapped the model). ``mixed`` needs FSDP when there are several ranks."""
    value = run.model.init_device
    if value == "meta":
        raise ConfigError(
            "model.init_device=meta is not available: the weights always come from model.path; use "
            "model.init_device=mixed (rank 0 reads the source, the other ranks build on meta) or cpu (every rank reads it)"
        )
    check_choice("model.init_device", value, INIT_DEVICES)
    if value == "mixed" and world_size > 1 and not fsdp_enabled(run.fsdp_config):
        raise ConfigError(
            "model.init_device=mixed needs FSDP (set fsdp_config, e.g. fsdp_config.sharding_strategy=FULL_SHARD): "
            "rank 0's weights reach the other ranks through FSDP's broadcast; without sharding every rank holds "
            "the whole model anyway, so use model.init_device=cpu"
        )


def parse_l0_settings(model: ModelSettings) -> None:
    """Parse ``model.l0_module`` into an ``L0Config`` (the target is checked against the source by
    :func:`check_l0_target`)."""
    settings = model.l0_module
    if settings is None or isinstance(settings, L0Config):
        return
    try:
        model.put("l0_module", L0Config.from_dict(settings), raw=settings)
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from None


def check_l0_target(model: ModelSettings) -> None:
    """A ``model.l0_module.target_budget`` is resolved to a ``target_model`` (the section changes: the run's
    config.json keeps the resolved settings). A ``model.l0_module.target_model`` the source cannot be pruned
    to, or whose ``d_model`` is not a multiple of its ``n_heads`` (transformers >= 5 cannot load the result),
    is refused before anything loads; the source's shape is read from its config only. The rules that need
    the source's weights or the masks are checked when the model loads."""
    parse_l0_settings(model)
    l0 = model.l0_module
    if l0 is None or (l0.target_model is None and l0.target_budget is None):
        return
    source = _source_config(model.path)
    if source is None:  # not readable here: the load reports it
        return
    if l0.target_budget is not None:  # the budget becomes a target_model here, before anything loads
        from llmshearing.pruning.budget import budget_resolution

        try:
            changes, _ = budget_resolution(l0, source)
            l0 = dataclasses.replace(l0, **changes)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        model.put("l0_module", l0, raw={**model.to_dict()["l0_module"], **changes})
        if l0.target_model is None:  # a learned shape: every candidate the fold rounds to is valid
            return
    try:
        target = target_config(l0.target_model, source)
        if not l0.allow_indivisible_d_model:
            check_loadable_shape(
                target, f"{PREFIX}.target_model", f"set {PREFIX}.allow_indivisible_d_model=true", source
            )
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _source_config(path: str) -> Any:
    """The ``ModelConfig`` of the checkpoint at ``path`` from its config.json alone (None if unreadable)."""
    from llmshearing.checkpoint.reading import model_config_if_readable

    return model_config_if_readable(path)


def check_run_values(run: RunConfig) -> None:
    """Every scalar of the run itself: durations, sizes, flags, precision, device, logging; parses
    ``model.l0_module`` on its own (:func:`parse_l0_settings`). Callbacks and loggers:
    :func:`check_component_settings`."""
    total = batches("max_duration", run.max_duration)
    batches("eval_interval", run.eval_interval)
    batches("save_interval", run.save_interval)
    batches("console_log_interval", run.console_log_interval)
    check_int("max_seq_len", run.max_seq_len, 1)
    check_int("seed", run.seed, 0)
    check_int("device_eval_batch_size", run.device_eval_batch_size, 1)
    subset = run.eval_subset_num_batches
    if check_int("eval_subset_num_batches", subset, -1) == 0:
        raise ConfigError(
            "eval_subset_num_batches must be -1 (the whole eval set) or a positive integer, got 0"
        )
    check_int("save_num_checkpoints_to_keep", run.save_num_checkpoints_to_keep, -1)
    check_number("dist_timeout", run.dist_timeout, 0.0, low_open=True)
    for key in BOOLEANS:
        if not isinstance(getattr(run, key), bool):
            raise ConfigError(f"{key} must be true or false, got {getattr(run, key)!r}")
    if not isinstance(run.model.allow_new_source, bool):
        raise ConfigError(f"model.allow_new_source must be true or false, got {run.model.allow_new_source!r}")
    check_choice("precision", run.precision, PRECISIONS)
    check_choice("device", run.device, DEVICES)
    level = run.python_log_level
    check_choice("python_log_level", level.lower() if isinstance(level, str) else level, LOG_LEVELS)
    check_optimizer(run.optimizer)
    check_scheduler(run.scheduler, total)
    check_clipping(run.algorithms)
    check_target_loss(run.callbacks.data_loading)
    parse_l0_settings(run.model)
    l0 = run.model.l0_module
    if l0 is not None and l0.fix_shape_at is not None and l0.fix_shape_at >= total:
        raise ConfigError(
            f"model.l0_module.fix_shape_at={l0.fix_shape_at}ba is not before the end of pruning "
            f"(max_duration={total}ba): the learned shape would never be fixed; set it below {total} or remove it"
        )
    check_choice("model.attn_impl", run.model.attn_impl, ATTN_IMPLS)


def check_component_settings(run: RunConfig) -> None:
    """The settings of each callback and logger against its class's arguments: the one check that imports
    Composer, so validation runs it last (every other mistake is answered before that import)."""
    check_settings("callbacks", dict(run.callbacks.items()), callback_classes())
    check_settings("loggers", dict(run.loggers.items()), logger_classes())
