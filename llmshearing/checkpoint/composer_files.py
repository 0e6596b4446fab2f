"""Composer checkpoint files on disk: is one complete, what is a file that is not one, and the repair
of a checkpoint folder after a process was killed while saving.

Composer 0.32.1 writes a monolithic checkpoint with ``torch.save`` straight into its final name
(``ep{epoch}-ba{batch}-rank{rank}.pt``) and only then replaces the ``latest-rank{rank}.pt`` symlink
(remove, then create). A process killed while saving therefore leaves a truncated file under a
checkpoint's name, or (between remove and create) no ``latest`` symlink at all. Either breaks
autoresume: Composer refuses to start next to a checkpoint "from the future", or starts over.
A sharded checkpoint (a directory ``ep{epoch}-ba{batch}`` that ``latest`` links to) is complete once
its ``.metadata`` index exists. ``repair_checkpoint_folder`` renames truncated files and index-less
directories to ``<name>.incomplete`` and points ``latest`` at the newest complete checkpoint again.
"""

from __future__ import annotations

import codecs
import logging
import os
import re
import zipfile
from pathlib import Path

from llmshearing.io.staging import staging_path

log = logging.getLogger("llmshearing.train")

CHECKPOINT_NAME = re.compile(r"ep(\d+)-ba(\d+)-rank(\d+)\.pt")
SHARDED_NAME = re.compile(r"ep(\d+)-ba(\d+)")  # a sharded checkpoint's directory (all ranks)
LATEST_NAME = "latest-rank{rank}.pt"
INCOMPLETE_SUFFIX = ".incomplete"
_PICKLE_MAGIC = b"\x80"  # torch's legacy (non-zip) format starts with a pickle protocol byte


def is_complete_torch_file(path: str | Path) -> bool:
    """True when ``path`` is a whole ``torch.save`` archive: a zip whose central directory (written
    last) is present and lists a ``data.pkl``. A legacy (non-zip) torch file counts as complete."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError:
        return False
    if head[:1] == _PICKLE_MAGIC:
        return True
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("data.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _kind_of_file(path: Path) -> str:
    """A short name for what a file that is not a torch checkpoint looks like."""
    with open(path, "rb") as handle:
        head = handle.read(64)
    if head.startswith(b"GGUF"):
        return "a GGUF model file"
    if len(head) >= 9 and head[8:9] == b"{":
        return "a safetensors file (part of a converted or exported model directory)"
    if head.lstrip()[:1] in (b"{", b"["):
        return "a JSON file"
    if not head:
        return "an empty file"
    try:  # an incremental decoder accepts a character cut off at the end of the sample
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return "a binary file of another format"
    if all(char.isprintable() or char in "\t\r\n" for char in text):
        return "a text file"
    return "a binary file of another format"


def checkpoint_file_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a readable Composer checkpoint file, or None when it looks like one."""
    path = Path(path)
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head.startswith(b"PK"):
        if is_complete_torch_file(path):
            return None
        return (
            f"{path} is incomplete: it was cut off while being written (a run killed or out of disk while "
            "saving); use the previous checkpoint (the run's checkpoints/latest-rank0.pt points at the newest "
            "complete one after `autoresume=true` restarts the run)"
        )
    if head[:1] == _PICKLE_MAGIC:
        return None
    return f"{path} is not a Composer checkpoint (.pt written by training): it is {_kind_of_file(path)}"


def _batch_of(name: str) -> int:
    match = CHECKPOINT_NAME.fullmatch(name) or SHARDED_NAME.fullmatch(name)
    return int(match.group(2)) if match else -1


def is_complete_checkpoint(path: str | Path) -> bool:
    """A whole ``.pt`` file, or a sharded checkpoint directory whose ``.metadata`` index (written last,
    once every rank has written its shard) exists."""
    from llmshearing.checkpoint.sharded import is_sharded_checkpoint

    path = Path(path)
    return is_sharded_checkpoint(path) if path.is_dir() else is_complete_torch_file(path)


def set_aside_incomplete(folder: str | Path) -> list[Path]:
    """Rename truncated checkpoint files in ``folder`` to ``<name>.incomplete``; returns the new paths."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    moved = []
    for entry in sorted(folder.iterdir()):
        if entry.is_symlink():
            continue
        named = (
            CHECKPOINT_NAME.fullmatch(entry.name) if entry.is_file() else SHARDED_NAME.fullmatch(entry.name)
        )
        if not named or not (entry.is_file() or entry.is_dir()):
            continue
        if not is_complete_checkpoint(entry):
            target = entry.with_name(entry.name + INCOMPLETE_SUFFIX)
            os.replace(entry, target)
            log.warning("%s was cut off while being written; set aside as %s", entry, target.name)
            moved.append(target)
    return moved


def complete_checkpoints(folder: str | Path, rank: int = 0) -> list[Path]:
    """The complete checkpoints of ``rank`` in ``folder`` (its ``.pt`` files, and sharded checkpoints'
    directories), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [
        entry
        for entry in folder.iterdir()
        if not entry.is_symlink()
        and (
            ((match := CHECKPOINT_NAME.fullmatch(entry.name)) and int(match.group(3)) == rank)
            or (entry.is_dir() and SHARDED_NAME.fullmatch(entry.name))
        )
        and is_complete_checkpoint(entry)
    ]
    return sorted(found, key=lambda entry: _batch_of(entry.name))


def newest_complete_checkpoint(folder: str | Path, rank: int = 0) -> Path | None:
    """The complete checkpoint of ``rank`` in ``folder`` with the highest batch count, if any."""
    found = complete_checkpoints(folder, rank)
    return found[-1] if found else None


def saved_checkpoints(folder: str | Path, rank: int = 0) -> list[Path]:
    """The complete checkpoints in ``folder``, oldest first, named as Composer's checkpoint saver lists those it
    saved: ``rank``'s ``.pt`` file, or a file inside a sharded checkpoint's directory (the saver removes the
    directory). A resumed run hands them to the saver, which otherwise keeps count of its own saves only."""
    return [
        entry / f"__{rank}_0.distcp" if entry.is_dir() else entry
        for entry in complete_checkpoints(folder, rank)
    ]


def repair_latest_link(folder: str | Path, rank: int = 0) -> Path | None:
    """Point ``latest-rank{rank}.pt`` at the newest complete checkpoint when it is missing, dangling or
    points at an incomplete file (replaced atomically); returns the link when it was changed."""
    folder = Path(folder)
    link = folder / LATEST_NAME.format(rank=rank)
    if link.exists() and is_complete_checkpoint(link):
        return None
    newest = newest_complete_checkpoint(folder, rank)
    if newest is None:
        return None
    staging = staging_path(link)
    os.symlink(newest.name, staging)
    os.replace(staging, link)
    log.warning("%s pointed at no complete checkpoint; it now points at %s", link, newest.name)
    return link


def repair_checkpoint_folder(folder: str | Path, rank: int = 0) -> list[Path]:
    """Make a checkpoint folder safe to resume from after a kill while saving; returns what changed."""
    changed = set_aside_incomplete(folder)
    link = repair_latest_link(folder, rank)
    return [*changed, *([link] if link is not None else [])]


def read_recorded_identity(path: str | Path) -> dict | None:
    """The run identity (model shape, mask settings) a training checkpoint recorded, if any."""
    import torch

    from llmshearing.checkpoint.run_config import recorded_identity

    try:
        payload = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # unreadable files are reported by the checkpoint reader itself
        return None
    return recorded_identity(payload.get("state")) if isinstance(payload, dict) else None
