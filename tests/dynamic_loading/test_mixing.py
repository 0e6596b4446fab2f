"""Domain-mixing rules against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from llmshearing.data.proportions import largest_remainder_counts, validate_proportions
from llmshearing.dynamic_loading.mixing import (
    apply_floors,
    doremi_update,
    ema_losses,
    excess_loss,
    update_weights,
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


# ------------------------------------------------------------------------------- stabilisers
def test_relative_excess_divides_by_the_reference():
    losses, ref = np.array([3.0, 1.0, 0.25]), np.array([2.0, 0.5, 0.5])
    assert excess_loss(losses, ref, relative=True).tolist() == [0.5, 1.0, 0.0]
    assert excess_loss(losses, ref, clip=False, relative=True).tolist() == [0.5, 1.0, -0.5]
    with pytest.raises(ValueError, match="positive reference losses"):
        excess_loss(losses, np.array([2.0, 0.0, 1.0]), relative=True)


def test_doremi_update_with_relative_excess_by_hand():
    # absolute deltas [1, 0.5] would favour a; relative deltas [0.5, 1.0] favour b
    w = doremi_update([0.5, 0.5], [3.0, 1.0], [2.0, 0.5], eta=1.0, smoothing=0.0, relative=True)
    raw = np.array([math.exp(0.5), math.exp(1.0)])
    assert w.tolist() == pytest.approx((raw / raw.sum()).tolist(), abs=1e-15)
    assert w[1] > w[0]


def test_ema_losses_by_hand():
    present = np.array([True, True, True])
    first = ema_losses(None, np.array([2.0, 1.0, 4.0]), present, 0.25)
    assert first.tolist() == [2.0, 1.0, 4.0]  # the first observation starts the average
    second = ema_losses(first, np.array([4.0, 1.0, 0.0]), np.array([True, True, False]), 0.25)
    # 0.25 * old + 0.75 * new; the absent third domain keeps its average
    assert second.tolist() == [0.25 * 2 + 0.75 * 4, 1.0, 4.0]
    unseen = ema_losses(None, np.array([2.0, 7.0]), np.array([True, False]), 0.5)
    assert unseen[0] == 2.0 and math.isnan(unseen[1])
    assert ema_losses(first, np.array([4.0, 1.0, 0.0]), present, 0.0).tolist() == [4.0, 1.0, 0.0]
    with pytest.raises(ValueError, match=r"decay must be in \[0, 1\)"):
        ema_losses(None, np.array([1.0]), np.array([True]), 1.0)


@pytest.mark.parametrize(
    ("weights", "floors", "expected"),
    [
        ([0.5, 0.3, 0.2], [0.1, 0.1, 0.1], [0.5, 0.3, 0.2]),  # nothing below: unchanged
        ([0.97, 0.02, 0.01], [0.0, 0.05, 0.05], [0.9, 0.05, 0.05]),
        ([0.9, 0.09, 0.01], [0.05, 0.05, 0.05], [0.9 * 0.95 / 0.99, 0.09 * 0.95 / 0.99, 0.05]),
        # raising c scales b below its own floor: b is raised in a second round
        ([0.5, 0.46, 0.04], [0.0, 0.45, 0.1], [0.45, 0.45, 0.1]),
    ],
)
def test_apply_floors_by_hand(weights, floors, expected):
    w = apply_floors(weights, floors)
    assert w.tolist() == pytest.approx(expected, abs=1e-15)
    assert w.sum() == pytest.approx(1.0, abs=1e-15) and np.all(w >= np.asarray(floors) - 1e-15)


def test_apply_floors_rejects_floors_that_cannot_hold():
    with pytest.raises(ValueError, match="summing to at most 1"):
        apply_floors([0.5, 0.5], [0.6, 0.6])
    with pytest.raises(ValueError, match="one non-negative value per domain"):
        apply_floors([0.5, 0.5], [0.1])


def test_doremi_update_with_floors_and_dispatch():
    # unfloored: delta [4, 0] drives b to 1 / (1 + e^4) of the mix; its floor 0.1 holds it up
    free = doremi_update([0.5, 0.5], [5.0, 1.0], [1.0, 1.0], smoothing=0.0)
    assert free[1] == pytest.approx(1 / (1 + math.exp(4.0)), abs=1e-15)
    floored = doremi_update([0.5, 0.5], [5.0, 1.0], [1.0, 1.0], smoothing=0.0, floors=[0.1, 0.1])
    assert floored.tolist() == pytest.approx([0.9, 0.1], abs=1e-15)
    dispatched = update_weights(
        "doremi", [0.5, 0.5], [5.0, 1.0], [1.0, 1.0], smoothing=0.0, floors=[0.1, 0.1], relative=True
    )
    assert dispatched.tolist() == pytest.approx([0.9, 0.1], abs=1e-15)  # relative deltas [4, 0] too
    assert update_weights("constant", [0.2, 0.8], [9.0, 1.0], None, floors=[0.5, 0.0]).tolist() == [0.2, 0.8]
