"""The run folder (``save_folder``): what makes it hold a run, and the start-up rules that keep a run
from being damaged by the next start.

* A folder that holds a run is used only with ``autoresume=true`` (continue it) or
  ``save_overwrite=true`` (replace it); otherwise the start is refused before anything is written.
* A resumed run must be the same run: the model shape and the mask settings (the ``l0_module``
  settings that decide the masks and the target) agree with the folder's ``config.json``, and so do the
  optimizer settings its checkpoint carries (checked first, before anything is loaded).
* A start that fails leaves the folder as it found it (no stub ``config.json``).
* Every checkpoint carries the run's identity (the ``RunRecord`` callback,
  :mod:`llmshearing.training.run_record`), so ``prune-model`` can tell whether ``config.json`` describes the
  checkpoint it folds.

Nothing here imports Composer: the start-up checks run before it is imported.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from llmshearing.checkpoint.run_config import (
    RUN_CONFIG_NAME,
    differences,
    read_run_description,
    source_hint,
)
from llmshearing.config_base import ConfigError

log = logging.getLogger("llmshearing.train")

# what a training run writes into its folder (the report and user files are not part of it)
RUN_ENTRIES = (RUN_CONFIG_NAME, "metrics.jsonl", "checkpoints", "masks", "logs.txt")
RUN_ENTRY_PREFIXES = ("samples-rank",)
DERIVED_ENTRIES = ("report",)  # made from a run by `llmshearing report`; replaced with the run


def run_entries(folder: str | Path) -> list[str]:
    """Names of the run artefacts ``folder`` holds (an empty ``checkpoints``/``masks`` folder is none)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for entry in sorted(folder.iterdir()):
        if entry.name not in RUN_ENTRIES and not entry.name.startswith(RUN_ENTRY_PREFIXES):
            continue
        if entry.is_dir() and not any(entry.iterdir()):
            continue
        found.append(entry.name)
    return found


def check_start(folder: str | Path, autoresume: bool, overwrite: bool) -> None:
    """Refuse to start a fresh run in a folder that holds a run unless asked to resume or replace it."""
    if Path(folder).exists() and not Path(folder).is_dir():
        raise ConfigError(f"save_folder {folder} is a file, not a folder; choose another save_folder")
    entries = run_entries(folder)
    if entries and not autoresume and not overwrite:
        raise ConfigError(
            f"save_folder {folder} already holds a run ({', '.join(entries)}); set autoresume=true to continue "
            "it, save_overwrite=true to replace it, or choose another save_folder"
        )


def check_same_run(folder: str | Path, description: dict[str, Any]) -> None:
    """A resumed run must be the run the folder holds (same model shape and mask settings)."""
    previous = read_run_description(folder)
    if previous is None:
        return
    changed = differences(description, previous)
    if changed:
        raise ConfigError(
            f"save_folder {folder} holds a different run: {'; '.join(changed[:6])} (this recipe vs the "
            f"folder's {RUN_CONFIG_NAME}){source_hint(changed)}; resume with the run's own settings, or choose "
            "another save_folder (save_overwrite=true with autoresume=false replaces the run)"
        )


# a checkpoint's optimizer state holds these (its parameter groups' settings): a resumed run trains on with the
# checkpoint's values whatever the recipe says, so a change is refused rather than written into config.json unused
L0_OPTIMIZER_KEYS = ("mask_lr", "multiplier_lr")


def optimizer_changes(train: dict[str, Any], previous: dict[str, Any]) -> list[str]:
    """``key: <this recipe's> vs <the folder's>`` for each optimizer setting a resume would not take."""
    found = []
    mine, theirs = train.get("optimizer") or {}, previous.get("optimizer")
    if isinstance(theirs, dict):  # a config.json without the section has nothing to compare
        for key in sorted(set(mine) | set(theirs)):
            if mine.get(key) != theirs.get(key):
                found.append(f"optimizer.{key}: {mine.get(key)!r} vs {theirs.get(key)!r}")
    l0_mine = (train.get("model") or {}).get("l0_module")
    l0_theirs = (previous.get("model") or {}).get("l0_module")
    if isinstance(l0_mine, dict) and isinstance(l0_theirs, dict):
        for key in L0_OPTIMIZER_KEYS:
            if l0_mine.get(key) != l0_theirs.get(key):
                found.append(f"model.l0_module.{key}: {l0_mine.get(key)!r} vs {l0_theirs.get(key)!r}")
    return found


def resumable_checkpoint(folder: str | Path) -> Path | None:
    """The checkpoint ``autoresume`` continues the run in ``folder`` from (its newest complete one), if any."""
    from llmshearing.checkpoint.composer_files import newest_complete_checkpoint

    return newest_complete_checkpoint(Path(folder) / "checkpoints")


def check_resumed_optimizer(folder: str | Path, train: dict[str, Any], checkpoint: Path) -> None:
    """A run resumed from ``checkpoint`` keeps its optimizer settings: refuse a recipe that changes them."""
    previous = read_run_description(folder)
    if previous is None:
        return
    changed = optimizer_changes(train, previous.get("train") or {})
    if changed:
        raise ConfigError(
            f"save_folder {folder} holds a run whose checkpoint carries its optimizer settings, which a resumed "
            f"run keeps: {'; '.join(changed)} (this recipe vs the folder's {RUN_CONFIG_NAME}); resume with the "
            f"run's own settings, or train on from its weights in another save_folder with "
            f"load_path={checkpoint} load_weights_only=true"
        )


def clear_previous_run(folder: str | Path) -> list[str]:
    """Remove the run artefacts of ``folder`` (``save_overwrite=true`` on a fresh start); returns them."""
    folder = Path(folder)
    removed = run_entries(folder)
    if removed:
        removed += [name for name in DERIVED_ENTRIES if (folder / name).exists()]
    for name in removed:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    if removed:
        log.warning("save_overwrite: removed the previous run in %s (%s)", folder, ", ".join(removed))
    return removed


def prepare(folder: str | Path, description: dict[str, Any], autoresume: bool, overwrite: bool) -> None:
    """Make the folder ready for this start, once the run's description is known.

    Resuming: the folder must hold this run, and checkpoints cut off while being written are set
    aside. Replacing (``save_overwrite`` without ``autoresume``): the previous run is removed.
    Checks run on every rank; only global rank 0 changes the folder.
    """
    from composer.utils import dist

    from llmshearing.checkpoint.composer_files import repair_checkpoint_folder

    if autoresume:
        check_same_run(folder, description)
        if dist.get_global_rank() == 0:
            repair_checkpoint_folder(Path(folder) / "checkpoints")
    elif overwrite and dist.get_global_rank() == 0:
        clear_previous_run(folder)


class StartGuard:
    """Context manager: when the block fails, remove what it created in the watched folder (the folder
    itself if it did not exist); what was there before is kept."""

    def __init__(self) -> None:
        self.folder: Path | None = None
        self.before: set[str] | None = None

    def watch(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.before = {e.name for e in self.folder.iterdir()} if self.folder.is_dir() else None

    def __enter__(self) -> StartGuard:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None or self.folder is None or not self.folder.is_dir():
            return
        if self.before is None:
            shutil.rmtree(self.folder, ignore_errors=True)
            return
        for entry in self.folder.iterdir():
            if entry.name in self.before:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def check_progress(folder: str | Path, done: int, max_batches: int) -> bool:
    """True when a resumed run has already trained its ``max_batches``; an error when it went beyond."""
    if done > max_batches:
        raise ConfigError(
            f"save_folder {folder} holds a run already trained for {done} batches, more than "
            f"max_duration={max_batches}ba; raise max_duration to continue it, or choose another save_folder"
        )
    return done == max_batches > 0


def resume_line(
    folder: str | Path, done: int, max_batches: int, held_run: bool, checkpoint: Path | None
) -> str | None:
    """Where a run started with ``autoresume=true`` begins: the ``checkpoint`` it resumed from, or batch 0, said
    plainly when the folder held a run (``held_run``, before this start) but no complete checkpoint of it;
    None for a folder that held no run."""
    from llmshearing.checkpoint.composer_files import INCOMPLETE_SUFFIX

    checkpoints = Path(folder) / "checkpoints"
    if done:
        return f"resumed from {checkpoint or checkpoints} at batch {done} of {max_batches}"
    if not held_run:
        return None
    aside = sorted(p.name for p in checkpoints.glob(f"*{INCOMPLETE_SUFFIX}")) if checkpoints.is_dir() else []
    why = f" (set aside, cut off while written: {', '.join(aside)})" if aside else ""
    return (
        f"autoresume: {folder} holds no complete checkpoint{why}; the run starts over at batch 0 "
        "(metrics.jsonl keeps the earlier start's lines before this one's)"
    )


def trained_batches(folder: str | Path) -> int | None:
    """Batches trained by the run in ``folder`` at its latest complete checkpoint; None without one."""
    import torch

    from llmshearing.checkpoint.composer_files import LATEST_NAME, is_complete_torch_file

    latest = Path(folder) / "checkpoints" / LATEST_NAME.format(rank=0)
    if not latest.exists() or not is_complete_torch_file(latest):
        return None
    payload = torch.load(latest, map_location="cpu", weights_only=False, mmap=True)
    return int(payload["state"]["timestamp"]["Timestamp"]["batch"])


def is_finished(folder: str | Path) -> bool:
    """True when the run in ``folder`` has trained all of its ``max_duration`` (as its config.json says)."""
    description = read_run_description(folder)
    done = trained_batches(folder)
    if description is None or done is None:
        return False
    max_duration = str((description.get("train") or {}).get("max_duration", ""))
    return max_duration.endswith("ba") and done >= int(max_duration[:-2])
