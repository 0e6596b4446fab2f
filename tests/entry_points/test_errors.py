"""The one error report every entry point shares (``llmshearing.errors``): which faults are the user's,
how each reads, the exit codes, and that the three entry points print the same fault the same way."""

from __future__ import annotations

import errno
import importlib.util
import sys
from pathlib import Path

import pytest

from llmshearing import cli, train
from llmshearing.errors import (
    EXIT_INTERRUPTED,
    EXIT_USER_ERROR,
    file_system_message,
    run_reported,
    user_message,
)
from llmshearing.io.staging import output_of_staged, staging_path

REPO = Path(__file__).resolve().parents[2]


def _raise(err: BaseException):
    def body(*args: object) -> None:
        raise err

    return body


def test_a_staging_path_is_named_as_the_output_it_becomes(tmp_path):
    staged = staging_path(tmp_path / "mds")
    assert (
        output_of_staged(staged / "train" / "web" / "shard.00000.mds")
        == tmp_path / "mds/train/web/shard.00000.mds"
    )
    assert output_of_staged(staging_path(tmp_path / "scores.json")) == tmp_path / "scores.json"
    assert output_of_staged(tmp_path / ".hidden" / "x") == tmp_path / ".hidden" / "x"


@pytest.mark.parametrize(
    ("code", "says"),
    [
        (errno.EROFS, "the file system is read-only; choose an output path on a writable disk"),
        (errno.EACCES, "permission denied"),
        (errno.ENOTDIR, "a part of the path is a file, not a directory"),
        (errno.ENOSPC, "no space left on"),
    ],
)
def test_file_system_faults_name_the_output_not_the_staging(tmp_path, code, says):
    err = OSError(code, "refused", str(staging_path(tmp_path / "out") / "index.json"))
    message = file_system_message(err, tmp_path / "out")
    assert says in message and f"{tmp_path / 'out' / 'index.json'}" in message and ".tmp-" not in message


def test_a_fault_raised_from_a_file_system_refusal_is_the_refusal():
    try:
        try:
            raise OSError(errno.EROFS, "Read-only file system", "/ro/out")
        except OSError as inner:
            raise RuntimeError("could not save") from inner
    except RuntimeError as outer:
        assert (
            user_message(outer)
            == "/ro/out: the file system is read-only; choose an output path on a writable disk"
        )


def test_user_faults_are_one_line_and_bugs_keep_their_traceback(capsys):
    assert run_reported(_raise(ValueError("model.path 'x' does not exist; convert first")), "prog") == 2
    assert capsys.readouterr().err == "prog: error: model.path 'x' does not exist; convert first\n"
    assert run_reported(_raise(KeyError("no target_model mapping")), None) == EXIT_USER_ERROR
    assert capsys.readouterr().err == "error: no target_model mapping\n"  # not quoted as str(KeyError) is
    with pytest.raises(TypeError):
        run_reported(_raise(TypeError("a bug")), "prog")
    with pytest.raises(ValueError):  # while training, a ValueError is a bug: only the file system is told
        run_reported(_raise(ValueError("bad")), "prog", user_errors=False)
    assert run_reported(_raise(OSError(errno.EROFS, "x", "/ro/run")), "prog", user_errors=False) == 2
    assert "/ro/run: the file system is read-only" in capsys.readouterr().err
    assert run_reported(lambda: 0, "prog") == 0 and run_reported(lambda: None, "prog") == 0


def test_ctrl_c_and_sigterm_are_one_line_with_their_exit_codes(capsys, tmp_path):
    assert run_reported(_raise(KeyboardInterrupt()), "prog", writing=tmp_path / "out") == EXIT_INTERRUPTED
    assert capsys.readouterr().err.splitlines() == [
        f"prog: interrupted before {tmp_path / 'out'} was complete; nothing half-written was left "
        "(run the command again to redo it)"
    ]
    # Composer turns SIGINT / SIGTERM into sys.exit(130 / 143)
    assert run_reported(_raise(SystemExit(130)), None, on_interrupt=lambda what: f"{what}; resume") == 130
    assert capsys.readouterr().err == "interrupted; resume\n"
    assert run_reported(_raise(SystemExit(143)), None) == 143
    assert capsys.readouterr().err.startswith("terminated (SIGTERM);")
    with pytest.raises(SystemExit):  # any other exit is the program's own
        run_reported(_raise(SystemExit(3)), None)


def _prepare_mds_module():
    spec = importlib.util.spec_from_file_location("prepare_mds", REPO / "data_prep" / "prepare_mds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_same_fault_reads_the_same_from_every_entry_point(tmp_path, monkeypatch, capsys):
    """A read-only output disk, met by `llmshearing prepare-data`, `prepare_mds.py` and the trainer."""
    out = tmp_path / "out"
    fault = OSError(errno.EROFS, "Read-only file system", str(staging_path(out)))
    import llmshearing.data.commands as data_commands

    monkeypatch.setattr(data_commands, "run_prepare", _raise(fault))
    script = _prepare_mds_module()
    monkeypatch.setattr(script, "run_prepare", _raise(fault))
    monkeypatch.setattr(train, "build_trainer", _raise(fault))
    argv = ["--input", str(tmp_path), "--output", str(out), "--tokenizer", "t", "--seq-len", "8"]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"save_folder: {out}\n")

    lines = []
    for run in (
        lambda: cli.main(["prepare-data", *argv]),
        lambda: script.main(argv),
        lambda: train.main([str(recipe)]),
    ):
        assert run() == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1, err
        lines.append(err.split("error: ", 1)[1])
    assert (
        lines[0]
        == lines[1]
        == lines[2]
        == f"{out}: the file system is read-only; choose an output path on a writable disk\n"
    )


def test_cli_names_a_path_output_in_its_messages(tmp_path, monkeypatch, capsys):
    """prepare-data's --output is a Path: a full disk names it (not '.')."""
    import llmshearing.data.commands as data_commands

    monkeypatch.setattr(data_commands, "run_prepare", _raise(RuntimeError("file write failed")))
    out = tmp_path / "mds"
    argv = [
        "prepare-data",
        "--input",
        str(tmp_path),
        "--output",
        str(out),
        "--tokenizer",
        "t",
        "--seq-len",
        "8",
    ]
    assert cli.main(argv) == 2
    assert f"while writing {out};" in capsys.readouterr().err


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signal masks")
def test_tokenizer_workers_start_with_ctrl_c_held():
    import signal

    from llmshearing.data.tokenizer_pool import _ctrl_c_held

    before = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    with _ctrl_c_held():
        assert signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, set())
    assert signal.pthread_sigmask(signal.SIG_BLOCK, set()) == before
