"""Sharded (``torch.distributed.checkpoint``) weights: Composer's sharded checkpoints and sharded sources.

A Composer sharded checkpoint is a directory (``ep{E}-ba{B}/``, which ``latest-rank0.pt`` links to)
holding a ``.metadata`` index and one ``__{rank}_0.distcp`` file per rank. The model's tensors are
stored under ``state.model.<ComposerLlama key>``; :class:`ShardedModelSource` lists them from the
index and loads one whole tensor at a time, so reading a model never holds more than the tensors
asked for.

A sharded project checkpoint (``convert hf-to-composer --sharded``) keeps its weights in the same
layout in a ``model.dcp/`` sub-directory, under the same names (``state.model.model.<Decoder key>``),
one ``__0_<i>.distcp`` file per tensor; :func:`write_sharded_weights` writes it one tensor at a
time, and the one reader serves both kinds.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llmshearing.convert.tensor_io import TensorMeta, TensorSource

METADATA = ".metadata"
MODEL_PREFIX = "state.model."
SHARDED_WEIGHTS = "model.dcp"  # a project checkpoint's sharded weights directory


def is_sharded_checkpoint(path: str | Path) -> bool:
    """``path`` is a directory written by ``torch.distributed.checkpoint`` (it has a ``.metadata`` index)."""
    path = Path(path)
    return path.is_dir() and (path / METADATA).is_file()


def check_shard_files(path: Path, metadata: object) -> None:
    """Refuse a sharded checkpoint whose index names data files the directory lacks, naming them all."""
    storage = getattr(metadata, "storage_data", None) or {}
    needed = sorted({info.relative_path for info in storage.values()})
    missing = [name for name in needed if not (path / name).is_file()]
    if missing:
        raise ValueError(
            f"{path} is missing {len(missing)} of its {len(needed)} shard files ({', '.join(missing)}): copy them "
            "from where the checkpoint was written, or use an earlier checkpoint"
        )


class ShardedModelSource(TensorSource):
    """The model tensors of a sharded Composer checkpoint, under ``ComposerLlama``'s state-dict names.

    ``model.*`` keys lose their ``model.`` prefix (the ``Decoder``'s names); ``l0_module.*`` keys stay.
    """

    def __init__(self, path: str | Path) -> None:
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.path = Path(path)
        self.reader = FileSystemReader(str(self.path))
        try:
            metadata = self.reader.read_metadata()
        except Exception as err:  # a missing or damaged index
            raise ValueError(
                f"{self.path} could not be read as a sharded checkpoint ({err}); the checkpoint is incomplete or "
                "corrupt: use an earlier one"
            ) from err
        check_shard_files(self.path, metadata)
        self.stored: dict[str, str] = {}
        self.metas: dict[str, TensorMeta] = {}
        for name, item in metadata.state_dict_metadata.items():
            if not (name.startswith(MODEL_PREFIX) and isinstance(item, TensorStorageMetadata)):
                continue
            key = name[len(MODEL_PREFIX) :]
            if key.startswith("model."):
                key = key[len("model.") :]
            elif not key.startswith("l0_module."):
                raise KeyError(
                    f"{self.path}: unexpected key {name!r} in the sharded checkpoint (expected "
                    "state.model.model.* and state.model.l0_module.*)"
                )
            self.stored[key] = name
            self.metas[key] = TensorMeta(item.properties.dtype, tuple(item.size))
        if not self.stored:
            raise ValueError(
                f"{self.path} holds no model tensors: it is neither a Composer training checkpoint nor sharded weights"
            )

    def keys(self) -> list[str]:
        return list(self.stored)

    def meta(self, key: str) -> TensorMeta:
        return self.metas[key]

    def get(self, key: str) -> Tensor:
        from torch.distributed.checkpoint import load

        meta = self.metas[key]
        holder = {self.stored[key]: torch.empty(meta.shape, dtype=meta.dtype)}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            load(holder, storage_reader=self.reader, no_dist=True)
        return holder[self.stored[key]]

    def close(self) -> None:
        pass


def sharded_weights_dir(directory: str | Path) -> Path | None:
    """The ``model.dcp/`` weights directory of a project checkpoint written with ``--sharded``, if it has one."""
    weights = Path(directory) / SHARDED_WEIGHTS
    return weights if weights.is_dir() else None


def stored_name(key: str) -> str:
    """Where a ``Decoder`` key is stored in sharded weights (Composer's name for it)."""
    return f"{MODEL_PREFIX}{key}" if key.startswith("l0_module.") else f"{MODEL_PREFIX}model.{key}"


def _producing_planner(
    names: Mapping[str, str], produce: Callable[[str], Tensor], tick: Callable[[], None]
) -> Any:
    """A save planner that makes each tensor only when the writer asks for it (``names``: stored -> key)."""
    from torch.distributed.checkpoint import DefaultSavePlanner
    from torch.distributed.checkpoint.planner import WriteItem, WriteItemType

    class ProducingPlanner(DefaultSavePlanner):
        def resolve_data(self, write_item: WriteItem) -> Any:
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            tensor = produce(names[write_item.index.fqn]).detach().cpu().contiguous()
            tick()
            return tensor

    return ProducingPlanner(flatten_state_dict=False, flatten_sharded_tensors=False)


def write_sharded_weights(
    directory: Path,
    metas: Mapping[str, TensorMeta],
    produce: Callable[[str], Tensor],
    progress: Callable[[], None] | None = None,
) -> Path:
    """Write the tensors named in ``metas`` as ``directory/model.dcp`` (``torch.distributed.checkpoint``).

    The plan is made from ``meta``-device placeholders; each tensor is produced when the writer reaches
    it, written to a file of its own (``__0_<i>.distcp``) and dropped, so the peak is one tensor as
    ``produce`` returns it (plus what ``produce`` holds while making it). ``.metadata`` is written last.
    """
    from torch.distributed.checkpoint import FileSystemWriter, save

    target = directory / SHARDED_WEIGHTS
    names = {stored_name(key): key for key in metas}
    placeholders = {
        name: torch.empty(metas[key].shape, dtype=metas[key].dtype, device="meta")
        for name, key in names.items()
    }
    writer = FileSystemWriter(str(target), single_file_per_rank=False, thread_count=1, overwrite=False)
    planner = _producing_planner(names, produce, progress or (lambda: None))
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        save(placeholders, storage_writer=writer, planner=planner, no_dist=True)
    return target


def fill_from_sharded_weights(module: torch.nn.Module, weights: str | Path) -> int:
    """Fill ``module``'s (a ``Decoder``'s) tensors in place from sharded weights, each rank its own part.

    ``module`` may be sharded by FSDP2 (DTensor parameters): ``torch.distributed.checkpoint.load`` then
    gives each rank the slices its shards hold. The stored tensors are whole (one file each): a rank reads
    each file once, one tensor at a time, and keeps its slice (floating tensors cast as ``copy_`` casts,
    e.g. bf16 to the fp32 master weights). Collective when a process group is up; returns the tensors filled.
    """
    from torch.distributed.checkpoint import FileSystemReader, load

    reader = FileSystemReader(str(weights))
    try:
        stored = reader.read_metadata().state_dict_metadata
    except Exception as err:  # a missing or damaged index
        raise ValueError(
            f"{weights} could not be read as sharded weights ({err}); convert the source again"
        ) from err
    own = module.state_dict()
    # a tied head shares the embedding's storage and is not stored
    targets = {stored_name(key): tensor for key, tensor in own.items() if stored_name(key) in stored}
    missing = sorted(key for key in own if stored_name(key) not in stored and not key.startswith("output."))
    if missing:
        raise KeyError(f"{weights} lacks {len(missing)} of the model's tensors: {missing[:8]}")
    load(targets, storage_reader=reader)
    return len(targets)
