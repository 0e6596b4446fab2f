"""The hard-concrete distribution (Louizos et al., 2018) used for the L0 pruning masks.

A unit with log-alpha ``a`` draws ``s = sigmoid((log u - log(1-u) + a) / temperature)`` with
``u ~ U(0, 1)``, stretches it to ``(limit_a, limit_b)`` and clamps it to ``[0, 1]``, so exact zeros
and ones have positive probability and the sample is differentiable in ``a``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

log = logging.getLogger(__name__)

EPSILON = 1e-6
# Kept units never get a deterministic value below this, so a unit selected to stay is never dropped.
MIN_KEPT_VALUE = 1e-3


@dataclass(frozen=True)
class HardConcrete:
    """Shape constants of the distribution: temperature and the stretch interval ``(limit_a, limit_b)``."""

    temperature: float = 2.0 / 3.0
    limit_a: float = -0.1
    limit_b: float = 1.1

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"model.l0_module.temperature must be > 0, got {self.temperature}")
        if not self.limit_a < 0.0 < 1.0 < self.limit_b:
            raise ValueError(
                "model.l0_module.limit_a must be < 0 and model.l0_module.limit_b > 1 "
                f"(got {self.limit_a}, {self.limit_b}); the defaults are -0.1 and 1.1"
            )

    def sample(self, log_alpha: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One reparameterised sample per unit, noise drawn on ``log_alpha``'s device (from ``generator``)."""
        u = torch.rand(log_alpha.shape, generator=generator, device=log_alpha.device, dtype=log_alpha.dtype)
        u = u.clamp_(EPSILON, 1.0 - EPSILON)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / self.temperature)
        return (s * (self.limit_b - self.limit_a) + self.limit_a).clamp(0.0, 1.0)

    def prob_nonzero(self, log_alpha: Tensor) -> Tensor:
        """``P(z > 0) = 1 - Q(0)``, differentiable in ``log_alpha``."""
        shift = self.temperature * math.log(-self.limit_a / self.limit_b)
        return torch.sigmoid(log_alpha - shift).clamp(EPSILON, 1.0 - EPSILON)

    def prob_below(self, x: float, log_alpha: Tensor) -> Tensor:
        """``P(s_stretched < x)`` for a point ``x`` of the stretch interval, differentiable in ``log_alpha``."""
        u = (x - self.limit_a) / (self.limit_b - self.limit_a)
        return torch.sigmoid(self.temperature * math.log(u / (1.0 - u)) - log_alpha)

    def prob_interior(self, log_alpha: Tensor) -> Tensor:
        """``P(0 < z < 1)``: the chance that a sample lies off both bounds, where it carries a gradient.

        A unit whose samples are clamped at 0 or 1 gets no gradient from the loss in that step; a
        setting that leaves almost every sample clamped freezes the masks where they start.
        """
        return self.prob_below(1.0, log_alpha) - self.prob_below(0.0, log_alpha)

    def test_value(self, log_alpha: Tensor) -> Tensor:
        """The noise-free value ``clamp(sigmoid(a) * (limit_b - limit_a) + limit_a, 0, 1)``."""
        return (torch.sigmoid(log_alpha) * (self.limit_b - self.limit_a) + self.limit_a).clamp(0.0, 1.0)

    def deterministic(self, log_alpha: Tensor, keep: int, rank_by: Tensor | None = None) -> Tensor:
        """Keep the ``keep`` units with the largest log-alpha in each row (last dim), zero the others.

        Kept units carry their test-time value (exactly 1 for a large log-alpha), floored at
        ``MIN_KEPT_VALUE`` so that the number of surviving units is exactly ``keep`` per row.
        ``rank_by`` (shaped like ``log_alpha``) replaces log-alpha as the ranking score. Exact ties
        (e.g. many units at the log-alpha clamp) go to the lower index, on every device.
        """
        n = log_alpha.shape[-1]
        if not 0 <= keep <= n:
            raise ValueError(f"cannot keep {keep} of {n} units")
        values = self.test_value(log_alpha).clamp(min=MIN_KEPT_VALUE)
        selected = top_units(log_alpha if rank_by is None else rank_by, keep)
        return torch.where(selected, values, torch.zeros_like(values))


def top_units(scores: Tensor, keep: int) -> Tensor:
    """Boolean mask of the ``keep`` highest scores in each row (last dim); ties go to the lower index."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    selected = torch.zeros_like(scores, dtype=torch.bool)
    return selected.scatter_(-1, order[..., :keep], True)


def floored_units(masks: Mapping[str, Tensor]) -> dict[str, int]:
    """Per family, the kept units of deterministic masks whose test value lies at or below ``MIN_KEPT_VALUE``.

    Such a unit survives the fold but scaled by ``MIN_KEPT_VALUE``: the target keeps more units
    than the learned masks regard as alive.
    """
    counts = {}
    for family, mask in masks.items():
        mask = mask.detach().cpu()
        floor = torch.tensor(MIN_KEPT_VALUE, dtype=mask.dtype)
        counts[family] = int(((mask != 0) & (mask <= floor)).sum().item())
    return counts


def describe_floored(counts: Mapping[str, int]) -> str | None:
    """A sentence naming the families whose kept units sit at the floor, or None when there are none."""
    nonzero = {family: n for family, n in counts.items() if n}
    if not nonzero:
        return None
    listed = ", ".join(f"{family}: {n}" for family, n in nonzero.items())
    return (
        f"{sum(nonzero.values())} kept units have a learned value at or below the floor {MIN_KEPT_VALUE} "
        f"({listed}); they stay in the pruned model scaled by {MIN_KEPT_VALUE}: the target keeps more units "
        "than the masks regard as alive (train longer, or lower the target)"
    )


def log_floored(counts: Mapping[str, int], where: str) -> None:
    """Warn (Python logging) about kept units at the floor in the masks of ``where``."""
    message = describe_floored(counts)
    if message is not None:
        log.warning("%s: %s", where, message)
