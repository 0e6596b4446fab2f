"""``eval_tasks``: lm-eval tasks scored on the model being trained, logged as ``icl/<label>/<metric>``.

A tiny pruning run (byte-level tokenizer, random decoder) scores the shipped multiple-choice task, the same
rows as an llm-foundry ``dataset_uri`` file, and a 2-shot cloze from an ``include_path`` YAML. Its last
scores must be those `llmshearing evaluate --tasks` gives the folded checkpoint (the masked model against
the physically pruned one: accuracies equal, perplexity within 1e-5 relative). Bad sections fail with one
line naming the key, before the model loads. The 2-rank FSDP2 runs of tests/training/test_fsdp.py score tasks
too (`icl_recipe_args`, in tests/conftest.py) and are compared with one process there.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BYTE_VOCAB, user_task_dir, write_byte_source, write_tiny_source

from llmshearing.callbacks.eval_tasks import parse_eval_tasks
from llmshearing.callbacks.icl_eval import kept_random_state
from llmshearing.cli import main as cli_main
from llmshearing.config_base import ConfigError
from llmshearing.harness.runner import TASKS_DIR as TASKS
from llmshearing.train import main as train_main
from llmshearing.training.builders import prepare_eval_tasks
from llmshearing.training.config import load_config, validate_config

PRUNE = "yamls/tiny/prune.yaml"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_mds) -> dict[str, Path]:
    """A byte-tokenizer source, the shipped MC rows in llm-foundry's format, a user cloze YAML."""
    root = tmp_path_factory.mktemp("icl")
    source = root / "source"
    write_byte_source(source, max_seq_len=512)
    rows = [json.loads(line) for line in (TASKS / "local_mc_test.jsonl").read_text().splitlines()]
    uri = root / "mc.jsonl"
    uri.write_text(
        "".join(
            json.dumps({"query": r["context"], "choices": r["choices"], "gold": r["label"]}) + "\n"
            for r in rows
        )
    )
    tasks = user_task_dir(root / "user_tasks")
    return {"root": root, "source": source, "mds": Path(tiny_mds), "uri": uri, "tasks": tasks}


def section(setup: dict[str, Path]) -> str:
    return (
        "eval_tasks={tasks: [{task: local_mc, limit: 8}, "
        f"{{label: mc_uri, dataset_uri: {setup['uri']}, icl_task_type: multiple_choice, limit: 8}}, "
        f"{{label: cloze, task: user_cloze, include_path: {setup['tasks']}, num_fewshot: 2, limit: 8, every: 2}}]}}"
    )


def run_args(setup: dict[str, Path], folder: Path) -> list[str]:
    return [
        f"model.path={setup['source']}", f"data_local={setup['mds']}", f"save_folder={folder}", "max_duration=4ba",
        "eval_interval=2ba", "save_interval=4ba", "eval_first=true", "model.l0_module.eval_target_model=true",
        section(setup),
    ]  # fmt: skip


def icl_metrics(folder: Path) -> dict[tuple[int, str], float]:
    rows = {}
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        step = record.pop("step")
        rows.update({(step, k): v for k, v in record.items() if k.startswith("icl/")})
    return rows


def test_eval_tasks_key_is_checked(setup, tmp_path):
    def refused(entries: str) -> str:
        cfg = load_config(PRUNE, [f"model.path={setup['source']}", f"data_local={setup['mds']}", entries])
        with pytest.raises(ConfigError) as caught:
            validate_config(cfg)
        return str(caught.value)

    assert "eval_tasks.tasks[0].limit must be a whole number of examples >= 1" in refused(
        "eval_tasks=[{task: local_mc, limit: 0}]"
    )
    missing = refused("eval_tasks=[{dataset_uri: /nowhere/x.jsonl, icl_task_type: multiple_choice}]")
    assert "eval_tasks.tasks[0].dataset_uri '/nowhere/x.jsonl' does not exist" in missing
    assert "did you mean eval_tasks.tasks[0].num_fewshot?" in refused(
        "eval_tasks=[{task: local_mc, num_fewshots: 1}]"
    )
    assert "icl_task_type must be one of ['multiple_choice', 'language_modeling'], got 'schema'" in refused(
        f"eval_tasks=[{{dataset_uri: {setup['uri']}, icl_task_type: schema}}]"
    )
    assert "needs exactly one of task" in refused("eval_tasks=[{label: x}]")
    assert "labels name the metrics" in refused("eval_tasks=[{task: local_mc}, {task: local_mc}]")
    config = parse_eval_tasks([{"task": "local_mc", "num_fewshot": [0, 2]}])
    assert [(t.label, t.num_fewshot) for t in config.tasks] == [
        ("local_mc/0-shot", 0),
        ("local_mc/2-shot", 2),
    ]

    def prepared(entries: list) -> str:
        with pytest.raises(ConfigError) as caught:
            prepare_eval_tasks(entries, str(setup["source"]), 4)
        return str(caught.value)

    assert (
        "eval_tasks.tasks[0].num_fewshot: 9-shot asks for more examples than the few-shot pool of local_mc holds (8)"
        in (prepared([{"task": "local_mc", "num_fewshot": 9}]))
    )
    assert "(23); lower num_fewshot" in prepared(
        [{"dataset_uri": str(setup["uri"]), "icl_task_type": "multiple_choice", "num_fewshot": 24}]
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "choices": ["a", "b"], "gold": 2}\n')
    assert f"{bad}:1: gold must be the index of the right choice, got 2" in prepared(
        [{"dataset_uri": str(bad), "icl_task_type": "multiple_choice"}]
    )
    unknown = prepared([{"task": "local_mcq"}])  # a recipe's names: its key for task YAMLs, no presets
    assert unknown.startswith("eval_tasks.tasks[0].task: unknown task 'local_mcq' (closest: local_mc")
    assert unknown.endswith("local task YAMLs: eval_tasks.include_path: [DIR])")
    assert "--include-path" not in unknown and "presets" not in unknown
    bare = write_tiny_source(str(tmp_path / "bare"), vocab_size=BYTE_VOCAB)  # no tokenizer beside it
    with pytest.raises(
        ConfigError, match="no tokenizer found with model.path .*set eval_tasks.tokenizer=DIR"
    ):
        prepare_eval_tasks(["local_mc"], bare, 4)


def test_random_states_are_put_back():
    state = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    with kept_random_state():  # what lm-eval does before scoring
        random.seed(0), np.random.seed(1234), torch.manual_seed(1234)
        assert not torch.equal(torch.get_rng_state(), state[2])
    assert random.getstate() == state[0] and np.array_equal(np.random.get_state()[1], state[1])
    assert torch.equal(torch.get_rng_state(), state[2])


@pytest.fixture(scope="module")
def single_run(setup) -> Path:
    folder = setup["root"] / "one"
    assert train_main([PRUNE, *run_args(setup, folder)]) == 0
    return folder


@pytest.mark.slow
def test_pruning_run_logs_what_evaluate_scores(setup, single_run, tmp_path):
    logged = icl_metrics(single_run)
    steps = {step for step, _ in logged}
    assert steps == {0, 2, 4}
    assert (2, "icl/cloze/acc") not in logged and (
        4,
        "icl/cloze/perplexity",
    ) in logged  # every: 2, and the last
    for step in steps:  # the llm-foundry rows score as the lm-eval YAML over the same rows
        for metric in ("acc", "acc_norm"):
            assert logged[(step, f"icl/mc_uri/{metric}")] == logged[(step, f"icl/local_mc/{metric}")]

    pruned = tmp_path / "pruned"
    assert cli_main(["prune-model", str(single_run / "checkpoints" / "latest-rank0.pt"), str(pruned)]) == 0
    common = ["--device", "cpu", "--limit", "8", "--batch-size", "4", "--include-path", str(setup["tasks"])]

    def evaluate(model: Path, tasks: str, *extra: str) -> dict:
        out = tmp_path / f"{model.name}-{tasks}.json"
        assert (
            cli_main(["evaluate", str(model), "--tasks", tasks, "--output", str(out), *common, *extra]) == 0
        )
        return json.loads(out.read_text())["results"][tasks]

    mc = evaluate(pruned, "local_mc")
    cloze = evaluate(pruned, "user_cloze", "--num-fewshot", "2")
    for metric in ("acc", "acc_norm"):
        assert logged[(4, f"icl/local_mc/{metric}")] == mc[f"{metric},none"]
    assert logged[(4, "icl/cloze/acc")] == cloze["acc,none"]
    assert logged[(4, "icl/cloze/perplexity")] == pytest.approx(cloze["perplexity,none"], rel=1e-5)
    unpruned = evaluate(setup["source"], "user_cloze", "--num-fewshot", "2")  # the masks matter
    assert logged[(4, "icl/cloze/perplexity")] != pytest.approx(unpruned["perplexity,none"], rel=1e-3)

    report = tmp_path / "report"
    assert cli_main(["report", str(single_run), "--out", str(report)]) == 0
    assert (report / "icl.png").is_file() and (report / "icl_perplexity.png").is_file()
    assert "| cloze/perplexity |" in (report / "report.md").read_text()
