"""Planted-structure benchmark: do the L0 masks find units a small model does not need?

A small Llama trained on the CPU (``bench/planted_models.py``) is embedded in a larger one with
planted units in every mask family (dead ones, cancelling pairs, duplicated copies); every method
prunes the large model back to the small model's exact shape, and the benchmark reports, per family,
the fraction of planted units the folded model dropped and its held-out loss against the embedded
model's (which equals the small model's):

  default     learned masks from the default init (every log-alpha at the bound log 100)
  importance  learned masks from ``init_from: importance`` (ranked, placed at +-bound)
  oneshot     ``prune-oneshot``'s cut: the same importance ranking, no learning
  oneshot-compensated  ``prune-oneshot --compensate``: neurons and query heads chosen and re-fitted by least squares
  compensated-bounded  learned masks from the compensated cut: its re-fitted weights, then ``init_from:
              importance`` (the units the cut removed have zero output columns, so they rank last)
  compensated-closing  the same with the closing multipliers (``schedule_l0_lr: masks``, ``multiplier_beta1: 0``),
              which end at the target (``bench/results/README.md``)
              (these three: ``,damping=D`` sets the fit's damping, as ``prune-oneshot --damping``)
  (variants)  learned masks with the settings under study (``--methods``; see ``METHODS``)

each with the weights frozen (mask learning alone) and with the weights training, for several seeds
and model sizes. The masks are trained with the project's own L0 module, optimizer groups and fold
(the functional API that ``L0Pruning`` wires into Composer), on windows of the standard library's
source; nothing reads ``/work/shared/data``.

    .venv/bin/python bench/planted.py                       # the full suite (CPU minutes)
    .venv/bin/python bench/planted.py --quick               # one seed, one size, fewer steps
    .venv/bin/python bench/planted.py --setups cancel --methods oneshot interior

Results go to ``bench/results/planted-<date>[-N].{md,json}`` with the command that produced them.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from planted_models import (  # noqa: E402
    Planted,
    PlantSpec,
    SmallSpec,
    batch_at,
    embed,
    held_out_batches,
    ideal_masks,
    mean_loss,
    stdlib_corpus,
    train_small,
)

from llmshearing.models.composer_model import ComposerLlama  # noqa: E402
from llmshearing.pruning.algorithm import (  # noqa: E402
    attach_l0_module,
    l0_param_groups,
    set_l0_step,
    set_multiplier_beta1,
)
from llmshearing.pruning.compensation import DEFAULT_DAMPING  # noqa: E402
from llmshearing.pruning.compensation import compensate as compensate_cut  # noqa: E402
from llmshearing.pruning.fold import prune_decoder  # noqa: E402
from llmshearing.pruning.importance import compute_importance  # noqa: E402
from llmshearing.pruning.ranking import importance_log_alpha, oneshot_masks  # noqa: E402
from llmshearing.pruning.targets import CLOSING_MULTIPLIERS, L0Config  # noqa: E402

RESULTS = REPO / "bench" / "results"


@dataclass(frozen=True)
class Setup:
    """Which families are pruned and what is planted in them."""

    name: str
    families: tuple[str, ...]
    plant: PlantSpec


SETUPS = {
    "dead": Setup("dead", ("layer", "kv_head", "head", "intermediate", "hidden"), PlantSpec("dead")),
    "dead-blocks": Setup(
        "dead-blocks", ("head_layer", "mlp", "kv_head", "head", "intermediate", "hidden"), PlantSpec("dead")
    ),
    "cancel": Setup(
        "cancel",
        ("kv_head", "head", "intermediate"),
        PlantSpec("cancel", layers=0, kv_heads=2, heads=2, intermediate=8, hidden=0),
    ),
    "cancel-mixed": Setup(  # no live neuron's activation is proportional to a pair's: one way to drop them
        "cancel-mixed",
        ("kv_head", "head", "intermediate"),
        PlantSpec("cancel", layers=0, kv_heads=2, heads=2, intermediate=8, hidden=0, pair_inputs="mix"),
    ),
    "duplicate": Setup(
        "duplicate",
        ("head", "intermediate"),
        PlantSpec("duplicate", layers=0, kv_heads=0, heads=1, intermediate=8, hidden=0),
    ),
}


def check_setup(setup: Setup) -> None:
    """Refuse a setup whose target cannot be reached: units planted in a family it does not prune."""
    counts = {
        "layer": setup.plant.layers,
        "kv_head": setup.plant.kv_heads,
        "head": setup.plant.heads,
        "intermediate": setup.plant.intermediate,
        "hidden": setup.plant.hidden,
    }
    pruned = set(setup.families)
    if {"head_layer", "mlp"} <= pruned:
        pruned.add("layer")
    for family, n in counts.items():
        if n and family not in pruned:
            raise ValueError(
                f"setup {setup.name}: planted {family}: {n} units per row are planted but '{family}' is not pruned "
                f"(pruning_modules {list(setup.families)}), so the small model's shape cannot be reached; "
                f"add '{family}' or plant 0"
            )


# Learned-mask variants: L0Config overrides (``warmup`` is the Lagrangian warm-up as a share of the steps).
# The paper's settings are mask and multiplier lr 1.0 with masks starting at the bound log 100 and a
# warmed-up target; the "-bounded" variants start in the interior (log-alpha 0, or a ranking within
# +-1), learn with mask lr 0.1 and multiplier lr 0.05, and count units at the bounds exactly.
BOUNDED = {"mask_lr": 0.1, "multiplier_lr": 0.05, "bounded_scores": True, "warmup": 0.0}
COMPENSATED = {"init_from": "importance", "init_scale": 1.0, **BOUNDED, "start": "compensated"}
METHODS: dict[str, dict[str, Any]] = {
    "default": {"warmup": 0.2},
    "importance": {"init_from": "importance", "warmup": 0.0},
    "interior": {"init_log_alpha": 0.0, "warmup": 0.0},
    "interior-bounded": {"init_log_alpha": 0.0, **BOUNDED},
    "importance-bounded": {"init_from": "importance", "init_scale": 1.0, **BOUNDED},
    "compensated-bounded": COMPENSATED,
    "compensated-closing": {**COMPENSATED, **CLOSING_MULTIPLIERS},
    "oneshot": {},
    "oneshot-compensated": {},
}

SIZES = {
    "s": SmallSpec(),
    "m": SmallSpec(d_model=48, n_layers=3, n_heads=6, n_kv_heads=3, intermediate_size=48),
}


@dataclass
class Settings:
    steps: int = 600
    batch: int = 16
    seq_len: int = 32
    weight_lr: float = 1e-3
    calibration_batches: int = 16
    cache: Path = field(default_factory=lambda: Path.home() / ".cache" / "llmshearing-planted")


# ---------------------------------------------------------------------------------------- scoring
def dropped_fraction(
    planted: Planted, family: str, mask: torch.Tensor, by_label: bool = False
) -> float | None:
    """Share of the planted units of ``family`` the mask drops.

    Duplicates count pairs that lost exactly one copy. Collinear groups (a live neuron and the cancelling halves
    that read its rows, ``pair_inputs: copy``: one activation, so a re-fit can keep any unit of the group) count
    ``min(dropped, planted)`` of each group's planted units as dropped, whichever units went; ``by_label`` counts
    the units labelled planted instead. Only units in rows of the small model count (the units inside a planted
    layer or KV group have no function to measure them by). ``None`` when nothing is planted in the family.
    """
    source = "layer" if family in ("head_layer", "mlp") else family
    where = planted.planted[source] & planted.real_rows[source]
    gone = mask == 0
    if planted.plan.kind == "duplicate" and source in ("head", "intermediate"):
        ids = planted.pairs[source]
        pair_ids = torch.unique(ids[ids >= 0])
        if pair_ids.numel() == 0:
            return None
        one = [int(gone[ids == p].sum().item()) == 1 for p in pair_ids.tolist()]
        return sum(one) / len(one)
    if int(where.sum()) == 0:
        return None
    groups = planted.collinear.get(source)
    if by_label or groups is None or not bool((groups >= 0).any()):
        return float(gone[where].float().mean().item())
    found = int((gone & where & (groups < 0)).sum())
    for group in torch.unique(groups[groups >= 0]).tolist():
        members = groups == group
        found += min(int((gone & members).sum()), int((where & members).sum()))
    return found / int(where.sum())


def score(
    planted: Planted, families: Sequence[str], masks: Mapping[str, torch.Tensor], by_label: bool = False
) -> dict[str, float]:
    out = {}
    for family in families:
        value = dropped_fraction(planted, family, masks[family], by_label)
        if value is not None:
            out[family] = value
    return out


# the families where a fold can keep a planted unit in a live one's place
LIVE_FAMILIES = ("kv_head", "head", "intermediate")


def live_worth(
    planted: Planted, families: Sequence[str], held: list[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """What each live unit is worth alone: the embedded model's held-out loss with only that unit dropped, minus
    its loss; NaN where a unit is not live. Live units are the small model's own (in its rows, not planted, not
    one of a duplicated pair), so a planted unit a fold keeps has displaced one of these."""
    base = mean_loss(planted.decoder, held)
    out: dict[str, torch.Tensor] = {}
    for family in families:
        if family not in LIVE_FAMILIES:
            continue
        live = planted.real_rows[family] & ~planted.planted[family]
        if family in planted.pairs:
            live &= planted.pairs[family] < 0
        worth = torch.full(live.shape, float("nan"))
        for index in torch.nonzero(live).tolist():
            alone = torch.ones(live.shape)
            alone[tuple(index)] = 0
            worth[tuple(index)] = mean_loss(planted.decoder, held, {family: alone}) - base
        out[family] = worth
    return out


def displaced_live(
    worth: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    collinear: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, list[float]]:
    """The worth (:func:`live_worth`) of each live unit the fold of ``masks`` drops, per family; a live unit whose
    collinear group (:attr:`Planted.collinear`) keeps a unit is not displaced (that unit can carry it)."""
    out = {}
    for family, w in worth.items():
        dropped = (masks[family] == 0) & ~w.isnan()
        groups = (collinear or {}).get(family)
        if groups is not None:
            for group in torch.unique(groups[dropped & (groups >= 0)]).tolist():
                if bool((masks[family][groups == group] != 0).any()):
                    dropped &= groups != group
        out[family] = w[dropped].tolist()
    return out


# ---------------------------------------------------------------------------------------- methods
def method_overrides(method: str) -> dict[str, Any]:
    """The L0 overrides of ``method``: a name from ``METHODS``, optionally followed by ``,key=value`` pairs."""
    name, *pairs = method.split(",")
    overrides = dict(METHODS[name])
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:  # numbers, true/false/null; a bare word (importance, masks) stays a string
            overrides[key] = json.loads(value)
        except ValueError:
            overrides[key] = value
    return overrides


def l0_settings(setup: Setup, planted: Planted, method: str, steps: int) -> dict[str, Any]:
    overrides = method_overrides(method)
    warmup = overrides.pop("warmup", 0.0)
    overrides.pop("start", None)  # where the weights start (run_learned), not an L0 setting
    overrides.pop("damping", None)  # the compensated start's fit (run_oneshot), not an L0 setting
    settings: dict[str, Any] = {
        "pruning_modules": list(setup.families),
        "target_model": dict(planted.target),
        "lagrangian_warmup_steps": int(round(warmup * steps)),
        "eval_target_model": True,
    }
    settings.update(overrides)
    return settings


def calibration(train: torch.Tensor, settings: Settings, seed: int) -> list[torch.Tensor]:
    return [
        batch_at(train, 10_000_000 + i, settings.batch, settings.seq_len, seed)
        for i in range(settings.calibration_batches)
    ]


def run_oneshot(
    setup: Setup,
    planted: Planted,
    train: torch.Tensor,
    settings: Settings,
    seed: int,
    compensate: bool = False,
    damping: float = DEFAULT_DAMPING,
) -> tuple[dict[str, torch.Tensor], Any]:
    """The one-shot cut and the decoder it folds (with ``compensate``, a copy with ``w2`` and ``wo`` re-fitted at
    ``damping``)."""
    decoder = planted.decoder
    scores = compute_importance(decoder, calibration(train, settings, seed), progress=False, grams=compensate)
    plan = L0Config(pruning_modules=list(setup.families), target_model=dict(planted.target)).resolve(
        decoder.config
    )
    masks = oneshot_masks(scores, decoder.config, plan)
    if compensate:
        decoder = copy.deepcopy(decoder)
        masks = compensate_cut(decoder, scores.grams, masks, plan, damping=damping)
    return masks, decoder


def run_learned(
    setup: Setup,
    planted: Planted,
    method: str,
    frozen: bool,
    train: torch.Tensor,
    settings: Settings,
    seed: int,
) -> tuple[dict[str, torch.Tensor], Any, dict[str, float]]:
    """Train masks (and the weights unless ``frozen``); returns the deterministic masks at the target,
    the trained decoder and the final sparsity stats."""
    from composer.optim import DecoupledAdamW

    l0 = l0_settings(setup, planted, method, settings.steps)
    init_from = l0.get("init_from")  # the module knows its ranked start (hold_ranked needs it); set here
    model = ComposerLlama(planted.decoder.config)
    start = planted.decoder
    overrides = method_overrides(method)
    if overrides.get("start") == "compensated":  # the least-squares cut's re-fitted weights
        damping = overrides.get("damping", DEFAULT_DAMPING)
        start = run_oneshot(setup, planted, train, settings, seed, compensate=True, damping=damping)[1]
    model.model.load_state_dict(start.state_dict())
    module = attach_l0_module(model, l0)
    module.set_noise_seed(seed)
    if init_from == "importance":
        scores = compute_importance(model.model, calibration(train, settings, seed), progress=False)
        values = importance_log_alpha(scores, model.model.config, module.l0_config)
        with torch.no_grad():
            for family, value in values.items():
                module.log_alpha[family].copy_(value)
    module.constrain_()
    if frozen:
        for p in model.model.parameters():
            p.requires_grad_(False)
    cfg = module.l0_config
    groups = [
        g for g in l0_param_groups(model, settings.weight_lr, cfg.mask_lr, cfg.multiplier_lr) if g["params"]
    ]
    optimizer = DecoupledAdamW(groups, lr=settings.weight_lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    set_multiplier_beta1(optimizer, module)
    scheduled = {"weights", *cfg.scheduled_groups}
    model.train()
    for step in range(settings.steps):
        # cosine decay to 0.1x, as the recipes' scheduler; the L0 groups as schedule_l0_lr says
        factor = 0.1 + 0.45 * (1.0 + math.cos(math.pi * step / settings.steps))
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * (factor if group.get("name") in scheduled else 1.0)
        set_l0_step(model, step)
        ids = batch_at(train, step, settings.batch, settings.seq_len, seed + 1)
        batch = {"input_ids": ids}
        out = model(batch)
        loss = model.loss(out, batch)["total"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        module.constrain_()
    set_l0_step(model, settings.steps)
    final = module.stats()
    stats = {k: float(v.reshape(-1)[0]) for k, v in final.items() if "sparsity" in k}
    masks = module.deterministic_masks(at_target=True)
    return masks, model.model, stats


# ------------------------------------------------------------------------------------------- runs
def one_run(
    setup: Setup,
    size: str,
    seed: int,
    methods: Sequence[str],
    settings: Settings,
    train: torch.Tensor,
    held: list[torch.Tensor],
    modes: Sequence[str] = ("frozen", "train"),
) -> list[dict[str, Any]]:
    check_setup(setup)
    small = train_small(replace(SIZES[size], seed=seed), train, settings.cache)
    planted = embed(small, replace(setup.plant, seed=seed))
    small_loss = mean_loss(small, held)
    embedded_loss = mean_loss(planted.decoder, held)
    ideal = ideal_masks(planted, setup.families)
    ideal_loss = mean_loss(prune_decoder(planted.decoder, ideal), held)
    worth = live_worth(planted, setup.families, held)
    base = {
        "setup": setup.name,
        "kind": setup.plant.kind,
        "size": size,
        "seed": seed,
        "small_loss": small_loss,
        "embedded_loss": embedded_loss,
        "ideal_fold_loss": ideal_loss,
        "live_worth_median": {
            f: float(w[~w.isnan()].median()) for f, w in worth.items() if (~w.isnan()).any()
        },
    }
    records = []
    for method in methods:
        for mode in modes:
            if method.startswith("oneshot") and mode == "train":
                continue
            started = time.perf_counter()
            if method.startswith("oneshot"):
                compensated = method.split(",")[0] == "oneshot-compensated"
                damping = method_overrides(method).get("damping", DEFAULT_DAMPING)
                masks, decoder = run_oneshot(setup, planted, train, settings, seed, compensated, damping)
                stats = {}
            else:
                masks, decoder, stats = run_learned(
                    setup, planted, method, mode == "frozen", train, settings, seed
                )
            folded = prune_decoder(decoder, masks)
            record = dict(base)
            record.update(
                method=method,
                mode="-" if method.startswith("oneshot") else mode,
                dropped=score(planted, setup.families, masks),
                dropped_by_label=score(planted, setup.families, masks, by_label=True),
                displaced=displaced_live(worth, masks, planted.collinear),
                folded_loss=mean_loss(folded, held),
                sparsity_gap=(stats["expected_sparsity"] - stats["target_sparsity"]) if stats else None,
                family_gaps={
                    f: stats[f"expected_sparsity/{f}"] - stats[f"target_sparsity/{f}"]
                    for f in setup.families
                    if f"expected_sparsity/{f}" in stats
                },
                seconds=time.perf_counter() - started,
            )
            records.append(record)
            print(summary_line(record), flush=True)
    return records


def summary_line(r: Mapping[str, Any]) -> str:
    dropped = " ".join(f"{f}={v:.2f}" for f, v in r["dropped"].items())
    by_label = r.get("dropped_by_label", r["dropped"])
    dropped += "".join(f" {f}-by-label={v:.2f}" for f, v in by_label.items() if v != r["dropped"][f])
    gap = ""
    if r["sparsity_gap"] is not None:
        worst = max(r["family_gaps"].values(), key=abs) if r["family_gaps"] else 0.0
        gap = f" gap={r['sparsity_gap']:+.4f} family-gap={worst:+.4f}"
    live = ""
    if r.get("displaced"):
        live = " live-dropped " + " ".join(
            f"{f}={len(c)}" + (f"({max(c):+.4f})" if c else "") for f, c in r["displaced"].items()
        )
    return (
        f"{r['setup']:<12}{r['size']} s{r['seed']} {r['method']:<11}{r['mode']:<7} {dropped}{live}  "
        f"folded {r['folded_loss']:.3f} (embedded {r['embedded_loss']:.3f}, ideal {r['ideal_fold_loss']:.3f})"
        f"{gap} {r['seconds']:.1f}s"
    )


# ------------------------------------------------------------------------------------------ report
def aggregate(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean over seeds and sizes per (setup, method, mode)."""
    groups: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["setup"], r["method"], r["mode"]), []).append(r)
    rows = []
    for (setup, method, mode), rs in groups.items():
        families = list(rs[0]["dropped"])
        gaps = [abs(r["sparsity_gap"]) for r in rs if r["sparsity_gap"] is not None]
        rows.append(
            {
                "setup": setup,
                "method": method,
                "mode": mode,
                "runs": len(rs),
                "dropped": {f: statistics.mean(r["dropped"][f] for r in rs) for f in families},
                "min_dropped": min(min(r["dropped"].values()) for r in rs),
                "folded_minus_embedded": statistics.mean(r["folded_loss"] - r["embedded_loss"] for r in rs),
                "folded_minus_ideal": statistics.mean(r["folded_loss"] - r["ideal_fold_loss"] for r in rs),
                "max_abs_gap": max(gaps) if gaps else None,
                "displaced": displaced_summary(rs),
                "seconds": statistics.mean(r["seconds"] for r in rs),
            }
        )
    return rows


def displaced_summary(records: Sequence[Mapping[str, Any]]) -> str:
    """Per family: live units dropped per run (mean), the most any one of them was worth alone and the median
    live unit's worth (mean over runs); ``-`` for records written before they were measured."""
    if any("displaced" not in r for r in records):
        return "-"
    parts = []
    for family in records[0]["displaced"]:
        costs = [r["displaced"][family] for r in records]
        worst = max((c for run in costs for c in run), default=None)
        median = statistics.mean(r["live_worth_median"][family] for r in records)
        parts.append(
            f"{family} {statistics.mean(len(run) for run in costs):.1f}"
            + ("" if worst is None else f" (max {worst:+.4f}; median live {median:+.4f})")
        )
    return ", ".join(parts)


def markdown(records: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> str:
    lines = [
        f"# Planted-structure benchmark, {meta['date']}",
        "",
        f"Command: `{meta['command']}`  ",
        f"Commit: {meta['commit']}; machine: {meta['machine']}; {meta['threads']} torch thread(s); "
        f"total {meta['seconds']:.0f} s",
        "",
        f"Steps per learned run: {meta['settings']['steps']} of {meta['settings']['batch']} x "
        f"{meta['settings']['seq_len']} tokens; weights lr {meta['settings']['weight_lr']} when training.",
        "",
        "Per (setup, method, mode), the mean over seeds and sizes of the share of planted units the folded "
        "model dropped per family (duplicates: pairs that lost exactly one copy; a live neuron and the "
        "cancelling halves that read its rows, one activation: as many of the group as were planted, whichever "
        "units went), the smallest share seen in "
        "any run and family, the folded model's held-out loss minus the embedded model's and minus the fold "
        "of the ideal masks (which drop exactly the planted units; it differs from the embedded model "
        "where hidden dims are planted, as the norms renormalise over the kept dims), and the largest "
        "|expected - target| sparsity at the end. 'live dropped' is, per family, the mean number of the small "
        "model's own units the fold drops (each kept planted unit displaces one) and, in brackets, the most any "
        "of them was worth (the embedded model's held-out loss with that unit alone dropped, minus its loss) "
        "against the median live unit's worth.",
        "",
        "| setup | method | mode | runs | dropped per family | min | live dropped | folded - embedded "
        "| folded - ideal | max gap | s/run |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in aggregate(records):
        dropped = ", ".join(f"{f} {v:.2f}" for f, v in row["dropped"].items())
        gap = "-" if row["max_abs_gap"] is None else f"{row['max_abs_gap']:.4f}"
        lines.append(
            f"| {row['setup']} | {row['method']} | {row['mode']} | {row['runs']} | {dropped} | "
            f"{row['min_dropped']:.2f} | {row['displaced']} | {row['folded_minus_embedded']:+.3f} | "
            f"{row['folded_minus_ideal']:+.3f} | "
            f"{gap} | {row['seconds']:.1f} |"
        )
    lines += ["", "Every run:", "", "```"] + [summary_line(r) for r in records] + ["```", ""]
    return "\n".join(lines)


def commit() -> str:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "llmshearing", "bench/planted.py", "bench/planted_models.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def result_path(date: str, suffix: str) -> Path:
    stem = f"planted-{date}"
    n = 1
    while (RESULTS / f"{stem}{'' if n == 1 else f'-{n}'}.md").exists():
        n += 1
    return RESULTS / f"{stem}{'' if n == 1 else f'-{n}'}{suffix}"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    p.add_argument(
        "--methods",
        nargs="+",
        default=[
            "default",
            "importance",
            "oneshot",
            "interior-bounded",
            "importance-bounded",
            "oneshot-compensated",
            "compensated-closing",
        ],
    )
    p.add_argument("--modes", nargs="+", default=["frozen", "train"], choices=["frozen", "train"])
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument(
        "--combos",
        nargs="+",
        default=None,
        help="size:seed pairs to run instead of --sizes x --seeds (e.g. s:0 m:0)",
    )
    p.add_argument("--tag", default="", help="suffix of the result file names")
    p.add_argument(
        "--from-json", nargs="+", default=None, help="report the records of these files; run nothing"
    )
    p.add_argument("--steps", type=int, default=Settings.steps)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="seed 0, size s, 200 steps")
    p.add_argument("--no-write", action="store_true", help="print only; write no result files")
    args = p.parse_args(argv)
    unknown = [m for m in args.methods if m.split(",")[0] not in METHODS]
    if unknown:
        p.error(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    for method in args.methods:
        overrides = method_overrides(method)
        if "damping" not in overrides:
            continue
        fitted = method.split(",")[0] == "oneshot-compensated" or overrides.get("start") == "compensated"
        damping = overrides["damping"]
        if not fitted:
            p.error(f"--methods {method}: damping sets the least-squares fit of a compensated method only")
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not damping > 0:
            p.error(f"--methods {method}: damping must be a positive number, got {damping!r}")
    if args.quick:
        args.seeds, args.sizes, args.steps = [0], ["s"], 200
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    settings = Settings(steps=args.steps)
    train, held_stream = stdlib_corpus()
    held = held_out_batches(held_stream, batch=16, seq_len=64)
    records: list[dict[str, Any]] = []
    combos = [(size, seed) for size in args.sizes for seed in args.seeds]
    if args.combos:
        combos = [(c.split(":")[0], int(c.split(":")[1])) for c in args.combos]
    if args.from_json:  # report records written earlier (e.g. by interrupted or parallel runs)
        for path in args.from_json:
            records += json.loads(Path(path).read_text())["records"]
    partial = RESULTS / f"planted-partial-{args.tag or 'run'}.json"
    for setup in args.setups if not args.from_json else []:
        for size, seed in combos:
            records += one_run(SETUPS[setup], size, seed, args.methods, settings, train, held, args.modes)
            partial.write_text(json.dumps({"records": records}, indent=1) + "\n")
    meta = {
        "date": datetime.date.today().isoformat(),
        "command": "python bench/planted.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "commit": commit(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "threads": args.threads,
        "seconds": time.perf_counter() - started,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(settings).items()},
        "methods": {m: method_overrides(m) for m in args.methods},
        "python": platform.python_version(),
    }
    text = markdown(records, meta)
    print(text)
    if not args.no_write:
        md = result_path(meta["date"] + (f"-{args.tag}" if args.tag else ""), ".md")
        md.write_text(text, encoding="utf-8")
        md.with_suffix(".json").write_text(json.dumps({"meta": meta, "records": records}, indent=2) + "\n")
        print(f"wrote {md} and {md.with_suffix('.json')}")
    partial.unlink(missing_ok=True)  # the records are in the result files now
    return 0


if __name__ == "__main__":
    sys.exit(main())
