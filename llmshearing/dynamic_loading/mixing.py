"""The update rule of dynamic batch loading and its stabilisers, as pure functions.

Dynamic batch loading (Sheared LLaMA, Alg. 1) re-weights domains from their excess loss over a
reference loss::

    delta = max(loss - reference, 0)          # clip=False keeps negative excesses
    alpha = softmax(log(w_prev) + eta * delta)
    w     = (1 - c) * alpha + c / K            # uniform smoothing, c = smoothing

Options that keep the mix stable (each off by default, leaving the rule above unchanged):

* ``relative`` excess: ``delta = (loss - reference) / reference``, so domains whose losses differ in
  scale move the mix equally for the same relative gap;
* ``floors``: a lower bound per domain on ``w`` (:func:`apply_floors`), applied after smoothing;
* an exponential moving average of the losses (:func:`ema_losses`) feeds the rule instead of the
  raw losses of one interval.

The mix itself is plain values: its validation and the exact integer counts it gives per interval
are in ``llmshearing.data.proportions``. Everything here is numpy on float64 and has no side effects.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

UPDATE_TYPES = ("doremi", "constant")
EXCESS_TYPES = ("absolute", "relative")


def excess_loss(
    losses: np.ndarray, reference: np.ndarray, clip: bool = True, relative: bool = False
) -> np.ndarray:
    """Per-domain loss above the reference (divided by it when ``relative``); clipped at zero unless ``clip`` is False."""
    reference = np.asarray(reference, dtype=np.float64)
    delta = np.asarray(losses, dtype=np.float64) - reference
    if relative:
        if np.any(reference <= 0):
            raise ValueError(f"relative excess needs positive reference losses, got {reference.tolist()}")
        delta = delta / reference
    return np.maximum(delta, 0.0) if clip else delta


def ema_losses(
    previous: np.ndarray | None, losses: np.ndarray, present: np.ndarray, decay: float
) -> np.ndarray:
    """Exponential moving average ``decay * previous + (1 - decay) * loss`` per domain.

    A domain's first observed loss starts its average; a domain absent from this interval
    (``present`` false) keeps its previous average (NaN while it has never been observed).
    """
    losses = np.asarray(losses, dtype=np.float64)
    present = np.asarray(present, dtype=bool)
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"the loss EMA decay must be in [0, 1), got {decay}")
    if previous is None:
        previous = np.full(losses.shape, np.nan)
    previous = np.asarray(previous, dtype=np.float64)
    blended = np.where(np.isnan(previous), losses, decay * previous + (1.0 - decay) * losses)
    return np.where(present, blended, previous)


def apply_floors(weights: Sequence[float], floors: Sequence[float]) -> np.ndarray:
    """The closest mix to ``weights`` (same ratios among unfloored domains) with ``w_i >= floors[i]``.

    Domains below their floor are raised to it and the others scaled down proportionally to share
    what is left; repeated until no domain is below its floor. ``sum(floors)`` must be at most 1.
    """
    w = np.asarray(list(weights), dtype=np.float64)
    w = w / w.sum()
    floors_arr = np.asarray(list(floors), dtype=np.float64)
    if floors_arr.shape != w.shape or np.any(floors_arr < 0) or floors_arr.sum() > 1.0 + 1e-12:
        raise ValueError(
            f"floors must be one non-negative value per domain summing to at most 1, got {floors}"
        )
    fixed = np.zeros(w.shape, dtype=bool)
    for _ in range(len(w)):
        below = ~fixed & (w < floors_arr)
        if not below.any():
            break
        fixed |= below
        free_mass = 1.0 - floors_arr[fixed].sum()
        free = w[~fixed]
        total = free.sum()
        scaled = (
            free * (free_mass / total) if total > 0 else np.full(free.shape, free_mass / max(free.size, 1))
        )
        w = np.where(fixed, floors_arr, 0.0)
        w[~fixed] = scaled
    return w


def doremi_update(
    weights: Sequence[float],
    losses: Sequence[float],
    reference: Sequence[float],
    *,
    eta: float = 1.0,
    smoothing: float = 1e-4,
    clip: bool = True,
    relative: bool = False,
    floors: Sequence[float] | None = None,
) -> np.ndarray:
    """One exponentiated-gradient step on the domain weights (see module docstring)."""
    w_prev = np.asarray(list(weights), dtype=np.float64)
    delta = excess_loss(np.asarray(list(losses)), np.asarray(list(reference)), clip, relative)
    with np.errstate(divide="ignore"):
        logits = np.log(w_prev) + eta * delta
    logits = logits - np.max(logits)
    alpha = np.exp(logits)
    alpha = alpha / alpha.sum()
    k = len(w_prev)
    updated = (1.0 - smoothing) * alpha + smoothing / k
    updated = updated / updated.sum()
    return updated if floors is None else apply_floors(updated, floors)


def update_weights(
    update_type: str,
    weights: Sequence[float],
    losses: Sequence[float],
    reference: Sequence[float] | None,
    *,
    eta: float = 1.0,
    smoothing: float = 1e-4,
    clip: bool = True,
    relative: bool = False,
    floors: Sequence[float] | None = None,
) -> np.ndarray:
    """Dispatch on ``update_type`` (``doremi`` or ``constant``)."""
    if update_type == "constant":
        w = np.asarray(list(weights), dtype=np.float64)
        return w / w.sum()
    if update_type == "doremi":
        if reference is None:
            raise ValueError("update_type doremi needs reference losses")
        return doremi_update(
            weights,
            losses,
            reference,
            eta=eta,
            smoothing=smoothing,
            clip=clip,
            relative=relative,
            floors=floors,
        )
    raise ValueError(f"unknown update_type {update_type!r}; choose one of {list(UPDATE_TYPES)}")
