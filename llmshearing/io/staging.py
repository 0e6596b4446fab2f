"""Write-then-rename: every output appears complete or not at all.

A writer stages its output under a hidden sibling ``.<name>.tmp-<host>-<pid>-<random>`` and renames
it into place when it is complete; an output being replaced is first moved aside to
``.<name>.old-...``. A process that is killed cannot clean up, so each writer first removes the
staging of earlier writers of the same output on this host whose process no longer runs (staging
written from other hosts of a shared filesystem is left alone).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path


def _host() -> str:
    """This host's name with every character but letters, digits and dots replaced (no ``-``)."""
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def staging_path(out: str | Path, kind: str = "tmp") -> Path:
    """A fresh hidden sibling of ``out`` owned by this process (``kind``: ``tmp`` or ``old``)."""
    out = Path(out)
    return out.with_name(f".{out.name}.{kind}-{_host()}-{os.getpid()}-{secrets.token_hex(4)}")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():  # unlinking a missing name fails on a read-only disk
        path.unlink(missing_ok=True)


_STAGED_NAME = re.compile(r"\.(.+)\.(?:tmp|old)-[A-Za-z0-9._]+-\d+-[0-9a-f]+")


def output_of_staged(path: str | Path) -> Path:
    """``path`` with a staging directory or file in it replaced by the output it becomes.

    ``/data/.mds.tmp-host-12-ab12cd34/train`` -> ``/data/mds/train``; other paths are returned as they are.
    """
    parts = [match.group(1) if (match := _STAGED_NAME.fullmatch(part)) else part for part in Path(path).parts]
    return Path(*parts) if parts else Path(path)


def remove_stale(out: str | Path) -> list[Path]:
    """Remove what killed writers of ``out`` on this host left beside it; returns what was removed."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(?:tmp|old)-{re.escape(_host())}-(\d+)-[0-9a-f]+")
    removed = []
    for entry in out.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and int(match.group(1)) != os.getpid() and not _running(int(match.group(1))):
            _remove(entry)
            removed.append(entry)
    return removed


def _rename_without_replacing(staging: Path, out: Path) -> None:
    """Rename ``staging`` to ``out``, which may be missing or an empty directory, never a finished output."""
    try:
        os.rename(staging, out)  # atomic; fails when out is a non-empty directory or not a directory
    except OSError as err:
        if err.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise
        raise ValueError(
            f"{out} was written by another process while this one ran (two runs with the same output?); "
            "it is left as it is and this run's output discarded: remove it or choose another output path"
        ) from None


def check_distinct_outputs(outputs: dict[str, str | Path | None]) -> None:
    """Raise ``ValueError`` when two outputs (``{option: path}``; None: not written) are the same path or
    one lies inside the other: the second writer would replace or pollute the first one's output."""
    given = [(name, Path(os.path.abspath(path))) for name, path in outputs.items() if path is not None]
    for i, (name_a, a) in enumerate(given):
        for name_b, b in given[i + 1 :]:
            if a == b or a in b.parents or b in a.parents:
                how = "is the same path as" if a == b else "lies inside" if a in b.parents else "holds"
                raise ValueError(
                    f"{name_b} {b} {how} {name_a} {a}: each output needs its own directory; choose another path"
                )


def refuse_existing_output(out: str | Path, overwrite: bool = False) -> None:
    """A ``ValueError`` when ``out`` exists (other than as an empty directory) and ``overwrite`` is off: what
    :func:`staged_dir` checks first, for a command to answer before its heavy work."""
    out = Path(out)
    if out.exists() and not overwrite and not (out.is_dir() and not any(out.iterdir())):
        raise ValueError(
            f"{out} already exists; remove it, choose another output path, or replace it with --overwrite"
        )


@contextlib.contextmanager
def staged_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty staging directory; it becomes ``out`` only when the block succeeds.

    An existing ``out`` (other than an empty directory) is an error unless ``overwrite``, in which
    case it is replaced as a whole. Without ``overwrite``, an ``out`` that another writer completed
    meanwhile is kept and this writer fails.
    """
    out = Path(out)
    refuse_existing_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(out)
    staging = staging_path(out)
    staging.mkdir()
    try:
        yield staging
        if not overwrite:
            _rename_without_replacing(staging, out)
        elif out.exists() or out.is_symlink():
            old = staging_path(out, "old")
            os.replace(out, old)
            os.replace(staging, out)
            _remove(old)
        else:
            os.replace(staging, out)
    except BaseException:
        _remove(staging)
        raise


@contextlib.contextmanager
def staged_file(path: str | Path) -> Iterator[Path]:
    """Yield a staging path to write; the file replaces ``path`` only when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    staging = staging_path(path)
    try:
        yield staging
        os.replace(staging, path)
    finally:
        _remove(staging)  # gone already after a successful rename


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a staging file and a rename."""
    with staged_file(path) as staging:
        staging.write_text(text, encoding="utf-8")
    return Path(path)
