"""The training entry point, stopped by an exception when batch ``N`` is about to start.

    composer -n 2 tests/scripts/train_until.py N RECIPE key=value ...

Every rank stops at the same batch (the checkpoint of batch N is on disk by then), as a crashed
multi-process run would; ``tests/test_fsdp.py`` then resumes it with ``autoresume=true``.
"""

from __future__ import annotations

import sys

from composer.core import Callback

from llmshearing.train import build_trainer, run


class Interrupted(RuntimeError):
    pass


class StopAt(Callback):
    def __init__(self, at: int) -> None:
        self.at = at

    def batch_start(self, state, logger) -> None:
        del logger
        if int(state.timestamp.batch) == self.at:
            raise Interrupted(f"stopped before batch {self.at + 1}")


def main(argv: list[str]) -> int:
    at, recipe, overrides = int(argv[0]), argv[1], argv[2:]
    trainer, values = build_trainer(recipe, overrides)
    trainer.state.callbacks.append(StopAt(at))
    try:
        run(trainer, values)
    except Interrupted as stop:
        print(f"interrupted: {stop}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
