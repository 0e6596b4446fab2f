"""Data sub-command: `llmshearing prepare-data ...` (MDS datasets from JSON-lines text).

Only the standard library is imported here: the work happens in functions that import
``llmshearing.data.prepare`` and friends when they run.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

PREPARE_DESCRIPTION = "Prepare per-domain MDS datasets (train, eval and test) from JSON-lines text."


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    prepare = subparsers.add_parser(
        "prepare-data",
        help="per-domain MDS datasets (train, eval, test) from JSON-lines text",
        description=PREPARE_DESCRIPTION,
    )
    add_prepare_arguments(prepare)
    prepare.set_defaults(func=run_prepare)


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``prepare-data`` (and of ``data_prep/prepare_mds.py``), one per ``PrepareConfig`` field."""
    parser.add_argument(
        "--input", required=True, type=Path, help="directory holding <domain>/*.jsonl[.gz|.zst]"
    )
    parser.add_argument("--output", required=True, type=Path, help="output directory (must not hold data)")
    parser.add_argument("--tokenizer", required=True, help="HF tokenizer directory, hub name or .gguf file")
    parser.add_argument("--seq-len", required=True, type=int, help="tokens per sample")
    parser.add_argument(
        "--eval-seqs", type=int, default=500, help="eval samples per domain; 0: no eval split (default: 500)"
    )
    parser.add_argument(
        "--test-seqs",
        type=int,
        default=None,
        help="test samples per domain, never read during training; 0: no test split (default: as --eval-seqs)",
    )
    parser.add_argument(
        "--train-seqs", type=int, default=None, help="cap on train samples per domain (default: all)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="tokenizer processes (default: CPUs, at most 8)",
    )
    parser.add_argument("--seed", type=int, default=42, help="seed of the split (default: 42)")
    parser.add_argument(
        "--text-field", default="text", help="JSON field holding the document text (default: text)"
    )
    parser.add_argument(
        "--max-bad-lines",
        type=int,
        default=100,
        help="malformed lines skipped per domain before failing (default: 100)",
    )
    parser.add_argument(
        "--compression", choices=["zstd"], default=None, help="MDS shard compression (default: none)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an output directory that holds data"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


class _TqdmHandler(logging.Handler):
    """Log records printed through tqdm so that they do not break progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


def run_prepare(args: argparse.Namespace) -> int:
    """Prepare the data the parsed options describe and print the summary table.

    User errors (``FileNotFoundError``, ``ValueError``, ``KeyError``) propagate to the caller,
    which reports them in one line.
    """
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])

    from llmshearing.data.prepare import PrepareConfig, format_summary, prepare

    config = PrepareConfig(
        input=args.input,
        output=args.output,
        tokenizer=args.tokenizer,
        seq_len=args.seq_len,
        eval_seqs=args.eval_seqs,
        test_seqs=args.test_seqs,
        train_seqs=args.train_seqs,
        workers=args.workers,
        seed=args.seed,
        text_field=args.text_field,
        max_bad_lines=args.max_bad_lines,
        compression=args.compression,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    manifest = prepare(config)
    print(format_summary(manifest))
    print(f"wrote {args.output}")
    return 0
