"""The recipes the repository ships for its embedded default, SmolLM2-135M on text every Python install
has: where they are (``REPO``, ``PRUNE_RECIPE``, ``CONTINUE_RECIPE``), the data they are written for
(``SEQ_LEN``, ``EVAL_SEQS``), and ``Steps``, which runs a scripted path's commands from the repository
root as a user would, timing each. `make demo`, the benchmarks and the tests run them."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PRUNE_RECIPE = REPO / "yamls" / "pruning" / "smollm2-135m-demo.yaml"
CONTINUE_RECIPE = REPO / "yamls" / "continued" / "smollm2-135m-demo.yaml"
SEQ_LEN = 128
EVAL_SEQS = 16


class Steps:
    """Runs the steps, timing each and printing a banner."""

    def __init__(self) -> None:
        self.timings: list[tuple[str, float]] = []

    def run(self, title: str, command: list[str] | None = None, func=None):
        print(f"\n=== {title} ===", flush=True)
        start = time.perf_counter()
        result = None
        if command is not None:
            print("$ " + " ".join(str(c) for c in command), flush=True)
            subprocess.run([str(c) for c in command], check=True, cwd=REPO)
        if func is not None:
            result = func()
        self.timings.append((title, time.perf_counter() - start))
        return result

    def reuse(self, title: str, path: Path, what: str = "the output of an earlier run") -> None:
        """Say that the step is skipped because ``path`` holds its finished output (listed as reused)."""
        print(f"\n=== {title} ===\nreusing {what} in {path}", flush=True)
        self.timings.append((f"{title} (reused)", 0.0))

    def run_once(
        self, out: Path, title: str, command: list | None = None, func=None, done: str | None = "config.json"
    ) -> None:
        """:meth:`run` the step that writes ``out``, or :meth:`reuse` it when ``out`` is finished: it holds the
        file ``done`` (None: ``out`` exists)."""
        if (out / done).is_file() if done else out.exists():
            self.reuse(title, out)
        else:
            self.run(title, command, func)
