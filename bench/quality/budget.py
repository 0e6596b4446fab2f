"""The quality benchmark's token budget and its arms: the budget T every arm spends (``Budget``), the
stages of each arm (``Stage``, ``plan_arms``) and the check that they all train exactly T tokens, the
order of the runs over the seeds, and the training FLOPs of a stage and of an arm."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ARMS = (
    "l0-dynamic", "l0-constant", "l0-distill", "oneshot", "oneshot-distill", "scratch", "l0-default", "l0-held",
)  # fmt: skip
ARM_NUMBER = {arm: i + 1 for i, arm in enumerate(ARMS)}
# the arms the targets compare (3 vs 5 and 8, 1 vs 2, 7 vs 5): repeated for every seed after the first
DECIDING_ARMS = ("l0-distill", "oneshot-distill", "l0-held", "l0-dynamic", "l0-constant", "l0-default")
SPARSITY_TOLERANCE = 0.02  # an L0 stage must end with |expected - target| sparsity within this
DEFAULT_SEEDS = (17, 18)


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
    """The stages of the arms; pruning takes ``prune_share`` of the steps, at least one of each.
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
        "l0-held": l0(True, kd_prune),
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
