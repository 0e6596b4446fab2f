"""Dynamic batch loading: re-weight the training domains from their losses at every update interval.

At the end of each interval (one epoch of ``DynamicStreamingDataset``) the callback reads every
domain's loss, updates the domain weights with ``llmshearing.dynamic_loading.mixing.update_weights`` and pushes
them into the train dataset for the next interval. The losses come from the evaluation that ends the
interval (``loss_source: eval``, reading ``state.eval_metrics[eval_label][f"{domain}_LanguageCrossEntropy"]``)
or from the training batches of the interval (``loss_source: train``, token-weighted, all-reduced).

When the update happens (Composer's event order):

* evaluation at ``BATCH_END`` of the interval's last batch (``eval_interval`` = the interval in
  batches): the next epoch has not been generated yet, and the checkpoint written at that
  ``BATCH_CHECKPOINT`` already carries the new mix;
* evaluation at ``EPOCH_END`` (``eval_interval: 1ep``): same, before ``EPOCH_CHECKPOINT``; a
  checkpoint written at the last ``BATCH_CHECKPOINT`` before it does not have the update, and the
  resumed run recomputes it from the same evaluation when it replays ``EPOCH_END``;
* an evaluation before training (``trainer.eval()`` before ``fit``) updates the first interval,
  or with ``reference: source`` only records the reference losses;
* evaluations anywhere else (e.g. the one Composer runs at ``FIT_END``) are logged but change
  nothing, and each interval is updated at most once.

Stabilisers (``DataLoadingConfig``): with ``loss_ema`` the rule reads an exponential moving average
of each domain's losses, fed once per interval boundary; with ``update_warmup: W`` the boundaries
before batch ``W`` feed the average but keep the mix (the first update is at the first boundary at
or after ``W``); ``min_proportion`` and ``excess`` act inside :func:`llmshearing.dynamic_loading.mixing.update_weights`.
The average, like the weights, is part of the callback's checkpoint state.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from llmshearing.data.dynamic_dataset import DynamicStreamingDataset
from llmshearing.dynamic_loading.config import KEY, DataLoadingConfig
from llmshearing.dynamic_loading.mixing import ema_losses, update_weights
from llmshearing.dynamic_loading.reference_loss import resolve_reference
from llmshearing.models.loss import domain_token_losses

log = logging.getLogger(__name__)


class DynamicLoadingCallback(Callback):
    """Update the train dataset's domain weights from per-domain losses once per interval.

    Args:
        config: the ``callbacks.data_loading`` section (:class:`DataLoadingConfig`, validated when it was
            made) with ``dynamic: true``; every key is described in this folder's README.
    """

    def __init__(self, config: DataLoadingConfig) -> None:
        if not config.dynamic:
            raise ValueError(
                f"{KEY}.dynamic is false: the mix is fixed, no callback is needed "
                "(DynamicLoadingCallback.from_config returns None for it)"
            )
        self.cfg = config
        self.set_names = tuple(config.set_names)
        self.from_source = config.reference == "source"
        self.reference = resolve_reference(self.set_names, config.target_loss, config.reference)
        self._check_reference(self.reference)
        self.weights = np.asarray(config.proportion, dtype=np.float64)
        self.weights = self.weights / self.weights.sum()
        self.next_update_epoch = 0
        self.smoothed: np.ndarray | None = None  # moving average of the losses (loss_ema > 0)
        self.history: list[dict[str, Any]] = []
        k = len(self.set_names)
        self.train_loss_sum = np.zeros(k, dtype=np.float64)
        self.train_tokens = np.zeros(k, dtype=np.float64)
        self._micro_sum: torch.Tensor | None = None
        self._micro_tokens: torch.Tensor | None = None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | DataLoadingConfig) -> DynamicLoadingCallback | None:
        """The callback for ``callbacks.data_loading``, or None when ``dynamic`` is false."""
        dl = cfg if isinstance(cfg, DataLoadingConfig) else DataLoadingConfig.from_dict(cfg)
        return cls(dl) if dl.dynamic else None

    # ------------------------------------------------------------------------------ helpers
    def _check_reference(self, reference: np.ndarray | None) -> None:
        if self.cfg.excess == "relative" and reference is not None and np.any(reference <= 0):
            raise ValueError(
                f"{KEY}.excess: relative divides by the reference losses, which must be positive; got "
                f"{dict(zip(self.set_names, reference.tolist(), strict=True))}: fix them or use excess: absolute"
            )

    def _signal(self, losses: np.ndarray, present: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The losses the rule reads and which domains have one: raw, or their moving average."""
        if not self.cfg.loss_ema:
            return losses, present
        self.smoothed = ema_losses(self.smoothed, losses, present, self.cfg.loss_ema)
        return self.smoothed, ~np.isnan(self.smoothed)

    def _dataset(self, state: State) -> DynamicStreamingDataset:
        dataset = getattr(state.train_dataloader, "dataset", None)
        if not isinstance(dataset, DynamicStreamingDataset):
            raise ValueError(
                "DynamicLoadingCallback needs the train dataloader of llmshearing.dynamic_loading.loader."
                f"build_train_dataloader (a DynamicStreamingDataset), got {type(dataset).__name__}"
            )
        if tuple(dataset.set_names) != self.set_names:
            raise ValueError(
                f"{KEY}.set_names {list(self.set_names)} differ from the train dataset's domains "
                f"{list(dataset.set_names)}: build both from the same config"
            )
        return dataset

    def _boundary_epoch(self, state: State, interval: int) -> int | None:
        """The epoch an update made now applies to, or None when not at an interval boundary."""
        in_epoch = int(state.timestamp.batch_in_epoch)
        if in_epoch == 0:
            return int(state.timestamp.epoch)
        if in_epoch == interval:
            return int(state.timestamp.epoch) + 1
        return None

    def _eval_losses(self, state: State) -> tuple[np.ndarray, np.ndarray]:
        metrics = state.eval_metrics.get(self.cfg.eval_label, {})
        losses = np.zeros(len(self.set_names), dtype=np.float64)
        present = np.zeros(len(self.set_names), dtype=bool)
        for i, name in enumerate(self.set_names):
            key = f"{name}_LanguageCrossEntropy"
            metric = metrics.get(key)
            if metric is None:
                raise ValueError(
                    f"evaluator {self.cfg.eval_label!r} has no metric {key}: build the model with "
                    f"domains={list(self.set_names)} and give the evaluator its metric names"
                )
            value = float(metric.compute())
            tokens = getattr(metric, "tokens", None)
            present[i] = tokens is None or tokens > 0
            losses[i] = value
        return losses, present

    def _log(
        self, logger: Logger, prefix: str, values: np.ndarray, present: np.ndarray | None = None
    ) -> None:
        logger.log_metrics(
            {
                f"data/{prefix}/{name}": float(v)
                for i, (name, v) in enumerate(zip(self.set_names, values, strict=True))
                if present is None or present[i]
            }
        )

    def _update(
        self, state: State, logger: Logger, epoch: int, losses: np.ndarray, present: np.ndarray
    ) -> None:
        if epoch < self.next_update_epoch:
            return
        dataset = self._dataset(state)
        if self.cfg.update_type == "doremi" and self.reference is None:
            raise RuntimeError(
                f"{KEY}.reference is 'source' but no evaluation ran before training: "
                "run trainer.eval() before trainer.fit() so the source model's losses become the reference"
            )
        if not present.all():
            log.warning(
                "domains %s had no tokens in this interval's %s losses; their weights get no loss signal",
                [n for n, p in zip(self.set_names, present, strict=True) if not p],
                self.cfg.loss_source,
            )
        signal, known = self._signal(losses, present)
        batch = int(state.timestamp.batch)
        self.next_update_epoch = epoch + 1
        entry: dict[str, Any] = {
            "epoch": epoch,
            "batch": batch,
            "losses": [float(v) if p else None for v, p in zip(losses, present, strict=True)],
        }
        if self.cfg.loss_ema:
            entry["smoothed"] = [float(v) if k else None for v, k in zip(signal, known, strict=True)]
        self._log(logger, "loss", losses, present)
        if self.cfg.loss_ema:
            self._log(logger, "smoothed_loss", signal, known)
        if batch < self.cfg.update_warmup:  # the average learns, the mix stays
            self.history.append({**entry, "warmup": True, "weights": self.weights.tolist()})
            return
        effective = np.where(known, signal, self.reference) if self.reference is not None else signal
        weights = update_weights(
            self.cfg.update_type,
            self.weights,
            effective,
            self.reference,
            eta=self.cfg.eta,
            smoothing=self.cfg.smoothing,
            clip=self.cfg.clip,
            relative=self.cfg.excess == "relative",
            floors=self.cfg.floors,
        )
        counts = dataset.set_proportions(weights, epoch)
        self.weights = weights
        self.history.append({**entry, "weights": weights.tolist(), "counts": [int(c) for c in counts]})
        self._log(logger, "weight", weights)
        self._log(logger, "count", counts)
        if self.reference is not None:
            self._log(logger, "reference", self.reference)
        logger.log_metrics({"data/update_epoch": epoch})
        log.info(
            "data mix for epoch %d: %s",
            epoch,
            ", ".join(f"{n}={w:.4f}" for n, w in zip(self.set_names, weights, strict=True)),
        )

    # ------------------------------------------------------------------------------ events
    def fit_start(self, state: State, logger: Logger) -> None:
        dataset = self._dataset(state)
        if state.dataloader_len is not None and int(state.dataloader_len) != dataset.interval_batches:
            raise ValueError(
                f"the trainer runs {int(state.dataloader_len)} batches per epoch but the data mix interval is "
                f"{dataset.interval_batches} batches: do not set train_subset_num_batches with dynamic loading"
            )
        if not self.history:
            self._log(logger, "weight", self.weights)

    def eval_end(self, state: State, logger: Logger) -> None:
        if state.dataloader_label != self.cfg.eval_label:
            return
        losses, present = self._eval_losses(state)
        if self.from_source and self.reference is None and int(state.timestamp.batch) == 0:
            absent = [n for n, p in zip(self.set_names, present, strict=True) if not p]
            if absent:
                raise ValueError(f"reference: source needs eval tokens of every domain; none for {absent}")
            self._check_reference(losses)
            self.reference = losses.copy()
            self._log(logger, "reference", self.reference)
            log.info(
                "reference losses from the source model: %s",
                dict(zip(self.set_names, losses.tolist(), strict=True)),
            )
            return
        if self.cfg.loss_source != "eval":
            return
        epoch = self._boundary_epoch(state, self._dataset(state).interval_batches)
        if epoch is None:
            self._log(logger, "eval_loss", losses, present)
            return
        self._update(state, logger, epoch, losses, present)

    def after_loss(self, state: State, logger: Logger) -> None:
        if self.cfg.loss_source != "train":
            return
        outputs = state.outputs
        logits = getattr(outputs, "logits", outputs)
        if isinstance(outputs, Mapping):
            logits = outputs["logits"]
        sums, tokens = domain_token_losses(logits, state.batch, len(self.set_names))
        if self._micro_sum is None:
            self._micro_sum, self._micro_tokens = sums, tokens
        else:
            self._micro_sum += sums
            self._micro_tokens += tokens

    def batch_end(self, state: State, logger: Logger) -> None:
        if self.cfg.loss_source != "train":
            return
        k = len(self.set_names)
        if self._micro_sum is None:
            packed = torch.zeros(2 * k, dtype=torch.float64)
        else:
            packed = torch.cat([self._micro_sum, self._micro_tokens])
        packed = state.device.tensor_to_device(packed)
        dist.all_reduce(packed, reduce_operation="SUM")
        packed = packed.cpu().numpy()
        self.train_loss_sum += packed[:k]
        self.train_tokens += packed[k:]
        self._micro_sum = self._micro_tokens = None
        dataset = self._dataset(state)
        if int(state.timestamp.batch_in_epoch) != dataset.interval_batches:
            return
        present = self.train_tokens > 0
        losses = np.where(present, self.train_loss_sum / np.maximum(self.train_tokens, 1.0), 0.0)
        self.train_loss_sum[:] = 0.0
        self.train_tokens[:] = 0.0
        self._update(state, logger, int(state.timestamp.epoch) + 1, losses, present)

    # ------------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            "set_names": list(self.set_names),
            "weights": self.weights.tolist(),
            "reference": None if self.reference is None else self.reference.tolist(),
            "next_update_epoch": self.next_update_epoch,
            "smoothed": json.dumps(_nan_as_none(self.smoothed)),  # a leaf whether or not it exists yet
            # one JSON string: a sharded (FSDP) checkpoint stores a leaf, whatever the history's length
            "history": json.dumps(self.history),
            "train_loss_sum": self.train_loss_sum.tolist(),
            "train_tokens": self.train_tokens.tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["set_names"]) != list(self.set_names):
            raise ValueError(
                f"the checkpoint's data mix is over domains {state['set_names']}, not {list(self.set_names)}: "
                f"resume with the same {KEY}.set_names"
            )
        self.weights = np.asarray(state["weights"], dtype=np.float64)
        if state["reference"] is not None:
            self.reference = np.asarray(state["reference"], dtype=np.float64)
        self.next_update_epoch = int(state["next_update_epoch"])
        smoothed = state.get("smoothed")  # absent from checkpoints written before loss_ema existed
        if isinstance(smoothed, str):
            smoothed = json.loads(smoothed)
        self.smoothed = (
            None
            if smoothed is None
            else np.asarray([np.nan if v is None else v for v in smoothed], dtype=float)
        )
        history = state["history"]  # a list in checkpoints written before it became a JSON string
        self.history = [dict(h) for h in (json.loads(history) if isinstance(history, str) else history)]
        self.train_loss_sum = np.asarray(state["train_loss_sum"], dtype=np.float64)
        self.train_tokens = np.asarray(state["train_tokens"], dtype=np.float64)


def _nan_as_none(values: np.ndarray | None) -> list[float | None] | None:
    """A float array as a plain list, NaN (never observed) as None."""
    if values is None:
        return None
    return [None if np.isnan(v) else float(v) for v in values]
