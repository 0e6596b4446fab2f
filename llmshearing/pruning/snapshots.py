"""A pruning run's mask snapshots (``RUN/masks/``) and how far its structure moved from where it started.

:class:`llmshearing.pruning.algorithm.L0Pruning` writes ``ba<N>.pt`` after every evaluation (the deterministic
masks, and at the target where they differ: what ``prune-model`` folds) and, for a ranked start
(``init_from``), ``start.pt`` at batch 0. :func:`changed_units` counts the units two structures keep or drop
the other way; ``prune-model``, ``llmshearing report``, the demo and the quality benchmark use it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from llmshearing.io.staging import staged_file


def save_masks(path: str, payload: dict[str, Any]) -> None:
    """``torch.save`` to a staging file beside ``path``, then rename it into place."""
    with staged_file(path) as staging:
        torch.save(payload, staging)


def mask_snapshot_path(save_folder: str | os.PathLike[str], batch: int) -> str:
    """Where a run writes its deterministic masks after the evaluation at ``batch``."""
    return os.path.join(save_folder, "masks", f"ba{batch}.pt")


def start_snapshot_path(save_folder: str | os.PathLike[str]) -> str:
    """Where a run with a ranked start (``init_from``) writes the structure its masks start at."""
    return os.path.join(save_folder, "masks", "start.pt")


def folded_structure(payload: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The masks of a snapshot that ``prune-model`` folds: those at the target where the run has one."""
    return payload.get("target_masks", payload["masks"])


def changed_units(
    masks: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]
) -> dict[str, tuple[int, int]]:
    """``{family: (changed, units)}``: the units one structure keeps and the other drops, per mask family both
    have (a unit is kept where its mask is above 0)."""
    out = {}
    for family in sorted(set(masks) & set(reference)):
        mine, theirs = masks[family], reference[family]
        if mine.shape != theirs.shape:
            raise ValueError(
                f"mask {family!r} has shape {tuple(mine.shape)} against {tuple(theirs.shape)}: the two "
                "structures do not describe the same source"
            )
        out[family] = (int(((mine > 0) != (theirs > 0)).sum()), mine.numel())
    return out


def describe_moved(moved: Mapping[str, tuple[int, int]]) -> str:
    """``N of U (family n, ...)`` for :func:`changed_units`' result: the changed units in all and per family."""
    changed = sum(n for n, _ in moved.values())
    units = sum(u for _, u in moved.values())
    parts = ", ".join(f"{family} {n:,}" for family, (n, _) in moved.items() if n)
    return f"{changed:,} of {units:,}" + (f" ({parts})" if parts else "")


def read_start_structure(save_folder: str | os.PathLike[str]) -> dict[str, torch.Tensor] | None:
    """The structure a run's ranked start folds to (``masks/start.pt``), or ``None`` for a run without one."""
    path = start_snapshot_path(save_folder)
    if not os.path.isfile(path):
        return None
    return folded_structure(torch.load(path, map_location="cpu", weights_only=True))


def moved_from_start(save_folder: str | os.PathLike[str]) -> dict[str, tuple[int, int]] | None:
    """:func:`changed_units` of a run's last mask snapshot against its ranked start; ``None`` without both."""
    start, latest = read_start_structure(save_folder), latest_mask_snapshot(save_folder)
    if start is None or latest is None:
        return None
    return changed_units(folded_structure(torch.load(latest, map_location="cpu", weights_only=True)), start)


def latest_mask_snapshot(save_folder: str | os.PathLike[str]) -> str | None:
    """The run's mask snapshot of the highest batch (by number, not name), or ``None`` when it has none."""
    folder = os.path.join(save_folder, "masks")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    batches = [int(n[2:-3]) for n in names if n.startswith("ba") and n.endswith(".pt") and n[2:-3].isdigit()]
    return mask_snapshot_path(save_folder, max(batches)) if batches else None
