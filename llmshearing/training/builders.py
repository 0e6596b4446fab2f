"""Build the pieces of a Composer run from a validated training config (a plain dict)."""

from __future__ import annotations

import json
import os
from typing import Any

from composer.core import Algorithm, Callback
from composer.loggers import LoggerDestination

from llmshearing.models.composer_model import ComposerLlama
from llmshearing.staging import write_text_atomic

SCHEDULERS = ("cosine_with_warmup", "linear_with_warmup", "constant_with_warmup")


def build_model(values: dict[str, Any], domains: list[str]) -> tuple[ComposerLlama, dict[str, Any]]:
    """The ComposerLlama initialised from ``model.path``; attaches the L0 module when pruning.

    Returns the model and the run description written to ``<save_folder>/config.json``.
    """
    from llmshearing.convert.checkpoint import load_checkpoint

    model_cfg = values["model"]
    config, state_dict, hf_config = load_checkpoint(model_cfg["path"], drop_l0=True)
    config = config.replace(
        attn_impl=model_cfg["attn_impl"], max_seq_len=max(config.max_seq_len, values["max_seq_len"])
    )
    model = ComposerLlama(config, domains=domains, init_device="meta")  # no random init: weights come next
    model.model.load_state_dict(state_dict, strict=True, assign=True)
    description = {"model": config.to_dict(), "hf_config": hf_config, "l0_module": None, "train": values}
    if model_cfg.get("l0_module"):
        from llmshearing.pruning import attach_l0_module

        l0 = attach_l0_module(model, model_cfg["l0_module"])
        description["l0_module"] = l0.l0_config.to_dict()
        if l0.l0_config.init_from is not None:  # log-alphas ranked by activation importance of the source
            from llmshearing.pruning.oneshot import initialize_from_importance

            initialize_from_importance(
                l0, model.model, values["data_local"], values["device_eval_batch_size"]
            )
    return model, description


def write_run_description(save_folder: str, description: dict[str, Any]) -> str:
    """Write ``config.json`` into the run folder (temp file + rename); prune-model and export read it."""
    path = os.path.join(save_folder, "config.json")
    write_text_atomic(path, json.dumps(description, indent=2, default=str))
    return path


def build_optimizer(values: dict[str, Any], model: ComposerLlama):
    from composer.optim import DecoupledAdamW

    opt = values["optimizer"]
    if opt["name"] != "decoupled_adamw":
        raise ValueError(f"optimizer.name {opt['name']!r} is not supported; use decoupled_adamw")
    if model.l0_module is not None:
        from llmshearing.pruning import l0_param_groups

        l0 = model.l0_module.l0_config
        groups = l0_param_groups(model, opt["lr"], l0.mask_lr, l0.multiplier_lr)
    else:
        groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
    return DecoupledAdamW(
        groups, lr=opt["lr"], betas=tuple(opt["betas"]), eps=opt["eps"], weight_decay=opt["weight_decay"]
    )


def build_scheduler(values: dict[str, Any]):
    from composer.optim import (
        ConstantWithWarmupScheduler,
        CosineAnnealingWithWarmupScheduler,
        LinearWithWarmupScheduler,
    )

    sched = dict(values["scheduler"])
    name = sched.pop("name")
    if name == "cosine_with_warmup":
        return CosineAnnealingWithWarmupScheduler(
            t_warmup=sched["t_warmup"], alpha_f=sched.get("alpha_f", 0.0)
        )
    if name == "linear_with_warmup":
        return LinearWithWarmupScheduler(t_warmup=sched["t_warmup"], alpha_f=sched.get("alpha_f", 0.0))
    if name == "constant_with_warmup":
        return ConstantWithWarmupScheduler(t_warmup=sched["t_warmup"])
    raise ValueError(f"scheduler.name {name!r} is not supported; use one of {SCHEDULERS}")


def build_algorithms(values: dict[str, Any], save_folder: str) -> list[Algorithm]:
    algorithms: list[Algorithm] = []
    clipping = values["algorithms"].get("gradient_clipping")
    if clipping:
        from composer.algorithms import GradientClipping

        algorithms.append(
            GradientClipping(
                clipping_type=clipping.get("clipping_type", "norm"),
                clipping_threshold=float(clipping.get("clipping_threshold", 1.0)),
            )
        )
    if values["model"].get("l0_module"):
        from llmshearing.pruning import L0Pruning

        algorithms.append(L0Pruning(values["model"]["l0_module"], save_folder=save_folder))
    return algorithms


def build_callbacks(values: dict[str, Any], save_folder: str) -> list[Callback]:
    from composer.callbacks import LRMonitor, MemoryMonitor, OptimizerMonitor, RuntimeEstimator, SpeedMonitor

    from llmshearing.callbacks.sample_log import SampleLog

    known = {
        "speed_monitor": SpeedMonitor,
        "lr_monitor": LRMonitor,
        "memory_monitor": MemoryMonitor,
        "runtime_estimator": RuntimeEstimator,
        "optimizer_monitor": OptimizerMonitor,
    }
    callbacks: list[Callback] = []
    for name, kwargs in values["callbacks"].items():
        if name == "data_loading" or kwargs is False:
            continue
        if name == "sample_log":
            callbacks.append(SampleLog(**{"folder": save_folder, **(kwargs or {})}))
            continue
        callbacks.append(known[name](**(kwargs or {})))
    return callbacks


def build_loggers(values: dict[str, Any], save_folder: str) -> list[LoggerDestination]:
    from composer.loggers import FileLogger

    from llmshearing.training.metrics_log import MetricsJSONLLogger

    loggers: list[LoggerDestination] = [MetricsJSONLLogger(save_folder)]
    for name, kwargs in values["loggers"].items():
        kwargs = dict(kwargs or {})
        if name == "file":
            kwargs.setdefault("filename", os.path.join(save_folder, "logs.txt"))
            loggers.append(FileLogger(**kwargs))
        elif name == "wandb":
            from composer.loggers import WandBLogger

            loggers.append(WandBLogger(**kwargs))
        elif name == "mlflow":
            from composer.loggers import MLFlowLogger

            loggers.append(MLFlowLogger(**kwargs))
        elif name == "tensorboard":
            from composer.loggers import TensorboardLogger

            loggers.append(TensorboardLogger(**kwargs))
    return loggers
