"""Pure domain-mixing rules: proportion validation, integer per-interval counts, weight updates.

Dynamic batch loading (Sheared LLaMA, Alg. 1) re-weights domains from their excess loss over a
reference loss::

    delta = max(loss - reference, 0)          # clip=False keeps negative excesses
    alpha = softmax(log(w_prev) + eta * delta)
    w     = (1 - c) * alpha + c / K            # uniform smoothing, c = smoothing

Everything here is numpy on float64 and has no side effects.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

UPDATE_TYPES = ("doremi", "constant")
SUM_TOLERANCE = 1e-3
_SNAP = 1e-12


def validate_proportions(
    proportion: Sequence[float], set_names: Sequence[str], key: str = "callbacks.data_loading.proportion"
) -> np.ndarray:
    """Check one weight per domain, non-negative, summing to 1; return them renormalised as float64."""
    values = np.asarray(list(proportion), dtype=np.float64)
    if values.ndim != 1 or len(values) != len(set_names):
        raise ValueError(
            f"{key} has {values.size} values but there are {len(set_names)} domains {list(set_names)}: "
            "give exactly one proportion per domain, in the order of set_names"
        )
    if not np.all(np.isfinite(values)) or np.any(values < 0):
        raise ValueError(f"{key} must hold finite non-negative numbers, got {values.tolist()}")
    total = float(values.sum())
    if abs(total - 1.0) > SUM_TOLERANCE:
        raise ValueError(
            f"{key} sums to {total:.6g}, not 1 (tolerance {SUM_TOLERANCE}): "
            "rescale the proportions so that they sum to 1"
        )
    return values / total


def largest_remainder_counts(proportion: Sequence[float], total: int) -> np.ndarray:
    """Integer counts summing to ``total`` closest to ``proportion * total``.

    Each domain gets the floor of its quota; the samples left over go one each to the domains with
    the largest fractional parts, ties broken by the lower domain index.
    """
    if total < 0:
        raise ValueError(f"total must be non-negative, got {total}")
    weights = np.asarray(list(proportion), dtype=np.float64)
    weights = weights / weights.sum()
    quotas = weights * total
    # Decimal proportions rarely multiply exactly (0.045 * 32 = 1.4399999999999997): snap quotas
    # to integers and remainders to 1e-9 so that nominally equal remainders tie.
    nearest = np.round(quotas)
    quotas = np.where(np.abs(quotas - nearest) <= _SNAP * max(total, 1), nearest, quotas)
    counts = np.floor(quotas).astype(np.int64)
    left = int(total - counts.sum())  # 0 <= left < number of domains
    order = np.argsort(-np.round(quotas - counts, 9), kind="stable")
    counts[order[:left]] += 1
    return counts


def excess_loss(losses: np.ndarray, reference: np.ndarray, clip: bool = True) -> np.ndarray:
    """Per-domain loss above the reference; clipped at zero unless ``clip`` is False."""
    delta = np.asarray(losses, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    return np.maximum(delta, 0.0) if clip else delta


def doremi_update(
    weights: Sequence[float],
    losses: Sequence[float],
    reference: Sequence[float],
    *,
    eta: float = 1.0,
    smoothing: float = 1e-4,
    clip: bool = True,
) -> np.ndarray:
    """One exponentiated-gradient step on the domain weights (see module docstring)."""
    w_prev = np.asarray(list(weights), dtype=np.float64)
    delta = excess_loss(np.asarray(list(losses)), np.asarray(list(reference)), clip)
    with np.errstate(divide="ignore"):
        logits = np.log(w_prev) + eta * delta
    logits = logits - np.max(logits)
    alpha = np.exp(logits)
    alpha = alpha / alpha.sum()
    k = len(w_prev)
    updated = (1.0 - smoothing) * alpha + smoothing / k
    return updated / updated.sum()


def update_weights(
    update_type: str,
    weights: Sequence[float],
    losses: Sequence[float],
    reference: Sequence[float] | None,
    *,
    eta: float = 1.0,
    smoothing: float = 1e-4,
    clip: bool = True,
) -> np.ndarray:
    """Dispatch on ``update_type`` (``doremi`` or ``constant``)."""
    if update_type == "constant":
        w = np.asarray(list(weights), dtype=np.float64)
        return w / w.sum()
    if update_type == "doremi":
        if reference is None:
            raise ValueError("update_type doremi needs reference losses")
        return doremi_update(weights, losses, reference, eta=eta, smoothing=smoothing, clip=clip)
    raise ValueError(f"unknown update_type {update_type!r}; choose one of {list(UPDATE_TYPES)}")
