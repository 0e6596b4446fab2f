"""The pure parts of ``bench/quality.py``: budget splitting, mixes, metrics reading, result writers."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "quality.py"


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
    assert set(arms) == set(quality.ARMS)
    assert budget.tokens == budget.steps * 4 * 128
    for name, stages in arms.items():
        assert sum(stage.tokens(budget) for stage in stages) == budget.tokens, name
        assert all(stage.steps >= 1 for stage in stages if stage.kind in ("l0", "train")), name
    prune = arms["l0-dynamic"][0].steps
    assert prune == min(budget.steps - 1, max(1, round(budget.steps * share)))
    assert [s.steps for s in arms["l0-dynamic"]] == [s.steps for s in arms["l0-constant"]]


def test_default_budgets(quality):
    full = quality.make_budget(False, 1, batch=4, seq_len=128, prune_share=0.25)
    assert (full.steps, full.tokens) == (96, 49_152)
    assert [s.steps for s in quality.plan_arms(full)["l0-dynamic"]] == [24, 0, 72]
    scaled = quality.make_budget(False, 10, batch=4, seq_len=128, prune_share=0.25)
    assert scaled.steps == 960
    assert quality.plan_arms(scaled)["l0-dynamic"][0].update_interval(scaled) == 60  # updates per stage kept


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


def test_initial_mix(quality):
    domains = ["arxiv", "book", "c4-rp", "cc", "github", "stackexchange", "wiki"]
    mix = quality.initial_mix(domains)
    assert math.isclose(sum(mix), 1.0)
    assert mix[domains.index("cc")] == pytest.approx(0.67)
    part = quality.initial_mix(["cc", "wiki"])  # a subset of RedPajama keeps its relative rates
    assert part == pytest.approx([0.67 / 0.715, 0.045 / 0.715])
    assert quality.initial_mix(["code", "docs"]) == [0.5, 0.5]
    assert quality.initial_mix(domains, uniform=True) == [1 / 7] * 7


def test_final_weights_and_run_totals(quality, tmp_path):
    lines = [
        {"step": 0, "data/weight/a": 0.5, "data/weight/b": 0.5},
        {"step": 4, "data/weight/a": 0.7, "data/weight/b": 0.3, "loss/train/total": 2.0},
        {"step": 4, "time/token": 2048.0, "time/train": 3.0, "time/val": 1.0},
        {"step": 8, "loss/train/total": 1.5, "time/token": 4096.0},
        {"step": 8, "time/train": 6.5, "time/val": 2.0},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 9, "tr')
    assert quality.final_weights(tmp_path) == {"a": 0.7, "b": 0.3}
    # the partial last line of a killed run is ignored
    totals = {"steps": 8, "tokens": 4096.0, "train_seconds": 6.5, "eval_seconds": 2.0}
    assert quality.run_totals(tmp_path) == totals
    assert quality.normalised({"a": 0.7, "b": 0.2}, ["b", "a"]) == pytest.approx([2 / 9, 7 / 9])
    assert quality.final_weights(tmp_path / "missing") == {}


def _losses(values):
    return {d: {"loss": v, "perplexity": math.exp(v), "tokens": 127} for d, v in values.items()}


def _results(quality):
    rows = {"source": {"title": "source", "losses": _losses({"a": 2.0, "b": 3.0}), "tokens": 0}}
    stages = [
        {"name": "train", "steps": 8, "tokens": 4096, "seconds": 12.5, "detail": "", "train_seconds": 9.25},
        {"name": "fold", "steps": 0, "tokens": 0, "seconds": 2.0, "detail": "note"},
    ]
    for arm, (a, b) in zip(quality.ARMS, [(3.0, 4.0), (3.2, 4.0), (3.5, 4.5), (6.0, 7.0)], strict=True):
        rows[arm] = {
            "title": quality.ARM_TITLES[arm],
            "dynamic": arm != "l0-constant",
            "stages": stages,
            "losses": _losses({"a": a, "b": b}),
            "tokens": 4096,
            "seconds": 12.5,
            "mixes": {"train": {"initial": {"a": 0.5, "b": 0.5}, "final": {"a": 0.25, "b": 0.75}}},
        }
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
        "initial_mix": [0.5, 0.5],
        "eval_samples": 8,
        "target_desc": "tiny",
        "params": {"source": 1000, "target": 400},
        "rows": rows,
    }


def test_markdown_table(quality):
    text = quality.render_markdown(_results(quality))
    assert "| model | avg loss | avg ppl | after pruning | a | b | train tokens | wall s |" in text
    row = next(line for line in text.splitlines() if line.startswith("| l0-dynamic:"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:7] == ["3.500", f"{math.exp(3.5):.1f}", "5.500", "3.000", "4.000", "4,096"]
    source = next(line for line in text.splitlines() if line.startswith("| source:"))
    assert "| 2.500 |" in source and source.rstrip().endswith("| - |")
    assert "| l0-dynamic | train | 8 | 4,096 | 12.5 | 9.2 | - |  |" in text
    assert "| scratch | fold | 0 | 0 | 2.0 | - | - | note |" in text
    weights = next(line for line in text.splitlines() if line.startswith("| b | "))
    assert weights.count("0.750") == 3 and "0.500" in weights  # three dynamic arms' final mixes, initial mix
    assert "`python bench/quality.py --quick`" in text and "Test CPU" in text and "abc123" in text
    assert "total wall time: 99 s" in text


def test_result_line(quality):
    rows = _results(quality)["rows"]
    assert quality.result_line(rows) == "RESULT quality ratio=0.875 target=<=1.00"  # 3.5 / 4.0 (oneshot)
    del rows["oneshot"], rows["scratch"]
    assert quality.result_line(rows).startswith("RESULT quality skipped=")


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


def test_scratch_model_has_the_target_shape(quality, tiny_source, tmp_path):
    from llmshearing.models import from_pretrained

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
