"""Prepare per-domain MDS datasets (train, eval and test) from JSON-lines text.

Example::

    python data_prep/prepare_mds.py --input raw --output data/mds --tokenizer .cache/smollm2-135m \\
        --seq-len 4096 --eval-seqs 500 --test-seqs 500 --workers 8

``raw`` holds ``<domain>/*.jsonl`` (or ``.jsonl.gz``, ``.jsonl.zst``), one JSON object per line with
a text field. The output holds ``train/<domain>/``, ``eval/<domain>/`` and ``test/<domain>/`` MDS
directories (no document in two of them) and a ``manifest.json``; see ``llmshearing.data.prepare``.
Training reads train, and eval for the data mix; test is for ``llmshearing evaluate --split test``.
The same command is ``llmshearing prepare-data`` (same options).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    import llmshearing  # noqa: F401
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmshearing.data.commands import PREPARE_DESCRIPTION, add_prepare_arguments, run_prepare


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prepare_mds.py", description=PREPARE_DESCRIPTION)
    add_prepare_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    from llmshearing.errors import run_reported

    args = build_parser().parse_args(argv)
    return run_reported(lambda: run_prepare(args), writing=args.output)


if __name__ == "__main__":
    sys.exit(main())
