"""The README.md model card `convert composer-to-hf` writes into the HF directory."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import write_tiny_source

from llmshearing.checkpoint.reading import load_checkpoint
from llmshearing.cli import main as cli_main


def _header(text: str) -> list[str]:
    lines = text.splitlines()
    assert lines[0] == "---"
    return lines[1 : lines.index("---", 1)]


def test_a_project_checkpoint_gets_its_shape_and_how_to_load_it(tmp_path):
    source = write_tiny_source(str(tmp_path / "source"))
    out = tmp_path / "exported"
    assert cli_main(["convert", "composer-to-hf", source, str(out), "--dtype", "fp32"]) == 0
    card = (out / "README.md").read_text()
    header = _header(card)
    assert "library_name: transformers" in header and "- llmshearing" in header
    assert "- structured-pruning" not in header  # nothing says it was pruned
    assert "| layers | 3 |" in card and "| attention heads (KV heads) | 4 (2) |" in card
    config, _, _ = load_checkpoint(source)
    assert f"| parameters | {config.num_params():,} (" in card
    assert 'AutoModelForCausalLM.from_pretrained("exported")' in card
    assert "## How it was made" not in card  # no run folder: nothing is guessed


def test_a_run_checkpoint_gets_method_data_tokens_and_downstream_results(tmp_path):
    source = Path(write_tiny_source(str(tmp_path / "source")))
    config, state, hf_config = load_checkpoint(source)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    payload = {"state": {"model": {f"model.{k}": v for k, v in state.items()}}}
    torch.save(payload, run / "checkpoints" / "ep0-ba4-rank0.pt")
    train = {
        "model": {"path": str(source), "distillation": {"teacher": str(source), "alpha": 0.5}},
        "global_train_batch_size": 8,
        "max_seq_len": 16,
    }
    description = {"model": config.to_dict(), "hf_config": hf_config, "l0_module": None, "train": train}
    (run / "config.json").write_text(json.dumps(description))
    with open(run / "metrics.jsonl", "w") as log:
        log.write(
            json.dumps({"step": 2, "data/weight/code": 0.5, "data/weight/docs": 0.5, "data/loss/code": 3.0})
            + "\n"
        )
        log.write(
            json.dumps({"step": 4, "data/weight/code": 0.3, "data/weight/docs": 0.7, "data/loss/code": 2.5})
            + "\n"
        )
    results = {
        "results": {"local_mc": {"alias": "local_mc", "acc,none": 0.625, "acc_stderr,none": 0.1}},
        "n-shot": {"local_mc": 0},
        "llmshearing": {"presets": {}},
    }
    (run / "downstream.json").write_text(json.dumps(results))
    (run / "unrelated.json").write_text(json.dumps({"results": "not ours"}))

    out = tmp_path / "hf"
    assert (
        cli_main(["convert", "composer-to-hf", str(run / "checkpoints" / "ep0-ba4-rank0.pt"), str(out)]) == 0
    )
    card = (out / "README.md").read_text()
    assert f"- source model: `{source}`" in card
    assert "- method: training of the dense model (continued pretraining)" in card
    assert f"- distillation from `{source}` (alpha 0.5)" in card
    assert "- tokens seen: 512 (4 batches of 8 x 16 tokens)" in card
    assert "| code | 0.5000 | 0.3000 | 2.5000 |" in card and "| docs | 0.5000 | 0.7000 | - |" in card
    assert "| downstream.json | local_mc | 0 | acc,none | 0.6250 |" in card
    assert "unrelated.json" not in card
