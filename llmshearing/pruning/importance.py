"""Activation-based importance of every prunable structure of a dense ``Decoder``.

The dense model runs on calibration samples with forward hooks; each score is a mean over all
calibration tokens (higher = more important):

* ``head`` [L, H]: norm of the head's contribution to the residual stream, ``||wo_h ctx_h||``
  (its attention context projected by its own columns of ``wo``).
* ``kv_head`` [L, Hkv]: sum of the ``head`` scores of the query heads in the KV group (pruning ranks a
  group by the heads the target keeps in it: ``ranking.surviving_group_scores``).
* ``intermediate`` [L, I]: ``|silu(w1 x) * w3 x|`` of the dim times the norm of its ``w2`` column,
  i.e. the norm of its contribution to the residual stream.
* ``hidden`` [d]: ``|x|`` of the residual stream entering every RMSNorm (both norms of every block
  and the final norm), summed over those points.
* ``layer`` [L]: block influence ``1 - cos(block input, block output)``; an identity block scores 0.
* ``head_layer`` [L] / ``mlp`` [L]: the same influence measured across the attention / MLP branch only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from llmshearing.data.layout import TokenSamples, split_domains, token_batches
from llmshearing.models.decoder import Decoder

SCORE_KEYS = ("layer", "head_layer", "mlp", "head", "kv_head", "intermediate", "hidden")


@dataclass
class ImportanceScores:
    """Per-structure importance of a model (keys named like the decoder's masks)."""

    layer: Tensor  # [L]
    head_layer: Tensor  # [L]
    mlp: Tensor  # [L]
    head: Tensor  # [L, H]
    kv_head: Tensor  # [L, Hkv]
    intermediate: Tensor  # [L, I]
    hidden: Tensor  # [d]
    samples: int = 0  # calibration sequences seen
    tokens: int = 0  # calibration tokens seen
    # when asked for (least-squares compensation, :mod:`llmshearing.pruning.compensation`): the mean of x x^T
    # over the calibration tokens of every layer's ``w2`` input (``intermediate``: [L, I, I]) and ``wo`` input
    # (``head``: [L, H * hd, H * hd]); never written by ``save``
    grams: dict[str, Tensor] | None = None

    def as_dict(self) -> dict[str, Tensor]:
        return {key: getattr(self, key) for key in SCORE_KEYS}

    def save(self, path: str | Path) -> Path:
        """Write the scores as safetensors (sample and token counts in the metadata), via a temporary file and rename."""
        from llmshearing.checkpoint.tensor_io import save_tensors

        tensors = {key: value.float() for key, value in self.as_dict().items()}
        return save_tensors(path, tensors, {"samples": str(self.samples), "tokens": str(self.tokens)})

    @classmethod
    def load(cls, path: str | Path) -> ImportanceScores:
        """Read scores written by :meth:`save`."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"importance scores {path} not found; write them with prune-oneshot --scores-out"
            )
        with safe_open(str(path), framework="pt") as handle:
            missing = sorted(set(SCORE_KEYS) - set(handle.keys()))
            if missing:
                raise KeyError(
                    f"{path} lacks importance scores {missing}; it was not written by prune-oneshot"
                )
            tensors = {key: handle.get_tensor(key) for key in SCORE_KEYS}
            metadata = handle.metadata() or {}
        return cls(**tensors, samples=int(metadata.get("samples", 0)), tokens=int(metadata.get("tokens", 0)))


class _BodyDone(Exception):
    """Raised by the final-norm hook to end a calibration forward before the output head."""


class _Accumulator:
    """Running sums of every score, filled by hooks on one decoder."""

    def __init__(self, decoder: Decoder, grams: bool = False) -> None:
        cfg = decoder.config
        L = cfg.n_layers
        self.config = cfg
        device = decoder.tok_embeddings.weight.device

        def zeros(*shape: int) -> Tensor:  # sums stay on the model's device: no host sync per hook
            return torch.zeros(shape, dtype=torch.float64, device=device)

        self.sums = {
            "layer": zeros(L),
            "head_layer": zeros(L),
            "mlp": zeros(L),
            "head": zeros(L, cfg.n_heads),
            "intermediate": zeros(L, cfg.intermediate_size),
            "hidden": zeros(cfg.d_model),
        }
        if grams:  # float32: half the memory of the other sums' float64, at this size what matters
            width = cfg.n_heads * cfg.head_dim
            self.sums["gram/intermediate"] = zeros(L, cfg.intermediate_size, cfg.intermediate_size).float()
            self.sums["gram/head"] = zeros(L, width, width).float()
        self.samples = 0
        self.tokens = 0
        self._block_input: dict[int, Tensor] = {}
        self._branch_input: dict[int, Tensor] = {}
        self._handles = []
        for i, block in enumerate(decoder.layers):
            self._handles += [
                block.attention_norm.register_forward_pre_hook(self._on_attention_norm(i)),
                block.ffn_norm.register_forward_pre_hook(self._on_ffn_norm(i)),
                block.register_forward_hook(self._on_block_output(i)),
                block.attention.wo.register_forward_pre_hook(self._on_context(i, block.attention.wo.weight)),
                block.feed_forward.w2.register_forward_pre_hook(self._on_swiglu(i)),
            ]
        self._handles.append(decoder.norm.register_forward_pre_hook(self._on_final_norm))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def all_reduce(self) -> None:
        """Sum every running sum and count over the ranks (each rank calibrated on its own share)."""
        import torch.distributed as tdist

        if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
            return
        keys = sorted(self.sums)
        flat = torch.cat([self.sums[k].reshape(-1) for k in keys])
        device = flat.device
        counts = torch.tensor([self.samples, self.tokens], dtype=torch.float64, device=device)
        flat = torch.cat([flat, counts])
        tdist.all_reduce(flat)
        offset = 0
        for key in keys:
            n = self.sums[key].numel()
            self.sums[key] = flat[offset : offset + n].view_as(self.sums[key])
            offset += n
        self.samples, self.tokens = int(flat[offset].item()), int(flat[offset + 1].item())

    # Each hook sees activations of shape [B, T, ...]; sums run over all B*T tokens.
    def _add_hidden(self, x: Tensor) -> None:
        self.sums["hidden"] += x.detach().float().abs().sum(dim=(0, 1))

    @staticmethod
    def _state(x: Tensor) -> tuple[Tensor, Tensor]:
        """A residual-stream activation in fp32 with its per-token norm (reused by both influences)."""
        x = x.detach().float()
        return x, torch.linalg.vector_norm(x, dim=-1)

    @staticmethod
    def _influence(before: tuple[Tensor, Tensor], after: tuple[Tensor, Tensor]) -> Tensor:
        """Sum over tokens of ``1 - cos(before, after)``."""
        cos = torch.linalg.vecdot(before[0], after[0]) / (before[1] * after[1]).clamp(min=1e-8)
        return (1.0 - cos).sum()

    def _on_attention_norm(self, i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple) -> None:
            self._add_hidden(args[0])
            self._block_input[i] = self._state(args[0])

        return hook

    def _on_ffn_norm(self, i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple) -> None:
            self._add_hidden(args[0])
            mid = self._state(args[0])
            self.sums["head_layer"][i] += self._influence(self._block_input[i], mid)
            self._branch_input[i] = mid

        return hook

    def _on_block_output(self, i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            out = self._state(output)
            self.sums["mlp"][i] += self._influence(self._branch_input.pop(i), out)
            self.sums["layer"][i] += self._influence(self._block_input.pop(i), out)
            if i == 0:
                self.samples += output.shape[0]
                self.tokens += output.shape[0] * output.shape[1]

        return hook

    def _on_context(self, i: int, wo_weight: Tensor) -> Callable[..., None]:
        H, hd = self.config.n_heads, self.config.head_dim

        def hook(module: nn.Module, args: tuple) -> None:
            ctx = args[0].detach().float().reshape(-1, H, hd)  # [N, H, hd]
            w = wo_weight.detach().float().reshape(-1, H, hd)  # [d, H, hd]
            gram = torch.einsum("dhk,dhl->hkl", w, w)  # [H, hd, hd]: ||wo_h c||^2 = c^T gram_h c
            squared = torch.einsum("nhk,hkl,nhl->nh", ctx, gram, ctx)
            self.sums["head"][i] += squared.clamp(min=0).sqrt().sum(0)
            self._add_gram("head", i, ctx)

        return hook

    def _on_swiglu(self, i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple) -> None:
            h = args[0].detach().float()
            self.sums["intermediate"][i] += h.abs().sum(dim=(0, 1))
            self._add_gram("intermediate", i, h)

        return hook

    def _add_gram(self, family: str, i: int, x: Tensor) -> None:
        key = f"gram/{family}"
        if key in self.sums:
            x = x.reshape(-1, self.sums[key].shape[-1])
            self.sums[key][i] += x.T @ x

    def _on_final_norm(self, module: nn.Module, args: tuple) -> None:
        self._add_hidden(args[0])
        raise _BodyDone  # every score is known: skip the final norm and the output head

    def result(self, decoder: Decoder) -> ImportanceScores:
        if self.tokens == 0:
            raise ValueError("no calibration tokens were seen; pass at least one sample")
        cfg, n = self.config, float(self.tokens)
        grams = {key[5:]: (value / n).cpu() for key, value in self.sums.items() if key.startswith("gram/")}
        mean = {
            key: (value / n).float().cpu() for key, value in self.sums.items() if not key.startswith("gram/")
        }
        w2_norms = torch.stack(
            [block.feed_forward.w2.weight.detach().float().norm(dim=0).cpu() for block in decoder.layers]
        )
        intermediate = mean["intermediate"] * w2_norms
        kv_head = mean["head"].reshape(cfg.n_layers, cfg.n_kv_heads, cfg.heads_per_group).sum(-1)
        return ImportanceScores(
            layer=mean["layer"],
            head_layer=mean["head_layer"],
            mlp=mean["mlp"],
            head=mean["head"],
            kv_head=kv_head,
            intermediate=intermediate,
            hidden=mean["hidden"],
            samples=self.samples,
            tokens=self.tokens,
            grams=grams or None,
        )


@torch.no_grad()
def compute_importance(
    decoder: Decoder,
    batches: Iterable[Tensor],
    total: int | None = None,
    progress: bool = True,
    across_ranks: bool = False,
    grams: bool = False,
) -> ImportanceScores:
    """Run ``decoder`` (dense, no masks) on ``batches`` of input ids [B, T] and return its importance scores.

    ``total`` is the number of batches, for the progress bar. Each forward stops at the final norm:
    the output head does not affect any score. With ``across_ranks`` every rank of the process group
    passes its own share of the calibration batches and must call this: the sums are all-reduced, so
    every rank returns the scores of all the ranks' samples together. With ``grams`` the scores also
    carry every layer's Gram matrices of the ``w2`` and ``wo`` inputs (``ImportanceScores.grams``, float32,
    ``L * (I^2 + (H * hd)^2)`` numbers on the model's device while calibrating), which least-squares
    compensation needs.
    """
    from tqdm.auto import tqdm

    device = decoder.tok_embeddings.weight.device
    was_training = decoder.training
    decoder.eval()
    accumulator = _Accumulator(decoder, grams=grams)
    try:
        for input_ids in tqdm(batches, total=total, desc="calibration", unit="batch", disable=not progress):
            try:
                decoder(input_ids.to(device))
            except _BodyDone:
                pass
    finally:
        accumulator.remove()
        decoder.train(was_training)
    if across_ranks:
        accumulator.all_reduce()
    return accumulator.result(decoder)


def calibration_domains(data_dir: str | Path, split: str = "train") -> list[Path]:
    """The MDS directories ``DATA/<split>/<domain>/`` of a prepared data root, sorted by domain."""
    return [Path(data_dir) / split / d for d in split_domains(data_dir, split, label=f"--data {data_dir}: ")]


def calibration_batches(
    data_dir: str | Path, samples: int, batch_size: int, split: str = "train"
) -> tuple[int, Iterator[Tensor]]:
    """``(number of batches, batches)`` of ``samples`` token sequences taken round-robin over the domains.

    Sample ``j`` of domain ``k`` is used before sample ``j + 1`` of any domain, so every domain
    contributes equally until it runs out. Fewer samples are used if the data holds fewer.
    """
    if samples <= 0:
        raise ValueError(f"--samples must be a positive number of calibration samples, got {samples}")
    if batch_size <= 0:
        raise ValueError(f"--batch-size must be positive, got {batch_size}")
    label = f"--data {data_dir}: "
    sources = [TokenSamples(path, label) for path in calibration_domains(data_dir, split)]
    order = calibration_order([len(source) for source in sources], samples)
    if not order:
        raise ValueError(f"--data {data_dir}: the {split} split holds no samples")

    def generate() -> Iterator[Tensor]:
        try:
            for rows in token_batches(sources, order, batch_size, label):
                yield torch.from_numpy(rows)
        finally:
            for source in sources:
                source.close()

    return (len(order) + batch_size - 1) // batch_size, generate()


def calibration_order(domain_sizes: Sequence[int], samples: int) -> list[tuple[int, int]]:
    """``(domain, sample)`` pairs of ``samples`` calibration samples, round-robin over the domains.

    Sample ``j`` of domain ``k`` comes before sample ``j + 1`` of any domain, so every domain
    contributes equally until it runs out; fewer pairs when the domains hold fewer samples.
    """
    order: list[tuple[int, int]] = []
    for j in range(max(domain_sizes, default=0)):
        order += [(k, j) for k, size in enumerate(domain_sizes) if j < size]
        if len(order) >= samples:
            break
    return order[:samples]


def stream_calibration_batches(
    dataset: Any, samples: int, batch_size: int, rank: int = 0, world_size: int = 1
) -> tuple[int, int, Iterator[Tensor]]:
    """This rank's share of the calibration batches, read through the training run's ``StreamingDataset``.

    ``dataset`` is the run's train dataset (one stream per domain, samples as ``{"input_ids": ...}``):
    each sample is fetched by its index, so only the shards holding calibration samples are
    downloaded (with a remote) or decompressed, into the same local cache training reads. The
    samples are :func:`calibration_order`'s; rank ``r`` takes every ``world_size``-th one from ``r``.
    Returns ``(samples in all, batches of this rank, the batches)``.
    """
    if samples <= 0:
        raise ValueError(f"calibration needs a positive number of samples, got {samples}")
    if batch_size <= 0:
        raise ValueError(f"calibration batch size must be positive, got {batch_size}")
    sizes = [int(n) for n in dataset.samples_per_stream]
    starts = [int(n) for n in dataset.sample_offset_per_stream]
    order = calibration_order(sizes, samples)
    if not order:
        raise ValueError("the train split holds no samples to calibrate on")
    mine = order[rank::world_size]

    def generate() -> Iterator[Tensor]:
        for first in range(0, len(mine), batch_size):
            rows = [dataset[starts[k] + j]["input_ids"] for k, j in mine[first : first + batch_size]]
            lengths = {len(row) for row in rows}
            if len(lengths) != 1:
                raise ValueError(
                    f"calibration samples have different lengths {sorted(lengths)}; use a fixed seq_len"
                )
            yield torch.stack([torch.as_tensor(row, dtype=torch.int64) for row in rows])

    return len(order), (len(mine) + batch_size - 1) // batch_size, generate()


def scores_by_family(scores: ImportanceScores | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The scores as a plain mapping from mask family to tensor."""
    if isinstance(scores, ImportanceScores):
        return scores.as_dict()
    missing = [key for key in SCORE_KEYS if key not in scores]
    if missing:
        raise KeyError(f"importance scores lack {missing}; expected {list(SCORE_KEYS)}")
    return {key: scores[key] for key in SCORE_KEYS}


__all__ = [
    "ImportanceScores",
    "SCORE_KEYS",
    "calibration_batches",
    "calibration_domains",
    "calibration_order",
    "compute_importance",
    "scores_by_family",
    "stream_calibration_batches",
]
