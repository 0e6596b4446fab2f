"""Prepare per-domain MDS datasets (train, eval and test) from JSON-lines text.

Example::

    python data_prep/prepare_mds.py --input raw --output data/mds --tokenizer .cache/smollm2-135m \\
        --seq-len 4096 --eval-seqs 500 --test-seqs 500 --workers 8

``raw`` holds ``<domain>/*.jsonl`` (or ``.jsonl.gz``, ``.jsonl.zst``), one JSON object per line with
a text field. The output holds ``train/<domain>/``, ``eval/<domain>/`` and ``test/<domain>/`` MDS
directories (no document in two of them) and a ``manifest.json``; see ``llmshearing.data.prepare``.
Training reads train, and eval for the data mix; test is for ``llmshearing evaluate --split test``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

try:
    import llmshearing  # noqa: F401
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prepare_mds.py",
        description=__doc__.split("\n\n")[0],
    )
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
    return parser


class _TqdmHandler(logging.Handler):
    """Log records printed through tqdm so that they do not break progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
    try:
        manifest = prepare(config)
    except (FileNotFoundError, ValueError, KeyError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}", file=sys.stderr)
        return 2
    print(format_summary(manifest))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
