"""The train loader of a dynamic mix: ``callbacks.data_loading`` handed to ``llmshearing.data`` as plain values.

The config gives the domains and their initial proportions; its update interval, resolved against
``eval_interval`` and the global batch, is the length of one dataset epoch. The callback reaches the
dataset as ``spec.dataloader.dataset`` and changes its mix at every interval boundary.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llmshearing.data import loaders
from llmshearing.dynamic_loading.config import KEY, DataLoadingConfig, resolve_update_interval


def build_train_dataloader(
    loader_cfg: Mapping[str, Any],
    data_loading: Mapping[str, Any] | DataLoadingConfig,
    *,
    device_batch_size: int,
    eval_interval: int | str | None = None,
    where: str = "train_loader",
) -> Any:
    """A ``DataSpec`` over a ``DynamicStreamingDataset`` whose epoch is one update interval of ``data_loading``.

    ``data_loading`` is a validated :class:`DataLoadingConfig` (taken as it is) or the section as a
    mapping (parsed here).
    """
    from composer.utils import dist

    config = (
        data_loading
        if isinstance(data_loading, DataLoadingConfig)
        else DataLoadingConfig.from_dict(data_loading)
    )
    loaders.check_device_batch_size(device_batch_size)
    interval = resolve_update_interval(config, eval_interval, device_batch_size * dist.get_world_size())
    return loaders.build_train_dataloader(
        loader_cfg,
        config.set_names,
        config.proportion,
        interval_batches=interval,
        device_batch_size=device_batch_size,
        where=where,
        names_key=f"{KEY}.set_names",
    )
