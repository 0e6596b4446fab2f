"""How every entry point tells a fault: ``llmshearing``, ``composer llmshearing/train.py`` (and
``python -m llmshearing.train``) and ``data_prep/prepare_mds.py``.

A fault the user can fix (a bad value, a missing file, a full or read-only disk, a path that is a
file where a directory belongs) is printed as one line, ``[<prog>: ]error: <what, where, the fix>``,
and the process exits with 2; Ctrl-C prints one line and exits with 130 (SIGTERM: 143). Anything else is a bug and
keeps its traceback. The writers stage their output and rename it into place (``staging``), so a
fault or Ctrl-C leaves nothing half-written; a path inside a staging directory is reported as the
output it was becoming.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Callable
from pathlib import Path

from llmshearing.io.disk_full import disk_full_message, is_disk_full
from llmshearing.io.staging import output_of_staged

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

# File-system refusals the user fixes by choosing another path (or fixing the one given).
FILE_SYSTEM_FIXES = {
    errno.EROFS: "the file system is read-only; choose an output path on a writable disk",
    errno.EACCES: "permission denied; fix the permissions or choose a path this user can write",
    errno.EPERM: "operation not permitted; fix the permissions or choose another path",
    errno.ENOTDIR: "a part of the path is a file, not a directory; choose another path",
    errno.EISDIR: "it is a directory where a file belongs; choose another path",
    errno.ENAMETOOLONG: "the name is too long; choose a shorter path",
    errno.ELOOP: "too many levels of symbolic links; fix the links or choose another path",
}


def file_system_message(err: BaseException, writing: str | Path | None = None) -> str | None:
    """The one-line report of a full disk or a refusal of the file system, else None.

    ``writing`` names the output being written, for an error that names no file.
    """
    if is_disk_full(err):
        return disk_full_message(err, writing if writing is not None else ".")
    refusal = next((e for e in _chain(err) if isinstance(e, OSError) and e.errno in FILE_SYSTEM_FIXES), None)
    if refusal is not None:
        where = refusal.filename if refusal.filename is not None else writing
        what = FILE_SYSTEM_FIXES[refusal.errno]
        return f"{output_of_staged(where)}: {what}" if where is not None else what
    return None


def _chain(err: BaseException) -> list[BaseException]:
    """``err`` and the errors it was raised from or while handling."""
    links: list[BaseException] = []
    current: BaseException | None = err
    while current is not None and all(current is not link for link in links):
        links.append(current)
        current = current.__cause__ or current.__context__
    return links


def user_message(err: BaseException, writing: str | Path | None = None) -> str | None:
    """The one-line report of ``err`` when it is a fault the user can fix, else None (a bug)."""
    message = file_system_message(err, writing)
    if message is not None:
        return message
    if isinstance(err, KeyError):  # str() of a KeyError quotes its message
        return str(err.args[0]) if err.args else "a required key is missing"
    if isinstance(err, (FileNotFoundError, ValueError)):
        return str(err) or type(err).__name__
    return None


# Composer turns SIGINT and SIGTERM into ``sys.exit(128 + signal)`` once it is imported
SIGNAL_EXITS = {EXIT_INTERRUPTED: "interrupted", 128 + 15: "terminated (SIGTERM)"}


def interrupted_message(writing: str | Path | None = None, what: str = "interrupted") -> str:
    """The line printed on Ctrl-C (``what``: how the process was stopped)."""
    where = f" before {writing} was complete" if writing is not None else ""
    return f"{what}{where}; nothing half-written was left (run the command again to redo it)"


def report(message: str, prog: str | None = None) -> None:
    """Print ``message`` as the one error line of ``prog`` (``error: ...`` without a program name)."""
    prefix = f"{prog}: error: " if prog else "error: "
    print(prefix + message, file=sys.stderr, flush=True)


def run_reported(
    body: Callable[[], int | None],
    prog: str | None = None,
    writing: str | Path | None = None,
    on_disk_full: Callable[[BaseException, str], str] | None = None,
    on_interrupt: Callable[[str], str] | None = None,
    user_errors: bool = True,
) -> int:
    """Run ``body`` and turn a fault the user can fix into one line and an exit code.

    ``on_disk_full(err, message)`` may rewrite the message of a full disk (e.g. say what was set
    aside); ``on_interrupt(what)`` may replace the line printed on Ctrl-C or SIGTERM (``what`` says
    which). With ``user_errors`` false
    only faults of the file system (and Ctrl-C) are told this way: a ``ValueError`` is then a bug.
    Bugs propagate with their traceback.
    """
    try:
        return int(body() or 0)
    except (KeyboardInterrupt, SystemExit) as stop:
        code = EXIT_INTERRUPTED if isinstance(stop, KeyboardInterrupt) else stop.code
        if code not in SIGNAL_EXITS:  # a plain sys.exit: not ours to report
            raise
        what = SIGNAL_EXITS[code]
        line = on_interrupt(what) if on_interrupt is not None else interrupted_message(writing, what)
        print(f"{prog}: {line}" if prog else line, file=sys.stderr, flush=True)
        return int(code)
    except Exception as err:
        message = user_message(err, writing) if user_errors else file_system_message(err, writing)
        if message is None:
            raise
        if on_disk_full is not None and is_disk_full(err):
            message = on_disk_full(err, message)
        report(message, prog)
        return EXIT_USER_ERROR
