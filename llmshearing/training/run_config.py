"""The run config as one dataclass tree: ``RunConfig`` and its sections, each field a key of a recipe.

``SCHEMA`` (the keys a recipe may set), ``DEFAULTS`` (what a recipe that leaves a key out gets) and
``REQUIRED`` (the keys without a default) are derived from the fields. Sections other parts of the package
own are typed as their own dataclasses once validation has parsed them (:mod:`llmshearing.training.config`):
``model.l0_module`` an ``L0Config``, ``model.distillation`` a ``DistillationConfig``,
``callbacks.data_loading`` a ``DataLoadingConfig``; free-form sections (the loaders, ``fsdp_config``,
``compile_config``, each callback's and logger's settings) stay mappings. ``to_dict()`` is the recipe as
read, with what validation filled in (the ``train`` part of a run's ``config.json``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from llmshearing.config_base import Section, defaults_of, optional, parsed, required_of, schema_of, section
from llmshearing.dynamic_loading.config import DataLoadingConfig
from llmshearing.models.teacher import DistillationConfig
from llmshearing.pruning.targets import L0Config


@dataclass(kw_only=True)
class ModelSettings(Section):
    """``model``: the source checkpoint and how it is read; pruning and distillation when set."""

    path: str | None = optional()  # required, with its own message (validate_config)
    allow_new_source: bool = False  # a resumed run may take another model.path / source dtype
    init_device: str = "cpu"  # cpu (every rank reads the source) or mixed (rank 0 reads it; FSDP broadcasts)
    attn_impl: str = "auto"
    l0_module: L0Config | None = parsed()  # its keys checked by L0Config itself
    distillation: DistillationConfig | None = parsed(
        schema=dict.fromkeys(f.name for f in dataclasses.fields(DistillationConfig))
    )


@dataclass(kw_only=True)
class OptimizerSettings(Section):
    name: str = "decoupled_adamw"
    lr: float = 1e-4
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0


@dataclass(kw_only=True)
class SchedulerSettings(Section):
    name: str = "cosine_with_warmup"
    t_warmup: str = "0ba"
    alpha_f: float = 0.1
    t_max: str | None = optional()  # null: the whole run (1dur)


@dataclass(kw_only=True)
class AlgorithmSettings(Section):
    gradient_clipping: dict[str, Any] | None = optional(
        schema={"clipping_type": None, "clipping_threshold": None}
    )


@dataclass(kw_only=True)
class CallbackSettings(Section):
    """``callbacks``: each one the recipe names is on (its settings: the keyword arguments of its class)."""

    data_loading: DataLoadingConfig | None = parsed(omit=True)  # its keys checked by DataLoadingConfig itself
    speed_monitor: dict[str, Any] | bool | None = optional()
    lr_monitor: dict[str, Any] | bool | None = optional()
    memory_monitor: dict[str, Any] | bool | None = optional()
    runtime_estimator: dict[str, Any] | bool | None = optional()
    optimizer_monitor: dict[str, Any] | bool | None = optional()
    sample_log: dict[str, Any] | bool | None = (
        optional()
    )  # record the sample ids of every batch (audits resumption)


@dataclass(kw_only=True)
class LoggerSettings(Section):
    """``loggers``: metrics.jsonl is always written (report, demo and resume read it): it has no key here."""

    file: dict[str, Any] | bool | None = optional()
    wandb: dict[str, Any] | bool | None = optional()
    mlflow: dict[str, Any] | bool | None = optional()
    tensorboard: dict[str, Any] | bool | None = optional()


@dataclass(kw_only=True)
class RunConfig(Section):
    """A training run: every key of a recipe (``yamls/``), with its default where it has one."""

    variables: Any = optional()  # free-form: values for the recipe's interpolations
    run_name: str = "llmshearing"
    seed: int = 17
    data_local: str
    max_seq_len: int
    data_remote: str | None = None
    model: ModelSettings = section(ModelSettings)
    train_loader: dict[str, Any] | None = optional()  # checked by llmshearing.data.loaders
    eval_loader: dict[str, Any] | None = optional()
    optimizer: OptimizerSettings = section(OptimizerSettings)
    scheduler: SchedulerSettings = section(SchedulerSettings)
    algorithms: AlgorithmSettings = section(AlgorithmSettings)
    callbacks: CallbackSettings = section(CallbackSettings)
    loggers: LoggerSettings = section(LoggerSettings)
    max_duration: str
    eval_interval: str
    eval_first: bool = False
    eval_subset_num_batches: int = -1
    eval_tasks: Any = (
        None  # downstream tasks through lm-eval at eval intervals: llmshearing.callbacks.eval_tasks
    )
    global_train_batch_size: int
    device_train_microbatch_size: int | str = 1
    device_eval_batch_size: int = 8
    precision: str = "amp_bf16"
    fsdp_config: dict[str, Any] | None = None
    compile_config: dict[str, Any] | None = (
        None  # torch.compile keyword arguments ({} for the defaults); null: eager
    )
    save_folder: str = "runs/{run_name}"
    save_interval: str = "1000ba"
    save_num_checkpoints_to_keep: int = -1
    save_overwrite: bool = False
    save_weights_only: bool = False
    autoresume: bool = False
    load_path: str | None = None
    load_weights_only: bool = False
    progress_bar: bool = True
    log_to_console: bool = False
    console_log_interval: str = "1ba"
    python_log_level: str | None = None
    dist_timeout: float = 1800.0
    device: str | None = None

    def resolved_save_folder(self) -> str:
        """``save_folder`` with ``{run_name}`` filled in."""
        return self.save_folder.format(run_name=self.run_name)


SCHEMA: dict[str, Any] = schema_of(RunConfig)  # the keys a recipe may set (None: free-form below)
DEFAULTS: dict[str, Any] = defaults_of(RunConfig)
REQUIRED: tuple[str, ...] = required_of(RunConfig)
