"""Distillation from a frozen teacher: the ``model.distillation`` settings and the ``Teacher`` holder.

The teacher is a ``Decoder`` loaded from a checkpoint directory (what ``llmshearing convert
hf-to-composer`` or ``prune-model`` writes) by :func:`llmshearing.checkpoint.loading.load_teacher`.
It is held outside the student's module tree, so Composer neither checkpoints it nor wraps it: a
resumed run reloads it from its path, and under FSDP ``llmshearing.training.fsdp.shard_teacher``
shards its blocks.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from llmshearing.models.config import ModelConfig
from llmshearing.models.distill import KINDS

_KEY = "model.distillation"


@dataclass(frozen=True)
class DistillationConfig:
    """``model.distillation``: loss = ``alpha * KD + (1 - alpha) * LM`` with a frozen ``teacher``.

    ``temperature`` softens both distributions; ``kind`` is ``forward`` (KL(teacher || student)) or
    ``reverse``; ``top_k`` keeps the teacher's k most likely tokens and merges the rest (null: full
    vocabulary); ``chunk_size`` is the number of positions whose full-vocabulary logits are formed at once.
    """

    teacher: str
    alpha: float = 0.5
    temperature: float = 1.0
    kind: str = "forward"
    top_k: int | None = None
    chunk_size: int = 1024

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> DistillationConfig:
        """Validated settings; every error names its ``model.distillation`` key and the fix."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown keys {unknown} in {_KEY}; valid keys are {known}")
        settings = {key: value for key, value in values.items() if value is not None or key == "top_k"}
        if not isinstance(settings.get("teacher"), str) or not settings["teacher"]:
            raise ValueError(
                f"{_KEY}.teacher must be the path of a checkpoint directory "
                "(`llmshearing convert hf-to-composer` output)"
            )
        config = cls(**settings)
        config._check()
        return config

    def _check(self) -> None:
        if not _is_number(self.alpha) or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(
                f"{_KEY}.alpha must be a number in [0, 1] (weight of the KD loss), got {self.alpha!r}"
            )
        if not _is_number(self.temperature) or self.temperature <= 0:
            raise ValueError(f"{_KEY}.temperature must be a positive number, got {self.temperature!r}")
        if self.kind not in KINDS:
            raise ValueError(f"{_KEY}.kind must be one of {list(KINDS)}, got {self.kind!r}")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k <= 0):
            raise ValueError(
                f"{_KEY}.top_k must be a positive integer or null (full vocabulary), got {self.top_k!r}"
            )
        if not _is_int(self.chunk_size) or self.chunk_size <= 0:
            raise ValueError(
                f"{_KEY}.chunk_size must be a positive integer (positions per chunk), got {self.chunk_size!r}"
            )

    def check_vocab(self, student_vocab: int, teacher_vocab: int) -> None:
        """The teacher must predict over the student's vocabulary, and ``top_k`` must leave a tail."""
        if teacher_vocab != student_vocab:
            raise ValueError(
                f"{_KEY}.teacher {self.teacher!r} has a vocabulary of {teacher_vocab} tokens but the student has "
                f"{student_vocab}; distil from a checkpoint with the student's tokenizer (e.g. its source)"
            )
        if self.top_k is not None and self.top_k >= student_vocab:
            raise ValueError(
                f"{_KEY}.top_k ({self.top_k}) must be smaller than the vocabulary ({student_vocab}); "
                "use top_k=null for the full vocabulary"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class SpanClock:
    """Times spans of work without waiting for the device inside them.

    A span on a CUDA device is a pair of CUDA events recorded on the current stream; on the CPU a pair
    of ``time.perf_counter`` marks. :meth:`take_seconds` sums the spans taken since its last call;
    CUDA events must have completed by then, which one device synchronisation at the end of the step
    ensures (``TeacherTimeMonitor``), else the last event is waited for once.
    """

    def __init__(self) -> None:
        self.spans: list[tuple[Any, Any]] = []

    @staticmethod
    def mark(device: torch.device) -> Any:
        if device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(device))
            return event
        return time.perf_counter()

    def start(self, device: torch.device) -> Any:
        return self.mark(device)

    def stop(self, started: Any, device: torch.device) -> None:
        self.spans.append((started, self.mark(device)))

    def take_seconds(self) -> float:
        """Seconds within the spans since the last call (the spans are then forgotten)."""
        spans, self.spans = self.spans, []
        if not spans:
            return 0.0
        if isinstance(spans[-1][1], torch.cuda.Event):
            spans[-1][1].synchronize()  # a no-op once the step's end has synchronised the device
            return sum(start.elapsed_time(end) for start, end in spans) / 1000.0
        return sum(end - start for start, end in spans)


class Teacher:
    """A frozen teacher ``Decoder`` (eval mode, no gradients), deliberately not an ``nn.Module``.

    :meth:`hidden_states` is the teacher's one forward; :meth:`logits` applies its output head to a
    chunk of hidden states. Both run under ``torch.no_grad`` and are timed by :attr:`clock` (no device
    synchronisation per call). :meth:`module` returns the decoder (to wrap it for FSDP;
    :meth:`set_module` puts the wrapped one in place).
    """

    def __init__(self, decoder: nn.Module, path: str) -> None:
        self._decoder = decoder.eval().requires_grad_(False)
        self.path = path
        self.config: ModelConfig = decoder.config
        self.clock = SpanClock()

    def module(self) -> nn.Module:
        return self._decoder

    def set_module(self, module: nn.Module) -> None:
        self._decoder = module

    def device(self) -> torch.device:
        """The device the teacher's weights are on."""
        return _device_of(self._decoder)

    @torch.no_grad()
    def hidden_states(self, input_ids: Tensor) -> Tensor:
        """The teacher's final hidden states [B, T, d] (the decoder moves to ``input_ids``' device first)."""
        if _device_of(self._decoder) != input_ids.device:
            self._decoder.to(input_ids.device)
        started = self.clock.start(input_ids.device)
        hidden = self._decoder(input_ids, apply_head=False)
        self.clock.stop(started, input_ids.device)
        return hidden

    @torch.no_grad()
    def logits(self, hidden: Tensor) -> Tensor:
        """Logits [N, V] of final hidden states [N, d]."""
        started = self.clock.start(hidden.device)
        logits = self._decoder.head(hidden)
        self.clock.stop(started, hidden.device)
        return logits

    def forward_flops_per_token(self, seq_len: int) -> int:
        """FLOPs of one forward pass per token: a third of :meth:`ModelConfig.train_flops_per_token`
        (forward 2N, backward 4N over the matmul parameters, the same split for attention)."""
        return self.config.train_flops_per_token(seq_len) // 3

    def take_seconds(self) -> float:
        """Seconds spent in the teacher since the last call."""
        return self.clock.take_seconds()


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device
