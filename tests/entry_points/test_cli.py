"""The ``llmshearing`` command: building the parser and every ``--help`` load no torch and no Composer."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "composer")

# Runs every ``--help`` through ``cli.main`` in a fresh interpreter, then reports what was imported.
HELP_ALL = textwrap.dedent(
    """
    import argparse, contextlib, io, json, sys

    from llmshearing import cli


    def command_paths(parser, prefix=()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield (*prefix, name)
                    yield from command_paths(sub, (*prefix, name))


    codes = {}
    for argv in [(), *command_paths(cli.build_parser())]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            try:
                cli.main([*argv, "--help"])
            except SystemExit as done:
                codes[" ".join(argv)] = (done.code, "usage: llmshearing" in out.getvalue())
    print(json.dumps({"codes": codes, "loaded": sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)}))
    """
)


def run_all_helps() -> dict:
    script = f"HEAVY = {HEAVY!r}\n{HELP_ALL}"
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_help_of_every_command_imports_neither_torch_nor_composer() -> None:
    result = run_all_helps()
    codes = result["codes"]
    expected = {
        "",
        "prune-model",
        "prune-oneshot",
        "convert hf-to-composer",
        "convert composer-to-hf",
        "report",
    }
    assert expected <= set(codes), sorted(codes)
    assert all(code == 0 and printed for code, printed in codes.values()), codes
    assert result["loaded"] == [], f"--help imported {result['loaded'][:10]}"


def test_parser_is_built_without_torch_or_composer() -> None:
    script = (
        "import sys\nfrom llmshearing.cli import build_parser\nbuild_parser()\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]", proc.stdout[:300]
