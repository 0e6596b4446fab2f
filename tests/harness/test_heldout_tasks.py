"""Downstream tasks built from a held-out split: LAMBADA-format cloze and pick-the-true-continuation.

A tiny test split of byte-tokenised English (two domains) goes in; lm-eval YAMLs over JSONL come out, and
`llmshearing evaluate --tasks heldout_cloze,heldout_mc --include-path DIR` scores them.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from conftest import byte_split, write_byte_source

from llmshearing.cli import main as cli_main
from llmshearing.harness.heldout import CLOZE, MC, build_heldout_tasks, build_items, cloze_item, mc_parts


def test_items_have_the_formats_of_lambada_and_of_multiple_choice():
    text = (
        "The cat sat on the mat because it was warm, and then it slept for a long while near the fire. " * 8
    )
    item = cloze_item(text)
    assert item is not None and 120 <= len(item["text"]) <= 600 and text.startswith(item["text"])
    target = item["text"].split(" ")[-1]
    assert target.isalpha() and len(target) >= 3  # the word LAMBADA's doc_to_target takes
    context, continuation = mc_parts(text)
    assert text.startswith(context + " " + continuation)
    assert cloze_item("short text") is None and mc_parts("short text") is None
    texts = [[f"{i} " + text.replace("cat", f"cat{i}") for i in range(5)], ["x"]]
    items = build_items(texts, seed=0)
    assert len(items[CLOZE]) == 5 and len(items[MC]) == 5
    for row in items[MC]:
        assert len(set(row["choices"])) == 4 and 0 <= row["label"] < 4
    assert len({row["label"] for row in items[MC]}) > 1  # the answer is not always in one place


def test_built_tasks_run_through_evaluate(tmp_path, monkeypatch):
    source = tmp_path / "source"
    write_byte_source(source, max_seq_len=1024)
    data = byte_split(tmp_path / "mds", source)
    counts = build_heldout_tasks(str(data), str(source), str(tmp_path / "tasks"), fewshot=2)
    assert counts == {CLOZE: 18, MC: 18}
    for task in (CLOZE, MC):
        rows = [
            json.loads(line) for line in (tmp_path / "tasks" / f"{task}_test.jsonl").read_text().splitlines()
        ]
        assert len(rows) == 18
    with pytest.raises(ValueError, match="fewer than the 30 few-shot ones"):
        build_heldout_tasks(str(data), str(source), str(tmp_path / "none"), fewshot=30)
    assert not (tmp_path / "none").exists()

    out = tmp_path / "scores.json"
    args = ["evaluate", str(source), "--tasks", f"{CLOZE},{MC}", "--include-path", str(tmp_path / "tasks")]
    # no subprocess (lm-eval's environment dump runs pip, lscpu, nvidia-smi, git...) and no fork (its
    # bootstrapped perplexity stderr forks a worker pool, which can block for ever in a threaded process)
    started: list[object] = []
    real_popen, real_fork = subprocess.Popen, os.fork
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: started.append(a[0]) or real_popen(*a, **k))
    monkeypatch.setattr(os, "fork", lambda: started.append("fork") or real_fork())
    assert cli_main([*args, "--device", "cpu", "--limit", "4", "--output", str(out)]) == 0
    monkeypatch.undo()
    assert started == []
    assert "DISABLE_MULTIPROC" not in os.environ  # the switch is put back
    results = json.loads(out.read_text())["results"]
    assert set(results[CLOZE]) >= {"acc,none", "perplexity,none"} and set(results[MC]) >= {
        "acc,none",
        "acc_norm,none",
    }
    assert json.loads(out.read_text())["n-shot"] == {CLOZE: 0, MC: 0}
