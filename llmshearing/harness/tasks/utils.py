"""Data of the tasks in this folder: JSONL files beside this module, read with ``datasets``' json loader.

The task YAMLs name these functions as ``custom_dataset``, so the tasks find their data wherever the
package is installed and whatever the working directory is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _splits(stem: str) -> Any:
    import datasets

    files = {split: str(HERE / f"{stem}_{split}.jsonl") for split in ("train", "test")}
    return datasets.load_dataset("json", data_files=files)


def local_mc(**_: Any) -> Any:
    """``train`` and ``test`` splits of the pick-the-sensible-continuation task."""
    return _splits("local_mc")


def local_cloze(**_: Any) -> Any:
    """``train`` and ``test`` splits of the last-word cloze task."""
    return _splits("local_cloze")
