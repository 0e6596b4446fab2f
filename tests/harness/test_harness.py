"""`llmshearing evaluate MODEL --tasks ...`: lm-evaluation-harness on the project's checkpoints.

A tiny random decoder with a byte-level tokenizer (every text maps to tokens) is scored on the shipped local
tasks and on a task directory in the user's format (``dataset_path: json``); the scores must equal lm-eval's
own CLI on the exported HF directory, to the last digit, and those of the same weights read from any form the
project reads. Bad input fails with one line, exit 2, before the model's weights load.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import user_task_dir, write_byte_source, write_byte_tokenizer, write_tiny_source

from llmshearing.cli import main as cli_main
from llmshearing.harness import runner
from llmshearing.harness.presets import PRESETS

TASKS = runner.TASKS_DIR


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory) -> Path:
    """A random tiny project checkpoint whose vocabulary covers the byte tokenizer saved beside it."""
    return write_byte_source(tmp_path_factory.mktemp("harness") / "source", max_seq_len=512)


def metrics(results: dict, task: str) -> dict[str, float]:
    return {k: v for k, v in results["results"][task].items() if "," in k and isinstance(v, (int, float))}


def run_ours(model: Path, out: Path, *extra: str) -> dict:
    code = cli_main(["evaluate", str(model), "--output", str(out), "--device", "cpu", *extra])
    assert code == 0
    return json.loads(out.read_text())


def test_shipped_tasks_are_well_formed():
    for stem in ("local_mc", "local_cloze"):
        for split, count in (("train", 8), ("test", 24)):
            rows = [json.loads(line) for line in (TASKS / f"{stem}_{split}.jsonl").read_text().splitlines()]
            assert len(rows) == count
            if stem == "local_mc":
                assert all(len(r["choices"]) == 4 and 0 <= r["label"] < 4 for r in rows)
                assert len({r["label"] for r in rows}) == 4  # the answer is not always in one place
            else:
                assert all(len(r["text"].split(" ")) >= 6 for r in rows)


def test_task_spec_expands_presets_and_refuses_conflicts():
    requests, presets = runner.parse_task_spec("local_mc, sheared-llama")
    assert [p.name for p in presets] == ["sheared-llama"]
    by_name = {r.name: r for r in requests}
    assert by_name["local_mc"].num_fewshot is None
    assert by_name["arc_challenge"].num_fewshot == 25 and by_name["hellaswag"].num_fewshot == 10
    assert by_name["mmlu"].num_fewshot == 5 and by_name["boolq"].num_fewshot == 32
    assert len(requests) == 12 and len(PRESETS["sheared-llama"].tasks) == 11
    with pytest.raises(ValueError, match="winogrande with different few-shot counts"):
        runner.parse_task_spec("sheared-llama,minitron")  # winogrande: 0-shot in one, 5-shot in the other
    with pytest.raises(ValueError, match="empty name"):
        runner.parse_task_spec("local_mc,,local_cloze")
    local = runner.task_manager([], ["local_mc"])  # the shipped tasks only: indexed at once
    assert set(local.all_tasks) == {"local_mc", "local_cloze"}
    with pytest.raises(KeyError, match="unknown task or preset 'sheared-lama' \\(closest: sheared-llama"):
        runner.check_names(local, runner.parse_task_spec("sheared-lama")[0])


def test_preset_average_is_the_mean_of_the_chosen_metrics():
    preset = PRESETS["minitron"]
    results = {"results": {}, "groups": {"mmlu": {"acc,none": 0.5, "acc_stderr,none": 0.01}}}
    for i, task in enumerate(preset.tasks):
        if task.task != "mmlu":
            results["results"][task.task] = {task.metric: 0.1 * i, "other,none": 1.0}
    summary = runner.preset_summary(results, preset)
    expected = [50.0 if t.task == "mmlu" else 10.0 * i for i, t in enumerate(preset.tasks)]
    assert summary["average"] == pytest.approx(sum(expected) / len(expected))
    del results["results"]["gsm8k"]
    assert runner.preset_summary(results, preset)["average"] is None  # a missing task: no average


@pytest.mark.slow
def test_scores_equal_lm_eval_cli_on_the_export(byte_model, tmp_path):
    """Project checkpoint, its fp32 HF export and lm-eval's own `--model hf` CLI: identical results."""
    tasks_dir = user_task_dir(tmp_path / "user_tasks")
    common = [
        "--tasks",
        "local_mc,local_cloze,user_cloze",
        "--num-fewshot",
        "2",
        "--limit",
        "12",
        "--batch-size",
        "4",
    ]
    ours = run_ours(byte_model, tmp_path / "ours.json", *common, "--include-path", str(tasks_dir))

    hf = tmp_path / "hf"
    assert cli_main(["convert", "composer-to-hf", str(byte_model), str(hf), "--dtype", "fp32"]) == 0
    from_hf = run_ours(hf, tmp_path / "from_hf.json", *common, "--include-path", str(tasks_dir))

    cli_tasks = (
        tmp_path / "cli_tasks"
    )  # lm-eval's CLI takes one --include_path: the shipped tasks and the user's
    shutil.copytree(TASKS, cli_tasks, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(tasks_dir / "user_cloze.yaml", cli_tasks)
    cli_out = tmp_path / "cli"
    command = [
        sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={hf},dtype=float32",
        "--tasks", "local_mc,local_cloze,user_cloze", "--num_fewshot", "2", "--limit", "12", "--batch_size", "4",
        "--device", "cpu", "--include_path", str(cli_tasks), "--output_path", str(cli_out),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    reference = json.loads(next(cli_out.rglob("results_*.json")).read_text())

    for task in ("local_mc", "local_cloze", "user_cloze"):
        expected = metrics(reference, task)
        assert set(expected) >= {"acc,none"} and len(expected) == 4  # value and stderr of two metrics
        assert metrics(ours, task) == expected, task  # to the last digit
        assert metrics(from_hf, task) == expected, task
        assert ours["n-shot"][task] == 2 and ours["n-samples"][task] == {"original": 24, "effective": 12}
    assert ours["llmshearing"]["dtype"] == "fp32" and ours["llmshearing"]["seeds"] == [0, 1234, 1234, 1234]


@pytest.mark.slow
def test_a_composer_checkpoint_scores_as_its_weights(byte_model, tmp_path, capsys):
    """A Composer checkpoint of a (zero learning rate) run scores exactly as the checkpoint it started from."""
    from composer import Trainer

    from llmshearing.checkpoint.reading import load_checkpoint
    from llmshearing.models.composer_model import ComposerLlama

    config, state, hf_config = load_checkpoint(byte_model)
    model = ComposerLlama(config)
    model.model.load_state_dict(state)
    rows = [{"input_ids": torch.randint(0, 256, (16,))} for _ in range(4)]
    run = tmp_path / "run"
    trainer = Trainer(
        model=model,
        train_dataloader=torch.utils.data.DataLoader(rows, batch_size=2),
        max_duration="1ba",
        optimizers=torch.optim.SGD(model.parameters(), lr=0.0),
        save_folder=str(run / "checkpoints"),
        save_interval="1ba",
        device="cpu",
        progress_bar=False,
        log_to_console=False,
    )
    trainer.fit()
    trainer.close()
    run_config = {
        "model": config.to_dict(),
        "hf_config": hf_config,
        "train": {"model": {"path": str(byte_model)}},
    }
    (run / "config.json").write_text(json.dumps(run_config))

    common = ["--tasks", "local_mc", "--limit", "8", "--batch-size", "8"]
    source = run_ours(byte_model, tmp_path / "source.json", *common)
    continued = run_ours(run / "checkpoints" / "latest-rank0.pt", tmp_path / "continued.json", *common)
    assert metrics(continued, "local_mc") == metrics(source, "local_mc")
    table = capsys.readouterr().out
    assert "local_mc" in table and "acc_norm,none" in table and "stderr" in table


def test_bad_options_are_refused_before_anything_loads(byte_model, tmp_path, capsys):
    out = tmp_path / "out.json"
    cases = [
        (["--limit", "0"], "--limit must be a whole number of examples >= 1 or a fraction in (0, 1), got 0"),
        (["--limit", "2.5"], "--limit must be a whole number"),
        (["--num-fewshot", "-1"], "--num-fewshot must be 0 or more"),
        (["--batch-size", "0"], "--batch-size must be a whole number >= 1 or 'auto'"),
        (["--tasks", ""], "has an empty name"),
        (["--output", str(tmp_path)], f"--output {tmp_path} is a directory"),
        (["--output", str(tmp_path / "no" / "x.json")], "folder"),
        (["--split", "test"], "--split: only for the loss evaluation"),
        (["--include-path", str(tmp_path / "none")], "is not a directory of task YAMLs"),
    ]
    for extra, message in cases:
        args = ["evaluate", str(byte_model), "--tasks", "local_mc", "--output", str(out), *extra]
        if "--output" in extra:
            args = ["evaluate", str(byte_model), "--tasks", "local_mc", *extra]
        assert cli_main(args) == 2, extra
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, (extra, err)
    assert not out.exists()
    assert cli_main(["evaluate", str(byte_model), str(tmp_path), "--num-fewshot", "2"]) == 2
    assert "--num-fewshot: only with --tasks" in capsys.readouterr().err


def test_bad_models_and_tasks_are_named(byte_model, tmp_path, capsys):
    def error(*args: str) -> str:
        assert cli_main(["evaluate", *args, "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        return err

    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    assert "config.json" in error(str(not_a_model), "--tasks", "local_mc")
    assert "does not exist" in error(str(tmp_path / "missing"), "--tasks", "local_mc")

    # a tokenizer with more tokens than the model has embeddings
    small = tmp_path / "small"
    write_tiny_source(str(small), vocab_size=97)
    write_byte_tokenizer(small)
    assert "has 257 tokens but the model" in error(str(small), "--tasks", "local_mc")
    (small / "tokenizer.json").unlink()
    (small / "tokenizer_config.json").unlink()
    assert "pass --tokenizer DIR" in error(str(small), "--tasks", "local_mc")

    # a YAML that does not parse; a data file that does not exist; a few-shot count beyond the pool
    bad = tmp_path / "bad_yaml"
    bad.mkdir()
    (bad / "broken.yaml").write_text("task: broken\ndoc_to_text: [unclosed\n")
    assert "broken.yaml: not a valid task YAML" in error(
        str(byte_model), "--tasks", "local_mc", "--include-path", str(bad)
    )
    missing = user_task_dir(tmp_path / "missing_data")
    text = (
        (missing / "user_cloze.yaml")
        .read_text()
        .replace(str(TASKS / "local_cloze_test.jsonl"), "/nowhere/x.jsonl")
    )
    (missing / "user_cloze.yaml").write_text(text)
    err = error(str(byte_model), "--tasks", "user_cloze", "--include-path", str(missing))
    assert "task user_cloze" in err and "data file /nowhere/x.jsonl not found" in err
    err = error(str(byte_model), "--tasks", "local_mc", "--num-fewshot", "9")
    assert "task local_mc: 9-shot asks for more examples than its few-shot pool holds (8)" in err


def test_pruning_checkpoint_is_refused(byte_model, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    pruning = tmp_path / "pruning"
    shutil.copytree(byte_model, pruning)
    weights = load_file(pruning / "model.safetensors")
    weights["l0_module.masks.head.z_loga"] = torch.zeros(3, 4)
    save_file(weights, pruning / "model.safetensors")
    code = cli_main(["evaluate", str(pruning), "--tasks", "local_mc", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and ("prune-model" in err or "l0_module" in err) and err.count("\n") == 1, err


def test_hub_task_without_data_fails_at_once_naming_the_task(byte_model, tmp_path, monkeypatch, capsys):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", datasets.config.HF_HUB_OFFLINE)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", huggingface_hub.constants.HF_HUB_OFFLINE)
    hub = tmp_path / "hub_tasks"
    hub.mkdir()
    (hub / "hub_mc.yaml").write_text(
        "task: hub_mc\ndataset_path: llmshearing-tests/no-such-dataset\noutput_type: multiple_choice\n"
        "test_split: test\ndoc_to_text: q\ndoc_to_choice: ['a', 'b']\ndoc_to_target: 0\n"
    )
    manager = runner.task_manager([str(hub)], ["hub_mc"])
    requests, _ = runner.parse_task_spec("hub_mc")
    assert runner.check_local_data(manager, requests)  # it reads the Hub
    runner.go_offline()
    started = time.monotonic()
    with pytest.raises(ValueError) as caught:
        runner.load_tasks(manager, requests, offline=True)
    assert time.monotonic() - started < 10
    message = str(caught.value)
    assert message.startswith(
        "task hub_mc: its data (llmshearing-tests/no-such-dataset on the Hugging Face Hub)"
    )
    assert "dataset_path: json" in message and "--include-path DIR" in message

    code = cli_main(
        ["evaluate", str(byte_model), "--tasks", "hub_mc", "--include-path", str(hub), "--device", "cpu"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "task hub_mc: its data" in err and err.count("\n") == 1


@pytest.mark.slow
def test_unknown_names_get_the_closest_known_ones(byte_model, capsys):
    assert cli_main(["evaluate", str(byte_model), "--tasks", "local_mc,hellaswagg", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "unknown task or preset 'hellaswagg' (closest: hellaswag" in err and err.count("\n") == 1


def test_loss_evaluation_is_unchanged_without_tasks(byte_model, capsys):
    assert cli_main(["evaluate", str(byte_model)]) == 2
    assert "give DATA" in capsys.readouterr().err
