"""Budgets: parsing, the shapes that meet one (valid, within the band, counted exactly, none missed), the
shape a budget resolves to in a recipe and in prune-oneshot, and the one-line errors of bad budgets."""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import pytest

from llmshearing import cli
from llmshearing.checkpoint.reading import load_checkpoint, read_any_config
from llmshearing.config_base import ConfigError
from llmshearing.models.config import ModelConfig
from llmshearing.pruning.budget import (
    BudgetError,
    Candidate,
    ShapeSpace,
    budget_candidates,
    choose_shape,
    enumerate_shapes,
    forward_flops_per_token,
    kept_fractions,
    nearest_shape,
    parse_budget,
    recipe_budget,
    scoring_candidates,
)
from llmshearing.pruning.targets import (
    SHAPE_KEYS,
    L0Config,
    check_loadable_shape,
    prunable_params,
    target_config,
)
from llmshearing.training.config import load_config, validate_config

ROOT = Path(__file__).resolve().parents[2]
SMOLLM2 = read_any_config(ROOT / "yamls" / "sources" / "smollm2-135m.json")[0]
LLAMA2_7B = read_any_config(ROOT / "yamls" / "sources" / "llama2-7b.json")[0]
TINY = ModelConfig(
    vocab_size=97, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8, intermediate_size=48,
    tie_word_embeddings=True,
)  # fmt: skip


def shape_of(config: ModelConfig) -> tuple[int, ...]:
    return tuple(getattr(config, key) for key in SHAPE_KEYS)


def check_valid(config: ModelConfig, source: ModelConfig, multiple: int) -> None:
    """GQA-valid, hardware-friendly, loadable and a shape the pruning targets accept."""
    assert config.n_heads % config.n_kv_heads == 0
    assert config.heads_per_group <= source.heads_per_group
    assert config.d_model % config.n_heads == 0
    assert config.d_model % multiple == 0 or config.d_model == source.d_model
    assert config.intermediate_size % multiple == 0 or config.intermediate_size == source.intermediate_size
    target_config(dict(zip(SHAPE_KEYS, shape_of(config), strict=True)), source)
    check_loadable_shape(config, "target", "opt out", source)


@pytest.mark.parametrize(
    "spec",
    ["non_embedding_params=4.2e7", "params=8e7", "memory=160MB,dtype=bf16", "memory=300MB,dtype=fp32,context=2048",
     "tokens_per_second=1.6"],
)  # fmt: skip
def test_every_enumerated_shape_is_valid_within_budget_and_counted_exactly(spec: str) -> None:
    budget = parse_budget(spec, "--budget")
    found = enumerate_shapes(SMOLLM2, budget)
    assert found
    limit = budget.limit(SMOLLM2)
    for candidate in found:
        config = candidate.config
        check_valid(config, SMOLLM2, 64)
        if budget.kind == "params":
            exact = config.num_params()
        elif budget.kind == "non_embedding_params":
            exact = config.num_params(include_embeddings=False)
        elif budget.kind == "memory":
            kv = 2 * config.n_layers * config.n_kv_heads * config.head_dim * budget.context_tokens
            exact = (config.num_params() + kv) * {"bf16": 2, "fp32": 4}[budget.dtype]
        else:
            exact = forward_flops_per_token(config, 512)
            assert forward_flops_per_token(SMOLLM2, 512) / exact >= 1.6  # at least 1.6x the source's tokens/s
        assert candidate.cost == exact
        assert (1 - budget.tolerance) * limit <= exact <= limit
    priors = [c.prior for c in found]
    assert priors == sorted(priors)


def test_enumeration_misses_no_valid_shape_of_a_small_source() -> None:
    """Brute force over every shape of the tiny source on a grid of 8 against the enumeration."""
    budget = parse_budget("params=16000,tolerance=0.1", "--budget")
    expected = set()
    for n_layers, kv, per_group, d_model, inter in itertools.product(
        range(1, 4), range(1, 3), range(1, 3), range(8, 33, 8), range(8, 49, 8)
    ):
        heads = kv * per_group
        if d_model % heads:
            continue
        config = TINY.replace(
            n_layers=n_layers, n_heads=heads, n_kv_heads=kv, d_model=d_model, intermediate_size=inter
        )
        if 0.9 * 16000 <= config.num_params() <= 16000:
            expected.add(shape_of(config))
    found = enumerate_shapes(TINY, budget, ShapeSpace(multiple=8))
    assert {c.sizes for c in found} == expected and len(found) == len(expected) > 3
    picked = scoring_candidates(found, 3)
    assert len({c.sizes[:3] for c in picked}) == 3  # one per depth and attention layout
    assert picked[0] == found[0] and scoring_candidates(found, 2) == picked[:2]  # a search can be extended
    layouts = len({c.sizes[:3] for c in found})
    assert layouts < len(
        found
    )  # some layouts split their width between d_model and intermediate in several ways
    every = scoring_candidates(found, len(found))
    assert sorted(c.sizes for c in every) == sorted(c.sizes for c in found)  # a large count scores them all
    assert len({c.sizes[:3] for c in every[:layouts]}) == layouts  # every layout once before any twice
    assert scoring_candidates(found, layouts + 1) == every[: layouts + 1]  # and it still extends


def test_the_sheared_llama_1_3b_shape_meets_its_budget() -> None:
    found = enumerate_shapes(LLAMA2_7B, parse_budget({"params": 1.35e9}, "target_budget"))
    assert (24, 16, 16, 2048, 5504) in {c.sizes for c in found}  # the paper's target of LLaMA2-7B
    assert all(c.config.n_heads == c.config.n_kv_heads for c in found[:50])  # multi-head stays multi-head


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("params=1e9", r"budget params=1e\+09 is not below the source \(30L/9H/3KV/576d/1536I: 134,515,008 params\)"),
        ("tokens_per_second=0.5",
         r"budget tokens_per_second=0.5 is not faster than the source \(.* FLOPs/token\): a speed budget is the "
         r"speed-up over the source and must be above 1"),
        ("tokens_per_second=1e6", "tokens_per_second=1e\\+06 asks for more speed than the fastest valid shape .* lower the budget"),
        ("params=1e6", r"raise the budget or relax the grid \(a smaller --multiple or --min-layers\)$"),
        ("params=1e6", r"budget params=1e\+06 is below the smallest valid shape .* nearest valid shapes: 1L/1H/1KV/64d/64I"),
        ("memory=100KB", "budget memory=100KB,dtype=bf16 is below the smallest valid shape"),
        (f"params={TINY.replace(n_layers=2).num_params() - 1},tolerance=0.001",
         r"no valid shape costs between .* nearest valid shapes: below \d+L/.* above 2L/4H/2KV/32d/48I"),
    ],
)  # fmt: skip
def test_a_budget_no_shape_meets_names_the_nearest_shapes_in_one_line(spec: str, message: str) -> None:
    source = TINY if "tolerance" in spec else SMOLLM2  # the tiny source's grid of 64 has gaps
    with pytest.raises(BudgetError, match=message) as caught:
        enumerate_shapes(source, parse_budget(spec, "--budget"))
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("param=1e9", r"unknown keys \['param'\]"),
        ("params=1e9,memory=6GB", "exactly one budget"),
        ("memory=6 bananas", "--budget.memory must be a size"),
        ("params=-3", "must be positive"),
        ("params=1e9,dtype=bf16", "dtype applies to a memory budget only"),
        ("memory=6GB,dtype=fp8", "dtype must be one of"),
        ("params=nan", "must be finite"),
        ("params", "expected KIND=VALUE"),
    ],
)
def test_malformed_budgets_are_refused(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_budget(spec, "--budget")


def test_an_unknown_key_of_a_recipe_budget_lists_the_recipe_options() -> None:
    """A recipe's target_budget takes ``multiple`` beside the budget's keys; --budget does not."""
    key = "model.l0_module.target_budget"
    with pytest.raises(ValueError) as caught:
        recipe_budget({"params": 1e6, "multipl": 8}, key)
    assert f"{key} has unknown keys ['multipl']" in str(caught.value)
    assert "optionally ['dtype', 'context', 'tolerance', 'multiple']" in str(caught.value)
    assert recipe_budget({"params": 1e6, "multiple": 8}, key)[1] == 8
    with pytest.raises(ValueError, match=r"optionally \['dtype', 'context', 'tolerance'\]$"):
        parse_budget("params=1e6,multiple=8", "--budget")


def test_the_resolution_line_labels_its_amounts() -> None:
    _, why = choose_shape(SMOLLM2, parse_budget("non_embedding_params=4.26e7", "--budget"))
    assert re.search(r"resolves to \S+ \([\d,]+ non-embedding params, [\d,]+ params in total\)", why)


def test_memory_sizes_are_binary_as_the_planner_reads_them() -> None:
    assert parse_budget("memory=6GB", "b").value == parse_budget({"memory": "6GiB"}, "b").value == 6 * 2**30


def test_target_model_with_target_budget_is_refused_naming_both_keys() -> None:
    with pytest.raises(
        ValueError, match=r"model\.l0_module\.target_budget .* model\.l0_module\.target_model"
    ):
        L0Config(target_model={"n_layers": 2}, target_budget={"params": 1e6})
    with pytest.raises(
        ValueError, match=r"model\.l0_module\.target_budget .* model\.l0_module\.target_sparsity"
    ):
        L0Config(target_sparsity=0.5, target_budget={"params": 1e6})


def tiny_recipe(source: str, data: str, *extra: str) -> dict:
    overrides = [f"model.path={source}", f"data_local={data}", "model.l0_module.target_model=null", *extra]
    return validate_config(load_config(str(ROOT / "yamls" / "tiny" / "prune.yaml"), overrides))


def test_a_recipe_budget_resolves_to_a_shape_before_training(tiny_source: str, tiny_mds: str) -> None:
    two_layers = TINY.replace(n_layers=2).num_params()
    values = tiny_recipe(tiny_source, tiny_mds, f"model.l0_module.target_budget={{params: {two_layers}}}")
    l0 = values.model.l0_module
    assert l0.target_budget is None and l0.budget_choice.startswith(
        f"budget params={two_layers:.4g} resolves to"
    )
    target = TINY.replace(**l0.target_model)
    assert 0.95 * two_layers <= target.num_params() <= two_layers
    assert target.n_kv_heads == TINY.n_kv_heads  # the recipe does not prune kv_head
    best, why = choose_shape(
        TINY, parse_budget({"params": two_layers}, "b"), ShapeSpace(frozen=frozenset({"n_kv_heads"}))
    )
    assert best.shape == l0.target_model and why == l0.budget_choice
    L0Config.from_dict(l0).resolve(TINY)  # the masks' targets accept it


def test_a_recipe_mixing_target_model_and_target_budget_is_refused(tiny_source: str, tiny_mds: str) -> None:
    with pytest.raises(
        ConfigError, match=r"model\.l0_module\.target_budget .* or model\.l0_module\.target_model, not both"
    ):
        validate_config(
            load_config(
                str(ROOT / "yamls" / "tiny" / "prune.yaml"),
                [
                    f"model.path={tiny_source}",
                    f"data_local={tiny_mds}",
                    "model.l0_module.target_budget={params: 2e4}",
                ],
            )
        )
    with pytest.raises(
        ConfigError, match=r"model\.l0_module\.target_budget: budget params=5e\+06 is not below"
    ):
        tiny_recipe(tiny_source, tiny_mds, "model.l0_module.target_budget={params: 5e6}")


def test_a_recipe_budget_error_names_the_recipe_keys(tiny_source: str, tiny_mds: str) -> None:
    """The grid and the tolerance of a recipe's budget are keys under it, not search-shape's flags."""
    key = "model.l0_module.target_budget"
    with pytest.raises(ConfigError) as caught:
        tiny_recipe(tiny_source, tiny_mds, f"{key}={{params: 100, multiple: 8}}")
    assert str(caught.value).endswith(f"raise the budget or relax the grid (a smaller {key}.multiple)")
    two_layers = TINY.replace(n_layers=2).num_params()
    with pytest.raises(ConfigError) as caught:
        tiny_recipe(
            tiny_source, tiny_mds, f"{key}={{params: {two_layers - 1}, tolerance: 0.001, multiple: 8}}"
        )
    message = str(caught.value)
    assert (
        f"widen the budget's tolerance (e.g. {key}.tolerance=0.1), change the budget or relax the grid"
        in message
    )
    assert "--" not in message


def test_prune_oneshot_takes_a_budget(tiny_source: str, tiny_mds: str, tmp_path: Path, capsys) -> None:
    budget = 0.8 * TINY.num_params()
    out = tmp_path / "pruned"
    argv = ["prune-oneshot", tiny_source, str(out), "--data", tiny_mds, "--samples", "8"]
    assert cli.main([*argv, "--budget", f"params={budget}"]) == 0
    printed = capsys.readouterr().out
    assert f"budget params={budget:.4g} resolves to" in printed
    pruned = load_checkpoint(out)[0]
    assert 0.95 * budget <= pruned.num_params() <= budget
    assert cli.main([*argv[:2], str(tmp_path / "other"), *argv[3:], "--budget", "params=1e3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "budget params=1000 is below the smallest valid shape" in err and "\n" not in err
    assert err.endswith("raise the budget")  # prune-oneshot has no grid options to suggest
    assert not (tmp_path / "other").exists()
    assert cli.main([*argv, "--budget", "params=1e3", "--target", "n_layers=2"]) == 2
    assert "exactly one of --target" in capsys.readouterr().err
    assert math.isclose(
        parse_budget("tokens_per_second=2", "b").limit(TINY), forward_flops_per_token(TINY, 512) / 2
    )


def budget_run(source: str, data: str, folder: Path, budget: int, *extra: str) -> int:
    """A two-batch pruning run of the tiny recipe toward a parameter budget; its exit status."""
    from llmshearing import train

    overrides = [
        f"model.path={source}", f"data_local={data}", "model.l0_module.target_model=null",
        f"model.l0_module.target_budget={{params: {budget}}}", "max_duration=2ba", "eval_interval=2ba",
        "scheduler.t_warmup=1ba", "save_interval=2ba", f"save_folder={folder}", *extra,
    ]  # fmt: skip
    return train.main([str(ROOT / "yamls" / "tiny" / "prune.yaml"), *overrides])


@pytest.mark.slow
def test_a_pruning_run_says_which_shape_its_budget_resolved_to(
    tiny_source, tiny_mds, tmp_path, capsys
) -> None:
    import json

    budget = TINY.replace(n_layers=2).num_params()
    folder = tmp_path / "run"
    assert (
        budget_run(tiny_source, tiny_mds, folder, budget, "model.l0_module.lagrangian_warmup_steps=0ba") == 0
    )
    line = next(line for line in capsys.readouterr().out.splitlines() if "resolves to" in line)
    assert line.startswith(f"llmshearing: budget params={budget:.4g} resolves to 2L/4H/2KV/32d/48I")
    recorded = json.loads((folder / "config.json").read_text())
    l0 = recorded.get("l0_module") or recorded["train"]["model"]["l0_module"]
    assert l0["target_model"] == {
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "d_model": 32,
        "intermediate_size": 48,
    }
    assert line.endswith(l0["budget_choice"])


# ------------------------------------------------------------------------------ learned budget shape
LEARNED_FAMILIES = ["layer", "head", "kv_head", "intermediate", "hidden"]


def learned_l0(budget: float, **extra) -> L0Config:
    return L0Config(
        pruning_modules=LEARNED_FAMILIES,
        target_budget={"params": budget, "tolerance": 0.2},
        budget_shape="learned",
        bounded_scores=True,
        **extra,
    )


def test_budget_shape_settings_are_checked() -> None:
    with pytest.raises(
        ValueError, match=r"model\.l0_module\.budget_shape must be one of \['proportional', 'learned'\]"
    ):
        L0Config(target_budget={"params": 1e6}, budget_shape="searched")
    with pytest.raises(ValueError, match=r"budget_shape=learned needs model\.l0_module\.target_budget"):
        L0Config(target_sparsity=0.5, budget_shape="learned")


def test_a_learned_budget_trains_under_the_proportional_shapes_sparsity(
    tiny_source: str, tiny_mds: str
) -> None:
    budget = TINY.replace(n_layers=2).num_params()
    values = tiny_recipe(
        tiny_source,
        tiny_mds,
        f"model.l0_module.target_budget={{params: {budget}}}",
        "model.l0_module.budget_shape=learned",
    )
    l0 = values.model.l0_module
    assert l0.target_model is None and l0.target_budget == {"params": budget}
    assert f"budget params={budget:.4g}, shape learned" in l0.budget_choice
    plan = L0Config.from_dict(l0).resolve(TINY)
    best, _ = choose_shape(
        TINY, parse_budget({"params": budget}, "b"), ShapeSpace(frozen=frozenset({"n_kv_heads"}))
    )
    assert plan.target is None and plan.keep == {}
    assert plan.global_sparsity == pytest.approx(1.0 - prunable_params(best.config) / prunable_params(TINY))


def test_learned_shape_rounds_the_expected_sizes_to_the_nearest_shape_within_budget() -> None:
    import torch

    from llmshearing.models.decoder import Decoder
    from llmshearing.pruning.fold import prune_decoder
    from llmshearing.pruning.l0_module import L0Module

    budget = int(0.8 * TINY.num_params())
    module = L0Module(TINY, learned_l0(budget))
    labels = sorted(c.label() for c in budget_candidates(module.l0_config, TINY))
    assert labels == ["2L/4H/2KV/32d/48I", "3L/1H/1KV/32d/48I"]
    # every unit kept: the nearest shape within the budget is the one that keeps the most
    assert module.learned_shape()[0] == {
        "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_model": 32, "intermediate_size": 48,
    }  # fmt: skip
    bound = module.l0_config.log_alpha_clamp
    with torch.no_grad():  # the masks keep every layer, one KV group per layer and one head per group
        module.log_alpha["kv_head"].copy_(torch.tensor([bound, -bound]).expand(3, 2))
        module.log_alpha["head"].copy_(torch.tensor([bound, -bound, bound, -bound]).expand(3, 4))
    expected = module.expected_shape()
    assert [expected[k] for k in SHAPE_KEYS] == pytest.approx([3.0, 1.0, 1.0, 32.0, 48.0], rel=1e-5)
    shape, why = module.learned_shape()
    assert shape == {"n_layers": 3, "n_heads": 1, "n_kv_heads": 1, "d_model": 32, "intermediate_size": 48}
    assert why.startswith("learned shape 3L/1H/1KV/32d/48I: the masks expect 3.0/1.0/1.0/32.0/48.0")
    assert "nearest of 2 valid shapes within the budget" in why
    folded = prune_decoder(Decoder(TINY), module.deterministic_masks(at_target=True)).config
    assert shape_of(folded) == (3, 1, 1, 32, 48)
    assert 0.8 * budget <= folded.num_params() <= budget
    with torch.no_grad():  # every head kept, one layer dropped
        module.log_alpha["kv_head"].fill_(bound)
        module.log_alpha["head"].fill_(bound)
        module.log_alpha["layer"].copy_(torch.tensor([bound, -bound, bound]))
    assert module.learned_shape()[0]["n_layers"] == 2
    assert shape_of(prune_decoder(Decoder(TINY), module.deterministic_masks()).config) == (2, 4, 2, 32, 48)


@pytest.mark.slow
@pytest.mark.parametrize("fix", [None, "1ba"], ids=["learned-to-the-end", "fixed-at-batch-1"])
def test_a_learned_budget_run_folds_to_a_shape_within_the_budget_and_says_why(
    tiny_source, tiny_mds, tmp_path, capsys, fix
) -> None:

    budget = TINY.replace(n_layers=2).num_params()
    folder = tmp_path / "run"
    extra = [f"model.l0_module.fix_shape_at={fix}"] if fix else []
    assert (
        budget_run(tiny_source, tiny_mds, folder, budget, "model.l0_module.budget_shape=learned", *extra) == 0
    )
    printed = capsys.readouterr().out
    assert f"llmshearing: budget params={budget:.4g}, shape learned" in printed
    out = tmp_path / "pruned"
    assert cli.main(["prune-model", str(folder / "checkpoints" / "latest-rank0.pt"), str(out)]) == 0
    summary = capsys.readouterr().out
    assert "pruned to the shape the masks learned within the budget:" in summary
    assert "learned shape " in summary and "within the budget" in summary
    assert ("fixed as the target at batch 1" in summary) == bool(fix)
    pruned = load_checkpoint(out)[0]
    assert 0.95 * budget <= pruned.num_params() <= budget


def test_a_recipe_budget_takes_a_finer_grid_for_small_sources():
    from llmshearing.pruning.budget import budget_candidates, recipe_budget
    from llmshearing.pruning.targets import L0Config

    source = ModelConfig(
        vocab_size=64, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, intermediate_size=384,
        max_seq_len=16,
    )  # fmt: skip
    budget, multiple = recipe_budget(
        {"non_embedding_params": 304800, "multiple": 32}, "model.l0_module.target_budget"
    )
    assert (budget.kind, budget.value, multiple) == ("non_embedding_params", 304800.0, 32)
    assert recipe_budget({"params": 1e6}, "k")[1] == 64  # the default grid
    families = ["layer", "head", "kv_head", "intermediate", "hidden"]
    coarse = L0Config.from_dict(
        {"pruning_modules": families, "target_budget": {"non_embedding_params": 304800}}
    )
    fine = L0Config.from_dict(
        {"pruning_modules": families, "target_budget": {"non_embedding_params": 304800, "multiple": 32}}
    )
    widths = {c.shape["d_model"] for c in budget_candidates(fine, source)}
    assert 96 in widths and 96 not in {c.shape["d_model"] for c in budget_candidates(coarse, source)}
    for bad in (0, 2.5, True, "32"):
        with pytest.raises(
            ValueError, match=r"model\.l0_module\.target_budget\.multiple must be a positive integer"
        ):
            L0Config.from_dict(
                {"pruning_modules": families, "target_budget": {"params": 1e6, "multiple": bad}}
            )


def test_fix_shape_at_needs_a_learned_budget_and_a_positive_batch() -> None:
    budget = int(0.8 * TINY.num_params())
    with pytest.raises(ValueError, match=r"fix_shape_at fixes the shape.*budget_shape=learned"):
        L0Config(target_model={"n_layers": 2}, fix_shape_at=4)
    with pytest.raises(ValueError, match=r"fix_shape_at must be a positive number of batches"):
        learned_l0(budget, fix_shape_at="0ba")
    with pytest.raises(ValueError, match=r"fix_shape_at must be a number of batches"):
        learned_l0(budget, fix_shape_at="half")
    assert learned_l0(budget, fix_shape_at="384ba").fix_shape_at == 384


def test_a_fixed_learned_shape_becomes_the_per_family_target_and_survives_a_reload() -> None:
    import torch

    from llmshearing.pruning.l0_module import L0Module

    budget = int(0.8 * TINY.num_params())
    module = L0Module(TINY, learned_l0(budget, fix_shape_at=3))
    assert set(module.multipliers) == {
        "lambda_1", "lambda_2", *(f"lambda_{i}_{f}" for f in LEARNED_FAMILIES for i in (1, 2))
    }  # fmt: skip
    bound = module.l0_config.log_alpha_clamp
    with torch.no_grad():  # the masks keep one KV group per layer and one head per group
        module.log_alpha["kv_head"].copy_(torch.tensor([bound, -bound]).expand(3, 2))
        module.log_alpha["head"].copy_(torch.tensor([bound, -bound, bound, -bound]).expand(3, 4))
    module.train()
    module.set_step(2)  # still learning the shape: one global term
    assert module.plan.target is None and "target_sparsity/head" not in module.stats()
    out = module()
    out.penalty.backward()
    assert all(module.multipliers[f"lambda_1_{f}"].grad.item() == 0.0 for f in LEARNED_FAMILIES)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    module.set_step(3)  # fixed: the rounded shape is each family's target from here on
    shape, why = module.learned_shape()
    assert shape == {"n_layers": 3, "n_heads": 1, "n_kv_heads": 1, "d_model": 32, "intermediate_size": 48}
    assert module.plan.target is not None and shape_of(module.plan.target) == (3, 1, 1, 32, 48)
    assert module.keep_counts(at_target=True) == module.plan.keep
    assert why.startswith("learned shape 3L/1H/1KV/32d/48I: fixed as the target at batch 3")
    assert "where the masks expected 3.0/1.0/1.0/32.0/48.0" in why
    stats = module.stats()
    for f in LEARNED_FAMILIES:
        assert stats[f"target_sparsity/{f}"].item() == pytest.approx(module.plan.family_sparsity[f])
    assert stats["target_sparsity"].item() == pytest.approx(module.plan.global_sparsity)
    module.zero_grad()
    module().penalty.backward()  # the family terms join the global one, now toward the shape's sparsity
    assert module.multipliers["lambda_1"].grad.item() != 0.0
    assert any(module.multipliers[f"lambda_1_{f}"].grad.item() != 0.0 for f in LEARNED_FAMILIES)
    # the shape stays fixed even where the masks move on, and comes back with the state
    with torch.no_grad():
        module.log_alpha["kv_head"].fill_(bound)
        module.log_alpha["head"].fill_(bound)
    module.set_step(4)
    assert module.learned_shape()[0] == shape
    restored = L0Module(TINY, learned_l0(budget, fix_shape_at=3))
    restored.load_state_dict(module.state_dict())
    assert restored.plan.target is not None and restored.learned_shape()[0] == shape
    restored.load_state_dict(before)  # a state from before the batch: learning the shape again
    assert restored.plan.target is None
    with torch.device("meta"):  # built on meta for rank-0 loading: the shape arrives with the state
        empty = L0Module(TINY, learned_l0(budget, fix_shape_at=3))
        empty.set_step(5)  # nothing to round on meta
    assert empty.plan.target is None
    empty.load_state_dict(module.state_dict(), assign=True)
    assert empty.plan.target is not None and empty.learned_shape()[0] == shape


def test_the_learned_shape_rounds_to_the_shape_nearest_in_each_familys_share_of_units() -> None:
    # the benchmark miniature's source, where the masks kept d_model whole and expect an MLP between the two
    # shapes' sizes: in plain log sizes 96d/224I is nearer (0.109 against 0.148), in shares of each family's
    # units 128d/128I (0.19 against 0.36: cutting 31 of 128 hidden dims is a quarter of that family)
    source = ModelConfig(
        vocab_size=512, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, intermediate_size=384
    )
    narrow_mlp = Candidate(source, (3, 4, 2, 128, 128), cost=1.0, prior=0.0)
    narrow_d = Candidate(source, (3, 4, 2, 96, 224), cost=1.0, prior=0.0)
    expected = {
        "n_layers": 3.0,
        "n_heads": 3.9,
        "n_kv_heads": 2.0,
        "d_model": 126.9,
        "intermediate_size": 187.7,
    }
    assert nearest_shape([narrow_d, narrow_mlp], expected) is narrow_mlp
    assert kept_fractions(source, expected) == pytest.approx((0.75, 1.0, 0.975, 126.9 / 128, 187.7 / 384))
    assert nearest_shape([narrow_d, narrow_mlp], {**expected, "d_model": 96.0}) is narrow_d
    with pytest.raises(ValueError, match="at least one candidate"):
        nearest_shape([], expected)
