"""A domain mix as plain values: one proportion per domain, and the exact integer counts it gives.

The multi-domain dataset reads these; the rule that changes the mix over training lives in
``llmshearing.dynamic_loading``. Everything here is numpy on float64 and has no side effects.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SUM_TOLERANCE = 1e-3
_SNAP = 1e-12


def validate_proportions(
    proportion: Sequence[float], set_names: Sequence[str], key: str = "proportion"
) -> np.ndarray:
    """Check one weight per domain, non-negative, summing to 1; return them renormalised as float64.

    ``key`` names the setting in the messages (the recipe key, when the values come from one).
    """
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
