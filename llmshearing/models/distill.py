"""Knowledge-distillation loss: KL between a student's and a teacher's next-token distributions (torch only).

Per position the two distributions are ``softmax(logits / temperature)``; the KL is scaled by
``temperature ** 2`` (so its gradients keep their size as the temperature changes) and averaged over
the positions whose next-token target is not ``IGNORE_INDEX``, the positions the LM loss counts.

* ``forward`` KL is ``KL(teacher || student)`` (mass-covering), ``reverse`` is ``KL(student || teacher)``
  (mode-seeking).
* ``top_k``: the teacher's ``k`` most likely tokens stay separate outcomes and the rest of the
  vocabulary is merged into one "other" outcome, for both models, before the KL is taken. Both
  directions stay finite, and the student is still pushed to move mass off the tail.

:func:`distillation_loss` works chunk by chunk over positions: the teacher's logits are computed from
its final hidden states one chunk at a time, and the student's gradient is computed per chunk while
the loss is evaluated, so no full-vocabulary fp32 tensor of the whole batch is ever held besides the
student's own logits (and their gradient).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from llmshearing.models.loss import IGNORE_INDEX

KINDS = ("forward", "reverse")


def _merge_tail(log_probs: Tensor, keep: Tensor) -> Tensor:
    """Log-probabilities [N, k + 1]: the ``keep`` [N, k] columns, then the rest of the row merged."""
    kept = log_probs.gather(-1, keep)
    rest = log_probs.scatter(-1, keep, float("-inf")).logsumexp(-1, keepdim=True)
    return torch.cat((kept, rest), dim=-1)


def kd_log_probs(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float, top_k: int | None
) -> tuple[Tensor, Tensor]:
    """fp32 log-probabilities ``(student, teacher)`` [N, V] (or [N, top_k + 1]) over the outcomes compared."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if top_k is None:
        return student, teacher
    keep = teacher.topk(top_k, dim=-1).indices
    return _merge_tail(student, keep), _merge_tail(teacher, keep)


def kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(p || q)`` of each row from log-probabilities; outcomes with ``p = 0`` contribute nothing."""
    p = log_p.exp()
    difference = torch.where(p > 0, log_p - log_q, torch.zeros_like(log_p))
    return (p * difference).sum(-1)


def kd_per_position(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    kind: str = "forward",
    top_k: int | None = None,
) -> Tensor:
    """KD loss [N] of each row of the logits [N, V] (``temperature ** 2`` times the KL of ``kind``)."""
    if kind not in KINDS:
        raise ValueError(f"distillation kind must be one of {KINDS}, got {kind!r}")
    student, teacher = kd_log_probs(student_logits, teacher_logits, temperature, top_k)
    kl = kl_rows(teacher, student) if kind == "forward" else kl_rows(student, teacher)
    return kl * temperature**2


class _ChunkedKD(torch.autograd.Function):
    """Mean KD loss over the ``counted`` positions; the student's gradient is computed chunk by chunk
    (contiguous slices of positions, no copies) while the loss is evaluated."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        student_logits: Tensor,
        teacher_hidden: Tensor,
        counted: Tensor,
        teacher_head: Callable[[Tensor], Tensor],
        settings: tuple[float, str, int | None, int],
    ) -> Tensor:
        temperature, kind, top_k, chunk_size = settings
        student = student_logits.reshape(-1, student_logits.shape[-1])
        hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
        needs_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(student) if needs_grad else None
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for start in range(0, student.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            with torch.no_grad():
                teacher_logits = teacher_head(hidden[rows])
            leaf = student[rows].detach().requires_grad_(needs_grad)
            with torch.enable_grad():
                per_position = kd_per_position(leaf, teacher_logits, temperature, kind, top_k)
                chunk_sum = torch.where(counted[rows], per_position, 0.0).sum()
            if needs_grad:
                (grad[rows],) = torch.autograd.grad(chunk_sum, leaf)
            total += chunk_sum.detach()
        ctx.count, ctx.shape = max(int(counted.sum()), 1), student_logits.shape
        ctx.save_for_backward(grad if needs_grad else student.new_empty(0))
        return total / ctx.count

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        scaled = grad * (grad_output / ctx.count).to(grad.dtype)
        return scaled.reshape(ctx.shape), None, None, None, None


def distillation_loss(
    student_logits: Tensor,
    teacher_hidden: Tensor,
    teacher_head: Callable[[Tensor], Tensor],
    targets: Tensor,
    temperature: float = 1.0,
    kind: str = "forward",
    top_k: int | None = None,
    chunk_size: int = 1024,
) -> Tensor:
    """Mean KD loss over the positions whose ``targets`` [B, T] are not ``IGNORE_INDEX``.

    ``student_logits`` [B, T, V] carry the student's graph; ``teacher_hidden`` [B, T, d] are the
    teacher's final hidden states, turned into logits ``chunk_size`` positions at a time by
    ``teacher_head`` (under ``torch.no_grad``). A batch without counted positions gives 0.
    """
    if kind not in KINDS:
        raise ValueError(f"distillation kind must be one of {KINDS}, got {kind!r}")
    if student_logits.shape[:-1] != teacher_hidden.shape[:-1] or student_logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)}, teacher hidden states "
            f"{tuple(teacher_hidden.shape)} and targets {tuple(targets.shape)} must share batch and positions"
        )
    counted = targets.reshape(-1) != IGNORE_INDEX
    settings = (float(temperature), kind, top_k, int(chunk_size))
    return _ChunkedKD.apply(student_logits, teacher_hidden.detach(), counted, teacher_head, settings)
