"""The damping of ``prune-oneshot --compensate``: held-out loss of the compensated cut at several dampings.

One calibration of the source (activation scores and the Gram matrices of the ``w2`` / ``wo`` inputs, as
``prune-oneshot --compensate --samples S --batch-size B`` measures them) serves every target and damping;
for each target the ranked cut (``prune-oneshot`` without ``--compensate``) and the compensated cut at each
damping are folded and scored on the eval split (where the damping is chosen) and the test split (where it
is reported), with no training, as ``llmshearing evaluate MODEL DATA --split eval|test`` scores them.

    .venv/bin/python bench/compensation_damping.py SRC --data DATA \\
        --target n_layers=15,n_heads=9,n_kv_heads=3,d_model=576,intermediate_size=1088 --dampings 0.01 0.001 1e-4

Writes ``bench/results/compensation-damping-<date>[-N].{md,json}`` (``--no-write``: print only).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
SHAPE_KEYS = ("n_layers", "n_heads", "n_kv_heads", "d_model", "intermediate_size")
sys.path.insert(0, str(REPO))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="source checkpoint (project checkpoint dir, HF dir or Composer .pt)")
    parser.add_argument("--data", required=True, help="prepared MDS root with train, eval and test splits")
    parser.add_argument(
        "--target",
        action="append",
        required=True,
        metavar="KEY=VALUE,...",
        help="a target shape as prune-oneshot --target takes it; repeat for several",
    )
    parser.add_argument("--dampings", nargs="+", type=float, default=[1e-2, 1e-3, 1e-4])
    parser.add_argument("--samples", type=int, default=128, help="calibration samples (default: 128)")
    parser.add_argument("--batch-size", type=int, default=8, help="calibration batch size (default: 8)")
    parser.add_argument(
        "--max-samples", type=int, default=None, help="held-out samples per domain (default: all)"
    )
    parser.add_argument("--no-write", action="store_true", help="print only; write no result files")
    args = parser.parse_args(argv)
    bad = [d for d in args.dampings if not d > 0]
    if bad:
        parser.error(f"--dampings must be positive numbers, got {bad}")
    from llmshearing.pruning.commands import parse_target

    try:
        args.targets = [parse_target(text) for text in args.target]
    except ValueError as err:
        parser.error(str(err))
    return args


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per (target, cut): the ranked cut and the compensated one at each damping."""
    import torch

    from llmshearing.checkpoint.loading import from_pretrained
    from llmshearing.evaluate import ModelFn, domain_losses
    from llmshearing.pruning.compensation import compensate
    from llmshearing.pruning.fold import prune_decoder
    from llmshearing.pruning.importance import calibration_batches, calibration_domains, compute_importance
    from llmshearing.pruning.oneshot import resolve_target
    from llmshearing.pruning.ranking import oneshot_masks

    calibration_domains(args.data, "train")
    source = from_pretrained(args.src, dtype=torch.float32, device="cpu").eval()
    plans = [resolve_target(source.config, target) for target in args.targets]  # a bad target fails here
    total, batches = calibration_batches(args.data, args.samples, args.batch_size, "train")
    scores = compute_importance(source, batches, total=total, progress=True, grams=True)

    def losses(model: Any, split: str) -> dict[str, float]:
        fn = ModelFn(model, model.config.vocab_size)
        rows = domain_losses(fn, args.data, split=split, max_samples=args.max_samples, progress=False)
        return {r.domain: r.loss for r in rows}

    rows = []
    for plan in plans:
        ranked = oneshot_masks(scores, source.config, plan)
        for damping in [None, *args.dampings]:
            started = time.perf_counter()
            decoder, masks = source, ranked
            if damping is not None:
                decoder = copy.deepcopy(source)
                masks = compensate(decoder, scores.grams, ranked, plan, damping=damping)
            pruned = prune_decoder(decoder, masks).eval()
            with torch.no_grad():
                split_losses = {split: losses(pruned, split) for split in ("eval", "test")}
            row = {
                "target": {key: getattr(plan.target, key) for key in SHAPE_KEYS},
                "damping": damping,
                **{split: sum(v.values()) / len(v) for split, v in split_losses.items()},
                "domains": split_losses,
                "seconds": time.perf_counter() - started,
            }
            rows.append(row)
            print(line(row), flush=True)
    return rows


def shape(target: dict[str, int]) -> str:
    marks = ("L", "H", "KV", "d", "I")
    return "/".join(f"{target[k]}{m}" for k, m in zip(SHAPE_KEYS, marks, strict=True))


def cut_label(row: dict[str, Any]) -> str:
    return "ranked" if row["damping"] is None else f"compensated, damping {row['damping']:g}"


def line(row: dict[str, Any]) -> str:
    return (
        f"{shape(row['target'])}  {cut_label(row):<30} eval {row['eval']:.4f}  test {row['test']:.4f}  "
        f"({row['seconds']:.0f} s)"
    )


def markdown(args: argparse.Namespace, rows: list[dict[str, Any]], command: str, commit: str) -> str:
    out = [
        f"# `prune-oneshot --compensate` at several dampings, {datetime.date.today().isoformat()}",
        "",
        f"Command: `{command}`",
        f"Commit: {commit}; machine: {platform.machine()} CPU, {torch_threads()} torch threads; no training.",
        "",
        f"Calibration: {args.samples} train samples (batch {args.batch_size}), once for every row. Losses: the "
        "mean over domains of each domain's token-weighted loss"
        + (f" on its first {args.max_samples} samples" if args.max_samples else "")
        + "; choose on eval, report test.",
        "",
        "| target | cut | eval | test | s |",
        "|---|---|---:|---:|---:|",
    ]
    for row in rows:
        out.append(
            f"| {shape(row['target'])} | {cut_label(row)} | {row['eval']:.4f} | {row['test']:.4f} | {row['seconds']:.0f} |"
        )
    return "\n".join(out) + "\n"


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def write(args: argparse.Namespace, rows: list[dict[str, Any]]) -> Path:
    sys.path.insert(0, str(REPO / "bench"))
    from quality.report import git_commit

    from llmshearing.io.staging import write_text_atomic

    stem = f"compensation-damping-{datetime.date.today().isoformat()}"
    n, path = 1, RESULTS / f"{stem}.md"
    while path.exists() or path.with_suffix(".json").exists():
        n += 1
        path = RESULTS / f"{stem}-{n}.md"
    command = "python bench/compensation_damping.py " + " ".join(sys.argv[1:])
    commit = git_commit()
    write_text_atomic(
        path.with_suffix(".json"), json.dumps({"command": command, "commit": commit, "rows": rows}, indent=1)
    )
    write_text_atomic(path, markdown(args, rows, command, commit))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rows = measure(args)
    if not args.no_write:
        print(f"wrote {write(args, rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
