"""The quality benchmark's study (``--study``): the tables of variants of the settings (mix stabilisers,
distillation, pruning share and learning rate, how the L0 masks start and learn), each run once for the
whole budget and ranked on the eval split only; the best variant of each group, and the study's markdown."""

from __future__ import annotations

import argparse
import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from llmshearing.training.recipes import Steps

from .arms import run_arm
from .budget import SPARSITY_TOLERANCE, Budget, plan_arms
from .report import _fmt_loss, _header, _structure_cell
from .sources import Inputs, average_loss

# variants of the settings, each a set of option values (``--mix-*`` / ``--kd-*`` flags) over the
# defaults; mix variants run the one-shot arm from the paper's rule plus one change, distillation
# variants the one-shot + distillation arm with the default mix
PAPER_RULE = {"mix_eta": 1.0, "mix_ema": 0.0, "mix_floor": 0.0, "mix_warmup": 0, "mix_excess": "absolute"}
STUDY_MIX = {
    name: {**PAPER_RULE, **change}
    for name, change in {
        "paper rule": {},
        "eta 0.3": {"mix_eta": 0.3},
        "loss EMA 0.5": {"mix_ema": 0.5},
        "floor 0.5": {"mix_floor": 0.5},
        "warm-up 1 update": {"mix_warmup": 1},
        "relative excess": {"mix_excess": "relative"},
        "all four": {"mix_eta": 0.3, "mix_ema": 0.5, "mix_floor": 0.5, "mix_excess": "relative"},
    }.items()
}
STUDY_KD = {
    "alpha 0.5, T 1": {"kd_alpha": 0.5, "kd_temperature": 1.0},
    "alpha 0.9, T 1": {"kd_alpha": 0.9, "kd_temperature": 1.0},
    "alpha 1.0, T 1": {"kd_alpha": 1.0, "kd_temperature": 1.0},
    "alpha 0.5, T 2": {"kd_alpha": 0.5, "kd_temperature": 2.0},
    "alpha 0.9, T 2": {"kd_alpha": 0.9, "kd_temperature": 2.0},
}
PRUNE_LR = 2e-4  # the pruning recipe's learning rate of the model's weights
CONTINUE_LR = 3e-4  # the continued-pretraining recipe's
STUDY_PRUNE = {
    "share 0.25, lr 2e-4": {"prune_share": 0.25, "prune_lr": PRUNE_LR},
    "share 0.125, lr 2e-4": {"prune_share": 0.125, "prune_lr": PRUNE_LR},
    "share 0.25, lr 3e-4": {"prune_share": 0.25, "prune_lr": 3e-4},
}
# how arm 3's masks start and learn: held at the one-shot cut (bound 16, mask lr 0.05), or learning from a ranked
# start inside the bound (+-1 of log 100, units at the bounds counted exactly) with the target held from the first
# step or warmed up from where the ranked masks begin, with the lrs on the schedule
INTERIOR = {"l0_clamp": round(math.log(100), 4), "l0_init_scale": 1.0, "l0_bounded": True}
STUDY_MASKS = {
    "ranked, held (bound 16, mask lr 0.05)": {
        "l0_clamp": 16.0, "l0_init_scale": None, "l0_bounded": False, "mask_lr": 0.05, "l0_warmup": None,
    },
    "ranked interior, target from the start (mask lr 0.1, multiplier lr 0.05)": {
        **INTERIOR, "mask_lr": 0.1, "multiplier_lr": 0.05, "l0_warmup": None, "l0_schedule_lr": False,
    },
    "ranked interior, warm-up 75%, scheduled lrs (0.1 / 0.05)": {
        **INTERIOR, "mask_lr": 0.1, "multiplier_lr": 0.05, "l0_warmup": 0.75, "l0_schedule_lr": True,
    },
    "ranked interior, warm-up 50%, scheduled lrs (0.2 / 0.05)": {
        **INTERIOR, "mask_lr": 0.2, "multiplier_lr": 0.05, "l0_warmup": 0.5, "l0_schedule_lr": True,
    },
}  # fmt: skip
# the continued-pretraining lr of the one-shot + distillation arm (every arm takes ``--continue-lr``)
STUDY_CONTINUE = {
    f"continued lr {lr:g}" + (" (the recipe's)" if lr == CONTINUE_LR else ""): {"continue_lr": lr}
    for lr in (CONTINUE_LR, 6e-4, 1.2e-3, 3e-3)
}
STUDY_TABLES = {
    "mix": STUDY_MIX,
    "distillation": STUDY_KD,
    "pruning": STUDY_PRUNE,
    "masks": STUDY_MASKS,
    "continue": STUDY_CONTINUE,
}
STUDY_ARMS = {
    "mix": "oneshot",
    "distillation": "oneshot-distill",
    "pruning": "l0-distill",
    "masks": "l0-distill",
    "continue": "oneshot-distill",
}


def study_variants(groups: Sequence[str]) -> list[tuple[str, str, dict[str, Any]]]:
    """``(group, name, option values)`` of the study's variants in the chosen ``groups``."""
    unknown = sorted(set(groups) - set(STUDY_TABLES))
    if unknown:
        raise ValueError(f"unknown study groups {unknown}; choose from {sorted(STUDY_TABLES)}")
    return [(group, name, values) for group in groups for name, values in STUDY_TABLES[group].items()]


def as_flags(values: Mapping[str, Any]) -> str:
    """Option values as the command-line flags that select them (``mix_eta`` -> ``--mix-eta``)."""
    flags = []
    for key, value in values.items():
        flag = f"--{key.replace('_', '-')}"
        if isinstance(value, bool):
            flags += [flag] if value else []
        elif value is not None:
            flags.append(f"{flag} {value}")
    return " ".join(flags) or "(defaults)"


def best_variants(records: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """Per group, the variant with the lowest average eval loss among those whose L0 masks (if any) ended
    within the sparsity tolerance of the target (a model of another size does not qualify)."""
    best: dict[str, Mapping[str, Any]] = {}
    for record in records:
        group = record["group"]
        if record.get("sparsity") and not record["sparsity"]["ok"]:
            continue
        if group not in best or average_loss(record["losses"]) < average_loss(best[group]["losses"]):
            best[group] = record
    return best


def render_study(results: Mapping[str, Any]) -> str:
    """The study as markdown: eval-split losses per variant, and the best variant of each group."""
    domains = list(results["domains"])
    lines = _header(results, "Quality study (eval split only)")
    l0 = any(record.get("sparsity") for record in results["variants"])
    extra = " expected sparsity at the end (target) | units changed vs the one-shot cut |" if l0 else ""
    lines += [
        "",
        "| group | variant | flags | avg eval loss | " + " | ".join(domains) + " |" + extra,
        "|---|---|---|---|" + "---|" * (len(domains) + (2 if l0 else 0)),
    ]
    for record in results["variants"]:
        losses = record["losses"]
        cells = [record["group"], record["variant"], f"`{as_flags(record['values'])}`"]
        cells += [f"{average_loss(losses):.3f}", *(_fmt_loss(losses, d) for d in domains)]
        if l0:
            sparsity = record.get("sparsity")
            cells.append(f"{sparsity['expected']:.3f} ({sparsity['target']:.3f})" if sparsity else "-")
            cells.append(_structure_cell(record.get("structure")))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Best on the eval split", ""]
    for group, record in best_variants(results["variants"]).items():
        lines.append(
            f"- {group} ({STUDY_ARMS[group]} arm): {record['variant']} "
            f"({average_loss(record['losses']):.3f}): `{as_flags(record['values'])}`"
        )
    lines += [
        "",
        "Each mix, distillation or continue variant is the continued pretraining of the one-shot pruned model for "
        "the whole budget T (the distillation and continue variants with the source as teacher); each pruning or masks variant is "
        "arm 3 (L0 pruning for its share of T, then continued pretraining, both distilling from the source). All "
        "are evaluated on the eval split; the test split is not read. An L0 variant whose expected sparsity "
        f"ends more than {SPARSITY_TOLERANCE} from the target is not eligible as the best.",
        "",
    ]
    return "\n".join(lines)


def run_study(
    args: argparse.Namespace, budget: Budget, inputs: Inputs, root: Path, steps: Steps
) -> list[dict[str, Any]]:
    """Every study variant once (first seed), measured on the eval split."""
    records = []
    for index, (group, name, values) in enumerate(study_variants(args.study_groups)):
        variant = copy.copy(args)
        for key, value in values.items():
            setattr(variant, key, value)
        arm = STUDY_ARMS[group]
        # the pruning group varies the share; the others keep the budget's (the miniature's is its own)
        variant_budget = replace(budget, prune_share=values.get("prune_share", budget.prune_share))
        stages = plan_arms(variant_budget, variant.kd_prune)[arm]
        print(f"\n##### study {group}: {name} ({as_flags(values)})", flush=True)
        record = run_arm(arm, stages, variant_budget, inputs, root / f"variant{index}", variant, steps)
        records.append({"group": group, "variant": name, "values": dict(values), "arm": arm, **record})
    return records
