"""One streaming shared-memory registration at a time on a machine.

``StreamingDataset.__init__`` looks for the first free shared-memory prefix and then creates it. Between
the look and the create, another process of the machine (a second run on the same node, or two arms of a
benchmark started together) can choose the same prefix, and one of them stops with ``FileExistsError:
[Errno 17] File exists: '/000002_locals'``. Each node's local leader registers the prefix and the other
ranks attach to it inside the constructor, so holding a file lock around the constructor on the local
leader alone removes the race. The other ranks never take the lock: they wait for their leader at the
constructor's barriers, which the leader reaches while holding it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

try:
    import fcntl
except ImportError:  # no POSIX file locks (Windows): the registration stays unguarded
    fcntl = None  # type: ignore[assignment]


def lock_path() -> str:
    """The lock file: beside the shared memory it guards (``/dev/shm``) when the machine has it, one per user."""
    directory = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    return os.path.join(
        directory, f"llmshearing-streaming-{os.getuid() if hasattr(os, 'getuid') else 0}.lock"
    )


def is_local_leader() -> bool:
    """Whether this process registers the node's prefix, decided as ``StreamingDataset`` decides it."""
    from streaming.base.world import World

    return World.detect().is_local_leader


@contextlib.contextmanager
def prefix_registration() -> Iterator[None]:
    """Hold the machine's registration lock on the local leader while a ``StreamingDataset`` is built."""
    if fcntl is None or not is_local_leader():
        yield
        return
    with open(lock_path(), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
