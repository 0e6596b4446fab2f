"""The callbacks and loggers a recipe turns on by name (``callbacks.<name>``, ``loggers.<name>``).

Their settings are the keyword arguments of each class: validation checks them against the signature
(:mod:`llmshearing.training.value_checks`) and the builders make them (:mod:`llmshearing.training.builders`).
"""

from __future__ import annotations


def callback_classes() -> dict[str, type]:
    """The callbacks a recipe turns on under ``callbacks.<name>`` (their settings are the keyword
    arguments of the class)."""
    from composer.callbacks import LRMonitor, MemoryMonitor, OptimizerMonitor, RuntimeEstimator, SpeedMonitor

    from llmshearing.callbacks.sample_log import SampleLog

    return {
        "speed_monitor": SpeedMonitor,
        "lr_monitor": LRMonitor,
        "memory_monitor": MemoryMonitor,
        "runtime_estimator": RuntimeEstimator,
        "optimizer_monitor": OptimizerMonitor,
        "sample_log": SampleLog,
    }


def logger_classes() -> dict[str, type]:
    """The loggers a recipe turns on under ``loggers.<name>`` (settings: the class's keyword arguments)."""
    from composer.loggers import FileLogger, MLFlowLogger, TensorboardLogger, WandBLogger

    return {
        "file": FileLogger,
        "wandb": WandBLogger,
        "mlflow": MLFlowLogger,
        "tensorboard": TensorboardLogger,
    }
