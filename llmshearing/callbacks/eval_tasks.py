"""The recipe's ``eval_tasks`` section: downstream tasks scored through lm-eval at evaluation intervals.

    eval_tasks:
      every: 1                  # score at every Nth evaluation (each task may set its own)
      batch_size: null          # lm-eval's batch size (default: device_eval_batch_size)
      tokenizer: null           # default: the tokenizer beside model.path
      include_path: []          # directories of extra lm-eval task YAMLs
      tasks:
        - {label: mc, task: local_mc, num_fewshot: 0, limit: 16}       # an lm-eval task by name
        - {label: cloze, dataset_uri: data/cloze.jsonl,                # llm-foundry's local JSONL
           icl_task_type: language_modeling, num_fewshot: 2, every: 2}

A bare list stands for ``tasks``, a bare name in it for ``{task: name}``. ``dataset_uri`` files hold llm-foundry's rows: ``{"query", "choices",
"gold"}`` for ``multiple_choice`` and ``{"context", "continuation"}`` for ``language_modeling``; their
few-shot examples are drawn from the same file, never the document being scored. This module checks
the section's shape and paths (`parse_eval_tasks`); the task names, the files' rows and the few-shot
pools are checked when the tasks load, before the model does (`llmshearing.callbacks.icl_eval`).
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from typing import Any

from llmshearing.config_base import ConfigError, check_int, is_number

KEY = "eval_tasks"
TASK_TYPES = ("multiple_choice", "language_modeling")
LIST_STANDS_FOR = "tasks"  # a bare list is the section's tasks
SECTION_KEYS = ("tasks", "every", "batch_size", "tokenizer", "include_path")
TASK_KEYS = ("label", "task", "dataset_uri", "icl_task_type", "num_fewshot", "limit", "every", "include_path")
_LABEL = re.compile(r"[A-Za-z0-9_.\-]+")


@dataclass(frozen=True)
class EvalTask:
    """One task to score: ``task`` (an lm-eval name) or ``dataset_uri`` (a JSONL with ``icl_task_type``)."""

    key: str  # where it is written in the recipe, e.g. eval_tasks.tasks[1]
    label: str  # metrics are logged as icl/<label>/<metric>
    task: str | None
    dataset_uri: str | None
    icl_task_type: str | None
    num_fewshot: int
    limit: float | None
    every: int
    include_path: str | None


@dataclass(frozen=True)
class EvalTasksConfig:
    tasks: tuple[EvalTask, ...]
    batch_size: int | None
    tokenizer: str | None
    include_paths: tuple[str, ...]


def _unknown(key: str, name: Any, valid: tuple[str, ...]) -> ConfigError:
    close = difflib.get_close_matches(str(name), valid, n=1)
    hint = f"; did you mean {key}.{close[0]}?" if close else f"; valid keys: {list(valid)}"
    return ConfigError(f"unknown config key '{key}.{name}'{hint}")


def _limit(key: str, value: Any) -> float | None:
    if value is None:
        return None
    if not is_number(value) or value <= 0 or (value >= 1 and value != int(value)):
        raise ConfigError(
            f"{key} must be a whole number of examples >= 1 or a fraction in (0, 1) of the task's examples "
            f"(or null for all), got {value!r}"
        )
    return float(value)


def _path(key: str, value: Any, check_paths: bool, kind: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key} must be a path, got {value!r}")
    if check_paths:
        exists = os.path.isdir(value) if kind == "dir" else os.path.exists(value)
        if not exists:
            what = "a directory of lm-eval task YAMLs" if kind == "dir" else "a file"
            raise ConfigError(f"{key} {value!r} does not exist; give {what} (an absolute path is safest)")
    return os.path.abspath(value)


def _shots(key: str, value: Any) -> list[int]:
    """``num_fewshot``: a count, or llm-foundry's list of counts (one evaluation each)."""
    values = value if isinstance(value, list) else [value]
    if not values:
        raise ConfigError(f"{key} must be an integer >= 0 or a list of them, got []")
    return [check_int(key, v, 0) for v in values]


def _entry(index: int, raw: Any, every: int, check_paths: bool) -> list[EvalTask]:
    key = f"{KEY}.tasks[{index}]"
    if isinstance(raw, str):  # a bare name: that lm-eval task, 0-shot, every example
        raw = {"task": raw}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{key} must be a mapping (label, task or dataset_uri, num_fewshot, ...), got {raw!r}"
        )
    for name in raw:
        if name not in TASK_KEYS:
            raise _unknown(key, name, TASK_KEYS)
    task, uri, kind = raw.get("task"), raw.get("dataset_uri"), raw.get("icl_task_type")
    include = raw.get("include_path")
    if (task is None) == (uri is None):
        raise ConfigError(
            f"{key} needs exactly one of task (an lm-eval task name) and dataset_uri (a local JSONL file)"
        )
    if include is not None:
        include = _path(f"{key}.include_path", include, check_paths, "any")
    if task is not None:
        if not isinstance(task, str) or not task:
            raise ConfigError(f"{key}.task must be an lm-eval task name, got {task!r}")
        if kind is not None:
            raise ConfigError(
                f"{key}.icl_task_type goes with dataset_uri; the lm-eval task {task!r} has its own output type"
            )
    else:
        uri = _path(f"{key}.dataset_uri", uri, check_paths, "file")
        if include is not None:
            raise ConfigError(f"{key}.include_path goes with task (a YAML's task name), not with dataset_uri")
        if kind not in TASK_TYPES:
            raise ConfigError(f"{key}.icl_task_type must be one of {list(TASK_TYPES)}, got {kind!r}")
    default_label = task if task is not None else os.path.splitext(os.path.basename(uri))[0]
    label = raw.get("label", default_label)
    if not isinstance(label, str) or not _LABEL.fullmatch(label):
        raise ConfigError(
            f"{key}.label must be letters, digits, '_', '.' or '-' (it names the metrics), got {label!r}"
        )
    shots = _shots(f"{key}.num_fewshot", raw.get("num_fewshot", 0))
    limit = _limit(f"{key}.limit", raw.get("limit"))
    own_every = check_int(f"{key}.every", raw.get("every", every), 1)
    return [
        EvalTask(
            key=key,
            label=label if len(shots) == 1 else f"{label}/{n}-shot",
            task=task,
            dataset_uri=uri,
            icl_task_type=kind,
            num_fewshot=n,
            limit=limit,
            every=own_every,
            include_path=include,
        )
        for n in shots
    ]


def parse_eval_tasks(section: Any, check_paths: bool = True) -> EvalTasksConfig | None:
    """The checked ``eval_tasks`` section (None when it is absent); ``ConfigError`` names the key at fault."""
    if section is None or section is False:
        return None
    if isinstance(section, list):
        section = {LIST_STANDS_FOR: section}
    if not isinstance(section, dict):
        raise ConfigError(f"{KEY} must be a list of tasks or a mapping with tasks: [...], got {section!r}")
    for name in section:
        if name not in SECTION_KEYS:
            raise _unknown(KEY, name, SECTION_KEYS)
    entries = section.get("tasks")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(
            f"{KEY}.tasks must be a non-empty list of tasks, e.g. [{{task: local_mc, num_fewshot: 0}}], got {entries!r}"
        )
    every = check_int(f"{KEY}.every", section.get("every", 1), 1)
    batch_size = section.get("batch_size")
    if batch_size is not None:
        check_int(f"{KEY}.batch_size", batch_size, 1)
    tokenizer = section.get("tokenizer")
    if tokenizer is not None:
        tokenizer = _path(f"{KEY}.tokenizer", tokenizer, check_paths, "dir")
    includes = section.get("include_path") or []
    includes = includes if isinstance(includes, list) else [includes]
    include_paths = tuple(_path(f"{KEY}.include_path", p, check_paths, "dir") for p in includes)
    tasks = [task for i, raw in enumerate(entries) for task in _entry(i, raw, every, check_paths)]
    seen: dict[str, str] = {}
    for task in tasks:
        if task.label in seen:
            raise ConfigError(
                f"{task.key}.label {task.label!r} is already the label of {seen[task.label]}: labels name the "
                "metrics (icl/<label>/<metric>) and must differ"
            )
        seen[task.label] = task.key
    return EvalTasksConfig(tuple(tasks), batch_size, tokenizer, include_paths)
