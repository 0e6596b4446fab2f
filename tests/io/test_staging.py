"""Write-then-rename staging: complete outputs or none, and cleanup after killed writers."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from llmshearing.io.staging import remove_stale, staged_dir, staged_file, staging_path, write_text_atomic


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _stale(out, pid: int, kind: str = "tmp", host: str | None = None):
    """A staging entry as a writer with ``pid`` (on ``host``, default this one) would have named it."""
    own = staging_path(out, kind)
    prefix, _, _, token = own.name.rsplit("-", 3)
    host = host or own.name.rsplit("-", 3)[1]
    return own.with_name(f"{prefix}-{host}-{pid}-{token}")


def test_staged_dir_appears_whole_or_not_at_all(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with staged_dir(out) as staging:
            (staging / "half").write_text("x")
            raise RuntimeError("killed mid-way")
    assert list(tmp_path.iterdir()) == []  # no output, no staging left

    with staged_dir(out) as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".out.tmp-")
        (staging / "a").write_text("first")
    assert (out / "a").read_text() == "first"

    with pytest.raises(ValueError, match="already exists"):
        with staged_dir(out):
            pass
    with staged_dir(out, overwrite=True) as staging:
        (staging / "b").write_text("second")
    assert sorted(p.name for p in out.iterdir()) == ["b"]  # replaced as a whole
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_staged_file_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "out.json"
    write_text_atomic(path, "old")
    with pytest.raises(RuntimeError):
        with staged_file(path) as staging:
            staging.write_text("half")
            raise RuntimeError("boom")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # the usual permissions


def test_staging_of_killed_writers_is_removed_by_the_next_writer(tmp_path):
    out = tmp_path / "data"
    dead = _dead_pid()
    stale_dir, stale_old = _stale(out, dead), _stale(out, dead, "old")
    stale_dir.mkdir()
    (stale_dir / "shard.mds").write_bytes(b"0" * 10)
    stale_old.write_text("previous")
    running = _stale(out, os.getppid())  # a live process: perhaps still writing
    running.mkdir()
    other_host = _stale(out, dead, host="elsewhere.example")  # a shared filesystem's other host
    other_host.mkdir()
    unrelated = tmp_path / f".other.tmp-{stale_dir.name.rsplit('-', 3)[1]}-{dead}-00000000"
    unrelated.mkdir()

    with staged_dir(out) as staging:
        (staging / "manifest.json").write_text("{}")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["data", running.name, other_host.name, unrelated.name])
    assert remove_stale(out) == []  # nothing more to remove
