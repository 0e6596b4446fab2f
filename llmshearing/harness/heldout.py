"""Downstream tasks built from a prepared MDS split (the held-out ``test`` split), for lm-eval.

Two tasks over the decoded text of the split's sequences, written as lm-eval YAMLs over local JSONL files
(``llmshearing evaluate MODEL --tasks heldout_cloze,heldout_mc --include-path DIR``, or ``eval_tasks``):

* ``heldout_cloze``: LAMBADA's format, ``{"text": passage}`` whose last word (after a space) is the target;
  scored as lm-eval scores ``lambada_openai`` (accuracy of the greedy continuation, perplexity).
* ``heldout_mc``: pick the true continuation of a passage among four, the others the continuations of other
  sequences of the same domain at the same length; scored as PIQA or HellaSwag (``acc``, ``acc_norm``).

One item per sequence (a sequence too short for an item gives none), domains interleaved; the first
``fewshot`` items of each task form its few-shot pool (``train``), the rest its ``test`` split. The answer's
place among the choices is drawn from ``seed``.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CLOZE, MC = "heldout_cloze", "heldout_mc"
# what a report shows of them: name -> (task, lm-eval metric key)
METRICS = {"cloze acc": (CLOZE, "acc,none"), "mc acc": (MC, "acc,none"), "mc acc_norm": (MC, "acc_norm,none")}
_TARGET = re.compile(r" ([A-Za-z]{3,})(?=[^A-Za-z0-9_]|$)")  # a word after a space, as LAMBADA splits them
CLOZE_CHARS = (120, 600)  # the passage: at least / at most this many characters, up to its target word
MC_CONTEXT, MC_CONTINUATION = 240, 80  # characters of context and of each choice (cut at spaces)


def cloze_item(text: str) -> dict[str, str] | None:
    """The longest passage of ``text`` within ``CLOZE_CHARS`` ending in a word after a space."""
    low, high = CLOZE_CHARS
    ends = [m.end(1) for m in _TARGET.finditer(text[:high]) if m.end(1) >= low]
    return {"text": text[: ends[-1]]} if ends else None


_WORD_END = re.compile(r"\S ")


def _cut(text: str, start: int, length: int) -> tuple[str, int] | None:
    """``text[start:end]``, ``end`` the first space after a word at or after ``start + length`` (so a cut
    never falls inside a run of spaces); None without one."""
    match = _WORD_END.search(text, max(start, start + length - 1))
    if match is None:
        return None
    return text[start : match.start() + 1], match.start() + 1


def mc_parts(text: str) -> tuple[str, str] | None:
    """(context, continuation) of ``text``: both cut at spaces, the space between them dropped."""
    context = _cut(text, 0, MC_CONTEXT)
    if context is None:
        return None
    continuation = _cut(text, context[1] + 1, MC_CONTINUATION)
    if continuation is None or not continuation[0].strip():
        return None
    return context[0], continuation[0]


def decoded_texts(data_dir: str, split: str, tokenizer: Any, max_per_domain: int | None) -> list[list[str]]:
    """The decoded sequences of each domain of ``split`` (at most ``max_per_domain`` each)."""
    from llmshearing.data.layout import TokenSamples, domain_dir, split_domains

    texts = []
    for domain in split_domains(data_dir, split):
        with TokenSamples(domain_dir(data_dir, split, domain)) as samples:
            count = len(samples) if max_per_domain is None else min(len(samples), max_per_domain)
            texts.append([tokenizer.decode(samples.row(i).tolist()) for i in range(count)])
    return texts


def _interleave(per_domain: Sequence[Sequence[Any]]) -> list[Any]:
    longest = max((len(items) for items in per_domain), default=0)
    return [items[i] for i in range(longest) for items in per_domain if i < len(items)]


def build_items(texts: Sequence[Sequence[str]], seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """Cloze and multiple-choice items from each domain's texts (domains interleaved)."""
    rng = random.Random(seed)
    cloze = [[item for text in domain if (item := cloze_item(text))] for domain in texts]
    mc = []
    for domain in texts:
        parts = [p for text in domain if (p := mc_parts(text))]
        items = []
        for i, (context, truth) in enumerate(parts):
            others = [parts[j][1] for j in range(len(parts)) if j != i and parts[j][1] != truth]
            if len(others) < 3:
                continue
            choices = rng.sample(others, 3)
            label = rng.randrange(4)
            choices.insert(label, truth)
            items.append({"context": context, "choices": choices, "label": label})
        mc.append(items)
    return {CLOZE: _interleave(cloze), MC: _interleave(mc)}


def _yaml(task: str, files: dict[str, Path], fewshot: bool) -> str:
    splits = "".join(f"    {split}: {path}\n" for split, path in files.items())
    head = f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n{splits}test_split: test\n"
    if fewshot:
        head += "training_split: train\n"
    if task == CLOZE:
        body = (
            "output_type: loglikelihood\n"
            "doc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\n"
            "doc_to_target: \"{{' ' + text.split(' ')[-1]}}\"\n"
            'target_delimiter: ""\n'
            "metric_list:\n  - {metric: perplexity, aggregation: perplexity, higher_is_better: false}\n"
            "  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
        )
    else:
        body = (
            "output_type: multiple_choice\n"
            "doc_to_text: context\ndoc_to_choice: choices\ndoc_to_target: label\n"
            'target_delimiter: " "\n'
            "metric_list:\n  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
            "  - {metric: acc_norm, aggregation: mean, higher_is_better: true}\n"
        )
    return head + body + "metadata:\n  version: 1.0\n"


def build_heldout_tasks(
    data_dir: str,
    tokenizer_dir: str,
    out: str,
    split: str = "test",
    max_per_domain: int | None = 64,
    fewshot: int = 4,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, int]:
    """Write ``heldout_cloze`` and ``heldout_mc`` (YAML + JSONL) into ``out``; returns each task's test items.

    ``ValueError`` when the split gives fewer than ``fewshot + 1`` items of a task (sequences too short)."""
    from llmshearing.harness.model import load_tokenizer
    from llmshearing.io.staging import staged_dir

    texts = decoded_texts(data_dir, split, load_tokenizer(Path(tokenizer_dir)), max_per_domain)
    items = build_items(texts, seed)
    for task, rows in items.items():
        if len(rows) <= fewshot:
            raise ValueError(
                f"{data_dir} ({split} split) gives {len(rows)} {task} items, fewer than the {fewshot} few-shot "
                f"ones and one to test: prepare longer sequences (--seq-len) or more of them (--test-seqs)"
            )
    final = Path(out).resolve()
    with staged_dir(final, overwrite=overwrite) as staging:
        for task, rows in items.items():
            parts = {"train": rows[:fewshot], "test": rows[fewshot:]} if fewshot else {"test": rows}
            for part, part_rows in parts.items():
                text = "".join(json.dumps(row) + "\n" for row in part_rows)
                (Path(staging) / f"{task}_{part}.jsonl").write_text(text, encoding="utf-8")
            files = {part: final / f"{task}_{part}.jsonl" for part in parts}
            (Path(staging) / f"{task}.yaml").write_text(_yaml(task, files, bool(fewshot)), encoding="utf-8")
    return {task: len(rows) - fewshot for task, rows in items.items()}


def score_heldout(
    model: str,
    task_dir: str,
    batch_size: int = 8,
    limit: int | None = None,
    tokenizer: str | None = None,
    device: str | None = None,
) -> dict[str, float]:
    """``{"cloze acc", "mc acc", "mc acc_norm"}`` of a checkpoint on the tasks in ``task_dir``: 0-shot, every
    test item (the first ``limit`` of each task when given), through `llmshearing evaluate --tasks` (which
    prints its table); ``tokenizer`` and ``device`` as its ``--tokenizer`` and ``--device``."""
    from llmshearing.harness.runner import evaluate_tasks

    results = evaluate_tasks(
        model,
        f"{CLOZE},{MC}",
        limit=limit,
        batch_size=str(batch_size),
        device=device,
        include_paths=[task_dir],
        tokenizer=tokenizer,
    )
    return {name: float(results["results"][task][key]) for name, (task, key) in METRICS.items()}
