"""L0Module: config validation, masks, expected sizes, Lagrangian and multiplier ascent."""

import math

import pytest
import torch
from conftest import PRUNABLE_MODEL, PRUNABLE_TARGET

from llmshearing.models.config import ModelConfig
from llmshearing.pruning.fold import kept_structure
from llmshearing.pruning.l0_module import L0Module, expected_num_params, mask_shapes
from llmshearing.pruning.lagrangian import family_penalty, warmed_target
from llmshearing.pruning.targets import FAMILIES, L0Config, prunable_params

SOURCE = ModelConfig(**PRUNABLE_MODEL)
TARGET = PRUNABLE_TARGET
ALL = list(FAMILIES)


def module(modules=ALL, target=TARGET, **extra) -> L0Module:
    settings = {"pruning_modules": modules, **extra}
    if "target_sparsity" not in extra:
        settings["target_model"] = target
    return L0Module(SOURCE, settings)


def randomise(m: L0Module, seed: int = 0, scale: float = 2.0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for la in m.log_alpha.values():
            la.copy_(torch.randn(la.shape, generator=g) * scale)


def count_params(config: ModelConfig, masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """Prunable parameters left by concrete (possibly non-uniform) masks, counted structure by structure.

    Masks may carry leading sample dimensions; the result has them.
    """
    L, H, Hkv, hpg, hd = (
        config.n_layers,
        config.n_heads,
        config.n_kv_heads,
        config.heads_per_group,
        config.head_dim,
    )
    alive = {f: m != 0 for f, m in masks.items()}
    lead = next(iter(masks.values())).shape[: -len(mask_shapes(config)[next(iter(masks))])]
    everything = torch.ones(*lead, L, dtype=torch.bool)
    layer = alive.get("layer", everything)
    attention = layer & alive.get("head_layer", everything)
    mlp = layer & alive.get("mlp", everything)
    heads = alive.get("head", torch.ones(*lead, L, H, dtype=torch.bool)) & attention[..., None]
    kv = alive.get("kv_head", torch.ones(*lead, L, Hkv, dtype=torch.bool))
    heads = heads & kv.repeat_interleave(hpg, dim=-1)
    groups = heads.reshape(*lead, L, Hkv, hpg).any(-1)  # a KV group stays while one of its query heads does
    inter = (
        alive["intermediate"].sum(-1)
        if "intermediate" in alive
        else torch.full((*lead, L), config.intermediate_size)
    )
    d = alive["hidden"].sum(-1) if "hidden" in alive else torch.full(lead, config.d_model)
    per_width = 2 * hd * (heads.sum((-2, -1)) + groups.sum((-2, -1))) + 3 * (inter * mlp).sum(-1)
    return d * per_width


# ------------------------------------------------------------------------------------ structure
def test_parameters_buffers_and_initial_state():
    m = module()
    shapes = mask_shapes(SOURCE)
    assert {k: tuple(v.shape) for k, v in m.log_alpha.items()} == {f: shapes[f] for f in ALL}
    assert set(m.multipliers) == {f"lambda_{i}_{f}" for f in ALL for i in (1, 2)}
    assert all(p.item() == 0.0 for p in m.multipliers.values())
    assert "step" not in m.state_dict()  # set from the trainer's batch counter, not checkpointed
    out = m()
    assert set(out.masks) == set(ALL)
    assert all(tuple(out.masks[f].shape) == shapes[f] for f in ALL)
    assert out.stats["expected_sparsity/head"].item() < 0.01  # masks start near 1
    assert out.penalty is not None and out.penalty.requires_grad


def test_global_mode_has_only_global_multipliers():
    m = module(["head", "intermediate"], target_sparsity=0.3)
    assert set(m.multipliers) == {"lambda_1", "lambda_2"}
    assert m.plan.family_sparsity == {}
    assert m().stats["target_sparsity"].item() == pytest.approx(0.3)


def test_training_samples_differ_eval_masks_are_fixed():
    m = module()
    randomise(m)
    torch.manual_seed(0)
    first, second = m().masks["intermediate"], m().masks["intermediate"]
    assert not torch.equal(first, second)
    assert first.min() >= 0 and first.max() <= 1
    m.eval()
    a, b = m(), m()
    assert a.penalty is None
    assert all(torch.equal(a.masks[f], b.masks[f]) for f in ALL)


def test_seeded_noise_depends_only_on_seed_and_step():
    m = module()
    m.set_noise_seed(17)

    def draw(step: int, microbatches: int = 1) -> list[torch.Tensor]:
        m.set_step(step)
        return [m().masks["intermediate"] for _ in range(microbatches)]

    torch.manual_seed(0)
    first = draw(5, 2)
    torch.manual_seed(1)  # the global RNG plays no part
    again = draw(5, 2)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert torch.equal(first[0], first[1])  # micro-batches (and ranks) of a step share its sample
    assert not torch.equal(first[0], draw(6)[0])
    m.set_noise_seed(18)
    assert not torch.equal(first[0], draw(5)[0])


def test_log_alpha_is_clamped_in_forward_and_in_place_by_constrain():
    m = module(log_alpha_clamp=3.0)
    with torch.no_grad():
        m.log_alpha["head"].fill_(10.0)
        m.log_alpha["hidden"].fill_(-10.0)
    clamped = m.clamped_log_alpha()
    assert clamped["head"].max().item() == 3.0 and clamped["hidden"].min().item() == -3.0
    clamped["head"].sum().backward()  # the gradient passes as through an in-place clamp
    assert torch.equal(m.log_alpha["head"].grad, torch.ones_like(m.log_alpha["head"]))
    m()  # forward never writes the parameters (FSDP and autograd may own views of them)
    assert m.log_alpha["head"].max().item() == 10.0
    m.constrain_()  # what L0Pruning does after every optimizer step
    assert m.log_alpha["head"].max().item() == 3.0
    assert m.log_alpha["hidden"].min().item() == -3.0


def test_multipliers_are_vectors_and_scalar_checkpoints_still_load():
    m = module()
    assert all(p.shape == (1,) for p in m.multipliers.values())  # FSDP refuses 0-d parameters
    state = {
        k: (v.reshape(()) + 0.5 if k.startswith("multipliers.") else v) for k, v in m.state_dict().items()
    }
    fresh = module()
    fresh.load_state_dict(state)
    assert all(p.shape == (1,) and p.item() == 0.5 for p in fresh.multipliers.values())


# ------------------------------------------------------------------------- deterministic masks
def test_deterministic_masks_have_exact_target_sizes_and_uniform_gqa():
    m = module()
    randomise(m)
    m.eval()
    masks = m().masks
    assert int((masks["layer"] != 0).sum()) == 3
    assert int((masks["hidden"] != 0).sum()) == 16
    assert ((masks["intermediate"] != 0).sum(-1) == 24).all()
    assert ((masks["kv_head"] != 0).sum(-1) == 2).all()
    heads = (masks["head"] != 0).reshape(4, 4, 2)  # [layer, group, head in group]
    kept_groups = masks["kv_head"] != 0
    assert (heads.sum(-1)[kept_groups] == 1).all()  # target keeps 2 heads / 2 groups = 1 per group
    assert (heads.sum(-1)[~kept_groups] == 0).all()  # heads of dropped groups are dropped
    structure = kept_structure(SOURCE, masks)
    assert structure.pruned_config(SOURCE) == SOURCE.replace(**TARGET)


def test_head_masks_pick_top_heads_within_each_group():
    m = module(["head"], target={"n_heads": 4})
    randomise(m, seed=3)
    masks = m.deterministic_masks(at_target=True)
    la = m.log_alpha["head"].detach().reshape(4, 4, 2)
    kept = (masks["head"] != 0).reshape(4, 4, 2)
    assert torch.equal(kept, la == la.max(-1, keepdim=True).values)


def test_head_rows_are_the_kv_groups_the_fold_selects_within():
    """Dropping whole groups' heads does not meet the head target: the fold keeps top heads per group."""
    m = module(["kv_head", "head"], target={"n_heads": 2, "n_kv_heads": 2}, bounded_scores=True)
    bound = m.l0_config.log_alpha_clamp
    whole_groups = torch.tensor([bound, bound, bound, bound, -bound, -bound, -bound, -bound])
    half_of_each = torch.tensor([bound, -bound] * 4)
    with torch.no_grad():
        m.multipliers["lambda_2_head"].fill_(1.0)
    m.set_step(10**6)
    penalties = {}
    for name, row in (("whole", whole_groups), ("half", half_of_each)):
        with torch.no_grad():
            m.log_alpha["head"].copy_(row.expand(4, 8))
        rows = m.row_sparsity(m.scores())["head"]
        assert rows.shape == (4, 4)  # layers x KV groups
        assert float(rows.mean()) == pytest.approx(0.5)  # the same share of heads either way
        penalties[name] = float(m._penalty_and_stats()[0])
    assert penalties["half"] == pytest.approx(0.0, abs=1e-6)
    assert penalties["whole"] == pytest.approx(0.25, abs=1e-6)  # (+-0.5)**2 per group


def test_multi_head_attention_source_prunes_whole_heads_with_the_head_family():
    mha = SOURCE.replace(n_kv_heads=8)
    m = L0Module(
        mha, {"pruning_modules": ["layer", "head", "intermediate", "hidden"], "target_model": {"n_heads": 3}}
    )
    assert m.plan.target.n_kv_heads == 3  # stays multi-head attention
    assert m.plan.head_block == 8 and m.plan.keep["head"] == 3
    assert m.plan.family_sparsity["head"] == pytest.approx(5 / 8)
    randomise(m)
    masks = m.deterministic_masks(at_target=True)
    assert ((masks["head"] != 0).sum(-1) == 3).all()
    assert kept_structure(mha, masks).pruned_config(mha) == mha.replace(n_heads=3, n_kv_heads=3)
    with pytest.raises(ValueError, match="query heads per KV group exceeds"):
        L0Config.from_dict(
            {"pruning_modules": ["head"], "target_model": {"n_heads": 4, "n_kv_heads": 2}}
        ).resolve(mha)


def test_eval_at_expected_size_uses_current_expected_size_uniformly():
    m = module(eval_target_model=False)
    randomise(m, seed=1)
    m.eval()
    masks = m().masks
    scores = m.scores()
    want = round(scores["intermediate"].mean().item() * SOURCE.intermediate_size)
    assert ((masks["intermediate"] != 0).sum(-1) == want).all()
    assert int((masks["hidden"] != 0).sum()) == round(scores["hidden"].mean().item() * SOURCE.d_model)
    assert (
        (masks["head"] != 0).reshape(4, 4, 2).sum(-1)[masks["kv_head"] != 0]
        == round(scores["head"].mean().item() * 2)
    ).all()


# ------------------------------------------------------------------------------ expected sizes
SUBSETS = [
    ALL,
    ["head"],
    ["kv_head"],
    ["head", "kv_head"],
    ["intermediate", "hidden"],
    ["head_layer", "mlp"],
    ["layer", "head", "intermediate", "hidden"],
]


@pytest.mark.parametrize("modules", SUBSETS, ids=["+".join(s) for s in SUBSETS])
def test_expected_params_match_monte_carlo(modules):
    m = module(modules, target_sparsity=0.05)
    randomise(m, seed=2, scale=1.5)
    expected = m.expected_num_params().item()
    torch.manual_seed(0)
    n = 20_000
    samples = {f: m.distribution.sample(la.detach().expand(n, *la.shape)) for f, la in m.log_alpha.items()}
    assert count_params(SOURCE, samples).double().mean().item() == pytest.approx(expected, rel=0.01)
    m.train()
    one = m().masks  # the module's own training sample follows the same distribution and shapes
    assert {f: v.shape for f, v in one.items()} == {f: la.shape for f, la in m.log_alpha.items()}


@pytest.mark.parametrize("modules", SUBSETS, ids=["+".join(s) for s in SUBSETS])
def test_expected_params_are_exact_for_deterministic_masks(modules):
    m = module(modules, target_sparsity=0.05)
    randomise(m, seed=4)
    if {"head_layer", "mlp"} <= set(modules):  # drop the same layers' blocks so the result is uniform
        with torch.no_grad():
            m.log_alpha["mlp"].copy_(m.log_alpha["head_layer"])
    masks = m.deterministic_masks(at_target=False)
    indicators = {f: (v != 0).float() for f, v in masks.items()}
    assert expected_num_params(SOURCE, indicators).item() == count_params(SOURCE, masks).item()
    pruned = kept_structure(SOURCE, masks).pruned_config(SOURCE)
    assert expected_num_params(SOURCE, indicators).item() == prunable_params(pruned)


def test_prunable_size_and_global_target_of_a_shape():
    m = module()
    assert m.prunable_size == 4 * (32 * 8 * (16 + 8) + 3 * 32 * 48)
    target = SOURCE.replace(**TARGET)
    assert m.plan.global_sparsity == pytest.approx(1 - prunable_params(target) / prunable_params(SOURCE))
    assert m.plan.family_sparsity == {
        "layer": 0.25,
        "head_layer": 0.0,
        "head": 0.5,
        "kv_head": 0.5,
        "mlp": 0.0,
        "intermediate": 0.5,
        "hidden": 0.5,
    }


def test_head_layer_and_mlp_carry_the_layer_target_without_layer_family():
    m = module(["head_layer", "mlp"], target={"n_layers": 2})
    assert m.plan.family_sparsity == {"head_layer": 0.5, "mlp": 0.5}
    assert m.plan.keep == {"head_layer": 2, "mlp": 2}


# ----------------------------------------------------------------------------------- Lagrangian
def test_warmup_schedule_endpoints():
    assert warmed_target(0.1, 0.5, 0, 10).item() == pytest.approx(0.1)
    assert warmed_target(0.1, 0.5, 5, 10).item() == pytest.approx(0.3)
    assert warmed_target(0.1, 0.5, 10, 10).item() == pytest.approx(0.5)
    assert warmed_target(0.1, 0.5, 25, 10).item() == pytest.approx(0.5)
    assert warmed_target(0.1, 0.5, 0, 0).item() == pytest.approx(0.5)


def test_module_targets_follow_the_step_counter():
    m = module(start_sparsity=0.1, lagrangian_warmup_steps="8ba")
    m.set_step(0)
    assert m().stats["target_sparsity/head"].item() == pytest.approx(0.1)
    m.set_step(4)
    assert m().stats["target_sparsity/head"].item() == pytest.approx(0.3)
    m.set_step(8)
    assert m().stats["target_sparsity/head"].item() == pytest.approx(0.5)
    assert m().stats["target_sparsity/layer"].item() == pytest.approx(0.25)
    assert m().stats["target_sparsity/mlp"].item() == pytest.approx(0.0)


def test_family_penalty_formula():
    s = torch.tensor([0.2, 0.4])
    value = family_penalty(s, 0.5, torch.tensor(2.0), torch.tensor(3.0))
    expected = ((2 * -0.3 + 3 * 0.09) + (2 * -0.1 + 3 * 0.01)) / 2
    assert value.item() == pytest.approx(expected)


def test_multipliers_ascend_and_masks_descend():
    m = module(["head", "intermediate"], target={"n_heads": 4, "intermediate_size": 24})
    optimizer = torch.optim.SGD(m.parameters(), lr=1.0)
    out = m()
    gap = out.stats["expected_sparsity/head"].item() - 0.5  # far below the target: negative
    out.penalty.backward()
    grads = {k: p.grad.clone() for k, p in m.multipliers.items()}
    optimizer.step()
    optimizer.zero_grad()
    # gradient ascent: lambda_1 moves by +lr * dL/dlambda_1 = gap, lambda_2 by gap**2
    assert m.multipliers["lambda_1_head"].item() == pytest.approx(gap, rel=1e-5)
    assert m.multipliers["lambda_2_head"].item() == pytest.approx(gap**2, rel=1e-5)
    assert grads["lambda_1_head"].item() == pytest.approx(-gap, rel=1e-5)  # negated for the descent step
    before = m.log_alpha["head"].detach().clone()
    penalty_before = m().penalty.item()
    m().penalty.backward()
    optimizer.step()
    assert (m.log_alpha["head"] < before).all()  # the penalty now pushes toward more sparsity
    assert penalty_before > 0  # the maximising player made violating the target costly


@pytest.mark.parametrize("per_unit", [False, True])
def test_expected_sparsity_reaches_target_by_gradient_play(per_unit):
    m = module(
        ["head", "kv_head", "intermediate", "hidden"],
        target={**TARGET, "n_layers": 4},
        penalty_per_unit=per_unit,
    )
    optimizer = torch.optim.Adam(m.parameters(), lr=0.1)
    for _ in range(300):
        optimizer.zero_grad()
        m().penalty.backward()
        optimizer.step()
    stats = m().stats
    for f in ("head", "kv_head", "intermediate", "hidden"):
        assert stats[f"expected_sparsity/{f}"].item() == pytest.approx(m.plan.family_sparsity[f], abs=0.02)


def unit_gradients(m: L0Module) -> dict[str, torch.Tensor]:
    """The linear term's gradient on every log-alpha at lambda_1 = 1, lambda_2 = 0, all log-alphas 0.5."""
    with torch.no_grad():
        for la in m.log_alpha.values():
            la.fill_(0.5)
        for name, p in m.multipliers.items():
            p.fill_(1.0 if name.startswith("lambda_1") else 0.0)
    m.set_step(10**6)
    m().penalty.backward()
    return {f: la.grad for f, la in m.log_alpha.items()}


def units_in(family: str) -> int:
    return math.prod(mask_shapes(SOURCE)[family])


def test_penalty_per_unit_prices_one_unit_of_every_family_alike():
    """Per unit, each family's linear term is lambda_1 * (sum z - T): the same force on every unit."""
    fractions, units = unit_gradients(module()), unit_gradients(module(penalty_per_unit=True))
    one = units["hidden"].flatten()[0]
    assert one < 0  # at lambda_1 > 0 the term lambda_1 * (s - t) falls as units are kept: descent raises them
    for f in ALL:
        assert torch.allclose(units[f], torch.full_like(units[f], float(one)), rtol=1e-5), f
        # the fraction form divides the same force by the family's number of units
        assert torch.allclose(fractions[f] * units_in(f), units[f], rtol=1e-5), f
    assert float(fractions["hidden"].flatten()[0]) == pytest.approx(float(one) / SOURCE.d_model, rel=1e-5)


def test_penalty_per_unit_linear_term_counts_units_against_the_target():
    m = module(penalty_per_unit=True)
    randomise(m, seed=3)
    with torch.no_grad():
        for name, p in m.multipliers.items():
            p.fill_(0.7 if name.startswith("lambda_1") else 0.0)
    m.set_step(10**6)
    scores = m.scores()
    expected = sum(
        0.7 * (float((1 - scores[f]).sum()) - m.plan.family_sparsity[f] * scores[f].numel())
        for f in m.families
    )
    assert float(m().penalty) == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "settings, match",
    [
        ({"target_model": {"n_heads": 16}}, r"target_model\.n_heads=16 is larger"),
        ({"target_model": {"d_model": 40}}, r"target_model\.d_model=40 is larger"),
        ({"target_model": {"n_heads": 6, "n_kv_heads": 4}}, r"n_heads=6 is not divisible by .*n_kv_heads=4"),
        ({"target_model": {"n_heads": 6, "n_kv_heads": 2}}, r"3 query heads per KV group exceeds"),
        ({"target_model": {"n_kv_heads": 2, "n_heads": 4}, "pruning_modules": ["head"]}, r"lacks 'kv_head'"),
        ({"target_model": {"n_heads": 4}, "pruning_modules": ["kv_head"]}, r"lacks 'head'"),
        (
            {"target_model": {"d_model": 16}, "pruning_modules": ["head"]},
            r"target_model\.d_model.*lacks 'hidden'",
        ),
        ({"target_model": {"intermediate_size": 8}, "pruning_modules": ["head"]}, r"lacks 'intermediate'"),
        ({"target_model": {"n_layers": 2}, "pruning_modules": ["head_layer"]}, r"n_layers.*lacks 'layer'"),
        ({"target_model": {"vocab_size": 10}}, r"vocab_size=10 differs"),
        (
            {"target_model": {"n_experts": 2}},
            r"unknown config key 'model\.l0_module\.target_model\.n_experts'; valid keys here",
        ),
        ({"target_model": {"n_heads": 0}}, r"n_heads must be a positive integer"),
        ({"target_sparsity": 0.0}, r"target_sparsity must be in \(0, 1\)"),
        ({"target_sparsity": 1.5}, r"target_sparsity must be in \(0, 1\)"),
        ({"target_sparsity": 0.5, "target_model": {"n_heads": 4}}, "not both"),
        ({}, "needs a target"),
        ({"target_sparsity": 0.5, "pruning_modules": []}, "non-empty"),
        ({"target_sparsity": 0.5, "pruning_modules": ["heads"]}, r"unknown families \['heads'\]"),
        (
            {"target_sparsity": 0.5, "prune_modules": ["head"]},
            r"model\.l0_module\.prune_modules.*did you mean model\.l0_module\.pruning_modules",
        ),
        (
            {"target_sparsity": 0.5, "lagrangian_warmup_steps": "3ep"},
            "lagrangian_warmup_steps must be a number of batches",
        ),
        ({"target_sparsity": 0.5, "start_sparsity": 1.0}, r"start_sparsity must be in \[0, 1\)"),
        ({"target_sparsity": 0.9, "pruning_modules": ["head"]}, "cannot be reached"),
        (
            {"target_sparsity": 0.5, "penalty_per_unit": True},
            r"penalty_per_unit .* set model\.l0_module\.penalty_per_unit=false",
        ),
        (
            {"target_budget": {"params": 1000}, "budget_shape": "learned", "penalty_per_unit": True},
            r"a learned budget shape has one global term",
        ),
        (
            {"target_model": {"n_heads": 4}, "penalty_per_unit": "yes"},
            r"penalty_per_unit must be true or false",
        ),
        (
            {"target_sparsity": 0.5, "schedule_l0_lr": "multipliers"},
            r"schedule_l0_lr must be true .* or masks \(the mask lr only\), got 'multipliers'",
        ),
        ({"target_sparsity": 0.5, "multiplier_beta1": 1.0}, r"multiplier_beta1 must be in \[0, 1\)"),
        ({"target_sparsity": 0.5, "multiplier_beta1": True}, r"multiplier_beta1 must be in \[0, 1\)"),
        (
            {
                "target_sparsity": 0.5,
                "init_from": "importance",
                "lagrangian_warmup_steps": "10ba",
                "start_sparsity": 0.2,
            },
            r"start_sparsity is set by the ranked start with model\.l0_module\.init_from",
        ),
    ],
)
def test_invalid_settings_name_the_key(settings, match):
    settings = {"pruning_modules": ALL, **settings}
    with pytest.raises(ValueError, match=match):
        L0Config.from_dict(settings).resolve(SOURCE)


def test_config_round_trips_and_accepts_time_strings():
    config = L0Config.from_dict(
        {"pruning_modules": ["hidden", "head"], "target_sparsity": 0.4, "lagrangian_warmup_steps": "640ba"}
    )
    assert config.pruning_modules == ["head", "hidden"]
    assert config.lagrangian_warmup_steps == 640
    assert L0Config.from_dict(config.to_dict()) == config
    assert config.init_log_alpha == pytest.approx(math.log(100))


def test_omegaconf_node_is_accepted():
    from omegaconf import OmegaConf

    node = OmegaConf.create({"pruning_modules": ["head"], "target_model": {"n_heads": 4}})
    assert L0Config.from_dict(node).target_model == {"n_heads": 4}


# ------------------------------------------------------------------------- ties and tied blocks
def test_head_layer_and_mlp_masks_drop_the_same_layers():
    m = module(["head_layer", "mlp", "head"], target={"n_layers": 3, "n_heads": 4})
    with torch.no_grad():  # the attention would rather drop layer 0, the MLP layer 1; together layer 1 goes
        m.log_alpha["head_layer"].copy_(torch.tensor([-1.0, 3.0, 3.0, 3.0]))
        m.log_alpha["mlp"].copy_(torch.tensor([3.0, -3.0, 3.0, 3.0]))
    masks = m.deterministic_masks(at_target=True)
    assert (masks["head_layer"] != 0).tolist() == (masks["mlp"] != 0).tolist() == [True, False, True, True]
    assert kept_structure(SOURCE, masks).pruned_config(SOURCE) == SOURCE.replace(n_layers=3, n_heads=4)


def test_tied_blocks_keep_one_count_at_the_expected_size():
    m = module(["head_layer", "mlp"], target_sparsity=0.2)
    with torch.no_grad():  # alone, the attention would keep 3 layers and the MLP 2
        m.log_alpha["head_layer"].copy_(torch.tensor([5.0, 5.0, 5.0, -5.0]))
        m.log_alpha["mlp"].copy_(torch.tensor([5.0, 5.0, -5.0, -5.0]))
    keep = m.keep_counts(at_target=False)
    assert keep["head_layer"] == keep["mlp"]
    masks = m.deterministic_masks(at_target=False)
    assert kept_structure(SOURCE, masks).layers == list(range(keep["mlp"]))


@pytest.mark.parametrize("lone", ["head_layer", "mlp"])
def test_a_lone_block_family_with_a_target_sparsity_is_refused(lone):
    with pytest.raises(ValueError, match=rf"pruning_modules .* has '{lone}' without") as err:
        L0Config.from_dict({"pruning_modules": [lone, "head"], "target_sparsity": 0.3}).resolve(SOURCE)
    assert "use 'layer' instead" in str(err.value)


def test_deterministic_masks_at_the_clamp_keep_the_lowest_indices():
    m = module()  # every log-alpha starts at the clamp: all units tie
    masks = m.deterministic_masks(at_target=True)
    assert masks["layer"].nonzero().flatten().tolist() == [0, 1, 2]
    assert masks["hidden"].nonzero().flatten().tolist() == list(range(TARGET["d_model"]))
    for row in masks["intermediate"]:
        assert row.nonzero().flatten().tolist() == list(range(TARGET["intermediate_size"]))
    assert (masks["kv_head"] != 0).tolist() == [[True, True, False, False]] * SOURCE.n_layers


# ------------------------------------------------------------------------- bounded scores, init scale
def test_bounded_scores_count_units_at_the_bounds_exactly():
    m = module(bounded_scores=True)
    bound = m.l0_config.log_alpha_clamp
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for la in m.log_alpha.values():
            la.copy_(torch.where(torch.rand(la.shape, generator=g) < 0.5, -bound, bound))
        m.log_alpha["hidden"][0] = bound  # something stays
        m.log_alpha["layer"][0] = bound
    hard = {f: (la > 0).float() for f, la in m.log_alpha.items()}
    expected = m.expected_num_params().item()
    assert expected == pytest.approx(count_params(SOURCE, hard).item(), rel=1e-5)
    plain = module()
    plain.load_state_dict(m.state_dict())
    assert plain.expected_num_params().item() != pytest.approx(
        expected, rel=1e-3
    )  # P(z > 0) = 0.047 at -bound


def test_bounded_scores_keep_gradients_inside_the_bounds():
    m = module(bounded_scores=True, init_log_alpha=0.0)
    out = m()
    out.penalty.backward()
    s = sum(m.scores()[f].sum() for f in m.families)
    grads = torch.autograd.grad(s, list(m.log_alpha.values()))
    assert all(g.abs().min() > 0 for g in grads)


def test_bounded_scores_need_a_clamp():
    with pytest.raises(ValueError, match="bounded_scores .* needs model.l0_module.log_alpha_clamp"):
        L0Config(target_sparsity=0.5, bounded_scores=True, log_alpha_clamp=None)


def test_init_scale_places_a_ranked_start_inside_the_bound():
    from llmshearing.pruning.ranking import importance_log_alpha

    g = torch.Generator().manual_seed(0)
    shapes = mask_shapes(SOURCE)
    scores = {
        f: torch.rand(shapes[f], generator=g)
        for f in ("layer", "head_layer", "mlp", "head", "kv_head", "intermediate", "hidden")
    }
    settings = {"pruning_modules": ALL, "target_model": TARGET, "init_scale": 1.0}
    values = importance_log_alpha(scores, SOURCE, settings)
    assert max(v.abs().max().item() for v in values.values()) == pytest.approx(1.0)
    m = module(init_scale=1.0)
    with torch.no_grad():
        for f, v in values.items():
            m.log_alpha[f].copy_(v)
    reference = importance_log_alpha(scores, SOURCE, {"pruning_modules": ALL, "target_model": TARGET})
    ranked = module()
    with torch.no_grad():
        for f, v in reference.items():
            ranked.log_alpha[f].copy_(v)
    for f, mask in m.deterministic_masks().items():  # the same units are kept at the target
        assert torch.equal(mask != 0, ranked.deterministic_masks()[f] != 0), f
    with pytest.raises(ValueError, match="init_scale=5.0 exceeds model.l0_module.log_alpha_clamp"):
        L0Config(target_sparsity=0.5, init_scale=5.0)
    with pytest.raises(ValueError, match="init_scale must be > 0"):
        L0Config(target_sparsity=0.5, init_scale=0.0)


@pytest.mark.parametrize("bounded", [False, True])
def test_a_ranked_start_warms_its_target_up_from_where_its_masks_begin(bounded):
    """With ``init_from`` and a warm-up, the target starts at the ranked masks' own expected sparsity (per
    family and overall) whatever the ranking, and reaches the target when the warm-up ends."""
    from llmshearing.pruning.ranking import importance_log_alpha

    extra = {"init_from": "importance", "init_scale": 1.0, "bounded_scores": bounded, "log_alpha_clamp": 4.6}
    m = module(lagrangian_warmup_steps="10ba", **extra)
    shapes = mask_shapes(SOURCE)
    for seed in (0, 1):  # two different rankings begin at the same expected sizes
        g = torch.Generator().manual_seed(seed)
        scores = {f: torch.rand(shapes[f], generator=g) for f in FAMILIES}
        with torch.no_grad():
            for f, v in importance_log_alpha(scores, SOURCE, m.l0_config).items():
                m.log_alpha[f].copy_(v)
        m.set_step(0)
        stats = m().stats
        for f in m.plan.family_sparsity:
            assert stats[f"target_sparsity/{f}"].item() == pytest.approx(
                stats[f"expected_sparsity/{f}"].item(), abs=1e-6
            ), f
        # overall: up to how the rankings of layer and head_layer / mlp pair within a layer
        assert stats["target_sparsity"].item() == pytest.approx(stats["expected_sparsity"].item(), abs=1e-3)
    assert 0.0 < stats["target_sparsity"].item() < m.plan.global_sparsity  # a ranked start in the interior
    m.set_step(5)
    half = m().stats
    for f, t in m.plan.family_sparsity.items():
        assert half[f"target_sparsity/{f}"].item() == pytest.approx(
            (m.warmup_start[0][f] + t) / 2, abs=1e-6
        ), f
    m.set_step(10)
    end = m().stats
    for f, t in m.plan.family_sparsity.items():
        assert end[f"target_sparsity/{f}"].item() == pytest.approx(t), f
    held = module(lagrangian_warmup_steps="0ba", **extra)  # no warm-up: the target from the first step
    held.set_step(0)
    assert held().stats["target_sparsity"].item() == pytest.approx(held.plan.global_sparsity)


# ------------------------------------------------------------------------------------ hold_ranked
HELD = {"init_from": "scores.safetensors", "hold_ranked": ["hidden"]}


def test_a_held_family_is_its_ranked_cut_without_noise_gradient_or_multiplier():
    m = module(**HELD)
    randomise(m, seed=3)
    keep = m.plan.keep["hidden"]
    cut = torch.zeros(SOURCE.d_model)
    cut[torch.argsort(m.log_alpha["hidden"].detach(), descending=True)[:keep]] = 1.0
    assert not any("hidden" in name for name in m.multipliers)
    m.set_noise_seed(5)
    m.train()
    draws = []
    for step in (0, 1):
        m.set_step(step)
        out = m()
        assert torch.equal(out.masks["hidden"], cut)  # no noise: the same 0/1 cut every step
        draws.append(out.masks["intermediate"])
        assert float(out.stats["expected_sparsity/hidden"]) == pytest.approx(1 - keep / SOURCE.d_model)
    assert not torch.equal(draws[0], draws[1])  # the learned families are still sampled
    m.zero_grad()
    (out.penalty + sum(mask.sum() for mask in out.masks.values())).backward()
    assert torch.equal(m.log_alpha["hidden"].grad, torch.zeros(SOURCE.d_model))  # zero, not None (DDP)
    assert m.log_alpha["intermediate"].grad.abs().sum() > 0
    before = m.log_alpha["hidden"].detach().clone()
    optimizer = torch.optim.AdamW(m.parameters(), lr=0.5, weight_decay=0.0)
    optimizer.step()
    assert torch.equal(m.log_alpha["hidden"].detach(), before)
    m.eval()
    assert torch.equal(m().masks["hidden"], cut)  # the fold keeps the same units, at exactly 1
    assert torch.equal(m.deterministic_masks(at_target=False)["hidden"], cut)


def test_a_held_family_leaves_the_learned_families_as_they_were():
    held, free = module(**HELD), module(init_from="scores.safetensors")
    randomise(held, seed=4)
    randomise(free, seed=4)
    for f in ("layer", "head", "intermediate"):
        assert torch.equal(held.deterministic_masks()[f], free.deterministic_masks()[f]), f
    assert held.movable_fraction() != free.movable_fraction()  # the held family is not counted as movable
    from llmshearing.pruning.algorithm import describe_movable

    assert "hidden held at the ranked cut (model.l0_module.hold_ranked)" in describe_movable(held)[1]
    learned = [n for n in free.multipliers if "hidden" not in n]
    assert sorted(held.multipliers) == sorted(learned)


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"hold_ranked": ["hidden"]}, r"hold_ranked .* needs model\.l0_module\.init_from"),
        ({**HELD, "hold_ranked": "hidden"}, r"hold_ranked must be a list of mask families"),
        ({**HELD, "hold_ranked": ["mlp"], "pruning_modules": ["head", "hidden"]}, r"lists \['mlp'\], which"),
        (
            {**HELD, "target_model": None, "target_sparsity": 0.5},
            r"hold_ranked cuts each held family to its size in a target shape.*not target_sparsity",
        ),
        (
            {**HELD, "target_model": None, "target_budget": {"params": 1000}, "budget_shape": "learned"},
            r"in a target shape.*not a learned budget shape",
        ),
        ({**HELD, "hold_ranked": list(FAMILIES)}, r"holds every pruned family.*prune-oneshot"),
        ({**HELD, "hold_ranked": ["mlp"]}, r"holds one of head_layer and mlp.*hold both or neither"),
    ],
)
def test_invalid_hold_ranked_names_the_key(settings, match):
    settings = {"pruning_modules": ALL, "target_model": TARGET, **settings}
    with pytest.raises(ValueError, match=match):
        L0Config.from_dict(settings)
