"""``ComposerLlama``: the project ``Decoder`` as a Composer model (loss, metrics, FLOPs, FSDP hooks)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity
from composer.models import ComposerModel
from torch import Tensor, nn
from torchmetrics import Metric

from llmshearing.models.config import ModelConfig
from llmshearing.models.decoder import Decoder, parameters_on_meta
from llmshearing.models.distill import distillation_loss
from llmshearing.models.loss import IGNORE_INDEX, lm_loss, shifted_targets
from llmshearing.models.metrics import DomainLanguageCrossEntropy
from llmshearing.models.teacher import DistillationConfig, Teacher


@dataclass
class LMOutput:
    """Model output: logits [B, T, V], the L0 module's output (masks and penalty) when pruning, and the
    teacher's final hidden states [B, T, d] when distilling (training only)."""

    logits: Tensor
    l0: Any = None
    teacher_hidden: Tensor | None = None


class ComposerLlama(ComposerModel):
    """Composer wrapper of ``Decoder`` with next-token loss, per-domain metrics and an optional L0 module.

    Batches hold ``input_ids`` [B, T] and optionally ``labels`` [B, T], ``domain`` [B] (index into
    ``domains``), ``idx`` [B] and ``masks`` (used only when no L0 module is attached).
    ``init_device="meta"`` creates the parameters on the meta device (the RoPE buffer stays real); the
    decoder's ``param_init_fn`` then materialises and initialises them module by module, as FSDP does
    (Composer reads the FSDP, activation-checkpointing and init hooks from the ``Decoder`` child).
    """

    def __init__(self, config: ModelConfig, domains: Sequence[str] = (), init_device: str = "cpu") -> None:
        super().__init__()
        self.config = config
        self.domains = tuple(domains)
        if init_device == "meta":  # parameters without storage; FSDP materialises them via param_init_fn
            with parameters_on_meta():
                self.model = Decoder(config)
        elif init_device == "cpu":
            self.model = Decoder(config)
            self.model.init_weights()
        else:
            raise ValueError(f"model.init_device must be 'cpu' or 'meta', got {init_device!r}")
        self.l0_module: nn.Module | None = None
        self.masks_enabled = True  # False: the attached L0 module is ignored (the unpruned source runs)
        # a plain attribute, not a submodule: neither checkpointed nor wrapped with the student
        self.teacher: Teacher | None = None
        self.distillation: DistillationConfig | None = None
        self.train_metrics = self._build_metrics()
        self.eval_metrics = self._build_metrics()

    def _build_metrics(self) -> dict[str, Metric]:
        metrics: dict[str, Metric] = {
            "LanguageCrossEntropy": LanguageCrossEntropy(ignore_index=IGNORE_INDEX),
            "Perplexity": LanguagePerplexity(ignore_index=IGNORE_INDEX),
        }
        for index, domain in enumerate(self.domains):
            metrics[f"{domain}_LanguageCrossEntropy"] = DomainLanguageCrossEntropy(
                index, ignore_index=IGNORE_INDEX
            )
        return metrics

    def forward(self, batch: Mapping[str, Any]) -> LMOutput:
        l0 = self.l0_module() if self.l0_module is not None and self.masks_enabled else None
        masks = l0.masks if l0 is not None else batch.get("masks")
        logits = self.model(batch["input_ids"], masks=masks)
        teacher_hidden = None
        if self.teacher is not None and self.training:
            teacher_hidden = self.teacher.hidden_states(batch["input_ids"])
        return LMOutput(logits=logits, l0=l0, teacher_hidden=teacher_hidden)

    def attach_teacher(self, teacher: Teacher, config: DistillationConfig) -> None:
        """Distil from ``teacher`` in training: the loss becomes ``alpha * kd + (1 - alpha) * ce``."""
        config.check_vocab(self.config.vocab_size, teacher.config.vocab_size)
        self.teacher, self.distillation = teacher, config

    def loss(self, outputs: LMOutput, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        penalty = getattr(outputs.l0, "penalty", None) if outputs.l0 is not None else None
        if outputs.teacher_hidden is None or self.distillation is None:
            return lm_loss(outputs.logits, batch, penalty)
        cfg = self.distillation
        kd = distillation_loss(
            outputs.logits,
            outputs.teacher_hidden,
            self.teacher.logits,
            shifted_targets(batch),
            temperature=cfg.temperature,
            kind=cfg.kind,
            top_k=cfg.top_k,
            chunk_size=cfg.chunk_size,
        )
        return lm_loss(outputs.logits, batch, penalty, kd=kd, alpha=cfg.alpha)

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        return self.train_metrics if is_train else self.eval_metrics

    def update_metric(self, batch: Mapping[str, Any], outputs: LMOutput, metric: Metric) -> None:
        logits = outputs.logits if isinstance(outputs, LMOutput) else outputs
        targets = shifted_targets(batch)
        if isinstance(metric, DomainLanguageCrossEntropy):
            metric.update(logits, targets, batch.get("domain"))
        else:
            metric.update(logits, targets)

    def flops_per_batch(self, batch: Mapping[str, Any]) -> int:
        """Training FLOPs of one batch (PaLM): see :meth:`ModelConfig.train_flops_per_token`; the
        teacher's forward pass is counted when distilling."""
        batch_size, seq_len = batch["input_ids"].shape[:2]
        per_token = self.model.config.train_flops_per_token(seq_len)
        if self.teacher is not None:
            per_token += self.teacher.forward_flops_per_token(seq_len)
        return batch_size * seq_len * per_token
