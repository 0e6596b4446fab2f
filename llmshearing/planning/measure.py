"""Count what a real training step holds on the CPU, for holding the planner's estimates to it.

:func:`measure_step` runs the project's model (``ComposerLlama`` with its L0 module and teacher when
attached), its loss and Composer's ``DecoupledAdamW`` through one warm-up step and then one measured
step. Parameters, gradients and optimizer state are counted exactly from their tensors; the step's
peak comes from the CPU allocator's events recorded by ``torch.profiler`` (allocations and frees in
order, so temporaries count), and the bytes saved for the backward from ``saved_tensors_hooks``
(storages counted once, parameters excluded).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class StepMemory:
    """Bytes of one process's training step on the CPU."""

    params: int
    grads: int
    optimizer: int
    teacher: int
    saved: int  # saved for the backward by one forward and loss (0 under activation checkpointing)
    peak: int  # parameters, optimizer state and teacher, plus the step's highest allocation above them


def storage_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors``."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return storage_bytes(
        value for state in optimizer.state.values() for value in state.values() if isinstance(value, Tensor)
    )


def checkpoint_blocks(decoder: nn.Module) -> None:
    """Non-reentrant activation checkpointing per decoder block, as Composer applies it."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    from llmshearing.models.decoder import is_block

    apply_activation_checkpointing(
        decoder,
        checkpoint_wrapper_fn=partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=is_block,
    )


def saved_bytes(model: nn.Module, batch: Mapping[str, Any]) -> int:
    """Bytes one forward and loss save for the backward (distinct storages, parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    teacher = getattr(model, "teacher", None)
    if teacher is not None:
        params |= {p.untyped_storage().data_ptr() for p in teacher.module().parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params and tensor.device.type != "meta":
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        outputs = model(batch)
        loss = model.loss(outputs, batch)["total"]
    del outputs, loss
    return sum(seen.values())


def _peak_of(prof: Any) -> int:
    """Highest net allocation of the CPU allocator within a profiled region."""
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def measure_step(
    model: nn.Module, batch: Mapping[str, Any], optimizer: torch.optim.Optimizer, checkpointing: bool
) -> StepMemory:
    """Memory of one training step of ``model`` (a ``ComposerLlama``) on ``batch`` (see the module doc).

    ``checkpointing`` wraps the decoder's blocks first (non-reentrant, as Composer does).
    """
    from torch.profiler import ProfilerActivity, profile

    model.train()
    saved = 0 if checkpointing else saved_bytes(model, batch)
    if checkpointing:
        checkpoint_blocks(model.model)

    def step() -> None:
        outputs = model(batch)  # held until the backward is done, as Composer's state.outputs is
        loss = model.loss(outputs, batch)["total"]
        loss.backward()
        optimizer.step()
        del outputs, loss

    step()  # the optimizer's state exists from here on
    optimizer.zero_grad(set_to_none=True)
    teacher = getattr(model, "teacher", None)
    teacher_bytes = storage_bytes(teacher.module().parameters()) if teacher is not None else 0
    params = storage_bytes(model.parameters())
    state = optimizer_state_bytes(optimizer)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    grads = storage_bytes(p.grad for p in model.parameters() if p.grad is not None)
    return StepMemory(
        params=params,
        grads=grads,
        optimizer=state,
        teacher=teacher_bytes,
        saved=saved,
        peak=params + state + teacher_bytes + _peak_of(prof),
    )
