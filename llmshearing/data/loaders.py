"""Composer-ready train and eval data loaders built from plain (YAML) config dicts, with validation.

Data layout (written by ``llmshearing prepare-data``; see ``llmshearing.data.layout``):
``<root>/train/<domain>/`` and ``<root>/eval/<domain>/`` MDS directories with a ``tokens`` column,
and ``<root>/manifest.json`` (checked when the root is local). ``dataset.local`` is that root, or
with ``dataset.remote`` the local cache of the remote root.

Train loader config (``train_loader``)::

    name: text                      # optional
    dataset: {local, remote, split: train, shuffle: true, shuffle_seed, max_seq_len,
              shuffle_algo, shuffle_block_size, num_canonical_nodes, partition_algo,
              predownload, cache_limit, download_retry, download_timeout, validate_hash, keep_zip}
    drop_last, num_workers, prefetch_factor, persistent_workers, pin_memory, timeout

Eval loader config (``eval_loader``): the same, with ``split: eval`` and ``samples_per_domain``
instead of the shuffling and partitioning keys.

The loaders take plain values: the domain names, their proportions and the number of batches in
one dataset epoch (one update interval of the mix). ``llmshearing.dynamic_loading.loader`` builds
the train loader from a recipe's ``callbacks.data_loading``; in a training script::

    train = build_train_dataloader(
        cfg["train_loader"], set_names, proportion, interval_batches=50, device_batch_size=b
    )
    evaluation = build_eval_dataloader(cfg["eval_loader"], set_names, device_batch_size=e)
    model = ComposerLlama(config, domains=set_names)
    evaluator = Evaluator(label="eval", dataloader=evaluation, metric_names=list(model.eval_metrics))

``names_key`` names where the domain names come from in the messages about missing domains.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from llmshearing.config_base import refuse_unknown_keys
from llmshearing.data.checks import check_shards
from llmshearing.data.layout import (
    INDEX_NAME,
    available_splits,
    domain_dir,
    manifest_path,
    missing_split_message,
    read_manifest,
)

_COMMON_DATASET_KEYS = {
    "local": None,
    "remote": None,
    "split": None,
    "max_seq_len": None,
    "download_retry": 2,
    "download_timeout": 60,
    "validate_hash": None,
    "keep_zip": False,
}
_TRAIN_DATASET_KEYS = {
    **_COMMON_DATASET_KEYS,
    "split": "train",
    "shuffle": True,
    "shuffle_seed": 9176,
    "shuffle_algo": "py1e",
    "shuffle_block_size": None,
    "num_canonical_nodes": None,
    "partition_algo": "relaxed",
    "predownload": None,
    "cache_limit": None,
}
_EVAL_DATASET_KEYS = {**_COMMON_DATASET_KEYS, "split": "eval", "samples_per_domain": None}
_LOADER_KEYS = {
    "name": "text",
    "dataset": None,
    "drop_last": True,
    "num_workers": 0,
    "prefetch_factor": None,
    "persistent_workers": False,
    "pin_memory": False,
    "timeout": 0,
}


def check_data(
    local: str | None,
    remote: str | None,
    split: str,
    set_names: Sequence[str],
    max_seq_len: int | None,
    where: str,
    names_key: str = "set_names",
) -> None:
    """Fail early, naming the domain and the fix, when the data does not match the config."""
    if not local:
        raise ValueError(
            f"{where}.dataset.local is required (the MDS root, or the local cache of the remote root)"
        )
    manifest = read_manifest(local)
    if manifest is not None:
        path = manifest_path(local)
        domains = manifest.get("domains", [])
        missing = [d for d in set_names if d not in domains]
        if missing:
            raise ValueError(
                f"domains {missing} of {names_key} are missing from the data ({path} lists {domains}): "
                "fix set_names or prepare those domains"
            )
        split_stats = manifest.get("splits", {}).get(split)
        if split_stats is not None:
            empty = [d for d in set_names if int(split_stats.get(d, {}).get("samples", 1)) <= 0]
            if empty and split not in available_splits(local):
                raise ValueError(
                    f"{_local_key(where)}: {missing_split_message(local, split, 'set data_local=DIR')}"
                )
            if empty:
                raise ValueError(
                    f"domains {empty} have no {split} samples in {path}: prepare more text for them"
                )
        seq_len = manifest.get("seq_len")
        if max_seq_len is not None and seq_len is not None and max_seq_len > int(seq_len):
            raise ValueError(
                f"{where}.dataset.max_seq_len = {max_seq_len} exceeds the data's seq_len {seq_len} ({path}): "
                "lower max_seq_len or prepare the data with a longer --seq-len"
            )
    if remote is None:
        if not split_domains_present(local, split):
            raise ValueError(
                f"{_local_key(where)}: {missing_split_message(local, split, 'set data_local=DIR')}"
            )
        for name in set_names:
            index = os.path.join(domain_dir(local, split, name), INDEX_NAME)
            if not os.path.isfile(index):
                raise ValueError(
                    f"domain {name!r} is missing from the data: no {index}; "
                    f"fix {names_key} or point {_local_key(where)} at the prepared MDS root"
                )
            check_shards(domain_dir(local, split, name))


def _local_key(where: str) -> str:
    """The keys that name a loader's data root: ``data_local``, unless the loader sets its own."""
    return f"data_local ({where}.dataset.local)"


def split_domains_present(local: str, split: str) -> bool:
    """``<local>/<split>`` holds at least one domain's MDS index."""
    directory = os.path.join(local, split)
    return os.path.isdir(directory) and any(
        os.path.isfile(os.path.join(directory, d, INDEX_NAME)) for d in os.listdir(directory)
    )


def _streams(local: str, remote: str | None, split: str, set_names: Sequence[str]) -> list[Any]:
    from streaming import Stream

    return [
        Stream(
            local=domain_dir(local, split, name),
            remote=None if remote is None else domain_dir(remote, split, name),
        )
        for name in set_names
    ]


def _loader_kwargs(cfg: Mapping[str, Any], where: str) -> dict[str, Any]:
    merged = {**_LOADER_KEYS, **{k: v for k, v in cfg.items() if k != "dataset"}}
    if merged["name"] != "text":
        raise ValueError(f"{where}.name must be 'text' (token MDS data), got {merged['name']!r}")
    workers = int(merged["num_workers"])
    if workers < 0:
        raise ValueError(f"{where}.num_workers must be >= 0, got {workers}")
    kwargs = {
        "num_workers": workers,
        "pin_memory": bool(merged["pin_memory"]),
        "timeout": float(merged["timeout"]),
        "drop_last": bool(merged["drop_last"]),
    }
    if workers > 0:
        kwargs["persistent_workers"] = bool(merged["persistent_workers"])
        if merged["prefetch_factor"] is not None:
            kwargs["prefetch_factor"] = int(merged["prefetch_factor"])
    return kwargs


def _dataset_cfg(loader_cfg: Mapping[str, Any], defaults: Mapping[str, Any], where: str) -> dict[str, Any]:
    if not isinstance(loader_cfg, Mapping):
        raise ValueError(f"{where} must be a mapping, got {type(loader_cfg).__name__}")
    refuse_unknown_keys(loader_cfg, _LOADER_KEYS, where)
    ds = loader_cfg.get("dataset")
    if not isinstance(ds, Mapping):
        raise ValueError(f"{where}.dataset is required: a mapping with at least `local` (the MDS root)")
    if "is_uint16" in ds:
        raise ValueError(
            f"{where}.dataset.is_uint16 is not needed (the token dtype is read from the data): remove it"
        )
    refuse_unknown_keys(ds, defaults, f"{where}.dataset")
    return {**defaults, **{k: v for k, v in ds.items() if v is not None}}


def check_loader_config(
    loader_cfg: Mapping[str, Any],
    set_names: Sequence[str],
    *,
    train: bool,
    where: str,
    names_key: str = "set_names",
    check_paths: bool = True,
) -> None:
    """What building the loader checks before anything is imported: its keys and (``check_paths``) the
    data's domains, splits, shards and sequence length against ``set_names``; a ``ValueError`` naming the key."""
    ds = _dataset_cfg(loader_cfg, _TRAIN_DATASET_KEYS if train else _EVAL_DATASET_KEYS, where)
    if check_paths:
        check_data(
            ds["local"], ds["remote"], ds["split"], list(set_names), ds["max_seq_len"], where, names_key
        )


def _num_tokens(batch: Mapping[str, Any]) -> int:
    return int(batch["input_ids"].numel())


def check_device_batch_size(device_batch_size: Any) -> int:
    """A positive integer number of samples per device and batch."""
    if not isinstance(device_batch_size, int) or device_batch_size <= 0:
        raise ValueError(f"device batch size must be a positive integer, got {device_batch_size!r}")
    return device_batch_size


def build_train_dataloader(
    loader_cfg: Mapping[str, Any],
    set_names: Sequence[str],
    proportion: Sequence[float],
    *,
    interval_batches: int,
    device_batch_size: int,
    where: str = "train_loader",
    names_key: str = "set_names",
) -> Any:
    """A ``DataSpec`` over a ``DynamicStreamingDataset`` (reach it as ``spec.dataloader.dataset``).

    ``proportion`` is the initial mix of ``set_names``; one dataset epoch is ``interval_batches``
    global batches (the interval at which a mix may change).
    """
    from composer.core import DataSpec

    from llmshearing.data.dynamic_dataset import DynamicStreamingDataset, SampleDataLoader

    check_device_batch_size(device_batch_size)
    set_names = list(set_names)
    ds = _dataset_cfg(loader_cfg, _TRAIN_DATASET_KEYS, where)
    check_data(ds["local"], ds["remote"], ds["split"], set_names, ds["max_seq_len"], where, names_key)
    dataset = DynamicStreamingDataset(
        streams=_streams(ds["local"], ds["remote"], ds["split"], set_names),
        set_names=set_names,
        proportion=list(proportion),
        interval_batches=interval_batches,
        batch_size=device_batch_size,
        max_seq_len=ds["max_seq_len"],
        shuffle=bool(ds["shuffle"]),
        shuffle_seed=int(ds["shuffle_seed"]),
        shuffle_algo=ds["shuffle_algo"],
        shuffle_block_size=ds["shuffle_block_size"],
        num_canonical_nodes=ds["num_canonical_nodes"],
        partition_algo=ds["partition_algo"],
        predownload=ds["predownload"],
        cache_limit=ds["cache_limit"],
        download_retry=int(ds["download_retry"]),
        download_timeout=float(ds["download_timeout"]),
        validate_hash=ds["validate_hash"],
        keep_zip=bool(ds["keep_zip"]),
    )
    loader = SampleDataLoader(dataset, batch_size=device_batch_size, **_loader_kwargs(loader_cfg, where))
    return DataSpec(loader, get_num_tokens_in_batch=_num_tokens)


def _check_subset_covers_domains(dataset: Any, batches: int, device_batch_size: int, world_size: int) -> None:
    """Each rank evaluates ``batches`` batches of a non-shuffled, rank-strided set: the first
    ``batches * device_batch_size * world_size`` samples; they must include every domain."""
    evaluated = batches * device_batch_size * world_size
    needed = dataset.prefix_covering()
    if evaluated >= needed:
        return
    present = set(dataset.domains_in_prefix(evaluated))
    missing = [name for name in dataset.set_names if name not in present]
    enough = -(-needed // (device_batch_size * world_size))
    raise ValueError(
        f"eval_subset_num_batches={batches} evaluates the first {evaluated} eval samples, which hold none of "
        f"domains {missing}: they would get no eval loss (for the logs or the dynamic mix); set "
        f"eval_subset_num_batches={enough} or more, or -1 for the whole eval set"
    )


def build_eval_dataloader(
    loader_cfg: Mapping[str, Any],
    set_names: Sequence[str],
    *,
    device_batch_size: int,
    subset_num_batches: int = -1,
    where: str = "eval_loader",
    names_key: str = "set_names",
) -> Any:
    """A ``DataSpec`` over a ``DomainEvalDataset`` with a non-shuffling ``DistributedSampler``.

    ``subset_num_batches`` (the run's ``eval_subset_num_batches``; -1: all) must reach every domain:
    a domain left out of the evaluated prefix would have no eval loss for the mix or the logs.
    """
    from composer.core import DataSpec
    from composer.utils import dist

    from llmshearing.data.dynamic_dataset import SampleDataLoader
    from llmshearing.data.eval_dataset import DomainEvalDataset

    check_device_batch_size(device_batch_size)
    ds = _dataset_cfg(loader_cfg, _EVAL_DATASET_KEYS, where)
    check_data(ds["local"], ds["remote"], ds["split"], list(set_names), ds["max_seq_len"], where, names_key)
    dataset = DomainEvalDataset(
        streams=_streams(ds["local"], ds["remote"], ds["split"], list(set_names)),
        set_names=list(set_names),
        max_seq_len=ds["max_seq_len"],
        samples_per_domain=ds["samples_per_domain"],
        download_retry=int(ds["download_retry"]),
        download_timeout=float(ds["download_timeout"]),
        validate_hash=ds["validate_hash"],
        keep_zip=bool(ds["keep_zip"]),
    )
    if subset_num_batches > 0:
        _check_subset_covers_domains(dataset, subset_num_batches, device_batch_size, dist.get_world_size())
    kwargs = _loader_kwargs(loader_cfg, where)
    kwargs["drop_last"] = False  # Composer removes the sampler's padding only without drop_last
    sampler = dist.get_sampler(dataset, drop_last=False, shuffle=False)
    loader = SampleDataLoader(dataset, batch_size=device_batch_size, sampler=sampler, **kwargs)
    return DataSpec(loader, get_num_tokens_in_batch=_num_tokens)
