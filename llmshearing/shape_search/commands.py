"""Argument parsing of ``llmshearing search-shape`` (the pipeline is :mod:`llmshearing.shape_search.search`)."""

from __future__ import annotations

import argparse
import json


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "search-shape",
        help="find the shape that does best under a budget (params, memory or speed) and write it as a target",
        description="Enumerate the uniform, GQA-valid shapes of SRC that meet --budget (d_model and "
        "intermediate_size in multiples of --multiple, d_model divisible by n_heads), score --candidates of "
        "them (one-shot importance pruning + --steps batches of distillation from SRC on DATA's train split, "
        "loss on its eval split), print the ranking and write the best as a target_model YAML. Resumable: a "
        "rerun with the same options continues from the state in --work-dir.",
    )
    parser.add_argument("src", help="source checkpoint: project checkpoint dir, HF model dir or Composer .pt")
    parser.add_argument(
        "--budget",
        required=True,
        metavar="KIND=VALUE",
        help="params=1.3e9, non_embedding_params=4e7, memory=6GB[,dtype=bf16][,context=TOKENS] or "
        "tokens_per_second=2 (x the source); optional tolerance=0.05 (the band below the budget)",
    )
    parser.add_argument("--data", required=True, help="prepared MDS root with train/ and eval/ splits")
    parser.add_argument("--candidates", type=int, default=10, help="shapes to score (default: 10)")
    parser.add_argument(
        "--multiple", type=int, default=64, help="d_model / intermediate_size multiple (default: 64)"
    )
    parser.add_argument(
        "--min-layers", type=int, default=1, help="fewest layers a shape may have (default: 1)"
    )
    parser.add_argument("--max-layers", type=int, default=None, help="most layers (default: the source's)")
    parser.add_argument(
        "--steps", type=int, default=20, help="distillation batches per candidate (default: 20)"
    )
    parser.add_argument("--batch-size", type=int, default=4, help="distillation batch size (default: 4)")
    parser.add_argument("--lr", type=float, default=3e-4, help="distillation learning rate (default: 3e-4)")
    parser.add_argument(
        "--samples", type=int, default=64, help="importance calibration samples (default: 64)"
    )
    parser.add_argument(
        "--eval-batches", type=int, default=16, help="eval batches of 8 per score (default: 16)"
    )
    parser.add_argument(
        "--out", default="target.yaml", help="target_model YAML to write (default: target.yaml)"
    )
    parser.add_argument(
        "--work-dir", default=None, help="state and scratch folder (default: <out stem>-search/)"
    )
    parser.add_argument("--restart", action="store_true", help="discard the state of an earlier search")
    parser.add_argument("--json", action="store_true", help="print the ranking as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_search_shape)


def run_search_shape(args: argparse.Namespace) -> int:
    from llmshearing.shape_search.search import SearchSettings, search_shape

    settings = SearchSettings(
        src=args.src,
        data=args.data,
        budget=args.budget,
        candidates=args.candidates,
        multiple=args.multiple,
        min_layers=args.min_layers,
        max_layers=args.max_layers,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        samples=args.samples,
        eval_batches=args.eval_batches,
    )
    result = search_shape(
        settings, args.out, args.work_dir, restart=args.restart, progress=not args.no_progress
    )
    print(json.dumps(result.to_json(), indent=2) if args.json else result.table())
    return 0
