"""The training entry point, stopped by an exception when batch ``N`` is about to start.

    composer -n 2 tests/scripts/train_until.py N RECIPE key=value ...

Every rank stops at the same batch (the checkpoint of batch N is on disk by then), as a crashed
multi-process run would; ``tests/training/test_fsdp.py`` then resumes it with ``autoresume=true``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: the shared CrashAt callback

from conftest import CrashAt, Interrupted  # noqa: E402

from llmshearing.train import build_trainer, run  # noqa: E402


def main(argv: list[str]) -> int:
    at, recipe, overrides = int(argv[0]), argv[1], argv[2:]
    trainer, values = build_trainer(recipe, overrides)
    trainer.state.callbacks.append(CrashAt(at))
    try:
        run(trainer, values)
    except Interrupted as stop:
        print(f"interrupted: {stop}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
