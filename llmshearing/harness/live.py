"""lm-eval's ``HFLM`` over a model in memory: the model being trained, sharded or not.

`LiveModel` gives a forward function (``input ids -> logits``) the face of the transformers model HFLM
wraps (a config, a device, ``model(ids).logits``), so the tokenisation, batching and scoring are lm-eval's
own, as for `llmshearing evaluate --tasks`. `RankedLM` adds what lm-eval needs to split a task's documents
over the processes of a ``torch.distributed`` run (``rank``, ``world_size``, gathers, a barrier), and keeps
every process's forward passes in step: under FSDP a forward is a collective (each sharded block gathers
its parameters), so a process that has run out of requests keeps answering with one-token forwards until
every process is done.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import torch
from lm_eval.models.huggingface import HFLM


class LiveModel:
    """``forward(ids) -> logits`` with the attributes HFLM reads from a transformers model."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], config: Any, device: torch.device):
        self.forward = forward
        self.config = config
        self.device = device

    def __call__(self, input_ids: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.forward(input_ids))

    def eval(self) -> LiveModel:
        return self

    def tie_weights(self) -> None:
        """Nothing to tie: the model's own weights are used as they are."""


def hf_config_object(config_dict: dict[str, Any]) -> Any:
    """A transformers config object from a config dict (what ``config.json`` holds)."""
    from transformers import CONFIG_MAPPING

    return CONFIG_MAPPING[config_dict["model_type"]].from_dict(config_dict)


class RankedLM(HFLM):
    """HFLM over a `LiveModel`, able to take one share of each task's documents in a distributed run.

    ``share(rank, world)`` chooses the split for the next evaluation (``(0, 1)``: every process scores
    every document). Whenever ``torch.distributed`` runs with several processes the forward passes are
    kept in step (see the module docstring), whatever the split.
    """

    def __init__(self, model: LiveModel, tokenizer: str, batch_size: int, quiet: bool = True) -> None:
        super().__init__(
            pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device)
        )
        self._live = model
        self._quiet = quiet
        self._lockstep = torch.distributed.is_available() and torch.distributed.is_initialized()
        self._lockstep = self._lockstep and torch.distributed.get_world_size() > 1

    def share(self, rank: int, world: int) -> None:
        self._rank, self._world_size = rank, world

    # ------------------------------------------------------------------ lm-eval's distributed calls
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size <= 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, tensor.contiguous())
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    # ------------------------------------------------------------------ forward passes in step
    def _others_busy(self, busy: bool) -> bool:
        """One all-reduce: whether any process has a forward pass to run now."""
        flag = torch.tensor([1 if busy else 0], device=self._live.device)
        torch.distributed.all_reduce(flag)
        return bool(flag.item())

    def _model_call(self, inps: torch.Tensor, attn_mask: Any = None, labels: Any = None) -> torch.Tensor:
        if self._lockstep:
            self._others_busy(True)
        return super()._model_call(inps, attn_mask, labels)

    def _drain(self) -> None:
        """Run one-token forwards for as long as another process still has requests."""
        if not self._lockstep:
            return
        token = self.eot_token_id if self.eot_token_id is not None else 0
        filler = torch.full((1, 1), int(token), dtype=torch.long, device=self._live.device)
        with torch.no_grad():
            while self._others_busy(False):
                self._live(filler)

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        results = super().loglikelihood(requests, disable_tqdm=disable_tqdm or self._quiet)
        self._drain()
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        results = super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or self._quiet)
        self._drain()
        return results

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        raise NotImplementedError(
            "in-training evaluation scores log-likelihoods only; evaluate generation tasks after training "
            "with `llmshearing evaluate MODEL --tasks ...`"
        )
