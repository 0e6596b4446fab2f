"""The quality benchmark's results: one row per arm over its seeds, the targets (each met or missed,
with the figures that say why), the machine and commit a run was made on, the markdown tables, and the
JSON and markdown records written under ``bench/results`` (an earlier record is never overwritten)."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llmshearing.io.staging import write_text_atomic
from llmshearing.training.recipes import REPO

from .budget import ARM_NUMBER, ARMS, SPARSITY_TOLERANCE
from .sources import average_loss

RESULTS_DIR = REPO / "bench" / "results"


# ------------------------------------------------------------------------------------- aggregation
def seed_summary(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Average test loss per seed of one arm, their mean and spread (max - min; 0 for one seed)."""
    per_seed = {str(r["seed"]): average_loss(r["losses"]) for r in records}
    values = list(per_seed.values())
    return {"per_seed": per_seed, "mean": statistics.fmean(values), "spread": max(values) - min(values)}


def build_rows(source: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """One row per arm: the first seed's record, with ``repeats`` (every seed's record) and ``seeds``
    (:func:`seed_summary`); the source row first."""
    rows: dict[str, dict[str, Any]] = {"source": dict(source)}
    for arm in ARMS:
        mine = [r for r in records if r["arm"] == arm]
        if mine:
            rows[arm] = {**mine[0], "repeats": list(mine[1:]), "seeds": seed_summary(mine)}
    return rows


def arm_loss(row: Mapping[str, Any]) -> float:
    """An arm's average test loss: the mean over its seeds when it has several."""
    return row["seeds"]["mean"] if "seeds" in row else average_loss(row["losses"])


def sparsity_misses(rows: Mapping[str, Any]) -> list[str]:
    """One line per L0 run whose expected sparsity ended more than the tolerance from the target."""
    misses = []
    for arm, row in rows.items():
        for record in [row, *row.get("repeats", [])]:
            sparsity = record.get("sparsity")
            if sparsity and not sparsity["ok"]:
                misses.append(
                    f"{arm} seed {record['seed']}: expected sparsity {sparsity['expected']:.3f}, target "
                    f"{sparsity['target']:.3f} (gap {sparsity['gap']:+.3f}, tolerance {SPARSITY_TOLERANCE})"
                )
    return misses


# ----------------------------------------------------------------------------------------- targets
def compare(rows: Mapping[str, Any], arm: str, other: str) -> float | None:
    """``arm``'s average test loss over ``other``'s (None when either did not run)."""
    if arm not in rows or other not in rows:
        return None
    return arm_loss(rows[arm]) / arm_loss(rows[other])


def result_line(rows: Mapping[str, Any]) -> str:
    """``RESULT`` line: arm 3 / arm 5 and arm 3 / arm 8 (targets < 1.00) and arm 1 / arm 2 (target <= 1.00),
    average test losses."""
    full, mix = compare(rows, "l0-distill", "oneshot-distill"), compare(rows, "l0-dynamic", "l0-constant")
    learning = compare(rows, "l0-distill", "l0-held")
    if full is None and mix is None:
        return "RESULT quality skipped=needs arms 3 and 5 (l0-distill, oneshot-distill) or 1 and 2 (l0-dynamic, l0-constant)"
    parts = ["RESULT quality"]
    if full is not None:
        parts.append(f"arm3/arm5={full:.3f} target=<1.00")
    if learning is not None:
        parts.append(f"arm3/arm8={learning:.3f} target=<1.00")
    if mix is not None:
        parts.append(f"arm1/arm2={mix:.3f} target=<=1.00")
    return " ".join(parts)


def _domain_deltas(rows: Mapping[str, Any], arm: str, other: str) -> str:
    """Per-domain test-loss differences of the first seeds, largest loss of ``arm`` first."""
    a, b = rows[arm]["losses"], rows[other]["losses"]
    deltas = sorted(((a[d]["loss"] - b[d]["loss"], d) for d in a if d in b), reverse=True)
    return ", ".join(f"{d} {delta:+.3f}" for delta, d in deltas)


def _explain(rows: Mapping[str, Any], arm: str, other: str, strict: bool) -> str:
    """Whether ``arm`` met its target against ``other``, with the figures that say why not."""
    mine, theirs = arm_loss(rows[arm]), arm_loss(rows[other])
    ratio = mine / theirs
    met = ratio < 1.0 if strict else ratio <= 1.0
    spread = max(rows[arm]["seeds"]["spread"], rows[other]["seeds"]["spread"])
    n = min(len(rows[arm]["seeds"]["per_seed"]), len(rows[other]["seeds"]["per_seed"]))
    head = (
        f"arm {ARM_NUMBER[arm]} ({arm}) {mine:.3f} vs arm {ARM_NUMBER[other]} ({other}) {theirs:.3f}: "
        f"ratio {ratio:.3f}, target {'<' if strict else '<='} 1.00: **{'met' if met else 'missed'}**"
    )
    notes = [f"seed spread (max - min over {n} seeds) up to {spread:.3f}" if n > 1 else "one seed: no spread"]
    if n > 1 and abs(mine - theirs) <= spread:
        notes.append("the difference is within the seed spread")
    if not met:
        notes.append(f"per-domain differences (first seed): {_domain_deltas(rows, arm, other)}")
        for name in (arm, other):
            sparsity, structure = rows[name].get("sparsity"), rows[name].get("structure")
            if sparsity and not sparsity["ok"]:
                notes.append(
                    f"arm {ARM_NUMBER[name]}'s masks ended at expected sparsity {sparsity['expected']:.3f} "
                    f"of {sparsity['target']:.3f}"
                )
            if structure:
                notes.append(
                    f"arm {ARM_NUMBER[name]} folds a structure that differs from the one-shot cut in "
                    f"{_structure_cell(structure)} (first seed)"
                )
    return f"- {head}; " + "; ".join(notes)


def target_lines(rows: Mapping[str, Any]) -> list[str]:
    """The issue's targets, each met or missed with its figures."""
    lines = []
    if "l0-distill" in rows and "oneshot-distill" in rows:
        lines.append(_explain(rows, "l0-distill", "oneshot-distill", strict=True))
    if "l0-distill" in rows and "l0-held" in rows:  # the masks' learning, the pruning stage's training aside
        lines.append(_explain(rows, "l0-distill", "l0-held", strict=True))
    if "l0-dynamic" in rows and "l0-constant" in rows:
        lines.append(_explain(rows, "l0-dynamic", "l0-constant", strict=False))
    arms = [a for a in ARMS if a in rows]
    if "l0-distill" in rows and len(arms) > 1:
        best = min(arms, key=lambda a: arm_loss(rows[a]))
        if best == "l0-distill":
            lines.append("- arm 3 has the lowest average test loss of all arms: **met**")
        else:
            lines.append(
                f"- arm 3 has the lowest average test loss of all arms: **missed** (lowest: arm "
                f"{ARM_NUMBER[best]} {best} {arm_loss(rows[best]):.3f}, arm 3 {arm_loss(rows['l0-distill']):.3f})"
            )
    if "l0-default" in rows and "oneshot-distill" in rows:  # learned masks without the ranked start
        lines.append(_explain(rows, "l0-default", "oneshot-distill", strict=True))
    return lines


# ----------------------------------------------------------------------------------------- results
def machine() -> dict[str, Any]:
    """CPU model, cores, torch threads and GPU (if any) of this machine."""
    import torch

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def git_commit() -> str:
    """``HEAD``'s commit, with ``+dirty`` when the work tree has changes (the result files an earlier
    run wrote to ``bench/results`` do not count)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        )
        status = ["git", "status", "--porcelain", "--", ".", f":(exclude){RESULTS_DIR.relative_to(REPO)}"]
        dirty = subprocess.run(status, cwd=REPO, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _fmt_loss(losses: Mapping[str, Mapping[str, float]] | None, domain: str | None = None) -> str:
    if not losses:
        return "-"
    return f"{average_loss(losses) if domain is None else losses[domain]['loss']:.3f}"


def _fmt_flops(flops: float) -> str:
    return f"{flops / 1e12:.2f}"


def _label(name: str) -> str:
    return f"{ARM_NUMBER[name]} {name}" if name in ARM_NUMBER else name


SOURCE_NAMES = {"smollm2": "SmolLM2-135M", "miniature": "the miniature Llama"}


def source_name(results: Mapping[str, Any]) -> str:
    """The pruned source's name (a study's ``source`` is its loss row; it names the miniature in ``miniature``)."""
    if results.get("miniature"):
        return SOURCE_NAMES["miniature"]
    source = results.get("source")
    return SOURCE_NAMES.get(source, "SmolLM2-135M") if isinstance(source, str) else "SmolLM2-135M"


def _header(results: Mapping[str, Any], title: str) -> list[str]:
    meta, budget = results["meta"], results["budget"]
    domains = list(results["domains"])
    excluded = results.get("excluded_domains") or {}
    lines = [
        f"# {title}: {source_name(results)} -> {results['target_desc']} ({meta['mode']})",
        "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}; git commit: {meta['commit']}; total wall time: {meta['total_seconds']:.0f} s",
        f"- machine: {meta['machine']['cpu']}, {meta['machine']['cores']} cores, "
        f"{meta['machine']['torch_threads']} torch threads, GPU: {meta['machine']['gpu'] or 'none'}",
        f"- data: {results['corpus']} ({len(domains)} domains); losses: first {results['eval_samples']} "
        f"sequences per domain of the {results['report_split']} split",
    ]
    if excluded:
        lines.append("- left out: " + "; ".join(f"{d} ({why})" for d, why in excluded.items()))
    lines += [
        f"- token budget T per arm: {budget['tokens']:,} tokens = {budget['steps']} steps x "
        f"{budget['batch']} sequences x {budget['seq_len']} tokens (pruning share {budget['prune_share']:.0%}"
        + (
            f"; L0 pruning at batch {budget['prune_batch']}, {budget['batch'] // budget['prune_batch']}x the steps)"
            if budget.get("prune_batch")
            else ")"
        ),
        f"- parameters: source {results['params']['source']:,} non-embedding; target "
        f"{results['params']['target']:,} ({results['params']['target'] / results['params']['source']:.1%})",
        "- settings: " + ", ".join(f"{k}={v}" for k, v in results.get("settings", {}).items()),
    ]
    return lines


def _loss_table(results: Mapping[str, Any], split: str) -> list[str]:
    rows, domains = results["rows"], list(results["domains"])
    lines = [
        f"## {split.capitalize()} loss (lower is better)",
        "",
        "| model | avg loss | seeds: mean (spread) | avg ppl | after pruning | "
        + " | ".join(domains)
        + " | train tokens | TFLOPs | wall s |",
        "|---|---|---|---|---|" + "---|" * len(domains) + "---|---|---|",
    ]
    for name, row in rows.items():
        losses = row["losses"]
        avg = average_loss(losses)
        seeds = row.get("seeds")
        seed_cell = (
            f"{seeds['mean']:.3f} ({seeds['spread']:.3f}, n={len(seeds['per_seed'])})"
            if seeds and len(seeds["per_seed"]) > 1
            else "-"
        )
        cells = [
            f"{_label(name)}: {row['title']}",
            f"{avg:.3f}",
            seed_cell,
            f"{math.exp(min(avg, 50.0)):.1f}",
            _fmt_loss(row.get("after_pruning")),
            *(_fmt_loss(losses, d) for d in domains),
            f"{row.get('tokens', 0):,}",
            _fmt_flops(row["flops"]["total"]) if "flops" in row else "-",
            f"{row['seconds']:.0f}" if "seconds" in row else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _sparsity_table(rows: Mapping[str, Any]) -> list[str]:
    entries = [
        (name, record)
        for name, row in rows.items()
        for record in [row, *row.get("repeats", [])]
        if record.get("sparsity")
    ]
    if not entries:
        return []
    lines = [
        "",
        "## L0 masks before folding",
        "",
        f"Expected sparsity of the prunable parameters at the last pruning step (must be within "
        f"{SPARSITY_TOLERANCE} of the target).",
        "",
        "'units changed': units of the folded structure (the last mask snapshot, at batch N) that the "
        "one-shot cut of the same importance scores treats the other way (kept / dropped), of all units compared.",
        "",
        "'largest family gap': the mask family whose own expected sparsity ended farthest from its target.",
        "",
        "| arm | seed | at start | at the end | target | gap | within tolerance | largest family gap "
        "| units changed vs the one-shot cut |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, record in entries:
        s = record["sparsity"]
        lines.append(
            f"| {_label(name)} | {record['seed']} | {s['initial']:.3f} | {s['expected']:.3f} | {s['target']:.3f} | "
            f"{s['gap']:+.3f} | {'yes' if s['ok'] else '**no**'} | {_family_gap_cell(s.get('families'))} | "
            f"{_structure_cell(record.get('structure'))} |"
        )
    return lines


def _family_gap_cell(families: Mapping[str, float] | None) -> str:
    """``family +0.095`` for the family farthest from its target; ``-`` when the run logged none."""
    if not families:
        return "-"
    family = max(families, key=lambda f: abs(families[f]))
    return f"{family} {families[family]:+.3f}"


def _structure_cell(structure: Mapping[str, Any] | None) -> str:
    """``changed of units (family n, ...), at batch N`` for :func:`structure_change`'s result."""
    from llmshearing.pruning.snapshots import describe_moved

    if not structure:
        return "-"
    moved = {family: (n, structure["units"][family]) for family, n in structure["changed"].items()}
    return f"{describe_moved(moved)}, at batch {structure['batch']}"


def _stage_table(rows: Mapping[str, Any]) -> list[str]:
    lines = [
        "",
        "## Stages (first seed)",
        "",
        "| arm | stage | steps | tokens | TFLOPs | wall s | train s | eval s | LM / KD loss, teacher time | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        for stage in row.get("stages", []):
            timings = [stage.get(key) for key in ("train_seconds", "eval_seconds")]
            train_s, eval_s = ("-" if t is None else f"{t:.1f}" for t in timings)
            kd = stage.get("distill_summary") or {}
            kd_cell = (
                f"{kd['lm']:.3f} / {kd['kd']:.3f}, {kd.get('teacher_time_share', 0.0):.0%}"
                if "lm" in kd and "kd" in kd
                else "-"
            )
            lines.append(
                f"| {_label(name)} | {stage['name']} | {stage['steps']} | {stage['tokens']:,} | "
                f"{_fmt_flops(stage.get('flops', 0))} | {stage['seconds']:.1f} | {train_s} | {eval_s} | "
                f"{kd_cell} | {stage['detail']} |"
            )
    return lines


def _mix_table(results: Mapping[str, Any]) -> list[str]:
    rows, domains = results["rows"], list(results["domains"])
    columns = [
        ("initial (constant arms: throughout)", dict(zip(domains, results["initial_mix"], strict=True)))
    ]
    columns += [
        (f"{_label(name)} {stage} final", mix["final"])
        for name, row in rows.items()
        for stage, mix in row.get("mixes", {}).items()
        if row.get("dynamic") and "final" in mix
    ]
    if not domains:
        return []
    lines = [
        "",
        "## Domain weights (first seed)",
        "",
        "| domain | " + " | ".join(c for c, _ in columns) + " |",
    ]
    lines.append("|---|" + "---|" * len(columns))
    for d in domains:
        lines.append(f"| {d} | " + " | ".join(f"{m.get(d, float('nan')):.3f}" for _, m in columns) + " |")
    return lines


def render_markdown(results: Mapping[str, Any]) -> str:
    """The results as markdown: test losses per arm and domain with seed spreads, targets, L0
    sparsity, stages with FLOPs, data mixes, run facts."""
    rows = results["rows"]
    lines = _header(results, "Quality benchmark")
    lines += ["", *_loss_table(results, results["report_split"])]
    targets = target_lines(rows)
    if targets:
        lines += ["", "## Targets", "", result_line(rows), "", *targets]
    misses = sparsity_misses(rows)
    if misses:
        lines += ["", "**L0 sparsity check failed:** " + "; ".join(misses)]
    lines += _sparsity_table(rows)
    if results.get("downstream_tasks"):
        from . import downstream

        lines += downstream.table(rows, results["downstream_tasks"])
    if results.get("lm_eval_tasks"):
        from . import downstream

        spec = results["lm_eval_tasks"]
        lines += downstream.lm_eval_table(rows, spec["tasks"], spec["limit"])
    lines += _stage_table(rows)
    lines += _mix_table(results)
    lines += [
        "",
        "TFLOPs: training FLOPs (6 N per token over the matmul parameters plus attention, the model's "
        "`flops_per_batch` formula) of every training stage, the teacher's forward (2 N per token of the source) "
        "included, plus the one-shot calibration forward for the arms that use its scores; evaluations are not "
        "counted. Wall times include process start, model loading and the evaluations during training; 'train "
        "s' and 'eval s' are Composer's own. 'after pruning' is the loss right after pruning, before continued "
        "pretraining. Seeds: the first seed runs every arm, later seeds the deciding arms (3, 5, 1, 2); the mean "
        "and spread (max - min) are over the seeds an arm ran. The dynamic mix reads the eval split; every "
        f"loss in the tables is on the {results['report_split']} split.",
        "",
    ]
    return "\n".join(lines)


def write_results(
    results: Mapping[str, Any], directory: Path = RESULTS_DIR, kind: str = ""
) -> tuple[Path, Path]:
    """``quality-<date>-<mode>[-<kind>].json`` and ``.md`` under ``directory`` (temp file + rename).

    A record already there is kept: a second run of the same day and mode gets ``-2``, then ``-3``.
    """
    stem = f"quality-{results['meta']['date']}-{results['meta']['mode']}" + (f"-{kind}" if kind else "")
    json_path, md_path = directory / f"{stem}.json", directory / f"{stem}.md"
    repeat = 1
    while json_path.exists() or md_path.exists():
        repeat += 1
        json_path, md_path = directory / f"{stem}-{repeat}.json", directory / f"{stem}-{repeat}.md"
    from .study import render_study  # the study's markdown is built from this module's tables

    render = render_study if kind == "study" else render_markdown
    write_text_atomic(json_path, json.dumps(results, indent=2) + "\n")
    write_text_atomic(md_path, render(results))
    return json_path, md_path
