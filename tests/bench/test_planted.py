"""Planted structure (``bench/planted_models.py``, ``bench/planted.py``): the embedded model computes the
small one, bad plans are refused, and the masks find the planted units."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from llmshearing.pruning.targets import L0Config

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    models = _load("planted_models")
    planted = _load("planted")
    yield models, planted
    sys.modules.pop("planted", None)
    sys.modules.pop("planted_models", None)
    sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def corpus(bench):
    models, _ = bench
    train, held = models.stdlib_corpus(max_bytes=1_500_000)
    return train, models.held_out_batches(held, n=4)


@pytest.fixture(scope="module")
def small(bench, corpus, tmp_path_factory):
    models, _ = bench
    torch.manual_seed(0)
    return models.train_small(models.SmallSpec(steps=120), corpus[0], tmp_path_factory.mktemp("planted"))


@pytest.mark.parametrize("setup", ["dead", "cancel", "cancel-mixed", "duplicate"])
def test_embedded_model_computes_the_small_one(bench, small, corpus, setup):
    models, planted_bench = bench
    plan = planted_bench.SETUPS[setup].plant
    kind = plan.kind
    planted = models.embed(small, plan)
    large = planted.decoder
    assert large.config.n_heads > small.config.n_heads
    assert large.config.intermediate_size > small.config.intermediate_size
    ids = corpus[1][0][:4]
    with torch.no_grad():
        torch.testing.assert_close(large(ids), small(ids), atol=2e-5, rtol=1e-5)
    # the ideal masks (drop exactly the planted units) fold to the small model's shape
    families = planted_bench.SETUPS[setup].families
    folded = planted_bench.prune_decoder(large, models.ideal_masks(planted, families))
    for key, value in planted.target.items():
        assert getattr(folded.config, key) == value, key
    if kind in ("cancel", "duplicate"):  # no hidden dims planted: the fold is the small model again
        with torch.no_grad():
            torch.testing.assert_close(
                folded(ids) if kind == "cancel" else large(ids), small(ids), atol=2e-5, rtol=1e-5
            )


def test_cancelling_units_are_loud_and_worth_nothing(bench, small, corpus):
    models, planted_bench = bench
    planted = models.embed(small, planted_bench.SETUPS["cancel"].plant)
    decoder = planted.decoder
    ffn = decoder.layers[0].feed_forward
    pairs = planted.pairs["intermediate"][0]
    a, b = torch.nonzero(pairs == pairs[pairs >= 0][0]).flatten().tolist()
    torch.testing.assert_close(ffn.w2.weight[:, a], -ffn.w2.weight[:, b])
    typical = ffn.w2.weight[:, ~planted.planted["intermediate"][0]].norm(dim=0).mean()
    assert ffn.w2.weight[:, a].norm() > 2 * typical
    # dropping one of the pair changes the output; dropping both leaves it as it was
    ids = corpus[1][0][:2]
    one = torch.ones(decoder.config.n_layers, decoder.config.intermediate_size)
    one[0, a] = 0
    both = one.clone()
    both[0, b] = 0
    with torch.no_grad():
        full = decoder(ids)
        half = (decoder(ids, masks={"intermediate": one}) - full).norm()
        torch.testing.assert_close(decoder(ids, masks={"intermediate": both}), full, atol=2e-5, rtol=1e-5)
        # half a pair moves the output more than dropping a typical live neuron does
        live = []
        for i in torch.nonzero(~planted.planted["intermediate"][0]).flatten().tolist():
            drop = torch.ones_like(one)
            drop[0, i] = 0
            live.append((decoder(ids, masks={"intermediate": drop}) - full).norm())
        assert half > torch.stack(live).median()


def test_mixed_cancelling_pairs_read_two_live_neurons_rows_and_no_live_activation(bench, small, corpus):
    """``pair_inputs: mix``: each half of a pair reads one live neuron's ``w1`` row and another's ``w3`` row, so
    no live neuron's activation is proportional to the pair's (``copy``: one live neuron's, exactly)."""
    models, planted_bench = bench
    activations = {}
    for setup in ("cancel", "cancel-mixed"):
        planted = models.embed(small, planted_bench.SETUPS[setup].plant)
        ffn = planted.decoder.layers[0].feed_forward
        pairs = planted.pairs["intermediate"][0]
        live = torch.nonzero((pairs < 0) & ~planted.planted["intermediate"][0]).flatten()
        x = planted.decoder.tok_embeddings(corpus[1][0][:4]).reshape(-1, planted.decoder.config.d_model)
        h = torch.nn.functional.silu(x @ ffn.w1.weight.T) * (x @ ffn.w3.weight.T)
        unit = torch.nonzero(pairs >= 0).flatten()[0]
        rows = {
            name: (w.weight[live] == w.weight[unit]).all(dim=1)
            for name, w in (("w1", ffn.w1), ("w3", ffn.w3))
        }
        assert int(rows["w1"].sum()) == 1 and int(rows["w3"].sum()) == 1  # a live neuron's rows
        same_neuron = bool((rows["w1"] & rows["w3"]).any())
        assert same_neuron == (setup == "cancel")
        cosine = torch.nn.functional.cosine_similarity(h[:, live], h[:, unit : unit + 1], dim=0)
        activations[setup] = float(cosine.abs().max())
    assert activations["cancel"] > 0.9999 and activations["cancel-mixed"] < 0.99


def test_a_collinear_group_counts_its_planted_units_whichever_of_them_go(bench, small, corpus):
    """``cancel`` (``pair_inputs: copy``): a live neuron and the pair that reads its rows compute one activation, so
    a fold that keeps any one of the three (its column re-fitted) computes the small model; the count by function
    credits the group's planted units whichever went, the count by label only the pair's own."""
    models, planted_bench = bench
    setup = planted_bench.SETUPS["cancel"]
    planted = models.embed(small, setup.plant)
    groups, pairs = planted.collinear["intermediate"], planted.pairs["intermediate"]
    assert bool(((groups >= 0) == ((pairs >= 0) | torch.isin(groups, groups[pairs >= 0]))).all())
    a, b = torch.nonzero(pairs[0] == pairs[0][pairs[0] >= 0][0]).flatten().tolist()
    group = int(groups[0, a])
    assert int(groups[0, b]) == group
    live = [i for i in torch.nonzero(groups[0] == group).flatten().tolist() if pairs[0, i] < 0]
    assert len(live) == 1 and not bool(planted.planted["intermediate"][0, live[0]])
    live = live[0]
    ffn = planted.decoder.layers[0].feed_forward
    assert torch.equal(ffn.w1.weight[live], ffn.w1.weight[a]) and torch.equal(
        ffn.w3.weight[live], ffn.w3.weight[a]
    )
    n_planted = int((planted.planted["intermediate"] & planted.real_rows["intermediate"]).sum())

    def fraction(mask, by_label=False):
        return planted_bench.dropped_fraction(planted, "intermediate", mask, by_label)

    ideal = models.ideal_masks(planted, setup.families)["intermediate"]
    assert fraction(ideal) == fraction(ideal, by_label=True) == 1.0
    swapped = ideal.clone()  # keep b in the live neuron's place
    swapped[0, live], swapped[0, b] = 0.0, 1.0
    assert fraction(swapped) == 1.0
    assert fraction(swapped, by_label=True) == pytest.approx(1 - 1 / n_planted)
    refit = copy.deepcopy(planted.decoder)
    with torch.no_grad():
        refit.layers[0].feed_forward.w2.weight[:, b] = ffn.w2.weight[:, live]
        ids = corpus[1][0][:4]
        masks = {**models.ideal_masks(planted, setup.families), "intermediate": swapped}
        torch.testing.assert_close(
            planted_bench.prune_decoder(refit, masks)(ids), small(ids), atol=2e-5, rtol=1e-5
        )
    # a group kept whole leaves a planted unit, whichever live neuron goes in its place
    outsider = int(torch.nonzero((groups[0] < 0) & ~planted.planted["intermediate"][0]).flatten()[0])
    whole = ideal.clone()
    whole[0, a], whole[0, outsider] = 1.0, 0.0
    assert fraction(whole) == fraction(whole, by_label=True) == pytest.approx(1 - 1 / n_planted)
    # the live neuron is displaced only when its whole group goes
    worth = {"intermediate": torch.where(planted.planted["intermediate"], float("nan"), 1.0)}
    worth["intermediate"][0, live] = 0.5
    every = ideal.clone()
    every[0, live] = 0.0
    assert planted_bench.displaced_live(worth, {"intermediate": swapped}, planted.collinear) == {
        "intermediate": []
    }
    assert planted_bench.displaced_live(worth, {"intermediate": every}, planted.collinear) == {
        "intermediate": [0.5]
    }
    assert planted_bench.displaced_live(worth, {"intermediate": swapped}) == {"intermediate": [0.5]}
    assert fraction(every) == 1.0


def test_mixed_pairs_have_no_collinear_group(bench, small):
    models, planted_bench = bench
    planted = models.embed(small, planted_bench.SETUPS["cancel-mixed"].plant)
    assert not bool((planted.collinear["intermediate"] >= 0).any())


def test_displaced_live_units_are_the_small_models_units_a_fold_drops_with_their_worth(bench, small, corpus):
    models, planted_bench = bench
    setup = planted_bench.SETUPS["cancel-mixed"]
    planted = models.embed(small, setup.plant)
    worth = planted_bench.live_worth(planted, setup.families, corpus[1])
    assert set(worth) == {"kv_head", "head", "intermediate"}
    planted_units = planted.planted["intermediate"] & planted.real_rows["intermediate"]
    assert worth["intermediate"][planted_units].isnan().all()  # planted and pair units are not live
    assert not worth["intermediate"][~planted_units].isnan().any()
    ideal = models.ideal_masks(planted, setup.families)
    assert planted_bench.displaced_live(worth, ideal) == {"kv_head": [], "head": [], "intermediate": []}
    masks = {f: m.clone() for f, m in ideal.items()}
    pairs = planted.pairs["intermediate"][0]
    kept = int(torch.nonzero(pairs >= 0).flatten()[0])
    swapped = int(torch.nonzero(~planted_units[0]).flatten()[0])
    masks["intermediate"][0, kept], masks["intermediate"][0, swapped] = 1.0, 0.0
    alone = torch.ones_like(masks["intermediate"])
    alone[0, swapped] = 0
    base = models.mean_loss(planted.decoder, corpus[1])
    expected = models.mean_loss(planted.decoder, corpus[1], {"intermediate": alone}) - base
    displaced = planted_bench.displaced_live(worth, masks)
    assert displaced["intermediate"] == [pytest.approx(expected)] and expected != 0.0
    assert displaced["head"] == [] and displaced["kv_head"] == []


def test_oneshot_finds_dead_units_and_keeps_cancelling_pairs(bench, small, corpus):
    models, planted_bench = bench
    settings = planted_bench.Settings(calibration_batches=4)
    dead = planted_bench.SETUPS["dead"]
    planted = models.embed(small, dead.plant)
    masks, decoder = planted_bench.run_oneshot(dead, planted, corpus[0], settings, 0)
    assert decoder is planted.decoder  # the ranking folds the embedded model's own weights
    assert planted_bench.score(planted, dead.families, masks) == {f: 1.0 for f in dead.families}
    cancel = planted_bench.SETUPS["cancel"]
    planted = models.embed(small, cancel.plant)
    masks, _ = planted_bench.run_oneshot(cancel, planted, corpus[0], settings, 0)
    dropped = planted_bench.score(planted, cancel.families, masks)
    assert dropped["head"] < 1.0 and dropped["intermediate"] < 1.0  # loud pairs rank high and stay whole


def test_compensated_oneshot_removes_one_copy_of_every_duplicated_unit(bench, small, corpus):
    models, planted_bench = bench
    settings = planted_bench.Settings(calibration_batches=4)
    duplicate = planted_bench.SETUPS["duplicate"]
    planted = models.embed(small, duplicate.plant)
    ranked, _ = planted_bench.run_oneshot(duplicate, planted, corpus[0], settings, 0)
    masks, decoder = planted_bench.run_oneshot(duplicate, planted, corpus[0], settings, 0, compensate=True)
    assert planted_bench.score(planted, duplicate.families, ranked)["intermediate"] < 0.5
    assert planted_bench.score(planted, duplicate.families, masks)["intermediate"] == 1.0
    assert decoder is not planted.decoder  # re-fitted on a copy: the embedded model is shared by every method
    assert planted_bench.score(planted, duplicate.families, masks)["head"] == 1.0
    # each kept copy carries its twin's output column: the cut computes the embedded model's function
    folded = models.mean_loss(planted_bench.prune_decoder(decoder, masks), corpus[1])
    assert abs(folded - models.mean_loss(planted.decoder, corpus[1])) < 1e-3
    # learned masks from the compensated cut start there: its re-fitted weights, ranked by importance (with the
    # closing multipliers too: the library's keys, checked by L0Config)
    start = planted_bench.Settings(steps=0, calibration_batches=4)
    refit = decoder.state_dict()
    for method in ("compensated-bounded", "compensated-closing"):
        learned, weights, _ = planted_bench.run_learned(duplicate, planted, method, True, corpus[0], start, 0)
        for family in ("head", "intermediate"):
            assert torch.equal(learned[family] > 0, masks[family] > 0), (method, family)
        assert all(torch.equal(value, refit[key]) for key, value in weights.state_dict().items()), method
    closing = L0Config.from_dict(planted_bench.l0_settings(duplicate, planted, "compensated-closing", 10))
    assert closing.scheduled_groups == ("masks",) and closing.multiplier_beta1 == 0.0
    assert closing.mask_lr == planted_bench.BOUNDED["mask_lr"] and closing.init_from == "importance"


def test_damping_decides_whether_the_least_squares_cut_drops_loud_cancelling_pairs(bench, small, corpus):
    """Pairs that read their own inputs (``cancel-mixed``) cost the fit only its damping term, which grows
    with their loudness: at 1e-2 the cut keeps them in place of live neurons, at 1e-6 every pair goes whole
    (KV groups are the ranking's, not the fit's, and stay out of it)."""
    models, planted_bench = bench
    settings = planted_bench.Settings(calibration_batches=4)
    setup = planted_bench.SETUPS["cancel-mixed"]
    planted = models.embed(small, setup.plant)
    fitted, fitted_decoder = planted_bench.run_oneshot(setup, planted, corpus[0], settings, 0, True, 1e-6)
    dropped = planted_bench.score(planted, setup.families, fitted)
    assert dropped["head"] == 1.0 and dropped["intermediate"] == 1.0, dropped
    loud, loud_decoder = planted_bench.run_oneshot(setup, planted, corpus[0], settings, 0, True, 1e-2)
    assert planted_bench.score(planted, setup.families, loud)["intermediate"] < 0.5
    folded = [
        models.mean_loss(planted_bench.prune_decoder(decoder, masks), corpus[1])
        for masks, decoder in ((fitted, fitted_decoder), (loud, loud_decoder))
    ]
    assert folded[0] < folded[1], folded


def test_damping_is_a_setting_of_the_compensated_methods_only(bench):
    _, planted_bench = bench
    args = planted_bench.parse_args(
        ["--methods", "oneshot-compensated,damping=0.001", "compensated-bounded,damping=1e-4"]
    )
    assert [planted_bench.method_overrides(m)["damping"] for m in args.methods] == [1e-3, 1e-4]
    target = SimpleNamespace(target={"n_layers": 2})  # what l0_settings reads of a planted model
    l0 = planted_bench.l0_settings(
        planted_bench.SETUPS["cancel"], target, "compensated-bounded,damping=1e-4", 10
    )
    assert "damping" not in l0 and "start" not in l0 and l0["init_from"] == "importance"
    for bad in ("oneshot,damping=0.001", "importance-bounded,damping=0.001", "oneshot-compensated,damping=0"):
        with pytest.raises(SystemExit):
            planted_bench.parse_args(["--methods", bad])


def test_plans_that_cannot_reach_their_target_are_refused(bench, small):
    models, planted_bench = bench
    config = small.config
    with pytest.raises(ValueError, match=r"planted head: cancelling units come in pairs.*got 3"):
        models.PlantSpec("cancel", heads=3).check(config)
    with pytest.raises(ValueError, match=r"planted intermediate: 65 duplicates .* only 32"):
        models.PlantSpec("duplicate", kv_heads=0, intermediate=65).check(config)
    with pytest.raises(ValueError, match=r"planted kv_head: duplicated KV groups"):
        models.PlantSpec("duplicate", kv_heads=2).check(config)
    with pytest.raises(ValueError, match="plant kind"):
        models.PlantSpec("loud").check(config)
    with pytest.raises(ValueError, match=r"pair_inputs must be one of \('copy', 'mix'\), got 'both'"):
        models.PlantSpec("cancel", pair_inputs="both").check(config)
    setup = planted_bench.Setup(
        "bad", ("head", "intermediate"), models.PlantSpec("dead", layers=1, kv_heads=0)
    )
    with pytest.raises(ValueError, match=r"planted layer: 1 units .* 'layer' .* not pruned"):
        planted_bench.check_setup(setup)


def test_movable_fraction_is_reported(bench):
    from llmshearing.models.config import ModelConfig
    from llmshearing.pruning.algorithm import describe_movable
    from llmshearing.pruning.l0_module import L0Module

    config = ModelConfig(
        vocab_size=32, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=4, intermediate_size=24
    )
    settings = {
        "pruning_modules": ["head", "intermediate"],
        "target_model": {"n_heads": 2, "intermediate_size": 12},
    }
    fraction, message = describe_movable(L0Module(config, settings))
    assert fraction == pytest.approx(0.0451, abs=1e-3) and "frozen" not in message
    frozen = L0Module(config, {**settings, "init_log_alpha": 16.0, "log_alpha_clamp": 16.0})
    fraction, message = describe_movable(frozen)
    assert fraction < 1e-6
    assert "init_log_alpha=16.0" in message and "stay where they start" in message


@pytest.mark.slow
def test_learned_masks_from_an_interior_start_drop_the_dead_units(bench, small, corpus):
    """Weights frozen, masks from the interior with the planted suite's settings: every dead layer, KV
    group, query head and hidden dim goes, and the fold keeps the target shape."""
    models, planted_bench = bench
    setup = planted_bench.SETUPS["dead"]
    planted = models.embed(small, setup.plant)
    settings = planted_bench.Settings(steps=150)
    masks, decoder, stats = planted_bench.run_learned(
        setup, planted, "interior-bounded", True, corpus[0], settings, 0
    )
    dropped = planted_bench.score(planted, setup.families, masks)
    for family in ("layer", "kv_head", "head", "hidden"):
        assert dropped[family] == 1.0, (family, dropped)
    folded = planted_bench.prune_decoder(decoder, masks)
    assert {k: getattr(folded.config, k) for k in planted.target} == planted.target
    assert "expected_sparsity" in stats and "target_sparsity" in stats


def test_method_settings_take_numbers_flags_and_words(bench):
    _, planted_bench = bench
    overrides = planted_bench.method_overrides(
        "importance-bounded,schedule_l0_lr=masks,multiplier_beta1=0.0,penalty_per_unit=true,init_from=importance"
    )
    assert overrides["schedule_l0_lr"] == "masks" and overrides["multiplier_beta1"] == 0.0
    assert overrides["penalty_per_unit"] is True and overrides["init_from"] == "importance"
    assert overrides["mask_lr"] == planted_bench.BOUNDED["mask_lr"]  # the named method's own settings stay
