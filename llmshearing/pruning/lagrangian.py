"""The Lagrangian that steers the expected mask sizes to their targets.

Per family (or once, globally) the penalty is ``lambda_1 * (s - t) + lambda_2 * (s - t)**2`` averaged
over rows, where ``s`` is the expected sparsity and ``t`` the target, warmed up linearly from
``start_sparsity`` over ``lagrangian_warmup_steps`` batches. The loss is minimised over the weights
and log-alphas and maximised over the multipliers (their gradient is negated, see ``L0Module``).
"""

from __future__ import annotations

import torch
from torch import Tensor


def warmed_target(start: float, final: float, step: Tensor | int, warmup_steps: int) -> Tensor:
    """``start + (final - start) * min(1, step / warmup_steps)``; ``final`` from the first step if no warm-up."""
    step = torch.as_tensor(step)
    if warmup_steps <= 0:
        return torch.full_like(step, final, dtype=torch.float32)
    progress = (step.float() / float(warmup_steps)).clamp(max=1.0)
    return start + (final - start) * progress


def family_penalty(sparsity: Tensor, target: Tensor | float, lambda_1: Tensor, lambda_2: Tensor) -> Tensor:
    """Mean over rows of ``lambda_1 * (s - t) + lambda_2 * (s - t)**2``."""
    gap = sparsity - target
    return (lambda_1 * gap + lambda_2 * gap * gap).mean()
