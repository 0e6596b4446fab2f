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

from llmshearing.checkpoint.tensor_io import TensorMeta, TensorSource

METADATA = ".metadata"
MODEL_PREFIX = "state.model."
SHARDED_WEIGHTS = "model.dcp"  # a project checkpoint's sharded weights directory


def is_sharded_checkpoint(path: str | Path) -> bool:
    """``path`` is a directory written by ``torch.distributed.checkpoint`` (it has a ``.metadata`` index)."""
    path = Path(path)
    return path.is_dir() and (path / METADATA).is_file()


def check_shard_files(path: Path, metadata: object) -> None:
    """Refuse a sharded checkpoint whose index names data files the directory lacks, or files shorter than the
    bytes the index places in them (cut off while copied or written), naming them all."""
    storage = getattr(metadata, "storage_data", None) or {}
    ends: dict[str, int] = {}
    for info in storage.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    needed = sorted(ends)
    missing = [name for name in needed if not (path / name).is_file()]
    if missing:
        raise ValueError(
            f"{path} is missing {len(missing)} of its {len(needed)} shard files ({', '.join(missing)}): copy them "
            "from where the checkpoint was written, or use an earlier checkpoint"
        )
    short = [
        f"{name} ({size:,} of {ends[name]:,} bytes)"
        for name in needed
        if (size := (path / name).stat().st_size) < ends[name]
    ]
    if short:
        raise ValueError(
            f"{path}: {len(short)} of its {len(needed)} shard files are cut short ({', '.join(short)}): copy them "
            "again from where the checkpoint was written, or use an earlier checkpoint"
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
        self.files: dict[str, set[str]] = {}  # stored name -> the shard files holding it
        for index, info in (metadata.storage_data or {}).items():
            self.files.setdefault(index.fqn, set()).add(info.relative_path)
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
        from torch.distributed.checkpoint.api import CheckpointException

        meta = self.metas[key]
        holder = {self.stored[key]: torch.empty(meta.shape, dtype=meta.dtype)}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            try:
                load(holder, storage_reader=self.reader, no_dist=True)
            except (Exception, CheckpointException) as err:  # many types; DCP's is a BaseException
                files = ", ".join(sorted(self.files.get(self.stored[key], ())))
                raise ValueError(
                    f"{self.path}: tensor {key!r} could not be read from {files} ({type(err).__name__}); the "
                    "file is damaged: copy it again, or use an earlier checkpoint"
                ) from None
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
    it and written to a file of its own (``__0_<i>.distcp``); torch's writer loop still references the
    previous tensor while it asks for the next, so the peak is two tensors as ``produce`` returns them (plus
    what ``produce`` holds while making one). ``.metadata`` is written last.
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
    import torch.distributed as tdist
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.api import CheckpointException

    reader = FileSystemReader(str(weights))
    filled = _fill_targets(module, weights, reader)
    alone = not (tdist.is_available() and tdist.is_initialized())
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": alone, it is
            warnings.simplefilter("ignore" if alone else "default", UserWarning)
            load({stored_name(k): t for k, t in filled.items()}, storage_reader=reader, no_dist=alone)
    except (Exception, CheckpointException) as err:  # many types; DCP's is a BaseException
        raise ValueError(
            f"{weights}: a shard file could not be read ({type(err).__name__}); it is damaged: convert the "
            "source again"
        ) from None
    check_filled_finite(filled, weights)
    return len(filled)


def _fill_targets(module: torch.nn.Module, weights: str | Path, reader: Any) -> dict[str, Tensor]:
    """``module``'s state-dict tensors that the weights store, by ``Decoder`` key; every one but a tied head."""
    try:
        stored = reader.read_metadata().state_dict_metadata
    except Exception as err:  # a missing or damaged index
        raise ValueError(
            f"{weights} could not be read as sharded weights ({err}); convert the source again"
        ) from err
    own = module.state_dict()
    filled = {key: tensor for key, tensor in own.items() if stored_name(key) in stored}
    config = getattr(module, "config", None)
    tied = {"output.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = sorted(set(own) - set(filled) - tied)
    if missing:
        raise KeyError(f"{weights} lacks {len(missing)} of the model's tensors: {missing[:8]}")
    return filled


def check_filled_finite(tensors: Mapping[str, Tensor], weights: str | Path) -> None:
    """Raise on every rank when any rank's part of a floating tensor (``tensors``: by ``Decoder`` key) holds NaN
    or Inf (collective under a process group), naming the tensors this rank found."""
    import torch.distributed as tdist
    from torch.distributed.tensor import DTensor

    bad = [
        name
        for name, tensor in tensors.items()
        if tensor.is_floating_point()
        and not bool(torch.isfinite(tensor.to_local() if isinstance(tensor, DTensor) else tensor).all())
    ]
    device = next(iter(tensors.values())).device if tensors else torch.device("cpu")
    count = torch.tensor([len(bad)], device=device)
    if tdist.is_available() and tdist.is_initialized():
        tdist.all_reduce(count)
    if int(count.item()):
        found = ", ".join(bad[:4]) if bad else "tensors of another rank"
        raise ValueError(f"{weights}: NaN or Inf in {found}; the source is damaged: convert it again")
