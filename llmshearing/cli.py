"""The `llmshearing` console command: one sub-command per step of the user's path.

Each area of the package contributes its sub-commands through an ``add_commands(subparsers)``
function in its ``commands`` module; heavy imports happen inside the command functions so
that ``llmshearing --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMAND_MODULES = (
    "llmshearing.convert.commands",
    "llmshearing.pruning.commands",
    "llmshearing.data.commands",
    "llmshearing.dynamic_loading.commands",
    "llmshearing.evaluate",
    "llmshearing.report",
    "llmshearing.planning.commands",
    "llmshearing.shape_search.commands",
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


def _output_of(args: argparse.Namespace) -> str | None:
    """The output a command writes (named when the disk fills up or Ctrl-C stops it)."""
    for name in ("out", "out_dir", "output", "json"):
        value = getattr(args, name, None)
        if isinstance(value, (str, os.PathLike)):
            return os.fspath(value)
    return None


def main(argv: list[str] | None = None) -> int:
    from llmshearing.errors import run_reported

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides after the options (argparse takes positionals before them only)
        takes_overrides = isinstance(getattr(args, "overrides", None), list)
        unknown = [item for item in extra if not takes_overrides or item.startswith("-") or "=" not in item]
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.overrides += extra
    return run_reported(lambda: args.func(args), f"llmshearing {args.command}", writing=_output_of(args))


if __name__ == "__main__":
    sys.exit(main())
