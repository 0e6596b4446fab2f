"""The layout of a prepared data root, and the readers of it that are not training loaders.

A data root written by ``llmshearing prepare-data`` (or ``data_prep/prepare_mds.py``)::

    <root>/manifest.json                   what was prepared (fields: see ``llmshearing.data.prepare``)
    <root>/<split>/<domain>/index.json     one MDS directory per split and domain, with a
    <root>/<split>/<domain>/shard.*.mds    ``tokens`` column of fixed-length token samples

This module owns those names: the manifest's name and its read/write, the directory of a split's
domain, the domains a split holds, and :class:`TokenSamples` / :func:`token_batches`, which read
token samples by index for evaluation and calibration. Nothing here imports torch; streaming is
imported only when samples are read.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "llmshearing-mds"  # the manifest's "format" and "version" fields
MANIFEST_VERSION = 1
INDEX_NAME = "index.json"  # streaming's index of one MDS directory
TOKENS_COLUMN = "tokens"
SPLITS = ("train", "eval", "test")


def domain_dir(root: str, split: str, domain: str) -> str:
    """``<root>/<split>/<domain>``: the MDS directory of one domain's split (a local path or a remote URL)."""
    return os.path.join(root, split, domain)


def manifest_path(root: str | os.PathLike[str]) -> str:
    return os.path.join(os.fspath(root), MANIFEST_NAME)


def read_manifest(root: str | os.PathLike[str] | None) -> dict[str, Any] | None:
    """``<root>/manifest.json`` if the root is local and has one."""
    if not root:
        return None
    path = manifest_path(root)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}): re-run llmshearing prepare-data") from None


def write_manifest(root: str | os.PathLike[str], manifest: dict[str, Any]) -> None:
    """Write ``<root>/manifest.json`` (``root`` is a staging directory renamed into place when complete)."""
    Path(manifest_path(root)).write_text(json.dumps(manifest, indent=2) + "\n")


def manifest_header(
    seq_len: int,
    tokenizer: str,
    vocab_size: int,
    token_dtype: str,
    domains: Sequence[str],
    splits: dict[str, Any],
) -> dict[str, Any]:
    """The manifest fields every prepared root has (``prepare`` adds what it measured while tokenising);
    ``splits`` maps split -> domain -> ``{"files", "documents", "tokens", "samples"}``."""
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "seq_len": seq_len,
        "tokenizer": tokenizer,
        "vocab_size": vocab_size,
        "token_dtype": token_dtype,
        "domains": sorted(domains),
        "splits": splits,
    }


def write_token_root(
    root: str | os.PathLike[str],
    samples: Mapping[str, Mapping[str, Sequence[np.ndarray]]],
    vocab_size: int,
    tokenizer: str = "synthetic",
) -> dict[str, Any]:
    """Write already-tokenised samples (``samples[split][domain]``: equal-length token arrays) as a data
    root in this layout, manifest included, and return the manifest. For tests and benchmarks that need
    data without a tokenizer; ``prepare-data`` is the writer for text."""
    from streaming import MDSWriter

    from llmshearing.data.packing import token_dtype

    dtype = token_dtype(vocab_size).name
    splits: dict[str, dict[str, dict[str, int]]] = {}
    seq_lens: set[int] = set()
    for split, by_domain in samples.items():
        splits[split] = {}
        for domain, rows in by_domain.items():
            with MDSWriter(
                out=domain_dir(os.fspath(root), split, domain), columns={TOKENS_COLUMN: f"ndarray:{dtype}"}
            ) as writer:
                for row in rows:
                    writer.write({TOKENS_COLUMN: np.asarray(row).astype(dtype)})
                    seq_lens.add(len(row))
            count = len(rows)
            splits[split][domain] = {
                "files": 1,
                "documents": count,
                "tokens": count * len(rows[0]),
                "samples": count,
            }
    if len(seq_lens) != 1:
        raise ValueError(f"token samples must share one length, got lengths {sorted(seq_lens)}")
    domains = sorted({d for by_domain in samples.values() for d in by_domain})
    manifest = manifest_header(seq_lens.pop(), tokenizer, vocab_size, dtype, domains, splits)
    write_manifest(root, manifest)
    return manifest


def split_domains(root: str | os.PathLike[str], split: str, label: str = "") -> list[str]:
    """The domains of ``<root>/<split>`` (sub-directories holding an MDS index), sorted.

    Raises ``FileNotFoundError`` when the split is missing or empty, naming the splits the root does
    have; ``label`` prefixes the message (e.g. the option that named the root).
    """
    directory = os.path.join(os.fspath(root), split)
    domains = _domains_in(directory)
    if domains:
        return domains
    raise FileNotFoundError(label + missing_split_message(root, split))


def _domains_in(directory: str) -> list[str]:
    if not os.path.isdir(directory):
        return []
    return sorted(d for d in os.listdir(directory) if os.path.isfile(os.path.join(directory, d, INDEX_NAME)))


def available_splits(root: str | os.PathLike[str]) -> list[str]:
    """The splits of ``root`` that hold domains, and samples by its manifest when it has one."""
    present = [split for split in SPLITS if _domains_in(os.path.join(os.fspath(root), split))]
    manifest = read_manifest(root) if os.path.isfile(manifest_path(root)) else None
    recorded = manifest.get("splits") if isinstance(manifest, dict) else None
    if not isinstance(recorded, dict):
        return present
    return [
        split
        for split in present
        if any(
            int((stats or {}).get("samples", 0) or 0) > 0 for stats in (recorded.get(split) or {}).values()
        )
    ]


def missing_split_message(root: str | os.PathLike[str], split: str, use: str = "use DIR") -> str:
    """Why ``<root>/<split>`` cannot be read, and the fix: a prepared root without that split, a folder
    of raw JSON-lines text, or a folder that is not prepared data at all (``use``: how to point the
    command at the prepared data)."""
    root = os.fspath(root)
    splits = available_splits(root) if os.path.isdir(root) else []
    if splits:
        return (
            f"{root} has no {split} split (it was prepared with --{split}-seqs 0, or without that split); "
            f"its splits: {', '.join(splits)}: choose one of those, or prepare the data again with "
            f"--{split}-seqs N"
        )
    if holds_jsonl(root):
        return (
            f"{root} holds JSON-lines text, not prepared data: run `llmshearing prepare-data --input {root} "
            f"--output DIR --tokenizer MODEL --seq-len N` and {use}"
        )
    return (
        f"{root} is not an MDS root prepared by llmshearing prepare-data (no {split}/<domain>/{INDEX_NAME}); "
        f"prepare the data with `llmshearing prepare-data --output DIR ...` and {use}"
    )


def holds_jsonl(root: str | os.PathLike[str]) -> bool:
    """``root`` or its sub-directories hold JSON-lines files (the input of prepare-data)."""
    suffixes = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json")
    directory = Path(root)
    if not directory.is_dir():
        return False
    return any(p.name.endswith(suffixes) for p in directory.iterdir()) or any(
        p.name.endswith(suffixes) for d in directory.iterdir() if d.is_dir() for p in d.iterdir()
    )


def _decompressed_copy(directory: str) -> tempfile.TemporaryDirectory | None:
    """A temporary copy of ``directory`` with the shards stored only compressed (``--compression zstd``)
    decompressed and the others linked, or None when every shard is stored raw: streaming's
    ``LocalDataset`` reads raw shards only."""
    from streaming.base.compression import decompress

    with open(os.path.join(directory, INDEX_NAME), encoding="utf-8") as handle:
        shards = json.load(handle)["shards"]
    compressed = [
        s
        for s in shards
        if s.get("zip_data") and not os.path.isfile(os.path.join(directory, s["raw_data"]["basename"]))
    ]
    if not compressed:
        return None
    copy = tempfile.TemporaryDirectory(prefix="llmshearing-mds-")
    shutil.copy(os.path.join(directory, INDEX_NAME), copy.name)
    for shard in shards:
        raw = shard["raw_data"]["basename"]
        if shard in compressed:
            with open(os.path.join(directory, shard["zip_data"]["basename"]), "rb") as handle:
                data = decompress(shard["compression"], handle.read())
            with open(os.path.join(copy.name, raw), "wb") as handle:
                handle.write(data)
        else:
            os.symlink(os.path.abspath(os.path.join(directory, raw)), os.path.join(copy.name, raw))
    return copy


class TokenSamples:
    """The token samples of one MDS directory, read by index as int64 arrays.

    Shards stored only compressed are read from a decompressed temporary copy, removed by
    :meth:`close` (or when the object is collected). ``label`` prefixes error messages (default:
    the directory).
    """

    def __init__(self, directory: str | os.PathLike[str], label: str | None = None) -> None:
        from streaming import LocalDataset

        from llmshearing.data.checks import check_shards

        self.directory = os.fspath(directory)
        self.label = f"{self.directory}: " if label is None else label
        check_shards(self.directory)  # whole shards, and at least one sample
        self._copy = _decompressed_copy(self.directory)
        self._dataset = LocalDataset(self.directory if self._copy is None else self._copy.name)

    def __len__(self) -> int:
        return len(self._dataset)

    def row(self, index: int) -> np.ndarray:
        sample = self._dataset[index]
        if TOKENS_COLUMN not in sample:
            raise KeyError(
                f"{self.label}samples have no {TOKENS_COLUMN!r} column; prepare the data with "
                "llmshearing prepare-data"
            )
        return np.asarray(sample[TOKENS_COLUMN], dtype=np.int64)

    def close(self) -> None:
        if self._copy is not None:
            self._copy.cleanup()
            self._copy = None

    def __enter__(self) -> TokenSamples:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def token_batches(
    sources: Sequence[TokenSamples], order: Iterable[tuple[int, int]], batch_size: int, label: str = ""
) -> Iterator[np.ndarray]:
    """Batches ``[B, T]`` (int64) of the samples ``(source index, sample index)`` in ``order``, ``batch_size``
    at a time (the last batch may be smaller). Samples of one batch must have one length."""
    order = list(order)
    for start in range(0, len(order), batch_size):
        rows = [sources[k].row(j) for k, j in order[start : start + batch_size]]
        lengths = {len(r) for r in rows}
        if len(lengths) != 1:
            raise ValueError(f"{label}samples have different lengths {sorted(lengths)}; use a fixed seq_len")
        yield np.stack(rows)
