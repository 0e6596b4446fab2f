"""A training run's ``config.json``: where it is, writing and reading it, and the run's identity in it.

Rank 0 writes the run description (the model and its source, the mask settings, the whole validated recipe) to
``<save_folder>/config.json`` before training (:func:`write_run_description`); a resumed run, ``prune-model``, the
exporters and the model card read it back (:func:`read_run_description`, :func:`parse_run_config`,
:func:`find_run_config` for a checkpoint's own run). A run also records its identity (the model shape and mask
settings that must not change within one run) in every checkpoint (the ``RunRecord`` callback of
:mod:`llmshearing.training.run_folder`); a resumed run and ``prune-model`` compare it with the description to
tell whether the two belong together (:func:`identity`, :func:`differences`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from llmshearing.config_base import ConfigError
from llmshearing.io.staging import write_text_atomic

RUN_CONFIG_NAME = "config.json"  # the run description in a run folder (save_folder)


def run_config_path(folder: str | Path) -> Path:
    """Where a run folder keeps its description."""
    return Path(folder) / RUN_CONFIG_NAME


def write_run_description(folder: str, description: dict[str, Any]) -> str:
    """Write ``config.json`` into the run folder (temp file + rename); prune-model and export read it."""
    path = os.path.join(folder, RUN_CONFIG_NAME)
    write_text_atomic(path, json.dumps(description, indent=2, default=str))
    return path


def parse_run_config(path: str | Path) -> Any:
    """The JSON document at ``path`` (a run's ``config.json``); raises ``ValueError`` when it is not JSON."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_run_description(folder: str | Path) -> dict[str, Any] | None:
    """The folder's ``config.json`` as a dict, None when there is none."""
    path = run_config_path(folder)
    if not path.is_file():
        return None
    try:
        data = parse_run_config(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(
            f"{path} is not valid JSON ({err}); it is the run's description: restore it, or set "
            "save_overwrite=true (and autoresume=false) to replace the run"
        ) from None
    return data if isinstance(data, dict) else None


def find_run_config(ckpt: Path, config_path: Path | None) -> Path:
    """The ``config.json`` of a Composer checkpoint: ``config_path``, else beside it, else in its run folder."""
    if config_path is not None:
        if not config_path.is_file():
            raise FileNotFoundError(f"--config {config_path} not found")
        return config_path
    for candidate in (ckpt.parent / RUN_CONFIG_NAME, ckpt.parent.parent / RUN_CONFIG_NAME):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"no {RUN_CONFIG_NAME} beside {ckpt} or in its run folder ({ckpt.parent.parent}); "
        "pass --config PATH (the run's config.json or the source checkpoint's config.json)"
    )


def run_source_dir(run_config: Path) -> Path | None:
    """The source checkpoint a training run started from (``train.model.path`` of its config.json)."""
    try:
        source = parse_run_config(run_config)["train"]["model"]["path"]
    except (KeyError, TypeError, ValueError):
        return None
    return Path(source) if isinstance(source, str) and Path(source).is_dir() else None


# the callback whose checkpoint state holds the identity (Composer keys callback state by class name)
RECORD_CALLBACK = "RunRecord"
# model settings that may change between the start and a resume of one run
MODEL_KEYS_FREE = ("attn_impl", "max_seq_len", "init_std")
# l0_module settings that decide the masks and the target shape
L0_MASK_KEYS = (
    "pruning_modules",
    "target_model",
    "target_sparsity",
    "temperature",
    "limit_a",
    "limit_b",
    "log_alpha_clamp",
)


# source settings that must not change: where the weights (and a pruning run's teacher) come from
SOURCE_KEYS = ("path", "dtype")
# the recipe key that lets a resumed run take another source (e.g. the same checkpoint moved)
ALLOW_NEW_SOURCE_KEY = "model.allow_new_source"
# sections compared when both sides have them (descriptions written before a section existed lack it)
OPTIONAL_SECTIONS = ("source",)


def allows_new_source(description: dict[str, Any]) -> bool:
    """True when the run's recipe sets ``model.allow_new_source``."""
    model = ((description.get("train") or {}).get("model")) or {}
    return bool(model.get("allow_new_source")) if isinstance(model, dict) else False


def identity(description: dict[str, Any]) -> dict[str, Any]:
    """The part of a run description that must not change within a run: shape, mask settings, source.

    The source is left out when the recipe sets ``model.allow_new_source``.
    """
    model = {k: v for k, v in (description.get("model") or {}).items() if k not in MODEL_KEYS_FREE}
    l0 = description.get("l0_module")
    masks = {k: l0.get(k) for k in L0_MASK_KEYS} if isinstance(l0, dict) else None
    source = description.get("source")
    if isinstance(source, dict) and not allows_new_source(description):
        source = {k: source.get(k) for k in SOURCE_KEYS}
    else:
        source = None
    return {"model": model, "l0_module": masks, "source": source}


def differences(mine: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    """``key: <mine> vs <theirs>`` for every identity key that differs.

    ``mine`` and ``theirs`` are run descriptions or identities (``identity`` of an identity is itself).
    """
    a, b = identity(mine), identity(theirs)
    found = []
    for section in ("model", "l0_module", "source"):
        left, right = a.get(section), b.get(section)
        if section in OPTIONAL_SECTIONS and (left is None or right is None):
            continue
        if left is None or right is None:
            if left != right:
                found.append(f"{section}: {'set' if left else 'none'} vs {'set' if right else 'none'}")
            continue
        for key in sorted(set(left) | set(right)):
            if left.get(key) != right.get(key):
                found.append(f"{section}.{key}: {left.get(key)!r} vs {right.get(key)!r}")
    return found


def source_hint(changed: list[str]) -> str:
    """The way out when the source is what differs ("" otherwise)."""
    if not any(item.startswith("source.") for item in changed):
        return ""
    return (
        f"; the source is part of a run (its weights start the run and a pruning run distils from it): "
        f"point model.path at the run's own source, or set {ALLOW_NEW_SOURCE_KEY}=true to resume from this one"
    )


def recorded_identity(checkpoint_state: dict[str, Any]) -> dict[str, Any] | None:
    """The identity a training checkpoint (its ``state`` dict) recorded, None for checkpoints without one."""
    callbacks = checkpoint_state.get("callbacks") if isinstance(checkpoint_state, dict) else None
    record = (callbacks or {}).get(RECORD_CALLBACK)
    return record.get("identity") if isinstance(record, dict) else None
