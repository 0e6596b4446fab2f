"""Downstream accuracy in the quality benchmark: tasks built from the held-out test split, scored by lm-eval.

`build` writes ``heldout_cloze`` (a last-word cloze in LAMBADA's format) and ``heldout_mc`` (pick the true
continuation among four) from the benchmark's test split (`llmshearing.harness.heldout`); `score` runs
`llmshearing evaluate --tasks` on a checkpoint (0-shot); `seed_summary` and `table` give each arm's
accuracies with their spread over seeds, beside the test loss.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llmshearing.harness.heldout import CLOZE, MC, METRICS, build_heldout_tasks, score_heldout


def build(mds: Path, tokenizer: Path, work: Path, max_per_domain: int = 64) -> dict[str, Any]:
    """The task directory for ``mds``'s test split (built once, reused); returns where it is and its sizes."""
    out = work / f"tasks-{mds.name}"
    if not (out / f"{MC}.yaml").is_file():
        counts = build_heldout_tasks(
            str(mds), str(tokenizer), str(out), max_per_domain=max_per_domain, overwrite=True
        )
    else:
        counts = {t: sum(1 for _ in open(out / f"{t}_test.jsonl", encoding="utf-8")) for t in (CLOZE, MC)}
    return {"dir": str(out), "items": counts}


def score(model: Path, tasks: Mapping[str, Any], batch_size: int = 8) -> dict[str, float]:
    """``{"cloze acc": ..., "mc acc": ..., "mc acc_norm": ...}`` of a checkpoint, 0-shot, every test item."""
    print(f"--- downstream tasks ({CLOZE}, {MC}: the test split) of {model}", flush=True)
    return score_heldout(str(model), tasks["dir"], batch_size)


def seed_summary(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Per metric: mean and spread (max - min) over the seeds' records that have downstream scores."""
    scored = [r["downstream"] for r in records if r.get("downstream")]
    summary = {}
    for name in METRICS:
        values = [s[name] for s in scored]
        if values:
            summary[name] = {
                "mean": statistics.fmean(values),
                "spread": max(values) - min(values),
                "n": len(values),
            }
    return summary


def table(rows: Mapping[str, Mapping[str, Any]], tasks: Mapping[str, Any] | None) -> list[str]:
    """Markdown: each model's accuracies (and over seeds: mean and spread); nothing when none was scored."""
    if not tasks or not any(row.get("downstream") for row in rows.values()):
        return []
    items = ", ".join(f"{task} {count}" for task, count in tasks["items"].items())
    lines = [
        "",
        "## Downstream accuracy (lm-eval, tasks from the test split; higher is better)",
        "",
        f"0-shot, every item ({items}); chance: cloze ~0, multiple choice 0.25. Seeds: mean (spread, n).",
        "",
        "| model | " + " | ".join(METRICS) + " | " + " | ".join(f"{m}: seeds" for m in METRICS) + " |",
        "|---|" + "---|" * (2 * len(METRICS)),
    ]
    for name, row in rows.items():
        scores = row.get("downstream")
        if not scores:
            continue
        seeds = seed_summary([row, *row.get("repeats", [])])
        cells = [f"{scores[m]:.3f}" for m in METRICS]
        cells += [
            f"{seeds[m]['mean']:.3f} ({seeds[m]['spread']:.3f}, n={seeds[m]['n']})"
            if seeds.get(m, {}).get("n", 0) > 1
            else "-"
            for m in METRICS
        ]
        lines.append(f"| {name}: {row.get('title', '')} | " + " | ".join(cells) + " |")
    return lines
