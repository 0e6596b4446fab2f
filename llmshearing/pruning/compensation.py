"""Least-squares compensation of pruned MLP neurons: keep the neurons whose loss the others can best make up.

A layer's MLP writes ``W h`` to the residual stream, with ``h`` [I] the SwiGLU activation (the input of
``w2``) and ``W`` [d, I] the down projection. Removing the neurons ``S`` and re-fitting the kept columns
``K`` to the calibration activations (Optimal Brain Surgeon on a linear layer's squared output error, with
the Gram matrix ``G = sum_t h_t h_t^T`` as its Hessian) gives, per output row ``w``,

    w_K' = w_K + G_KK^-1 G_KS w_S,    error = tr(W_S (G^-1)_SS^-1 W_S^T)  (one neuron q: |W_q|^2 / (G^-1)_qq).

:func:`compensated_removal` removes neurons one at a time, each time the one whose removal (with the other
columns re-fitted) costs least, and updates ``W`` and ``G^-1`` in place. Unlike an importance ranking,
which scores each neuron alone, it sees redundancy: of two neurons with the same activation, one is
removed at no cost and the other takes over its output column; a pair whose output columns cancel loses
both. ``damping`` (a share of the mean diagonal of ``G``, added to it) keeps ``G`` invertible.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from llmshearing.models.decoder import Decoder

DEFAULT_DAMPING = 0.01


def damped_inverse(gram: Tensor, damping: float = DEFAULT_DAMPING) -> Tensor:
    """``(G + damping * mean(diag G) * I)^-1`` in float64."""
    if damping <= 0:
        raise ValueError(f"damping must be positive (it keeps the Gram matrix invertible), got {damping}")
    g = gram.double()
    scale = float(torch.diagonal(g).mean().clamp(min=1e-12))
    g = g + damping * scale * torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    return torch.cholesky_inverse(torch.linalg.cholesky(g))


def compensated_removal(
    weight: Tensor, gram: Tensor, keep: int, damping: float = DEFAULT_DAMPING
) -> tuple[Tensor, Tensor]:
    """Greedily remove ``I - keep`` columns of ``weight`` [d, I], re-fitting the rest; ``gram`` [I, I].

    Returns ``(kept, fitted)``: the kept column indices (ascending) and ``weight`` with the removed columns
    zero and the kept ones compensated (float64).
    """
    count = weight.shape[1]
    if gram.shape != (count, count):
        raise ValueError(f"the Gram matrix has shape {tuple(gram.shape)}, expected {(count, count)}")
    if not 0 < keep <= count:
        raise ValueError(f"keep must be in [1, {count}], got {keep}")
    fitted = weight.detach().double().clone()
    inverse = damped_inverse(gram.to(fitted.device), damping)
    alive = torch.ones(count, dtype=torch.bool, device=fitted.device)
    for _ in range(count - keep):
        diagonal = torch.diagonal(inverse)
        cost = fitted.square().sum(0) / diagonal.clamp(min=1e-30)
        q = int(torch.argmin(cost.masked_fill(~alive, float("inf"))))
        pivot = inverse[q, q]
        fitted -= torch.outer(fitted[:, q], inverse[q]) / pivot
        inverse -= torch.outer(inverse[:, q], inverse[q]) / pivot
        fitted[:, q] = 0.0  # exactly: later updates then leave it there, as its row of the inverse is 0
        inverse[q] = 0.0
        inverse[:, q] = 0.0
        alive[q] = False
    return torch.nonzero(alive).flatten(), fitted


def least_squares_fit(weight: Tensor, gram: Tensor, kept: Tensor, damping: float = DEFAULT_DAMPING) -> Tensor:
    """``weight`` [d, I] with only the ``kept`` columns, re-fitted in closed form (the result
    :func:`compensated_removal` reaches step by step); the others zero. For checks and for a kept set
    chosen elsewhere."""
    count = weight.shape[1]
    g = gram.double()
    scale = float(torch.diagonal(g).mean().clamp(min=1e-12))
    g = g + damping * scale * torch.eye(count, dtype=g.dtype, device=g.device)
    removed = torch.ones(count, dtype=torch.bool, device=g.device)
    removed[kept] = False
    w = weight.detach().double()
    fitted = torch.zeros_like(w)
    keep_idx, gone_idx = kept.to(g.device), torch.nonzero(removed).flatten()
    shift = torch.linalg.solve(g[keep_idx][:, keep_idx], g[keep_idx][:, gone_idx] @ w[:, gone_idx].T)
    fitted[:, keep_idx] = w[:, keep_idx] + shift.T
    return fitted


def compensate_intermediate(
    decoder: Decoder,
    grams: Tensor,
    masks: Mapping[str, Tensor],
    keep: int,
    damping: float = DEFAULT_DAMPING,
) -> dict[str, Tensor]:
    """Choose every kept layer's ``keep`` neurons by :func:`compensated_removal` and write the re-fitted
    ``w2`` into ``decoder`` (in place); returns ``masks`` with its ``intermediate`` mask replaced.

    ``grams`` [L, I, I] are the source's Gram matrices of the ``w2`` inputs
    (:func:`llmshearing.pruning.importance.compute_importance` with ``grams=True``). Layers the masks
    drop (``layer`` or ``mlp``) keep their mask and weights: nothing of them survives the fold.
    """
    config = decoder.config
    if tuple(grams.shape) != (config.n_layers, config.intermediate_size, config.intermediate_size):
        raise ValueError(
            f"Gram matrices of shape {tuple(grams.shape)} do not fit this model "
            f"({config.n_layers} layers of {config.intermediate_size} neurons)"
        )
    new = dict(masks)
    intermediate = masks["intermediate"].detach().clone().float()
    for i, block in enumerate(decoder.layers):
        if any(name in masks and float(masks[name][i]) == 0.0 for name in ("layer", "mlp")):
            continue
        w2 = block.feed_forward.w2.weight
        kept, fitted = compensated_removal(w2, grams[i], keep, damping)
        with torch.no_grad():
            w2.copy_(fitted.to(w2.dtype))
        row = torch.zeros(config.intermediate_size)
        row[kept.cpu()] = 1.0
        intermediate[i] = row
    new["intermediate"] = intermediate
    return new


__all__ = [
    "DEFAULT_DAMPING",
    "compensate_intermediate",
    "compensated_removal",
    "damped_inverse",
    "least_squares_fit",
]
