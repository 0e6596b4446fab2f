"""Downstream accuracy in the quality benchmark: tasks built from the held-out test split, scored by lm-eval.

`build` writes ``heldout_cloze`` (a last-word cloze in LAMBADA's format) and ``heldout_mc`` (pick the true
continuation among four) from the benchmark's test split (`llmshearing.harness.heldout`); `score` runs
`llmshearing evaluate --tasks` on a checkpoint (0-shot); `seed_summary` and `table` give each arm's
accuracies with their spread over seeds, beside the test loss.

`check_lm_eval` / `score_lm_eval` / `lm_eval_table` do the same for any lm-eval task list or preset
(``--lm-eval-tasks sheared-llama``, the paper's tasks, on by default with ``--scale``): its first ``limit``
items per task, each task's score in percent (a preset's own metric and few-shot count; otherwise
``acc_norm``, else ``acc``) and their average. The tasks are read before any arm runs, so data that cannot
be read fails the benchmark at its start, naming the task.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llmshearing.harness.heldout import CLOZE, MC, METRICS, build_heldout_tasks, score_heldout

PLAIN_METRICS = ("acc_norm,none", "acc,none")  # a task outside a preset: the first of these it reports


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


def check_lm_eval(spec: str) -> None:
    """Read ``spec``'s tasks now (names, data, few-shot pools): one clear error before any arm trains."""
    from llmshearing.harness.runner import check_tasks

    check_tasks(spec)


def lm_eval_scores(results: Mapping[str, Any], spec: str) -> dict[str, Any]:
    """``{"tasks": {task: percent}, "average": percent}`` from ``evaluate_tasks``'s results for ``spec``."""
    from llmshearing.harness.presets import PRESETS
    from llmshearing.harness.runner import metric_value, parse_task_spec

    requests, _ = parse_task_spec(spec)
    scores: dict[str, float | None] = {}
    for request in requests:
        preset_metric = {t.task: t.metric for t in PRESETS[request.preset].tasks} if request.preset else {}
        candidates = [preset_metric[request.name]] if request.name in preset_metric else list(PLAIN_METRICS)
        values = [metric_value(dict(results), request.name, metric)[0] for metric in candidates]
        found = [v for v in values if v is not None]
        scores[request.name] = 100.0 * found[0] if found else None
    done = [v for v in scores.values() if v is not None]
    return {"tasks": scores, "average": statistics.fmean(done) if done and len(done) == len(scores) else None}


def score_lm_eval(model: Path, spec: str, limit: int | None, batch_size: int = 8) -> dict[str, Any]:
    """``spec``'s tasks on a checkpoint through `llmshearing evaluate --tasks` (the first ``limit`` items)."""
    from llmshearing.harness.runner import evaluate_tasks

    print(f"--- lm-eval tasks {spec} (limit {limit}) of {model}", flush=True)
    results = evaluate_tasks(str(model), spec, limit=limit, batch_size=str(batch_size))
    return lm_eval_scores(results, spec)


def lm_eval_table(rows: Mapping[str, Mapping[str, Any]], spec: str, limit: int | None) -> list[str]:
    """Markdown: each model's average and per-task scores (percent); over seeds the average's mean."""
    scored = {name: row for name, row in rows.items() if row.get("lm_eval")}
    if not scored:
        return []
    tasks = list(next(iter(scored.values()))["lm_eval"]["tasks"])
    first = f"the first {limit} items of each task" if limit else "every item"
    lines = [
        "",
        f"## lm-eval tasks ({spec}; {first}; percent, higher is better)",
        "",
        "| model | average | average: seeds | " + " | ".join(tasks) + " |",
        "|---|---|---|" + "---|" * len(tasks),
    ]

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    for name, row in scored.items():
        scores = row["lm_eval"]
        averages = [r["lm_eval"]["average"] for r in [row, *row.get("repeats", [])] if r.get("lm_eval")]
        averages = [a for a in averages if a is not None]
        seeds = (
            f"{statistics.fmean(averages):.1f} ({max(averages) - min(averages):.1f}, n={len(averages)})"
            if len(averages) > 1
            else "-"
        )
        cells = [cell(scores["average"]), seeds, *(cell(scores["tasks"].get(t)) for t in tasks)]
        lines.append(f"| {name}: {row.get('title', '')} | " + " | ".join(cells) + " |")
    return lines
