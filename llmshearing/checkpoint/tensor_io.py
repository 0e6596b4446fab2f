"""Tensor-by-tensor reading and writing of checkpoint weights.

Readers expose names, dtypes and shapes without loading data, and load one tensor at a time.
Safetensors files are read with plain file reads and written as a stream (sharded past a size
limit), so a conversion holds about one tensor in memory at a time.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
BIN_NAME = "pytorch_model.bin"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3

_DTYPE_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}


@dataclass(frozen=True)
class TensorMeta:
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * self.dtype.itemsize


class TensorSource:
    """Named tensors that can be listed and described without loading them."""

    def keys(self) -> list[str]:
        raise NotImplementedError

    def meta(self, key: str) -> TensorMeta:
        raise NotImplementedError

    def get(self, key: str) -> Tensor:
        raise NotImplementedError

    def close(self) -> None:
        """Release open files."""

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StateDictSource(TensorSource):
    """Tensors already in memory (a state dict)."""

    def __init__(self, tensors: Mapping[str, Tensor]) -> None:
        self.tensors = dict(tensors)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def meta(self, key: str) -> TensorMeta:
        tensor = self.tensors[key]
        return TensorMeta(tensor.dtype, tuple(tensor.shape))

    def get(self, key: str) -> Tensor:
        return self.tensors[key]


class FiniteSource(TensorSource):
    """A view of another source whose floating tensors are checked when read: a NaN or an Inf is an
    error naming the tensor (weights that would train or export as garbage without a word)."""

    def __init__(self, source: TensorSource, origin: str) -> None:
        self.source, self.origin = source, origin

    def keys(self) -> list[str]:
        return self.source.keys()

    def meta(self, key: str) -> TensorMeta:
        return self.source.meta(key)

    def get(self, key: str) -> Tensor:
        tensor = self.source.get(key)
        check_finite(tensor, key, self.origin)
        return tensor

    def close(self) -> None:
        self.source.close()


def check_finite(tensor: Tensor, key: str, origin: str) -> None:
    """Raise ``ValueError`` naming ``key`` of ``origin`` when the floating ``tensor`` holds NaN or Inf."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    finite = torch.isfinite(tensor)
    if bool(finite.all()):
        return
    bad = int(finite.numel() - finite.sum())
    raise ValueError(
        f"{origin}: tensor {key} holds NaN or Inf values ({bad:,} of {tensor.numel():,}); the weights are "
        "damaged (a run that diverged, or a bad download or conversion): use an earlier checkpoint or "
        "convert the source again"
    )


def finite(source: TensorSource, origin: str) -> TensorSource:
    """``source`` with every floating tensor checked for NaN and Inf when read (once)."""
    return source if isinstance(source, FiniteSource) else FiniteSource(source, origin)


class SafetensorsSource(TensorSource):
    """One or more safetensors files, read tensor by tensor with plain file reads.

    The safetensors library validates each file; tensor data is then read with ``pread`` rather than
    through a memory map, so only the tensor being converted occupies memory.
    """

    def __init__(self, files: Iterable[Path]) -> None:
        self._files: list[int] = []
        self._where: dict[str, tuple[int, int, TensorMeta]] = {}  # key -> (fd, absolute offset, meta)
        try:
            for path in files:
                self._add_file(Path(path))
        except BaseException:
            self.close()
            raise

    def _add_file(self, path: Path) -> None:
        from safetensors import SafetensorError, safe_open

        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: the checkpoint's weight files are incomplete")
        try:
            with safe_open(str(path), framework="pt"):
                pass  # full structural validation: header, dtypes, offsets covering the file
        except (SafetensorError, OSError) as err:
            raise ValueError(
                f"{path} is not a valid safetensors file ({err}); the file is corrupt or truncated, "
                "re-download or re-create it"
            ) from err
        fd = os.open(path, os.O_RDONLY)
        self._files.append(fd)
        (header_len,) = struct.unpack("<Q", os.pread(fd, 8, 0))
        header = json.loads(os.pread(fd, header_len, 8))
        header.pop("__metadata__", None)
        for key, entry in header.items():
            if key in self._where:
                raise ValueError(f"{path}: tensor {key!r} also appears in another shard of the checkpoint")
            if entry["dtype"] not in _CODE_DTYPES:
                raise ValueError(f"{path}: tensor {key!r} has unsupported safetensors dtype {entry['dtype']}")
            meta = TensorMeta(_CODE_DTYPES[entry["dtype"]], tuple(entry["shape"]))
            self._where[key] = (fd, 8 + header_len + entry["data_offsets"][0], meta)

    def keys(self) -> list[str]:
        return list(self._where)

    def meta(self, key: str) -> TensorMeta:
        return self._where[key][2]

    def get(self, key: str) -> Tensor:
        fd, offset, meta = self._where[key]
        buffer = bytearray(meta.nbytes)
        view, done = memoryview(buffer), 0
        while done < meta.nbytes:
            count = os.preadv(fd, [view[done:]], offset + done)
            if count == 0:
                raise ValueError(
                    f"tensor {key!r}: unexpected end of file (the file was truncated while reading)"
                )
            done += count
        if meta.nbytes == 0:
            return torch.empty(meta.shape, dtype=meta.dtype)
        return torch.frombuffer(buffer, dtype=meta.dtype).reshape(meta.shape)

    def close(self) -> None:
        for fd in self._files:
            os.close(fd)
        self._files.clear()
        self._where.clear()


def read_index(path: Path) -> list[Path]:
    """Shard files named by a ``*.index.json`` weight map, in first-use order."""
    try:
        weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(
            f"{path} is not a valid shard index (expected a 'weight_map' object): {err}"
        ) from err
    return [path.parent / name for name in dict.fromkeys(weight_map.values())]


def torch_load(path: Path, what: str, weights_only: bool) -> object:
    """``torch.load`` onto the CPU, memory-mapped where the file format allows it; a file torch cannot read is
    named as corrupt, as ``what`` it should have been."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
        except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
            return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as err:  # torch raises many types for a damaged file
        raise ValueError(f"{path} could not be read as {what} ({err}); the file is corrupt") from err


def load_torch_file(path: Path) -> dict[str, Tensor]:
    """A ``pytorch_model*.bin`` state dict, memory-mapped where the file format allows it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the checkpoint's weight files are incomplete")
    state = torch_load(path, "a PyTorch state dict", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (found {type(state).__name__})")
    return state


def open_weights(directory: Path) -> TensorSource:
    """The weights of a model directory: safetensors (single or sharded) or pytorch_model*.bin."""
    for name in (SAFETENSORS_INDEX_NAME, SAFETENSORS_NAME, BIN_INDEX_NAME, BIN_NAME):
        path = directory / name
        if not path.is_file():
            continue
        if name == SAFETENSORS_INDEX_NAME:
            return SafetensorsSource(read_index(path))
        if name == SAFETENSORS_NAME:
            return SafetensorsSource([path])
        files = read_index(path) if name == BIN_INDEX_NAME else [path]
        tensors: dict[str, Tensor] = {}
        for file in files:
            tensors.update(load_torch_file(file))
        return StateDictSource(tensors)
    raise FileNotFoundError(
        f"no weights found in {directory}: expected {SAFETENSORS_NAME}, {SAFETENSORS_INDEX_NAME}, "
        f"{BIN_NAME} or {BIN_INDEX_NAME}"
    )


def plan_shards(metas: Mapping[str, TensorMeta], max_shard_bytes: int) -> list[list[str]]:
    """Split tensor names, in order, into shards of at most ``max_shard_bytes`` (one oversized tensor alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, meta in metas.items():
        if shards[-1] and size + meta.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += meta.nbytes
    return shards


def _write_safetensors_file(
    path: Path,
    names: list[str],
    metas: Mapping[str, TensorMeta],
    produce: Callable[[str], Tensor],
    metadata: Mapping[str, str] | None = None,
) -> None:
    header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name in names:
        meta = metas[name]
        if meta.dtype not in _DTYPE_CODES:
            raise ValueError(f"tensor {name!r} has dtype {meta.dtype}, which safetensors cannot store")
        header[name] = {
            "dtype": _DTYPE_CODES[meta.dtype],
            "shape": list(meta.shape),
            "data_offsets": [offset, offset + meta.nbytes],
        }
        offset += meta.nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(header_bytes)))
        handle.write(header_bytes)
        for name in names:
            tensor = produce(name).detach().cpu().contiguous()
            meta = metas[name]
            if tensor.dtype != meta.dtype or tuple(tensor.shape) != meta.shape:
                raise ValueError(
                    f"tensor {name!r} is {tensor.dtype}{list(tensor.shape)}, expected {meta.dtype}{list(meta.shape)}"
                )
            handle.write(tensor.reshape(-1).view(torch.uint8).numpy().data)


def save_tensors(
    path: str | Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write a small dict of tensors as one safetensors file (string ``metadata`` in its header), staged and
    renamed into place."""
    from llmshearing.io.staging import staged_file

    source = StateDictSource({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    metas = {name: source.meta(name) for name in source.keys()}
    with staged_file(path) as staging:
        _write_safetensors_file(staging, list(metas), metas, source.get, metadata)
    return Path(path)


def write_safetensors(
    directory: Path,
    metas: Mapping[str, TensorMeta],
    produce: Callable[[str], Tensor],
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: Callable[[], None] | None = None,
) -> list[Path]:
    """Write the tensors named in ``metas`` (in that order) produced one at a time by ``produce``.

    One shard is ``model.safetensors``; more are ``model-0000i-of-0000n.safetensors`` with a
    ``model.safetensors.index.json`` weight map. ``progress`` is called after each tensor.
    """

    def produce_and_tick(name: str) -> Tensor:
        tensor = produce(name)
        if progress is not None:
            progress()
        return tensor

    shards = plan_shards(metas, max_shard_bytes)
    if len(shards) == 1:
        path = directory / SAFETENSORS_NAME
        _write_safetensors_file(path, shards[0], metas, produce_and_tick)
        return [path]
    paths, weight_map = [], {}
    for i, names in enumerate(shards, start=1):
        path = directory / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors_file(path, names, metas, produce_and_tick)
        paths.append(path)
        weight_map.update(dict.fromkeys(names, path.name))
    total = sum(meta.nbytes for meta in metas.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / SAFETENSORS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return paths
