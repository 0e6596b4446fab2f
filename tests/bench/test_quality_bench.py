"""The pure parts of ``bench/quality.py``: budget splitting, mixes, metrics reading, result writers."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

BENCH = Path(__file__).resolve().parents[2] / "bench" / "quality.py"


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("bench_quality", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


@pytest.mark.parametrize(
    "quick, scale, steps, share",
    [(True, 1, None, 0.25), (False, 1, None, 0.25), (False, 3, 37, 0.4), (False, 1, 2, 0.9)],
)
def test_every_arm_trains_exactly_the_budget(quality, quick, scale, steps, share):
    budget = quality.make_budget(quick, scale, batch=4, seq_len=128, prune_share=share, steps=steps)
    arms = quality.plan_arms(budget)
    assert list(arms) == list(quality.ARMS)
    assert budget.tokens == budget.steps * 4 * 128
    for name, stages in arms.items():
        assert sum(stage.tokens(budget) for stage in stages) == budget.tokens, name
        assert all(stage.steps >= 1 for stage in stages if stage.kind in ("l0", "train")), name
    prune = arms["l0-dynamic"][0].steps
    assert prune == min(budget.steps - 1, max(1, round(budget.steps * share)))
    for arm in ("l0-constant", "l0-distill", "l0-default", "l0-held"):
        assert [s.steps for s in arms[arm]] == [s.steps for s in arms["l0-dynamic"]]
    for arm in ("l0-default", "l0-held"):  # arm 3 with other masks: the same stages, teacher and batches
        assert [(s.distill, s.batch) for s in arms[arm]] == [(s.distill, s.batch) for s in arms["l0-distill"]]


def test_distillation_stages(quality):
    budget = quality.make_budget(False, 1, batch=4, seq_len=128, prune_share=0.25)
    distilled = {
        arm: [s.name for s in stages if s.distill] for arm, stages in quality.plan_arms(budget).items()
    }
    assert distilled == {
        "l0-dynamic": [],
        "l0-constant": [],
        "l0-distill": ["prune", "continued"],
        "oneshot": [],
        "oneshot-distill": ["continued"],
        "scratch": [],
        "l0-default": ["prune", "continued"],
        "l0-held": ["prune", "continued"],
    }
    without = quality.plan_arms(budget, kd_prune=False)
    assert [s.name for s in without["l0-distill"] if s.distill] == ["continued"]


def test_default_budgets(quality):
    full = quality.make_budget(False, 1, batch=4, seq_len=128, prune_share=0.25)
    assert (full.steps, full.tokens) == (96, 49_152)
    assert [s.steps for s in quality.plan_arms(full)["l0-distill"]] == [24, 0, 72]
    scaled = quality.make_budget(False, 10, batch=4, seq_len=128, prune_share=0.25)
    assert scaled.steps == 960
    assert quality.plan_arms(scaled)["l0-dynamic"][0].update_interval(scaled) == 60  # updates per stage kept


def test_prune_batch_runs_pruning_in_more_smaller_steps_of_the_same_tokens(quality) -> None:
    budget = quality.make_budget(False, 1, batch=32, seq_len=128, prune_share=0.25, steps=8, prune_batch=4)
    prune, fold, continued = quality.plan_arms(budget)["l0-distill"]
    assert (prune.steps, prune.batch_size(budget)) == (16, 4)  # 2 steps of 32 -> 16 of 4
    assert (continued.steps, continued.batch_size(budget)) == (6, 32)
    assert prune.tokens(budget) + continued.tokens(budget) == budget.tokens  # equal budgets still checked
    oneshot = quality.plan_arms(budget)["oneshot"][1]
    assert (oneshot.steps, oneshot.batch_size(budget)) == (8, 32)
    with pytest.raises(ValueError, match="--prune-batch must divide the batch 32"):
        quality.make_budget(False, 1, batch=32, seq_len=128, prune_share=0.25, prune_batch=5)


def test_warmup_is_shorter_than_the_stage(quality):
    assert [quality.warmup_batches(steps, 0.1) for steps in (1, 2, 3, 24, 72)] == [0, 1, 1, 2, 7]
    assert quality.warmup_batches(4, 0.9) == 3


def test_unequal_budgets_are_rejected(quality):
    budget = quality.make_budget(True, 1, batch=4, seq_len=128, prune_share=0.25)
    arms = quality.plan_arms(budget)
    arms["scratch"] = [quality.Stage("train", "train", budget.steps - 1)]
    with pytest.raises(AssertionError, match="scratch"):
        quality.check_equal_budget(arms, budget)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"scale": 0}, "--scale"), ({"prune_share": 1.0}, "--prune-share"), ({"steps": 1}, "--steps")],
)
def test_bad_budget_arguments(quality, kwargs, message):
    args = {"quick": False, "scale": 1, "batch": 4, "seq_len": 128, "prune_share": 0.25, **kwargs}
    with pytest.raises(ValueError, match=message):
        quality.make_budget(**args)


def test_seeds_repeat_the_deciding_arms(quality):
    runs = quality.runs_per_seed(quality.ARMS, [17, 18])
    assert runs[:8] == [(17, arm) for arm in quality.ARMS]
    assert runs[8:] == [
        (18, "l0-dynamic"),
        (18, "l0-constant"),
        (18, "l0-distill"),
        (18, "oneshot-distill"),
        (18, "l0-default"),
        (18, "l0-held"),
    ]
    assert quality.runs_per_seed(["oneshot", "scratch"], [1, 2]) == [(1, "oneshot"), (1, "scratch")]
    with pytest.raises(ValueError, match="distinct"):
        quality.runs_per_seed(quality.ARMS, [5, 5])
    with pytest.raises(ValueError, match="at least one"):
        quality.runs_per_seed(quality.ARMS, [])


def test_flops_count_the_teacher_and_match_the_model(quality, tiny_source):
    """The bench's FLOPs equal what the model's own ``flops_per_batch`` reports, teacher included."""
    import torch

    from llmshearing.checkpoint.loading import from_pretrained, load_teacher
    from llmshearing.models.composer_model import ComposerLlama
    from llmshearing.models.teacher import DistillationConfig

    source = from_pretrained(tiny_source).config
    target = source.replace(n_layers=2, intermediate_size=16)
    budget = quality.make_budget(False, 1, batch=2, seq_len=8, prune_share=0.5, steps=6)
    batch = {"input_ids": torch.zeros(budget.batch, budget.seq_len, dtype=torch.long)}
    student = ComposerLlama(target)
    plain = quality.stage_flops(quality.Stage("c", "train", 3), budget, source, target)
    assert plain == 3 * student.flops_per_batch(batch)
    student.attach_teacher(
        load_teacher(tiny_source, torch.float32, "auto"), DistillationConfig(teacher=tiny_source)
    )
    distilled = quality.stage_flops(quality.Stage("c", "train", 3, True), budget, source, target)
    assert distilled == 3 * student.flops_per_batch(batch)
    assert distilled > plain
    masked = quality.stage_flops(quality.Stage("p", "l0", 3), budget, source, target)
    assert masked == 3 * ComposerLlama(source).flops_per_batch(batch)  # pruning trains the masked source
    assert quality.stage_flops(quality.Stage("f", "fold", 0), budget, source, target) == 0
    stages = quality.plan_arms(budget)
    calibration = quality.calibration_flops(4, budget.seq_len, source)
    assert calibration == 4 * budget.seq_len * (source.train_flops_per_token(budget.seq_len) // 3)
    oneshot = quality.arm_flops(stages["oneshot"], budget, source, target, calibration)
    assert oneshot == {"train": 2 * plain, "calibration": calibration, "total": 2 * plain + calibration}
    scratch = quality.arm_flops(stages["scratch"], budget, source, target, calibration)
    assert scratch["calibration"] == 0 and scratch["total"] == 2 * plain
    kd = quality.arm_flops(stages["oneshot-distill"], budget, source, target, calibration)
    assert kd["train"] == 2 * distilled
    l0 = quality.arm_flops(stages["l0-distill"], budget, source, target, calibration)
    teacher = 3 * budget.batch * budget.seq_len * (source.train_flops_per_token(budget.seq_len) // 3)
    assert l0["train"] == masked + teacher + distilled


def test_initial_mix(quality):
    domains = ["arxiv", "book", "c4-rp", "cc", "github", "stackexchange", "wiki"]
    mix = quality.initial_mix(domains)
    assert math.isclose(sum(mix), 1.0)
    assert mix[domains.index("cc")] == pytest.approx(0.67)
    part = quality.initial_mix(["cc", "wiki"])  # a subset of RedPajama keeps its relative rates
    assert part == pytest.approx([0.67 / 0.715, 0.045 / 0.715])
    assert quality.initial_mix(["code", "docs"]) == [0.5, 0.5]
    assert quality.initial_mix(domains, uniform=True) == [1 / 7] * 7


def test_domains_too_small_for_three_splits_are_left_out(quality, tmp_path):
    import gzip

    raw = tmp_path / "raw"
    for domain, files in {"book": [2], "cc": [2, 2], "wiki": [3], "zipped": [1, 2]}.items():
        (raw / domain).mkdir(parents=True)
        for i, lines in enumerate(files):
            text = "".join(json.dumps({"text": f"doc {j}"}) + "\n\n" for j in range(lines))
            if domain == "zipped" and i == 1:
                with gzip.open(raw / domain / f"part{i}.jsonl.gz", "wt") as handle:
                    handle.write(text)
            else:
                (raw / domain / f"part{i}.jsonl").write_text(text)
    (raw / "notes").mkdir()  # no JSON lines: not a domain
    kept, excluded = quality.usable_domains(raw)
    assert kept == ["cc", "wiki", "zipped"]
    assert list(excluded) == ["book"] and excluded["book"].startswith("2 documents")
    view = quality.domain_view(raw, kept, tmp_path / "view")
    assert sorted(p.name for p in view.iterdir()) == kept
    assert (view / "cc" / "part1.jsonl").read_text() == (raw / "cc" / "part1.jsonl").read_text()
    assert quality.domain_view(raw, kept, view) == view  # reused as it is


def _write_metrics(folder, lines, tail=""):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + tail)


def test_final_weights_and_run_totals(quality, tmp_path):
    lines = [
        {"step": 0, "data/weight/a": 0.5, "data/weight/b": 0.5},
        {"step": 4, "data/weight/a": 0.7, "data/weight/b": 0.3, "loss/train/total": 2.0},
        {"step": 4, "time/token": 2048.0, "time/train": 3.0, "time/val": 1.0},
        {"step": 8, "loss/train/total": 1.5, "time/token": 4096.0},
        {"step": 8, "time/train": 6.5, "time/val": 2.0},
    ]
    _write_metrics(tmp_path, lines, '{"step": 9, "tr')
    assert quality.final_weights(tmp_path) == {"a": 0.7, "b": 0.3}
    # the partial last line of a killed run is ignored
    totals = {"steps": 8, "tokens": 4096.0, "train_seconds": 6.5, "eval_seconds": 2.0}
    assert quality.run_totals(tmp_path) == totals
    assert quality.normalised({"a": 0.7, "b": 0.2}, ["b", "a"]) == pytest.approx([2 / 9, 7 / 9])
    assert quality.final_weights(tmp_path / "missing") == {}


def test_l0_sparsity_and_distillation_summaries(quality, tmp_path):
    lines = [
        {"step": 1, "l0/expected_sparsity": 0.55, "l0/target_sparsity": 0.6, "loss/train/ce": 3.0},
        {"step": 1, "loss/train/kd": 1.0, "distill/teacher_time_share": 0.2},
        {"step": 2, "l0/expected_sparsity": 0.59, "l0/target_sparsity": 0.6, "loss/train/ce": 2.0},
        {"step": 2, "loss/train/kd": 0.5, "distill/teacher_time_share": 0.4},
        # per family: the last values count; a family without a logged target is left out
        {"step": 1, "l0/expected_sparsity/layer": 0.1, "l0/target_sparsity/layer": 0.25},
        {"step": 2, "l0/expected_sparsity/layer": 0.345, "l0/target_sparsity/layer": 0.25},
        {"step": 2, "l0/expected_sparsity/hidden": 0.099, "l0/target_sparsity/hidden": 0.25},
        {"step": 2, "l0/expected_sparsity/head": 0.5},
    ]
    _write_metrics(tmp_path / "ok", lines)
    sparsity = quality.l0_sparsity(tmp_path / "ok")
    families = sparsity.pop("families")
    assert sparsity == pytest.approx(
        {"initial": 0.55, "expected": 0.59, "target": 0.6, "gap": -0.01, "ok": True}
    )
    assert families == pytest.approx({"layer": 0.095, "hidden": -0.151})
    assert quality.distill_summary(tmp_path / "ok") == pytest.approx(
        {"lm": 2.5, "kd": 0.75, "teacher_time_share": 0.3}
    )
    _write_metrics(tmp_path / "miss", [{"step": 3, "l0/expected_sparsity": 0.31, "l0/target_sparsity": 0.61}])
    missed = quality.l0_sparsity(tmp_path / "miss")
    assert missed["ok"] is False and missed["gap"] == pytest.approx(-0.30) and missed["families"] == {}
    _write_metrics(tmp_path / "dense", [{"step": 1, "loss/train/ce": 3.0}])
    with pytest.raises(RuntimeError, match="l0/expected_sparsity"):
        quality.l0_sparsity(tmp_path / "dense")
    assert quality.distill_summary(tmp_path / "dense") == {"lm": 3.0}


def test_structure_change_counts_units_against_the_oneshot_cut(quality, tmp_path):
    import torch
    from safetensors.torch import save_file

    from llmshearing.pruning.oneshot import MASKS_NAME
    from llmshearing.pruning.snapshots import save_masks

    cut = {"head": torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]), "layer": torch.tensor([1.0, 1.0])}
    (tmp_path / "oneshot").mkdir()
    save_file(cut, str(tmp_path / "oneshot" / MASKS_NAME))
    run = tmp_path / "run"
    early = {"head": torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]), "layer": torch.tensor([1.0, 0.0])}
    save_masks(str(run / "masks" / "ba4.pt"), {"batch": 4, "at_target": False, "masks": early})
    # the last snapshot (ba12, not ba4 as names sort) folds; its target masks, not the expected-size ones
    moved = {"head": torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]]), "layer": torch.tensor([1.0, 1.0])}
    payload = {"batch": 12, "at_target": False, "masks": early, "target_masks": moved}
    save_masks(str(run / "masks" / "ba12.pt"), payload)
    structure = quality.structure_change(run, tmp_path / "oneshot")
    assert structure == {"batch": 12, "changed": {"head": 2, "layer": 0}, "units": {"head": 6, "layer": 2}}
    assert quality._structure_cell(structure) == "2 of 8 (head 2), at batch 12"
    same = {"batch": 12, "changed": {"head": 0, "layer": 0}, "units": {"head": 6, "layer": 2}}
    assert quality._structure_cell(same) == "0 of 8, at batch 12" and quality._structure_cell(None) == "-"

    save_masks(
        str(run / "masks" / "ba16.pt"), {"batch": 16, "at_target": True, "masks": {"layer": torch.ones(3)}}
    )
    with pytest.raises(RuntimeError, match="mask 'layer' has shape \\(3,\\) against \\(2,\\)"):
        quality.structure_change(run, tmp_path / "oneshot")
    with pytest.raises(RuntimeError, match="no ba<N>.pt mask snapshots"):
        quality.structure_change(tmp_path / "empty", tmp_path / "oneshot")

    rows = _results(quality)["rows"]
    rows["l0-distill"]["structure"] = same
    rows["oneshot-distill"]["losses"] = _losses({"a": 2.0, "b": 3.0})
    rows["oneshot-distill"]["seeds"] = quality.seed_summary([rows["oneshot-distill"]])
    line = quality.target_lines(rows)[0]
    assert (
        "**missed**" in line
        and "arm 3 folds a structure that differs from the one-shot cut in 0 of 8" in line
    )
    text = quality.render_markdown({**_results(quality), "rows": rows})
    assert "| 3 l0-distill | 17 | 0.500 | 0.600 | 0.610 | -0.010 | yes | - | 0 of 8, at batch 12 |" in text


def _stage_args(quality, tmp_path, tiny_source, **extra):
    import argparse

    args = quality.build_parser().parse_args([])
    args.seed, args.train_eval_samples, args.precision = 3, 2, "fp32"
    args.reference = {"alpha": 1.5, "beta": 2.5}
    for key, value in extra.items():
        setattr(args, key, value)
    return argparse.Namespace(**vars(args))


# the bench passes its --target to L0 stages; this is one the tiny source can reach
TINY_TARGET = [
    f"model.l0_module.target_model.{k}={v}"
    for k, v in {"n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "d_model": 16, "intermediate_size": 24}.items()
]


def test_stage_overrides_pass_the_recipe_validation(quality, tmp_path, tiny_source, tiny_mds):
    """Every stage's overrides of the demo recipes load and validate with the project's own config code."""
    from llmshearing.training.config import load_config, validate_config

    budget = quality.make_budget(
        False, 1, batch=4, seq_len=16, prune_share=0.25, steps=4
    )  # a 1-step L0 stage
    inputs = quality.Inputs(Path(tiny_source), Path(tiny_mds), "tiny", ["alpha", "beta"], [0.5, 0.5], {})
    args = _stage_args(quality, tmp_path, tiny_source, mix_ema=0.5, mix_warmup=1, mix_excess="relative")
    scores = tmp_path / "scores.safetensors"
    stages = quality.plan_arms(budget)["l0-distill"]
    for stage, recipe in ((stages[0], quality.PRUNE_RECIPE), (stages[2], quality.CONTINUE_RECIPE)):
        overrides = quality.train_overrides(
            budget, stage, inputs, Path(tiny_source), tmp_path / "run", [0.8, 0.2], args, 0.1
        )
        if stage.kind == "l0":  # the bench adds its --target; here one the tiny source can reach
            overrides += quality.l0_overrides(args, None, stage.steps)
            overrides += TINY_TARGET
        values = validate_config(load_config(str(recipe), overrides))
        loading = values.to_dict()["callbacks"]["data_loading"]  # the section as the recipe writes it
        assert (loading["loss_ema"], loading["excess"], loading["eta"]) == (0.5, "relative", 1.0)
        # a stage starts from the mix it is given; the floor stays a share of the data's initial mix
        assert values.callbacks.data_loading.floors == [0.5 * args.mix_floor] * 2
        assert loading["proportion"] == [0.8, 0.2]
        assert loading["update_warmup"] == f"{stage.update_interval(budget)}ba"
        distillation = values.model.distillation
        assert distillation.teacher == tiny_source and distillation.alpha == args.kd_alpha
    l0 = dict(o.split("=", 1) for o in quality.l0_overrides(args, scores, 24))
    assert l0["model.l0_module.init_from"] == str(scores)
    assert l0["model.l0_module.lagrangian_warmup_steps"] == "0ba"  # ranked masks: no target warm-up
    assert l0["model.l0_module.log_alpha_clamp"] == l0["model.l0_module.init_log_alpha"] == str(args.l0_clamp)
    assert l0["model.l0_module.penalty_per_unit"] == "false"
    args.l0_per_unit = True  # --l0-per-unit: the recipe takes it with the stage's target shape
    per_unit = quality.l0_overrides(args, None, stages[0].steps) + TINY_TARGET
    stage_overrides = quality.train_overrides(
        budget, stages[0], inputs, Path(tiny_source), tmp_path / "run", [0.8, 0.2], args, 0.1
    )
    values = validate_config(load_config(str(quality.PRUNE_RECIPE), stage_overrides + per_unit))
    assert values.model.l0_module.penalty_per_unit is True
    assert values.model.l0_module.schedule_l0_lr is False and values.model.l0_module.multiplier_beta1 is None
    args.l0_per_unit = False
    # arm 8: the one-shot cut held (nothing but the weights learns), whatever arm 3's mask flags say
    held = validate_config(
        load_config(
            str(quality.PRUNE_RECIPE), stage_overrides + quality.held_l0_overrides(scores) + TINY_TARGET
        )
    ).model.l0_module
    assert (held.init_from, held.mask_lr, held.multiplier_lr) == (str(scores), 0.0, 0.0)
    assert held.log_alpha_clamp == held.init_log_alpha == quality.HELD_BOUND and held.init_scale is None
    assert held.lagrangian_warmup_steps in ("0ba", 0) and held.hold_ranked in ([], ())
    # --l0-schedule-lr masks --multiplier-beta1 0: the recipe takes the mask-only schedule and the beta1
    args.l0_schedule_lr, args.multiplier_beta1 = "masks", 0.0
    unscheduled = quality.l0_overrides(args, None, stages[0].steps) + TINY_TARGET
    l0_config = validate_config(
        load_config(str(quality.PRUNE_RECIPE), stage_overrides + unscheduled)
    ).model.l0_module
    assert (l0_config.schedule_l0_lr, l0_config.multiplier_beta1) == ("masks", 0.0)
    assert l0_config.scheduled_groups == ("masks",)
    args.l0_schedule_lr, args.multiplier_beta1 = False, None
    assert (
        dict(o.split("=", 1) for o in quality.l0_overrides(args, None, 24))[
            "model.l0_module.lagrangian_warmup_steps"
        ]
        == "5ba"
    )
    plain = quality.train_overrides(
        budget,
        quality.plan_arms(budget)["oneshot"][1],
        inputs,
        Path(tiny_source),
        tmp_path / "r",
        [0.5, 0.5],
        args,
        0.1,
    )
    # the demo recipes distil: an arm without distillation turns it off, whichever recipe it starts from
    assert [o for o in plain if o.startswith("model.distillation")] == ["model.distillation=null"]
    for stage, recipe in ((quality.plan_arms(budget)["l0-dynamic"][0], quality.PRUNE_RECIPE),):
        overrides = (
            quality.train_overrides(
                budget, stage, inputs, Path(tiny_source), tmp_path / "p", [0.5, 0.5], args, 0.1
            )
            + quality.l0_overrides(args, None, stage.steps)
            + TINY_TARGET
        )
        assert validate_config(load_config(str(recipe), overrides)).model.distillation is None
    values = validate_config(load_config(str(quality.CONTINUE_RECIPE), plain))
    assert values.model.distillation is None


def _losses(values):
    return {d: {"loss": v, "perplexity": math.exp(v), "tokens": 127} for d, v in values.items()}


ARM_LOSSES = {  # (a, b) test losses of the first seed
    "l0-dynamic": (3.0, 4.0),
    "l0-constant": (3.2, 4.0),
    "l0-distill": (2.8, 3.8),
    "oneshot": (3.5, 4.5),
    "oneshot-distill": (3.0, 3.9),
    "scratch": (6.0, 7.0),
    "l0-default": (3.1, 4.1),
    "l0-held": (2.9, 3.8),
}


def _record(quality, arm, seed, a, b):
    stages = [
        {"name": "train", "steps": 8, "tokens": 4096, "seconds": 12.5, "detail": "", "train_seconds": 9.25,
         "flops": 2_000_000_000_000, "distill_summary": {"lm": 3.25, "kd": 0.5, "teacher_time_share": 0.25}},
        {"name": "fold", "steps": 0, "tokens": 0, "seconds": 2.0, "detail": "note", "flops": 0},
    ]  # fmt: skip
    record = {
        "arm": arm,
        "title": quality.ARM_TITLES[arm],
        "seed": seed,
        "dynamic": arm != "l0-constant",
        "stages": stages,
        "losses": _losses({"a": a, "b": b}),
        "tokens": 4096,
        "seconds": 12.5,
        "flops": {"train": 2_000_000_000_000, "calibration": 500_000_000_000, "total": 2_500_000_000_000},
        "mixes": {"train": {"initial": {"a": 0.5, "b": 0.5}, "final": {"a": 0.25, "b": 0.75}}},
    }
    if arm.startswith("l0-"):
        record["sparsity"] = {"initial": 0.5, "expected": 0.6, "target": 0.61, "gap": -0.01, "ok": True}
        if seed == 18:  # records written before the family gaps were kept have none
            record["sparsity"]["families"] = {"layer": 0.095, "hidden": -0.151, "head": 0.0}
    return record


def _results(quality, second_seed=None):
    records = [_record(quality, arm, 17, *ARM_LOSSES[arm]) for arm in quality.ARMS]
    for arm, (a, b) in (second_seed or {}).items():
        records.append(_record(quality, arm, 18, a, b))
    source = {"title": "source", "losses": _losses({"a": 2.0, "b": 3.0}), "tokens": 0}
    rows = quality.build_rows(source, records)
    rows["l0-dynamic"]["after_pruning"] = _losses({"a": 5.0, "b": 6.0})
    return {
        "meta": {
            "mode": "quick",
            "date": "2030-01-02",
            "command": "python bench/quality.py --quick",
            "machine": {"cpu": "Test CPU", "cores": 2, "torch_threads": 2, "gpu": None},
            "commit": "abc123",
            "total_seconds": 99.0,
        },
        "budget": {"steps": 8, "batch": 4, "seq_len": 128, "prune_share": 0.25, "tokens": 4096},
        "corpus": "test",
        "domains": ["a", "b"],
        "excluded_domains": {"book": "2 documents: train, eval and test need 3 disjoint ones"},
        "initial_mix": [0.5, 0.5],
        "eval_samples": 8,
        "report_split": "test",
        "settings": {"kd_alpha": 0.5},
        "target_desc": "tiny",
        "params": {"source": 1000, "target": 400},
        "rows": rows,
    }


def test_rows_aggregate_seeds(quality):
    rows = _results(quality, {"l0-distill": (3.0, 4.0), "oneshot-distill": (3.1, 3.9)})["rows"]
    assert list(rows) == ["source", *quality.ARMS]
    seeds = rows["l0-distill"]["seeds"]
    assert seeds["per_seed"] == pytest.approx({"17": 3.3, "18": 3.5})
    assert (seeds["mean"], seeds["spread"]) == pytest.approx((3.4, 0.2))
    assert rows["l0-distill"]["seed"] == 17 and [r["seed"] for r in rows["l0-distill"]["repeats"]] == [18]
    assert quality.arm_loss(rows["l0-distill"]) == pytest.approx(3.4)
    assert quality.arm_loss(rows["scratch"]) == pytest.approx(6.5)
    assert quality.arm_loss(rows["source"]) == pytest.approx(2.5)


def test_markdown_table(quality):
    text = quality.render_markdown(_results(quality, {"l0-distill": (3.0, 4.0)}))
    header = "| model | avg loss | seeds: mean (spread) | avg ppl | after pruning | a | b | train tokens | TFLOPs | wall s |"
    assert header in text
    row = next(line for line in text.splitlines() if line.startswith("| 1 l0-dynamic:"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:10] == [
        "3.500",
        "-",
        f"{math.exp(3.5):.1f}",
        "5.500",
        "3.000",
        "4.000",
        "4,096",
        "2.50",
        "12",
    ]
    three = next(line for line in text.splitlines() if line.startswith("| 3 l0-distill:"))
    assert "| 3.400 (0.200, n=2) |" in three
    source = next(line for line in text.splitlines() if line.startswith("| source:"))
    assert "| 2.500 |" in source and source.rstrip().endswith("| - | - |")
    assert "| 1 l0-dynamic | train | 8 | 4,096 | 2.00 | 12.5 | 9.2 | - | 3.250 / 0.500, 25% |  |" in text
    assert "| 6 scratch | fold | 0 | 0 | 0.00 | 2.0 | - | - | - | note |" in text
    weights = next(line for line in text.splitlines() if line.startswith("| b | "))
    assert weights.count("0.750") == 7 and "0.500" in weights  # seven dynamic arms' final mixes, initial mix
    assert "| 3 l0-distill | 18 | 0.500 | 0.600 | 0.610 | -0.010 | yes | hidden -0.151 |" in text
    assert "| 3 l0-distill | 17 | 0.500 | 0.600 | 0.610 | -0.010 | yes | - |" in text
    assert "left out: book (2 documents" in text and "test split" in text
    assert "`python bench/quality.py --quick`" in text and "Test CPU" in text and "abc123" in text
    assert "total wall time: 99 s" in text and "sparsity check failed" not in text


def test_result_line_and_targets(quality):
    rows = _results(quality)["rows"]
    # arm 3: (2.8 + 3.8) / 2 = 3.3; arm 5: 3.45; arm 8: 3.35; arm 1: 3.5; arm 2: 3.6
    assert (
        quality.result_line(rows)
        == "RESULT quality arm3/arm5=0.957 target=<1.00 arm3/arm8=0.985 target=<1.00 arm1/arm2=0.972 target=<=1.00"
    )
    lines = quality.target_lines(rows)
    assert (
        lines[0].startswith("- arm 3 (l0-distill) 3.300 vs arm 5 (oneshot-distill) 3.450")
        and "**met**" in lines[0]
    )
    assert "one seed: no spread" in lines[0]
    # arm 3's learned masks against the same stages with the masks held at the one-shot cut
    assert lines[1].startswith(
        "- arm 3 (l0-distill) 3.300 vs arm 8 (l0-held) 3.350: ratio 0.985, target < 1.00"
    )
    assert "**met**" in lines[1]
    assert (
        "**met**" in lines[2] and lines[3] == "- arm 3 has the lowest average test loss of all arms: **met**"
    )
    held_better = _results(quality, {"l0-held": (2.7, 3.7)})["rows"]  # arm 8 over two seeds: 3.275
    assert "arm3/arm8=1.008 target=<1.00" in quality.result_line(held_better)
    assert "**missed**" in quality.target_lines(held_better)[1]
    worse = _results(quality, {"l0-dynamic": (3.9, 4.5), "l0-constant": (3.2, 4.0)})["rows"]
    line = quality.target_lines(worse)[2]
    # arm 1: mean(3.5, 4.2) = 3.85; arm 2: 3.6 over both seeds (spread 0)
    assert "ratio 1.069, target <= 1.00: **missed**" in line
    assert "seed spread (max - min over 2 seeds) up to 0.700" in line
    assert "the difference is within the seed spread" in line  # 0.25 apart, seeds 0.7 apart
    assert "per-domain differences (first seed): b +0.000, a -0.200" in line
    del rows["l0-distill"], rows["oneshot-distill"], rows["l0-dynamic"]
    assert quality.result_line(rows).startswith("RESULT quality skipped=")


def test_lowest_arm_and_sparsity_misses_are_reported(quality):
    results = _results(quality)
    rows = results["rows"]
    rows["oneshot-distill"]["losses"] = _losses({"a": 2.0, "b": 3.0})
    rows["oneshot-distill"]["seeds"] = quality.seed_summary([rows["oneshot-distill"]])
    rows["l0-dynamic"]["sparsity"] = {
        "initial": 0.49,
        "expected": 0.31,
        "target": 0.61,
        "gap": -0.3,
        "ok": False,
    }
    lines = quality.target_lines(rows)
    assert "**missed**" in lines[0] and "per-domain differences (first seed): b +0.800, a +0.800" in lines[0]
    assert "lowest: arm 5 oneshot-distill 2.500, arm 3 3.300" in lines[3]
    assert quality.sparsity_misses(rows) == [
        "l0-dynamic seed 17: expected sparsity 0.310, target 0.610 (gap -0.300, tolerance 0.02)"
    ]
    text = quality.render_markdown(results)
    assert "**L0 sparsity check failed:** l0-dynamic seed 17" in text
    assert "| 1 l0-dynamic | 17 | 0.490 | 0.310 | 0.610 | -0.300 | **no** |" in text


def test_git_commit_ignores_earlier_results_but_not_other_changes(quality, tmp_path, monkeypatch):
    import subprocess

    def git(*args):
        command = ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args]
        subprocess.run(command, cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "quality.py").write_text("x = 1\n")
    git("add", ".")
    git("commit", "-q", "-m", "one")
    report = sys.modules[quality.git_commit.__module__]  # the module whose paths git_commit reads
    monkeypatch.setattr(report, "REPO", tmp_path)
    monkeypatch.setattr(report, "RESULTS_DIR", tmp_path / "bench" / "results")
    clean = quality.git_commit()
    assert len(clean) == 40 and not clean.endswith("+dirty")
    (tmp_path / "bench" / "results" / "quality-2030-01-02-full.md").write_text("an earlier run\n")
    assert quality.git_commit() == clean
    (tmp_path / "bench" / "quality.py").write_text("x = 2\n")
    assert quality.git_commit() == clean + "+dirty"


def test_write_results_is_atomic_and_complete(quality, tmp_path):
    results = _results(quality)
    json_path, md_path = quality.write_results(results, tmp_path / "results")
    assert json_path.name == "quality-2030-01-02-quick.json" and md_path.name == "quality-2030-01-02-quick.md"
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(results))
    assert md_path.read_text() == quality.render_markdown(results)
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == [json_path.name, md_path.name]
    umask = os.umask(0)
    os.umask(umask)
    assert json_path.stat().st_mode & 0o777 == 0o666 & ~umask  # the usual permissions, not mkstemp's 0600
    # a second run of the same day and mode keeps the first record and writes beside it
    first = json_path.read_text()
    again = quality.write_results({**results, "eval_samples": 99}, tmp_path / "results")
    assert [p.name for p in again] == ["quality-2030-01-02-quick-2.json", "quality-2030-01-02-quick-2.md"]
    assert json_path.read_text() == first and json.loads(again[0].read_text())["eval_samples"] == 99
    third = quality.write_results(results, tmp_path / "results")
    assert third[1].name == "quality-2030-01-02-quick-3.md"


def test_study_variants_and_ranking_use_eval_only(quality, tmp_path):
    variants = quality.study_variants(["mix", "distillation"])
    assert len(variants) == len(quality.STUDY_MIX) + len(quality.STUDY_KD)
    assert ("mix", "paper rule", quality.PAPER_RULE) in variants
    # each mix variant is the paper's rule with one change (or the four together), whatever the defaults
    for group, name, values in variants:
        if group == "mix":
            changed = {k for k, v in values.items() if quality.PAPER_RULE[k] != v}
            assert set(values) == set(quality.PAPER_RULE) and (
                len(changed) == 1 or name in ("paper rule", "all four")
            )
    # the arms run the library's default mix unless told otherwise
    from llmshearing.dynamic_loading.config import DataLoadingConfig

    defaults = quality.build_parser().parse_args([])
    library = DataLoadingConfig(["a"], [1.0])
    assert (defaults.mix_eta, defaults.mix_ema, defaults.mix_floor, defaults.mix_excess) == (
        library.eta,
        library.loss_ema,
        library.min_proportion,
        library.excess,
    )
    with pytest.raises(ValueError, match="unknown study groups"):
        quality.study_variants(["mix", "lr"])
    parser = quality.build_parser()
    pruning = quality.study_variants(["pruning"])
    assert {quality.STUDY_ARMS[group] for group, _, _ in pruning} == {"l0-distill"}
    # the defaults are among the pruning variants; the pruning lr default is the recipe's
    assert any(
        values == {"prune_share": defaults.prune_share, "prune_lr": quality.PRUNE_LR}
        for *_, values in pruning
    )
    assert quality.PRUNE_LR == OmegaConf.load(quality.PRUNE_RECIPE).optimizer.lr
    assert quality.CONTINUE_LR == OmegaConf.load(quality.CONTINUE_RECIPE).optimizer.lr
    continued = quality.study_variants(
        ["continue"]
    )  # the one-shot + distillation arm, from the recipe's lr up
    assert {quality.STUDY_ARMS[group] for group, _, _ in continued} == {"oneshot-distill"}
    assert [values["continue_lr"] for *_, values in continued] == [quality.CONTINUE_LR, 6e-4, 1.2e-3, 3e-3]
    assert quality.as_flags(continued[1][2]) == "--continue-lr 0.0006"
    # each stage's weights take their own lr: pruning, continued pretraining, or the scratch arm's
    plan = quality.plan_arms(quality.make_budget(False, 1, batch=4, seq_len=16, prune_share=0.25, steps=4))
    lrs = parser.parse_args(["--prune-lr", "4e-4", "--continue-lr", "5e-4", "--scratch-lr", "2e-3"])
    assert [quality.stage_lr("l0-distill", s, lrs) for s in plan["l0-distill"] if s.kind != "fold"] == [
        4e-4,
        5e-4,
    ]
    assert [
        quality.stage_lr("oneshot-distill", s, lrs) for s in plan["oneshot-distill"] if s.kind == "train"
    ] == [5e-4]
    assert {quality.stage_lr("scratch", s, lrs) for s in plan["scratch"] if s.kind == "train"} == {2e-3}
    masks = quality.study_variants(["masks"])
    assert {quality.STUDY_ARMS[group] for group, _, _ in masks} == {"l0-distill"}
    # the held ranking is the bench's default; the learning ones start inside the library's default bound
    from llmshearing.pruning.targets import L0Config

    held, *learning = (values for *_, values in masks)
    assert (held["l0_clamp"], held["mask_lr"], held["l0_init_scale"]) == (
        defaults.l0_clamp,
        defaults.mask_lr,
        None,
    )
    for values in learning:
        assert values["l0_clamp"] == pytest.approx(
            L0Config.__dataclass_fields__["log_alpha_clamp"].default, abs=1e-4
        )
        assert values["l0_init_scale"] < values["l0_clamp"] and values["l0_bounded"]
    for _, _, values in [*variants, *pruning, *masks]:  # every variant's flags are options of the command
        flags = quality.as_flags(values).split() if values else []
        args = parser.parse_args(flags)
        assert all(getattr(args, key) == value for key, value in values.items())
    assert quality.as_flags({}) == "(defaults)"
    base = _results(quality)
    records = [
        {"group": "mix", "variant": "paper rule", "values": {}, "losses": _losses({"a": 3.0, "b": 4.0})},
        {"group": "mix", "variant": "eta 0.3", "values": {"mix_eta": 0.3}, "losses": _losses({"a": 3.0, "b": 3.8})},
        {"group": "distillation", "variant": "alpha 0.9, T 1", "values": {"kd_alpha": 0.9, "kd_temperature": 1.0},
         "losses": _losses({"a": 2.0, "b": 3.0})},
    ]  # fmt: skip
    best = quality.best_variants(records)
    assert best["mix"]["variant"] == "eta 0.3" and best["distillation"]["variant"] == "alpha 0.9, T 1"
    study = {**{k: v for k, v in base.items() if k != "rows"}, "report_split": "eval", "variants": records}
    json_path, md_path = quality.write_results(study, tmp_path, kind="study")
    assert md_path.name == "quality-2030-01-02-quick-study.md"
    text = md_path.read_text()
    assert "| mix | eta 0.3 | `--mix-eta 0.3` | 3.400 | 3.000 | 3.800 |" in text
    assert "- mix (oneshot arm): eta 0.3 (3.400): `--mix-eta 0.3`" in text
    assert (
        "- distillation (oneshot-distill arm): alpha 0.9, T 1 (2.500): `--kd-alpha 0.9 --kd-temperature 1.0`"
        in text
    )
    assert "eval split" in text and "test split is not read" in text
    assert "units changed" not in text  # no L0 variant: no mask columns
    sparsity = {"initial": 0.57, "expected": 0.605, "target": 0.608, "gap": -0.003, "ok": True}
    structure = {"batch": 24, "changed": {"head": 3, "layer": 0}, "units": {"head": 60, "layer": 4}}
    l0 = {"group": "masks", "variant": "learning", "values": {"mask_lr": 0.5}, "losses": _losses({"a": 2.5, "b": 3.0}),
          "sparsity": sparsity, "structure": structure}  # fmt: skip
    assert quality.best_variants([*records, l0])["masks"]["variant"] == "learning"
    missed = {**l0, "variant": "overshot", "losses": _losses({"a": 1.0, "b": 1.0}),
              "sparsity": {**sparsity, "expected": 0.66, "gap": 0.052, "ok": False}}  # fmt: skip
    assert (
        quality.best_variants([*records, l0, missed])["masks"]["variant"] == "learning"
    )  # lower, not eligible
    text = quality.render_study({**study, "variants": [*records, l0]})
    assert "| mix | eta 0.3 | `--mix-eta 0.3` | 3.400 | 3.000 | 3.800 | - | - |" in text
    assert (
        "| masks | learning | `--mask-lr 0.5` | 2.750 | 2.500 | 3.000 | 0.605 (0.608) | 3 of 64 (head 3), at batch 24 |"
        in text
    )


def test_scratch_model_has_the_target_shape(quality, tiny_source, tmp_path):
    from llmshearing.checkpoint.loading import from_pretrained

    target = {"n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "d_model": 24, "intermediate_size": 16}
    config = quality.build_scratch(Path(tiny_source), tmp_path / "init", seed=3, target=target)
    assert {k: config[k] for k in target} == target
    model = from_pretrained(tmp_path / "init")
    assert {k: getattr(model.config, k) for k in target} == target
    again = quality.build_scratch(Path(tiny_source), tmp_path / "again", seed=3, target=target)
    assert again == config
    other = from_pretrained(tmp_path / "again")
    assert all(
        (a == b).all() for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True)
    )


def test_target_option_reads_pairs_or_a_search_shape_yaml(quality, tmp_path):
    shape = {"n_layers": 3, "n_heads": 4, "n_kv_heads": 2, "d_model": 96, "intermediate_size": 224}
    assert quality.read_target("n_layers=3,n_heads=4,n_kv_heads=2,d_model=96,intermediate_size=224") == shape
    written = tmp_path / "target.yaml"
    written.write_text(
        "# from search-shape\ntarget_model:\n" + "".join(f"  {k}: {v}\n" for k, v in shape.items())
    )
    assert quality.read_target(str(written)) == shape
    assert quality.shape_desc(shape) == "3L / 4 heads over 2 KV groups / 96d / 224I"
    for bad, match in (
        ("n_layers=3", "names exactly"),
        ("n_layers", "key=value"),
        ("n_layers=3,n_heads=x,n_kv_heads=2,d_model=96,intermediate_size=224", "integer"),
    ):
        with pytest.raises(ValueError, match=match):
            quality.read_target(bad)
    args = quality.build_parser().parse_args(["--target", str(written), "--l0-learned-shape", "32"])
    assert (args.target_shape, args.l0_learned_shape) == (str(written), 32)


def test_l0_stages_take_the_target_shape_or_learn_one_under_its_budget(quality):
    from types import SimpleNamespace

    from llmshearing.models.config import ModelConfig

    source = ModelConfig(
        vocab_size=64, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, intermediate_size=384,
        max_seq_len=16,
    )  # fmt: skip
    target = {"n_layers": 3, "n_heads": 2, "n_kv_heads": 1, "d_model": 96, "intermediate_size": 288}
    args = SimpleNamespace(
        target=target, source_cfg=source, target_cfg=source.replace(**target), l0_learned_shape=None
    )
    exact = quality.target_overrides(args)
    assert "model.l0_module.target_model.d_model=96" in exact
    assert (
        "model.l0_module.pruning_modules=[layer,head,kv_head,intermediate,hidden]" in exact
    )  # drops a KV group
    args.l0_learned_shape = 32
    learned = quality.target_overrides(args)
    assert (
        "model.l0_module.target_model=null" in learned and "model.l0_module.budget_shape=learned" in learned
    )
    budget = f"model.l0_module.target_budget.non_embedding_params={args.target_cfg.num_params(False)}"
    assert budget in learned and "model.l0_module.target_budget.multiple=32" in learned


def test_a_bad_target_stops_the_benchmark_before_anything_is_prepared(quality, tmp_path, capsys):
    assert quality.main(["--target", "n_layers=3", "--out", str(tmp_path / "work"), "--no-progress"]) == 2
    assert "error: --target n_layers=3: a target names exactly" in capsys.readouterr().err
    for flag in ("--prune-lr", "--continue-lr"):  # likewise a learning rate that is not positive
        assert quality.main([flag, "0", "--out", str(tmp_path / "lr"), "--no-progress"]) == 2
        assert f"{flag} must be a positive learning rate, got 0" in capsys.readouterr().err
    assert not (tmp_path / "lr").exists()
    assert not any((tmp_path / "work").iterdir())  # no data, source or run prepared


def test_a_learned_shape_can_be_fixed_part_way_through_pruning(quality, capsys):
    args = quality.build_parser().parse_args(
        ["--l0-learned-shape", "32", "--l0-fix-shape", "0.5", "--l0-warmup", "0.5"]
    )
    l0 = dict(o.split("=", 1) for o in quality.l0_overrides(args, None, 512))
    assert l0["model.l0_module.fix_shape_at"] == "256ba"
    args.l0_learned_shape = None  # a target shape: nothing to fix
    assert "model.l0_module.fix_shape_at" not in dict(
        o.split("=", 1) for o in quality.l0_overrides(args, None, 512)
    )
    for bad in (["--l0-fix-shape", "0.5"], ["--l0-learned-shape", "32", "--l0-fix-shape", "1.0"]):
        with pytest.raises(SystemExit):
            quality.main([*bad, "--no-progress"])
        assert (
            "--l0-fix-shape fixes the shape --l0-learned-shape lets the masks learn"
            in capsys.readouterr().err
        )


def test_a_ranked_l0_stage_can_hold_families_at_the_one_shot_cut(quality, capsys):
    args = quality.build_parser().parse_args(["--l0-hold", "hidden"])
    held = dict(o.split("=", 1) for o in quality.l0_overrides(args, Path("scores.safetensors"), 512))
    assert held["model.l0_module.hold_ranked"] == "[hidden]"
    unranked = dict(o.split("=", 1) for o in quality.l0_overrides(args, None, 512))
    assert unranked["model.l0_module.hold_ranked"] == "[]"  # nothing to hold without a ranking
    with pytest.raises(SystemExit):
        quality.main(["--l0-hold", "hidden", "--l0-learned-shape", "32", "--no-progress"])
    assert "--l0-hold cuts each held family to its size in the target shape" in capsys.readouterr().err


def test_oneshot_damping_needs_the_compensated_cut_and_a_positive_value(quality, capsys):
    for bad in (["--oneshot-damping", "0.001"], ["--oneshot-compensate", "--oneshot-damping", "0"]):
        with pytest.raises(SystemExit):
            quality.main([*bad, "--no-progress"])
        assert "--oneshot-damping is the fit's damping of --oneshot-compensate" in capsys.readouterr().err
