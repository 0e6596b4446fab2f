"""Data sub-commands: `llmshearing prepare-data ...` (MDS datasets from JSON-lines text) and
`llmshearing reference-loss ...` (scaling-law reference losses for dynamic batch loading).

Only the standard library is imported here: the work happens in functions that import
``llmshearing.data.prepare`` and friends when they run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from llmshearing.staging import write_text_atomic

PREPARE_DESCRIPTION = "Prepare per-domain MDS datasets (train, eval and test) from JSON-lines text."


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    prepare = subparsers.add_parser(
        "prepare-data",
        help="per-domain MDS datasets (train, eval, test) from JSON-lines text",
        description=PREPARE_DESCRIPTION,
    )
    add_prepare_arguments(prepare)
    prepare.set_defaults(func=run_prepare)
    _add_reference_loss(subparsers)


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


def _add_reference_loss(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "reference-loss",
        help="reference losses for dynamic batch loading (scaling-law fit, presets)",
        description="Reference losses for callbacks.data_loading.target_loss.",
    )
    sub = parser.add_subparsers(dest="reference_command", required=True, metavar="ACTION")

    fit = sub.add_parser(
        "fit",
        help="fit L(N) = a/N^b + c per domain and predict the loss at a target size",
        description="Fit L(N) = a/N^b + c per domain from (model size, loss) points and print the "
        "predicted losses at --target-size, in domain order, ready for target_loss.",
    )
    fit.add_argument("--sizes", nargs="+", required=True, help="parameter counts of the measured models")
    losses = fit.add_mutually_exclusive_group(required=True)
    losses.add_argument(
        "--losses-file", type=Path, help='JSON object {"<domain>": [loss per size, ...], ...}'
    )
    losses.add_argument(
        "--losses", nargs="+", metavar="DOMAIN=L1,L2,...", help="inline losses, one argument per domain"
    )
    fit.add_argument(
        "--target-size", required=True, help="parameter count of the target, or a name: 1.3b, 2.7b, 370m"
    )
    fit.add_argument("--domains", nargs="+", help="output order (default: the order of the losses)")
    fit.add_argument("--output", type=Path, help="also write the result to this JSON file")
    fit.set_defaults(func=run_fit)

    presets = sub.add_parser("presets", help="print the named reference vectors of the paper")
    presets.set_defaults(func=run_presets)


def _read_losses(args: argparse.Namespace) -> dict[str, list[float]]:
    if args.losses_file is not None:
        if not args.losses_file.is_file():
            raise FileNotFoundError(f"losses file {args.losses_file} does not exist")
        try:
            data = json.loads(args.losses_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{args.losses_file} is not valid JSON: {err}") from None
        if not isinstance(data, dict) or not data:
            raise ValueError(f'{args.losses_file} must hold a JSON object {{"<domain>": [losses...]}}')
        source = str(args.losses_file)
    else:
        data = {}
        for item in args.losses:
            name, sep, values = item.partition("=")
            if not sep or not name:
                raise ValueError(f"--losses item {item!r} must look like DOMAIN=L1,L2,L3")
            data[name] = values.split(",")
        source = "--losses"
    out = {}
    for name, values in data.items():
        if not isinstance(values, list):
            raise ValueError(f"{source}: domain {name!r} must map to a list of losses, one per size")
        try:
            out[name] = [float(v) for v in values]
        except (TypeError, ValueError):
            raise ValueError(f"{source}: domain {name!r} has a non-numeric loss in {values}") from None
    return out


def _target_size(text: str) -> int:
    from llmshearing.data.reference_loss import TARGET_SIZES, parse_size

    return TARGET_SIZES.get(text.strip().lower()) or parse_size(text)


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def run_fit(args: argparse.Namespace) -> int:
    from llmshearing.data.reference_loss import fit_power_law, parse_size

    sizes = [parse_size(s) for s in args.sizes]
    losses = _read_losses(args)
    target = _target_size(args.target_size)
    domains = args.domains or list(losses)
    missing = [d for d in domains if d not in losses]
    if missing:
        raise ValueError(f"--domains lists {missing}, which have no losses (known: {list(losses)})")
    rows = []
    for domain in domains:
        try:
            law = fit_power_law(sizes, losses[domain])
            rows.append((domain, law, law.predict(target)))
        except ValueError as err:
            raise ValueError(f"domain {domain!r}: {err}") from None

    print(f"L(N) = a / (N/s)^b + c, s = {rows[0][1].scale:.6g}; target N = {target:,}")
    print(f"{'domain':<16}{'a':>12}{'b':>12}{'c':>12}{'residual':>12}{'L(target)':>12}")
    for domain, law, value in rows:
        print(f"{domain:<16}{law.a:>12.6f}{law.b:>12.6f}{law.c:>12.6f}{law.residual:>12.2e}{value:>12.4f}")
    vector = [round(value, 4) for _, _, value in rows]
    print(f"set_names: [{', '.join(domains)}]")
    print(f"target_loss: [{', '.join(f'{v:.4f}' for v in vector)}]")
    if args.output is not None:
        _write_json_atomic(
            args.output,
            {
                "sizes": sizes,
                "target_size": target,
                "set_names": domains,
                "target_loss": [value for _, _, value in rows],
                "fits": {d: {"a": law.a, "b": law.b, "c": law.c, "scale": law.scale} for d, law, _ in rows},
            },
        )
        print(f"wrote {args.output}")
    return 0


def run_presets(args: argparse.Namespace) -> int:
    from llmshearing.data.reference_loss import PAPER_DOMAINS, PRESETS

    print(f"set_names: [{', '.join(PAPER_DOMAINS)}]")
    for name, values in PRESETS.items():
        print(f"{name}: [{', '.join(f'{values[d]:.4f}' for d in PAPER_DOMAINS)}]")
    return 0
