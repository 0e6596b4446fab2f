"""`llmshearing report RUN_DIR`: PNG plots and a markdown summary of a training run.

Reads ``RUN_DIR/metrics.jsonl`` (written by the run's metrics logger) and draws one figure per
topic that the run logged: domain weights, per-domain eval loss against the reference,
expected vs target sparsity per mask family, Lagrange multipliers, the training loss and the
downstream tasks of ``eval_tasks`` (``icl/<label>/<metric>``: accuracies and perplexities apart).
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass

from llmshearing.io.staging import staged_dir

Series = list[tuple[int, float]]


@dataclass(frozen=True)
class Panel:
    """One figure: the metrics whose names match ``pattern``; group 1 of the match names the line."""

    filename: str
    title: str
    ylabel: str
    pattern: str
    dashed_pattern: str | None = None  # a second family of lines drawn dashed (targets, references)


# lm-eval's perplexity-like metrics (lower is better, on another scale): drawn apart from the accuracies
PERPLEXITIES = ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")

PANELS = (
    Panel("domain_weights.png", "Domain weights", "weight", r"^data/weight/(.+)$"),
    Panel(
        "domain_loss.png",
        "Per-domain loss (solid) vs reference (dashed)",
        "cross-entropy",
        r"^data/loss/(.+)$",
        r"^data/reference/(.+)$",
    ),
    Panel(
        "sparsity.png",
        "Expected (solid) vs target (dashed) sparsity per mask family",
        "sparsity",
        r"^l0/expected_sparsity/(.+)$",
        r"^l0/target_sparsity/(.+)$",
    ),
    Panel("multipliers.png", "Lagrange multipliers", "value", r"^l0/(lambda_[12]/.+)$"),
    Panel(
        "units_moved.png",
        "Units moved from the ranked start (mask snapshots)",
        "units",
        r"^l0/(units_moved)$",
    ),
    Panel("train_loss.png", "Training loss", "loss", r"^loss/train/(.+)$"),
    Panel(
        "icl.png",
        "Downstream tasks (lm-eval, eval_tasks)",
        "score",
        rf"^icl/(.+/(?!(?:{'|'.join(PERPLEXITIES)})$)[^/]+)$",
    ),
    Panel(
        "icl_perplexity.png",
        "Downstream tasks: perplexity (lm-eval, eval_tasks)",
        "perplexity",
        rf"^icl/(.+/(?:{'|'.join(PERPLEXITIES)}))$",
    ),
    Panel(
        "eval_loss.png",
        "Evaluation cross-entropy",
        "cross-entropy",
        r"^metrics/eval/(.*LanguageCrossEntropy)$",
    ),
)


def _select(metrics: dict[str, Series], pattern: str | None) -> dict[str, Series]:
    if pattern is None:
        return {}
    regex = re.compile(pattern)
    return {m.group(1): series for name, series in sorted(metrics.items()) if (m := regex.match(name))}


def _plot(panel: Panel, metrics: dict[str, Series], path: str) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    solid = _select(metrics, panel.pattern)
    dashed = _select(metrics, panel.dashed_pattern)
    if not solid:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = {}
    for label, series in solid.items():
        steps, values = zip(*series, strict=True)
        (line,) = ax.plot(steps, values, marker="." if len(steps) < 50 else None, label=label)
        colors[label] = line.get_color()
    for label, series in dashed.items():
        steps, values = zip(*series, strict=True)
        ax.plot(
            steps,
            values,
            linestyle="--",
            color=colors.get(label),
            label=f"{label} (ref)" if label not in colors else None,
        )
    ax.set_title(panel.title)
    ax.set_xlabel("batch")
    ax.set_ylabel(panel.ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _summary(run_dir: str, metrics: dict[str, Series], written: list[str]) -> str:
    from llmshearing.pruning.snapshots import describe_moved, moved_from_start

    lines = [f"# Run report: `{run_dir}`", ""]
    last_step = max((s[-1][0] for s in metrics.values() if s), default=0)
    lines += [f"Last logged batch: {last_step}.", ""]
    weights = _select(metrics, r"^data/weight/(.+)$")
    losses = _select(metrics, r"^data/loss/(.+)$")
    if weights:
        lines += ["| domain | first weight | last weight | last loss |", "|---|---|---|---|"]
        for domain, series in weights.items():
            loss = f"{losses[domain][-1][1]:.4f}" if domain in losses else "-"
            lines.append(f"| {domain} | {series[0][1]:.4f} | {series[-1][1]:.4f} | {loss} |")
        lines.append("")
    expected = _select(metrics, r"^l0/expected_sparsity/(.+)$")
    target = _select(metrics, r"^l0/target_sparsity/(.+)$")
    if expected:
        lines += ["| mask family | expected sparsity | target sparsity |", "|---|---|---|"]
        for family, series in expected.items():
            goal = f"{target[family][-1][1]:.4f}" if family in target else "-"
            lines.append(f"| {family} | {series[-1][1]:.4f} | {goal} |")
        lines.append("")
    moved = moved_from_start(run_dir)  # None without a ranked start
    if moved is not None:
        lines += [
            f"Units moved from the ranked start (masks/start.pt) by the last mask snapshot: {describe_moved(moved)}.",
            "",
        ]
    train = _select(metrics, r"^loss/train/(total)$")
    if train:
        lines += [
            f"Training loss: {train['total'][0][1]:.4f} (first) -> {train['total'][-1][1]:.4f} (last).",
            "",
        ]
    icl = _select(metrics, r"^icl/(.+)$")
    if icl:
        lines += ["| downstream task / metric | first | last |", "|---|---|---|"]
        for name, series in icl.items():
            lines.append(
                f"| {name} | {series[0][1]:.4g} (batch {series[0][0]}) | {series[-1][1]:.4g} (batch {series[-1][0]}) |"
            )
        lines.append("")
    lines += ["Plots:", ""] + [f"![{name}]({name})" for name in written]
    return "\n".join(lines) + "\n"


REPORT_FILES = frozenset([*(panel.filename for panel in PANELS), "report.md"])


def _check_out_dir(out_dir: str) -> None:
    """Refuse an output directory holding anything but an earlier report (which is replaced)."""
    if not os.path.exists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise ValueError(f"--out {out_dir} exists and is not a directory; choose another path")
    others = sorted(set(os.listdir(out_dir)) - REPORT_FILES)
    if others:
        raise ValueError(
            f"--out {out_dir} holds files a report does not write ({', '.join(others[:3])}); "
            "a report replaces its directory as a whole: choose a new or empty directory"
        )


def write_report(run_dir: str, out_dir: str | None = None) -> list[str]:
    """Render the plots and ``report.md`` for ``run_dir`` into ``out_dir`` (default ``RUN_DIR/report``)."""
    from llmshearing.training.metrics_log import METRICS_FILENAME, read_metrics

    source = os.path.join(run_dir, METRICS_FILENAME)
    if not os.path.isfile(source):
        raise FileNotFoundError(
            f"{source} not found: RUN_DIR must be the save_folder of a training run "
            "(the run writes metrics.jsonl there)"
        )
    metrics = read_metrics(source)
    if not metrics:
        raise ValueError(f"{source} holds no metrics yet; run training for at least one batch")
    out_dir = out_dir or os.path.join(run_dir, "report")
    _check_out_dir(out_dir)
    with staged_dir(out_dir, overwrite=True) as staging:
        written = [p.filename for p in PANELS if _plot(p, metrics, os.path.join(staging, p.filename))]
        with open(os.path.join(staging, "report.md"), "w", encoding="utf-8") as handle:
            handle.write(_summary(run_dir, metrics, written))
    return [os.path.join(out_dir, name) for name in [*written, "report.md"]]


def _run(args: argparse.Namespace) -> int:
    for path in write_report(args.run_dir, args.out):
        print(path)
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("report", help="PNG plots and a markdown summary of a training run")
    parser.add_argument("run_dir", help="the run's save_folder (holds metrics.jsonl)")
    parser.add_argument("--out", default=None, help="output directory (default: RUN_DIR/report)")
    parser.set_defaults(func=_run)
