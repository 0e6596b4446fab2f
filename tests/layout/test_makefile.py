"""The Makefile's user-facing side: ``make help`` reads as two columns, and ``make continue`` runs the demo's
continued recipe with the teacher it leaves to be set."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def make(*args: str) -> str:
    done = subprocess.run(["make", "-s", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_help_keeps_a_gap_after_every_target_name() -> None:
    lines = make("help").splitlines()
    targets = re.findall(r"^([a-z-]+):.*## ", (ROOT / "Makefile").read_text(), flags=re.M)
    assert len(lines) == len(targets) and "evaluate-tasks" in targets
    for line, target in zip(lines, targets, strict=True):
        assert re.match(rf"  {target} {{2,}}\S", line), line
    assert len({re.match(r"  \S+ +", line).end() for line in lines}) == 1  # the texts in one column
    continue_help = next(line for line in lines if line.startswith("  continue "))
    assert 'ARGS="callbacks.data_loading.target_loss=[L1,L2]"' in continue_help
    assert "make evaluate MODEL=<source>" in continue_help


def last_command(*args: str) -> str:
    """The command ``make continue`` would run (the Makefile reads the recipe with this interpreter)."""
    python_bin = f"BIN={Path(sys.executable).parent}"
    return make("-n", "continue", python_bin, "PRUNED=p", "CONT_RUN=r", *args).strip().splitlines()[-1]


def test_continue_passes_the_teacher_only_to_a_recipe_that_leaves_it_unset() -> None:
    demo = last_command("SOURCE=src")
    assert "yamls/continued/smollm2-135m-demo.yaml" in demo
    assert "model.distillation.teacher=src" in demo
    assert "model.distillation.teacher=t" in last_command("TEACHER=t")
    sheared = last_command("CONT_RECIPE=yamls/continued/sheared-llama-1.3b.yaml")
    assert "sheared-llama-1.3b.yaml" in sheared and "teacher" not in sheared
