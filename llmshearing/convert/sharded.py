"""Reading Composer's sharded (``torch.distributed.checkpoint``) checkpoints on one machine, no GPU.

A sharded checkpoint is a directory (``ep{E}-ba{B}/``, which ``latest-rank0.pt`` links to) holding a
``.metadata`` index and one ``__{rank}_0.distcp`` file per rank. The model's tensors are stored under
``state.model.<ComposerLlama key>``; :class:`ShardedModelSource` lists them from the index and loads
one whole tensor at a time, so reading a model never holds more than the tensors asked for.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor

from llmshearing.convert.tensor_io import TensorMeta, TensorSource

METADATA = ".metadata"
MODEL_PREFIX = "state.model."


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
            raise ValueError(f"{self.path} holds no model tensors: it is not a Composer training checkpoint")

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
