"""The `llmshearing` console command: one sub-command per step of the user's path.

Each area of the package contributes its sub-commands through an ``add_commands(subparsers)``
function in its ``commands`` module; heavy imports happen inside the command functions so
that ``llmshearing --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = (
    "llmshearing.convert.commands",
    "llmshearing.pruning.commands",
    "llmshearing.pruning.oneshot",
    "llmshearing.data.commands",
    "llmshearing.evaluate",
    "llmshearing.report",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmshearing",
        description="Targeted structured pruning and continued pretraining of LLaMA-family models.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except (FileNotFoundError, ValueError, KeyError) as err:  # user errors: one clear line, no traceback
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"llmshearing {args.command}: error: {message}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
