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


def _output_of(args: argparse.Namespace) -> str:
    """The output a command writes (named when the disk fills up)."""
    for name in ("out", "out_dir", "output", "json"):
        value = getattr(args, name, None)
        if isinstance(value, str):
            return value
    return "."


def main(argv: list[str] | None = None) -> int:
    from llmshearing.disk_full import disk_full_message, is_disk_full

    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except (FileNotFoundError, ValueError, KeyError) as err:  # user errors: one clear line, no traceback
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"llmshearing {args.command}: error: {message}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as err:
        if not is_disk_full(err):
            raise
        print(
            f"llmshearing {args.command}: error: {disk_full_message(err, _output_of(args))}", file=sys.stderr
        )
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
