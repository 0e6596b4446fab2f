"""Checks of prepared data before a model reads it: token ids within the model's vocabulary, and
MDS shards that are whole.

Both fail with a ``ValueError`` that names the data and the fix, before any sample is read: a token
id past the model's embedding would otherwise stop a run mid-way (``IndexError`` on CPU, a device
assert on GPU), and a truncated shard fails deep inside streaming with a message about buffer sizes.
"""

from __future__ import annotations

import json
import os
from typing import Any

from llmshearing.config_base import is_int
from llmshearing.data.layout import INDEX_NAME, manifest_path, read_manifest


def _manifest_int(manifest: dict[str, Any], key: str, path: str) -> int | None:
    value = manifest.get(key)
    if value is None:
        return None
    if not is_int(value):
        raise ValueError(
            f"{path}: {key!r} must be an integer, got {value!r}; re-run llmshearing prepare-data"
        )
    return value


def check_vocab(data_dir: str | os.PathLike[str], vocab_size: int, model: str) -> None:
    """Raise ``ValueError`` when the data at ``data_dir`` holds token ids that a model with
    ``vocab_size`` embeddings (named ``model`` in the message) cannot read.

    Reads ``<data_dir>/manifest.json``: the largest token id written (``max_token_id``) when it is
    recorded, else the tokenizer's vocabulary (``vocab_size``; manifests written before
    ``max_token_id`` existed). Data without a manifest is not checked.
    """
    manifest = read_manifest(os.fspath(data_dir))
    if manifest is None:
        return
    path = manifest_path(data_dir)
    tokenizer = manifest.get("tokenizer", "unknown")
    data_vocab = _manifest_int(manifest, "vocab_size", path)
    max_id = _manifest_int(manifest, "max_token_id", path)
    if max_id is not None:
        if max_id < vocab_size:
            return
        found = f"holds token ids up to {max_id}"
    elif data_vocab is not None and data_vocab > vocab_size:
        found = f"was tokenised with a {data_vocab}-token vocabulary"
    else:
        return
    raise ValueError(
        f"the data in {os.fspath(data_dir)} {found} (tokenizer {tokenizer!r}, vocabulary {data_vocab}), "
        f"but model {model} has {vocab_size} token embeddings (ids 0 to {vocab_size - 1}): prepare the "
        "data with the model's own tokenizer (llmshearing prepare-data --tokenizer MODEL_DIR) or use a "
        "model with this tokenizer's vocabulary"
    )


def _shard_files(shard: dict[str, Any]) -> list[tuple[str, int]]:
    """``(basename, bytes)`` of the forms a shard may be stored in (raw, then compressed)."""
    forms = []
    for key in ("raw_data", "zip_data"):
        entry = shard.get(key)
        if isinstance(entry, dict) and "basename" in entry and "bytes" in entry:
            forms.append((str(entry["basename"]), int(entry["bytes"])))
    return forms


def check_shards(split_dir: str | os.PathLike[str]) -> None:
    """Raise ``ValueError`` naming the file when ``<split_dir>/index.json`` lists no samples, or a
    shard it lists is missing or does not have the size the index records (a truncated or
    interrupted copy)."""
    directory = os.fspath(split_dir)
    index_path = os.path.join(directory, INDEX_NAME)
    try:
        with open(index_path, encoding="utf-8") as handle:
            index = json.load(handle)
        shards = index["shards"]
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{index_path} not found: {directory} is not an MDS directory written by llmshearing prepare-data"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise ValueError(
            f"{index_path} is not a readable MDS index ({type(err).__name__}: {err}); "
            "copy the data again or re-run llmshearing prepare-data"
        ) from None
    if not isinstance(shards, list) or not any(isinstance(s, dict) and s.get("samples") for s in shards):
        raise ValueError(
            f"{index_path} lists no samples ({'no shards' if not shards else 'only empty shards'}): "
            f"{directory} holds nothing to read; prepare that domain again with more text "
            "(llmshearing prepare-data), or leave the domain out"
        )
    for shard in shards:
        forms = _shard_files(shard) if isinstance(shard, dict) else []
        if not forms:
            raise ValueError(
                f"{index_path} lists a shard without file names; re-run llmshearing prepare-data"
            )
        sizes = {name: _size(os.path.join(directory, name)) for name, _ in forms}
        if any(sizes[name] == expected for name, expected in forms):
            continue
        name, expected = forms[0]
        actual = sizes[name]
        state = "is missing" if actual is None else f"has {actual:,} bytes"
        raise ValueError(
            f"{os.path.join(directory, name)} {state}, but {index_path} records {expected:,} bytes: the "
            "shard is truncated or was not copied completely; copy the data again or re-run "
            "llmshearing prepare-data"
        )


def _size(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None
