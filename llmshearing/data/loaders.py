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

Data mixing config (``callbacks.data_loading``): see ``DataLoadingConfig``.

In a training script::

    dl = DataLoadingConfig.from_dict(cfg["callbacks"]["data_loading"])
    train = build_train_dataloader(cfg["train_loader"], dl, device_batch_size=b, eval_interval=cfg["eval_interval"])
    evaluation = build_eval_dataloader(cfg["eval_loader"], dl.set_names, device_batch_size=e)
    model = ComposerLlama(config, domains=dl.set_names)
    evaluator = Evaluator(label="eval", dataloader=evaluation, metric_names=list(model.eval_metrics))
    callback = DynamicLoadingCallback.from_config(dl)  # None unless dynamic: true
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from llmshearing.data.checks import check_shards
from llmshearing.data.layout import (
    INDEX_NAME,
    available_splits,
    domain_dir,
    manifest_path,
    missing_split_message,
    read_manifest,
)
from llmshearing.data.mixing import EXCESS_TYPES, UPDATE_TYPES, validate_proportions

LOSS_SOURCES = ("eval", "train")
_DL = "callbacks.data_loading"

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


def _check_keys(cfg: Mapping[str, Any], known: Mapping[str, Any] | set[str], where: str) -> None:
    unknown = sorted(set(cfg) - set(known))
    if unknown:
        raise ValueError(f"unknown keys {unknown} in {where}; valid keys are {sorted(known)}")


@dataclass
class DataLoadingConfig:
    """``callbacks.data_loading``: the domains, their initial mix and how it is updated (every key, its
    default and the update rule: ``llmshearing/callbacks/dynamic_loading/README.md``).

    Upstream keys: ``dynamic``, ``set_names``, ``proportion``, ``update_type``, ``target_loss``.
    Added: ``reference`` (``source``, a preset name such as ``sheared-1.3b``, or
    ``{sizes, losses, target_size}`` for a scaling-law fit), ``clip``, ``eta``, ``smoothing``,
    ``loss_source`` (``eval`` or ``train``), ``update_interval`` (batches as ``50`` or ``"50ba"``,
    or samples as ``"1600sp"``; default: ``eval_interval``), ``eval_label``.
    Stabilisers: ``loss_ema`` (decay in [0, 1) of an exponential moving average of the per-domain
    losses; 0 = off), ``min_proportion`` (in [0, 1): each domain keeps at least this fraction of its
    initial proportion, i.e. a floor relative to ``proportion``; default 0.5, chosen on the quality
    benchmark's eval split; 0 is the paper's rule), ``floor_proportion`` (the mix the floor is a fraction
    of, default ``proportion``: a continued run that starts from the pruning run's final mix gives the
    pruning run's initial mix here, so the floor does not halve again in every stage),
    ``update_warmup`` (batches before the first update, as ``50`` or ``"50ba"``),
    ``excess`` (``absolute``: ``loss - ref``; ``relative``: ``(loss - ref) / ref``).
    """

    set_names: list[str]
    proportion: list[float] | None = None
    dynamic: bool = False
    update_type: str = "doremi"
    target_loss: list[float] | None = None
    reference: Any = None
    clip: bool = True
    eta: float = 1.0
    smoothing: float = 1e-4
    loss_source: str = "eval"
    update_interval: int | str | None = None
    eval_label: str = "eval"
    loss_ema: float = 0.0
    min_proportion: float = 0.5
    floor_proportion: list[float] | None = None
    update_warmup: int | str = 0
    excess: str = "absolute"

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> DataLoadingConfig:
        known = {f.name for f in fields(cls)}
        if not isinstance(cfg, Mapping):
            raise ValueError(f"{_DL} must be a mapping, got {type(cfg).__name__}")
        _check_keys(cfg, known, _DL)
        if cfg.get("set_names") is None:
            raise ValueError(f"{_DL}.set_names is required: list the domain names (the MDS sub-directories)")
        values = {k: v for k, v in cfg.items() if v is not None or k in ("target_loss", "reference")}
        out = cls(**values)
        out.validate()
        return out

    def validate(self) -> None:
        names = self.set_names
        if isinstance(names, str) or not isinstance(names, Sequence) or not names:
            raise ValueError(f"{_DL}.set_names must be a non-empty list of domain names, got {names!r}")
        names = [str(n) for n in names]
        if len(set(names)) != len(names):
            raise ValueError(f"{_DL}.set_names has duplicates: {names}")
        self.set_names = names
        if self.proportion is None:
            raise ValueError(
                f"{_DL}.proportion is required: one initial weight per domain in set_names, summing to 1"
            )
        validate_proportions(self.proportion, names, key=f"{_DL}.proportion")
        self.proportion = [float(p) for p in self.proportion]
        if self.update_type not in UPDATE_TYPES:
            raise ValueError(
                f"{_DL}.update_type must be one of {list(UPDATE_TYPES)}, got {self.update_type!r}"
            )
        if self.loss_source not in LOSS_SOURCES:
            raise ValueError(
                f"{_DL}.loss_source must be one of {list(LOSS_SOURCES)}, got {self.loss_source!r}"
            )
        if self.target_loss is not None:
            if self.reference is not None:
                raise ValueError(f"give either {_DL}.target_loss or {_DL}.reference, not both")
            if isinstance(self.target_loss, str) or len(self.target_loss) != len(names):
                raise ValueError(
                    f"{_DL}.target_loss must hold one loss per domain ({len(names)} for {names}), "
                    f"got {self.target_loss!r}"
                )
            self.target_loss = [float(v) for v in self.target_loss]
        if (
            self.dynamic
            and self.update_type == "doremi"
            and self.target_loss is None
            and self.reference is None
        ):
            raise ValueError(
                f"{_DL}.update_type doremi needs reference losses: set {_DL}.target_loss (one per domain) "
                f"or {_DL}.reference (source, a preset such as sheared-1.3b, or a scaling-law fit)"
            )
        if not (_is_number(self.eta) and self.eta >= 0 and math.isfinite(self.eta)):
            raise ValueError(
                f"{_DL}.eta must be a non-negative number (the step size; 1.0 in the paper), got {self.eta!r}"
            )
        if not (_is_number(self.smoothing) and 0 <= self.smoothing < 1):
            raise ValueError(f"{_DL}.smoothing must be in [0, 1), got {self.smoothing!r}")
        if not (_is_number(self.loss_ema) and 0 <= self.loss_ema < 1):
            raise ValueError(
                f"{_DL}.loss_ema must be a decay in [0, 1) (0 turns the moving average off, 0.5 halves the "
                f"weight of older losses each update), got {self.loss_ema!r}"
            )
        if not (_is_number(self.min_proportion) and 0 <= self.min_proportion < 1):
            raise ValueError(
                f"{_DL}.min_proportion must be in [0, 1): the fraction of its initial proportion each domain "
                f"keeps at least (0 = no floor), got {self.min_proportion!r}"
            )
        if self.floor_proportion is not None:
            validate_proportions(self.floor_proportion, names, key=f"{_DL}.floor_proportion")
            self.floor_proportion = [float(p) for p in self.floor_proportion]
        self.update_warmup = warmup_batches(self.update_warmup)
        if self.excess not in EXCESS_TYPES:
            raise ValueError(f"{_DL}.excess must be one of {list(EXCESS_TYPES)}, got {self.excess!r}")

    @property
    def floors(self) -> list[float] | None:
        """Lower bound of each domain's proportion (``min_proportion`` times its ``floor_proportion``,
        by default its initial proportion), or None."""
        if not self.min_proportion:
            return None
        anchor = self.proportion if self.floor_proportion is None else self.floor_proportion
        return [self.min_proportion * p for p in anchor]  # type: ignore[union-attr]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def warmup_batches(value: Any) -> int:
    """``update_warmup`` as a number of batches (``50`` or ``"50ba"``)."""
    text = str(value).strip().lower()
    digits = text[:-2] if text.endswith("ba") else text
    if isinstance(value, bool) or not digits.isdigit():
        raise ValueError(
            f"{_DL}.update_warmup must be a number of batches >= 0 (e.g. 100 or '100ba'), got {value!r}"
        )
    return int(digits)


def interval_in_batches(interval: int | str, global_batch_size: int, key: str) -> int:
    """An update interval given as batches (``50``, ``"50ba"``) or samples (``"1600sp"``) in batches."""
    text = str(interval).strip().lower()
    try:
        if text.endswith("ba"):
            batches = int(text[:-2])
        elif text.endswith("sp"):
            samples = int(text[:-2])
            if samples % global_batch_size:
                raise ValueError(
                    f"{key} = {interval} is not a whole number of global batches of {global_batch_size} "
                    "samples: choose a multiple of the global batch size"
                )
            batches = samples // global_batch_size
        else:
            batches = int(text)
    except ValueError as err:
        if "global batch" in str(err):
            raise
        raise ValueError(
            f"{key} = {interval!r} is not an interval in batches (50, '50ba') or samples ('1600sp'); "
            "epochs are not allowed (one dataset epoch is one update interval)"
        ) from None
    if batches <= 0:
        raise ValueError(f"{key} must be positive, got {interval!r}")
    return batches


def resolve_update_interval(
    data_loading: DataLoadingConfig, eval_interval: int | str | None, global_batch_size: int
) -> int:
    """The update interval in batches, checked against ``eval_interval``.

    ``eval_interval`` must be the update interval itself or ``1ep`` (one dataset epoch is one
    interval); with ``loss_source: train`` any ``eval_interval`` is allowed.
    """
    if isinstance(eval_interval, int):  # Composer reads a bare integer as epochs
        eval_interval = f"{eval_interval}ep"
    eval_text = None if eval_interval is None else str(eval_interval).strip().lower()
    eval_is_epoch = eval_text == "1ep"
    if data_loading.update_interval is not None:
        batches = interval_in_batches(
            data_loading.update_interval, global_batch_size, f"{_DL}.update_interval"
        )
    elif eval_text is not None and not eval_text.endswith("ep"):
        batches = interval_in_batches(eval_interval, global_batch_size, "eval_interval")
    else:
        raise ValueError(
            f"the update interval is unknown: set {_DL}.update_interval (e.g. 50ba) or eval_interval in batches"
        )
    needs_eval = data_loading.dynamic and data_loading.loss_source == "eval"
    if needs_eval and eval_text is not None and not eval_is_epoch:
        eval_batches = (
            None
            if eval_text.endswith("ep")
            else interval_in_batches(eval_interval, global_batch_size, "eval_interval")
        )
        if eval_batches != batches:
            raise ValueError(
                f"eval_interval ({eval_interval}) must equal {_DL}.update_interval ({batches}ba) or be 1ep: "
                "the mix is updated from the evaluation at the end of each interval"
            )
    return batches


def check_data(
    local: str | None,
    remote: str | None,
    split: str,
    set_names: Sequence[str],
    max_seq_len: int | None,
    where: str,
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
                f"domains {missing} of {_DL}.set_names are missing from the data ({path} lists {domains}): "
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
                    f"fix {_DL}.set_names or point {_local_key(where)} at the prepared MDS root"
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
    _check_keys(loader_cfg, _LOADER_KEYS, where)
    ds = loader_cfg.get("dataset")
    if not isinstance(ds, Mapping):
        raise ValueError(f"{where}.dataset is required: a mapping with at least `local` (the MDS root)")
    if "is_uint16" in ds:
        raise ValueError(
            f"{where}.dataset.is_uint16 is not needed (the token dtype is read from the data): remove it"
        )
    _check_keys(ds, defaults, f"{where}.dataset")
    return {**defaults, **{k: v for k, v in ds.items() if v is not None}}


def _num_tokens(batch: Mapping[str, Any]) -> int:
    return int(batch["input_ids"].numel())


def build_train_dataloader(
    loader_cfg: Mapping[str, Any],
    data_loading: Mapping[str, Any] | DataLoadingConfig,
    *,
    device_batch_size: int,
    eval_interval: int | str | None = None,
    where: str = "train_loader",
) -> Any:
    """A ``DataSpec`` over a ``DynamicStreamingDataset`` (reach it as ``spec.dataloader.dataset``)."""
    from composer.core import DataSpec
    from composer.utils import dist

    from llmshearing.data.dynamic_dataset import DynamicStreamingDataset, SampleDataLoader

    dl = (
        data_loading
        if isinstance(data_loading, DataLoadingConfig)
        else DataLoadingConfig.from_dict(data_loading)
    )
    dl.validate()
    if not isinstance(device_batch_size, int) or device_batch_size <= 0:
        raise ValueError(f"device batch size must be a positive integer, got {device_batch_size!r}")
    ds = _dataset_cfg(loader_cfg, _TRAIN_DATASET_KEYS, where)
    global_batch = device_batch_size * dist.get_world_size()
    interval = resolve_update_interval(dl, eval_interval, global_batch)
    check_data(ds["local"], ds["remote"], ds["split"], dl.set_names, ds["max_seq_len"], where)
    dataset = DynamicStreamingDataset(
        streams=_streams(ds["local"], ds["remote"], ds["split"], dl.set_names),
        set_names=dl.set_names,
        proportion=dl.proportion,
        interval_batches=interval,
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
) -> Any:
    """A ``DataSpec`` over a ``DomainEvalDataset`` with a non-shuffling ``DistributedSampler``.

    ``subset_num_batches`` (the run's ``eval_subset_num_batches``; -1: all) must reach every domain:
    a domain left out of the evaluated prefix would have no eval loss for the mix or the logs.
    """
    from composer.core import DataSpec
    from composer.utils import dist

    from llmshearing.data.dynamic_dataset import SampleDataLoader
    from llmshearing.data.eval_dataset import DomainEvalDataset

    if not isinstance(device_batch_size, int) or device_batch_size <= 0:
        raise ValueError(f"device batch size must be a positive integer, got {device_batch_size!r}")
    ds = _dataset_cfg(loader_cfg, _EVAL_DATASET_KEYS, where)
    check_data(ds["local"], ds["remote"], ds["split"], list(set_names), ds["max_seq_len"], where)
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
