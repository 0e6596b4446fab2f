"""Domain-mixing rules against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from llmshearing.data.mixing import (
    doremi_update,
    excess_loss,
    largest_remainder_counts,
    update_weights,
    validate_proportions,
)

NAMES = ["a", "b", "c"]


@pytest.mark.parametrize(
    ("proportion", "total", "expected"),
    [
        ([0.5, 0.25, 0.25], 80, [40, 20, 20]),
        ([0.1, 0.7, 0.2], 80, [8, 56, 16]),  # 0.2 * 80 must give 16, not 15
        ([1 / 3, 1 / 3, 1 / 3], 10, [4, 3, 3]),  # equal remainders: the lower index wins
        ([1 / 3, 1 / 3, 1 / 3], 11, [4, 4, 3]),
        ([0.6, 0.3, 0.1], 7, [4, 2, 1]),  # quotas 4.2, 2.1, 0.7: the leftover goes to c
        ([0.0, 0.5, 0.5], 5, [0, 3, 2]),
    ],
)
def test_largest_remainder_counts(proportion, total, expected):
    counts = largest_remainder_counts(proportion, total)
    assert counts.tolist() == expected
    assert counts.dtype == np.int64


def test_largest_remainder_counts_redpajama_mix():
    mix = [0.67, 0.045, 0.045, 0.02, 0.045, 0.025, 0.15]
    counts = largest_remainder_counts(mix, 50 * 32)
    # quotas 1072, 72, 72, 32, 72, 40, 240 are integers: no rounding at all
    assert counts.tolist() == [1072, 72, 72, 32, 72, 40, 240]
    counts = largest_remainder_counts(mix, 32)
    # quotas 21.44, 1.44, 1.44, .64, 1.44, .8, 4.8: floors sum to 28; the 4 left go to the largest
    # remainders: arxiv .8, c4 .8, stackexchange .64, then the first .44 (cc, lowest index)
    assert counts.tolist() == [22, 1, 1, 1, 1, 1, 5]
    assert counts.sum() == 32


def test_validate_proportions_renormalises_within_tolerance():
    w = validate_proportions([0.2192, 0.0002, 0.0791, 0.0064, 0.0096, 0.001, 0.6845], list("abcdefg"))
    assert w.sum() == pytest.approx(1.0, abs=1e-15)


@pytest.mark.parametrize(
    ("proportion", "message"),
    [
        ([0.5, 0.3, 0.3], "sums to 1.1, not 1"),
        ([0.5, 0.5], "has 2 values but there are 3 domains"),
        ([0.5, 0.7, -0.2], "non-negative"),
        ([0.5, float("nan"), 0.5], "non-negative"),
    ],
)
def test_validate_proportions_errors(proportion, message):
    with pytest.raises(ValueError, match="proportion") as err:
        validate_proportions(proportion, NAMES)
    assert message in str(err.value)


def test_excess_loss_clipping():
    assert excess_loss(np.array([2.0, 1.0]), np.array([1.5, 1.5])).tolist() == [0.5, 0.0]
    assert excess_loss(np.array([2.0, 1.0]), np.array([1.5, 1.5]), clip=False).tolist() == [0.5, -0.5]


def test_doremi_update_by_hand():
    # delta = [1, 0]: alpha = [0.5 e, 0.5] / (0.5 e + 0.5) = [e, 1] / (e + 1)
    w = doremi_update([0.5, 0.5], [2.0, 1.0], [1.0, 1.0], eta=1.0, smoothing=0.0)
    e = math.e
    assert w.tolist() == pytest.approx([e / (e + 1), 1 / (e + 1)], abs=1e-15)

    # smoothing c mixes in c / K of the uniform distribution
    w = doremi_update([0.5, 0.5], [2.0, 1.0], [1.0, 1.0], eta=1.0, smoothing=1e-4)
    expected = [(1 - 1e-4) * e / (e + 1) + 0.5e-4, (1 - 1e-4) / (e + 1) + 0.5e-4]
    assert w.tolist() == pytest.approx(expected, abs=1e-15)

    # step size: w ∝ w_prev * exp(eta * delta)
    w = doremi_update([0.2, 0.3, 0.5], [3.0, 1.0, 1.5], [1.0, 1.0, 1.0], eta=0.5, smoothing=0.0)
    raw = np.array([0.2 * math.exp(1.0), 0.3 * 1.0, 0.5 * math.exp(0.25)])
    assert w.tolist() == pytest.approx((raw / raw.sum()).tolist(), abs=1e-15)


def test_doremi_clip_versus_unclipped():
    weights, losses, ref = [0.25, 0.25, 0.5], [1.0, 2.0, 1.0], [1.5, 1.5, 1.5]
    clipped = doremi_update(weights, losses, ref, smoothing=0.0)  # delta [0, .5, 0]
    raw = np.array([0.25, 0.25 * math.exp(0.5), 0.5])
    assert clipped.tolist() == pytest.approx((raw / raw.sum()).tolist(), abs=1e-15)
    unclipped = doremi_update(weights, losses, ref, smoothing=0.0, clip=False)  # delta [-.5, .5, -.5]
    raw = np.array([0.25 * math.exp(-0.5), 0.25 * math.exp(0.5), 0.5 * math.exp(-0.5)])
    assert unclipped.tolist() == pytest.approx((raw / raw.sum()).tolist(), abs=1e-15)


def test_doremi_zero_weight_recovers_through_smoothing():
    w = doremi_update([0.0, 1.0], [5.0, 1.0], [1.0, 1.0], smoothing=1e-4)
    assert w.tolist() == pytest.approx([0.5e-4, 1 - 0.5e-4], abs=1e-15)


def test_update_weights_dispatch():
    assert update_weights("constant", [0.2, 0.8], [9.0, 9.0], None).tolist() == [0.2, 0.8]
    assert update_weights("doremi", [0.5, 0.5], [1.0, 1.0], [1.0, 1.0]).tolist() == pytest.approx([0.5, 0.5])
    with pytest.raises(ValueError, match="unknown update_type 'bandit'"):
        update_weights("bandit", [0.5, 0.5], [1.0, 1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="needs reference losses"):
        update_weights("doremi", [0.5, 0.5], [1.0, 1.0], None)
