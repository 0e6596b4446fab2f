"""Hard-concrete distribution: sampling, expected score, deterministic top-k masks."""

import math

import pytest
import torch

from llmshearing.pruning.hard_concrete import MIN_KEPT_VALUE, HardConcrete, floored_units, top_units

HC = HardConcrete()


def test_defaults_are_the_papers():
    assert HC.temperature == pytest.approx(2 / 3)
    assert (HC.limit_a, HC.limit_b) == (-0.1, 1.1)


def test_samples_lie_in_unit_interval_with_exact_zeros_and_ones():
    torch.manual_seed(0)
    log_alpha = torch.zeros(20000)
    z = HC.sample(log_alpha)
    assert z.min() == 0.0 and z.max() == 1.0
    assert ((z > 0) & (z < 1)).any()
    assert (z == 0).float().mean() > 0.05 and (z == 1).float().mean() > 0.05


def test_samples_are_differentiable_in_log_alpha():
    torch.manual_seed(0)
    log_alpha = torch.zeros(1000, requires_grad=True)
    HC.sample(log_alpha).sum().backward()
    assert log_alpha.grad is not None and log_alpha.grad.abs().sum() > 0
    assert (log_alpha.grad >= 0).all()  # a larger log-alpha never lowers a sample


@pytest.mark.parametrize("value", [-3.0, -1.0, 0.0, 1.5, 4.0])
def test_prob_nonzero_matches_monte_carlo(value):
    torch.manual_seed(1)
    n = 200_000
    empirical = (HC.sample(torch.full((n,), value)) > 0).float().mean().item()
    expected = HC.prob_nonzero(torch.tensor(value)).item()
    assert empirical == pytest.approx(expected, abs=4 * math.sqrt(expected * (1 - expected) / n) + 1e-3)


def test_prob_nonzero_at_clamp_bounds_matches_reference_numbers():
    bound = math.log(100.0)
    assert HC.prob_nonzero(torch.tensor(bound)).item() == pytest.approx(0.99798, abs=1e-5)
    assert HC.prob_nonzero(torch.tensor(-bound)).item() == pytest.approx(0.04713, abs=1e-5)


def test_test_value_is_one_for_large_log_alpha_and_zero_for_very_negative():
    values = HC.test_value(torch.tensor([10.0, 4.605, -10.0]))
    assert values[0].item() == 1.0
    assert values[1].item() == 1.0  # sigmoid(4.605) * 1.2 - 0.1 > 1, clamped
    assert values[2].item() == 0.0


def test_deterministic_keeps_exactly_k_largest_per_row():
    torch.manual_seed(0)
    log_alpha = torch.randn(5, 12) * 3
    mask = HC.deterministic(log_alpha, 4)
    assert ((mask != 0).sum(-1) == 4).all()
    for row, m in zip(log_alpha, mask, strict=True):
        kept = set(torch.nonzero(m).flatten().tolist())
        assert kept == set(torch.topk(row, 4).indices.tolist())
        assert torch.allclose(m[list(kept)], HC.test_value(row[list(kept)]).clamp(min=MIN_KEPT_VALUE))


def test_deterministic_never_drops_a_selected_unit():
    log_alpha = torch.full((3, 4), -8.0)  # test value 0 for every unit
    mask = HC.deterministic(log_alpha, 2)
    assert ((mask != 0).sum(-1) == 2).all()
    assert mask.max().item() == pytest.approx(MIN_KEPT_VALUE)


def test_deterministic_bounds():
    log_alpha = torch.zeros(2, 3)
    assert (HC.deterministic(log_alpha, 0) == 0).all()
    assert (HC.deterministic(log_alpha, 3) != 0).all()
    with pytest.raises(ValueError, match="cannot keep 4 of 3"):
        HC.deterministic(log_alpha, 4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"limit_a": 0.1}, "limit_a"),
        ({"limit_b": 0.9}, "limit_b"),
    ],
)
def test_invalid_constants_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HardConcrete(**kwargs)


@pytest.mark.parametrize(("n", "keep"), [(4, 3), (8, 2), (48, 24), (200, 50)])
def test_deterministic_breaks_exact_ties_by_the_lower_index(n, keep):
    log_alpha = torch.full((3, n), math.log(100.0))  # every unit at the clamp
    log_alpha[1, -1] = 10.0  # a unique best unit always wins, whatever its index
    mask = HC.deterministic(log_alpha, keep)
    assert mask[0].nonzero().flatten().tolist() == list(range(keep))
    assert mask[1].nonzero().flatten().tolist() == [*range(keep - 1), n - 1]


def test_rank_by_replaces_log_alpha_in_the_choice_but_not_in_the_values():
    log_alpha = torch.tensor([[3.0, -3.0, 0.5, 8.0]])
    rank_by = torch.tensor([[0.0, 2.0, 1.0, 0.0]])
    mask = HC.deterministic(log_alpha, 2, rank_by=rank_by)
    assert mask.nonzero()[:, 1].tolist() == [1, 2]
    assert mask[0, 1].item() == pytest.approx(MIN_KEPT_VALUE)  # test value 0, floored
    assert mask[0, 2].item() == pytest.approx(HC.test_value(torch.tensor(0.5)).item())
    assert top_units(torch.tensor([1.0, 1.0, 1.0]), 0).tolist() == [False, False, False]


def test_floored_units_counts_kept_units_at_the_floor_only():
    log_alpha = torch.tensor([[8.0, -8.0, -8.0, 0.0], [-8.0, -8.0, -8.0, -8.0]])
    masks = {"intermediate": HC.deterministic(log_alpha, 2), "hidden": HC.deterministic(torch.ones(5), 5)}
    # row 0 keeps 8.0 and 0.0 (both above the floor); row 1 keeps two units with test value 0
    assert floored_units(masks) == {"intermediate": 2, "hidden": 0}
    assert floored_units({"head": torch.tensor([0.0, 1.0, 0.5])}) == {"head": 0}


@pytest.mark.parametrize("value", [-4.605, -1.0, 0.0, 2.0, 4.605])
def test_prob_interior_matches_monte_carlo(value):
    dist = HardConcrete()
    torch.manual_seed(0)
    z = dist.sample(torch.full((200_000,), value))
    empirical = ((z > 0) & (z < 1)).float().mean().item()
    assert dist.prob_interior(torch.tensor(value)).item() == pytest.approx(empirical, abs=4e-3)
    assert (1 - dist.prob_below(0.0, torch.tensor(value))).item() == pytest.approx(
        dist.prob_nonzero(torch.tensor(value)).item(), abs=1e-6
    )


def test_prob_interior_is_tiny_far_beyond_the_default_bound():
    dist = HardConcrete()
    assert dist.prob_interior(torch.tensor(math.log(100.0))).item() == pytest.approx(0.0451, abs=1e-4)
    assert dist.prob_interior(torch.tensor(16.0)).item() < 1e-6
    wide = HardConcrete(limit_a=-0.1, limit_b=100.0)  # samples above 1 clamp at 1 almost always
    assert wide.prob_interior(torch.tensor(0.0)).item() < 0.05
