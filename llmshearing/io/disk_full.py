"""A full disk (or an exhausted quota) while writing, told as one line that names where.

``torch.save`` reports a failed write as a ``RuntimeError`` ("file write failed"), Python's own
writes as ``OSError`` with ``ENOSPC``/``EDQUOT``; both are recognised, also when chained.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from llmshearing.io.staging import output_of_staged

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "file write failed")


def _chain(err: BaseException | None):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def is_disk_full(err: BaseException) -> bool:
    """True when ``err`` (or an error it was raised from) means the disk or quota is full."""
    for link in _chain(err):
        if isinstance(link, OSError) and link.errno in DISK_FULL_ERRNOS:
            return True
        if isinstance(link, (OSError, RuntimeError)) and any(t in str(link) for t in _DISK_FULL_TEXTS):
            return True
    return False


def _failed_path(err: BaseException) -> str | None:
    for link in _chain(err):
        if isinstance(link, OSError) and link.filename:
            return str(link.filename)
    return None


def mount_point(path: str | Path) -> Path:
    """The mount point of the filesystem holding ``path`` (or its nearest existing parent)."""
    current = Path(os.path.abspath(path))
    while not current.exists() and current != current.parent:
        current = current.parent
    while not os.path.ismount(current) and current != current.parent:
        current = current.parent
    return current


def disk_full_message(err: BaseException, writing: str | Path) -> str:
    """``no space left on <mount> while writing <path>; ...`` for an error ``is_disk_full`` accepts.

    ``<path>`` is the file the error names, else ``writing``; a staging path is named as its output.
    """
    path = str(output_of_staged(_failed_path(err) or str(writing)))
    return f"no space left on {mount_point(path)} while writing {path}; free space there or write to another disk"
