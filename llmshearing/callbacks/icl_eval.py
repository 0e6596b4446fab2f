"""``InContextEval``: the recipe's ``eval_tasks`` scored through lm-eval at evaluation intervals.

The tasks load once, before the model (`prepare_eval_tasks`: names, data files and few-shot pools are
checked there, each fault a ``ConfigError`` naming its key). At the end of an evaluation the model being
trained is scored as it stands: in eval mode, so a pruning run's L0 module gives its deterministic masks
(as the loss evaluation does) and a continued run is the dense model, under the run's precision. The
scoring is lm-eval's ``evaluate`` over `llmshearing.harness.live.RankedLM`, with the seeds of
`llmshearing evaluate --tasks` (the random states of training are put back afterwards). In a distributed
run each process scores a share of a zero-shot task's documents (lm-eval draws few-shot examples from one
random stream in document order, so a few-shot task, or one with fewer documents than processes, is scored
whole by every process) and rank 0's aggregate is broadcast, so every process logs the same
``icl/<label>/<metric>`` values; ``wall_clock/icl`` is the seconds the scoring took.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from composer.core import Callback, State
from composer.loggers import Logger

from llmshearing.callbacks.eval_tasks import KEY, EvalTask, EvalTasksConfig
from llmshearing.config_base import ConfigError, is_number

# the seeds `llmshearing evaluate --tasks` (and lm-eval's CLI) use: python, numpy, torch, few-shot sampler
SEEDS = (0, 1234, 1234, 1234)
FIELDS = {"multiple_choice": ("query", "choices", "gold"), "language_modeling": ("context", "continuation")}


@dataclass
class LoadedTask:
    spec: EvalTask
    name: str  # the lm-eval task (or group) name its results are filed under
    task_dict: dict[str, Any]  # what TaskManager.load returns: {"tasks": ..., "groups": ...}


@dataclass
class PreparedTasks:
    tasks: list[LoadedTask]
    tokenizer: str
    batch_size: int


def _lm_eval_config(spec: EvalTask) -> dict[str, Any]:
    """The lm-eval task config of a ``dataset_uri`` task (few-shot examples from the same file)."""
    base = {
        "task": f"icl_{spec.label.replace('/', '_')}",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": spec.dataset_uri}},
        "test_split": "test",
        "fewshot_split": "test",  # lm-eval then leaves the scored document out of its own shots
        "target_delimiter": " ",
        "metadata": {"version": 1.0},
    }
    if spec.icl_task_type == "multiple_choice":
        metrics = ["acc", "acc_norm"]
        base.update(
            output_type="multiple_choice", doc_to_text="query", doc_to_choice="choices", doc_to_target="gold"
        )
    else:
        metrics = ["acc", "perplexity"]
        base.update(output_type="loglikelihood", doc_to_text="context", doc_to_target="continuation")
    aggregation = {"acc": "mean", "acc_norm": "mean", "perplexity": "perplexity"}
    base["metric_list"] = [
        {"metric": m, "aggregation": aggregation[m], "higher_is_better": m != "perplexity"} for m in metrics
    ]
    return base


def check_rows(spec: EvalTask) -> int:
    """Check every row of a ``dataset_uri`` file against its task type; returns the number of rows."""
    fields = FIELDS[spec.icl_task_type]
    where = f"{spec.key}.dataset_uri {spec.dataset_uri}"
    rows = 0
    with open(spec.dataset_uri, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{where}:{number}: not JSON ({err.msg}); one object per line") from None
            missing = [f for f in fields if not isinstance(row, dict) or f not in row]
            if missing:
                raise ConfigError(
                    f"{where}:{number}: a {spec.icl_task_type} row needs {', '.join(fields)}; missing {', '.join(missing)}"
                )
            if spec.icl_task_type == "multiple_choice":
                choices, gold = row["choices"], row["gold"]
                if (
                    not isinstance(choices, list)
                    or len(choices) < 2
                    or not all(isinstance(c, str) for c in choices)
                ):
                    raise ConfigError(f"{where}:{number}: choices must be a list of two or more strings")
                if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
                    raise ConfigError(
                        f"{where}:{number}: gold must be the index of the right choice, got {gold!r}"
                    )
            elif not all(isinstance(row[f], str) for f in fields):
                raise ConfigError(f"{where}:{number}: context and continuation must be strings")
            rows += 1
    if rows == 0:
        raise ConfigError(f"{where} holds no rows")
    return rows


def _include_dir(path: str | None) -> list[str]:
    if path is None:
        return []
    return [path if os.path.isdir(path) else os.path.dirname(path)]


def _load(
    spec: EvalTask, config: EvalTasksConfig, managers: dict[tuple[str, ...], tuple[Any, bool]]
) -> LoadedTask:
    from llmshearing.harness import runner

    includes = tuple([*config.include_paths, *_include_dir(spec.include_path)])
    offline = False
    if spec.dataset_uri is not None:
        check_rows(spec)
        target: Any = _lm_eval_config(spec)
        name = target["task"]
        includes = ()
    else:
        name = target = spec.task
    if includes not in managers:
        try:
            runner.check_include_paths(includes)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"{spec.key}: {err}") from None
        # the shipped and included tasks only, unless the name is none of them (a dataset_uri task needs none)
        managers[includes] = (runner.task_manager(includes, [spec.task or runner.LOCAL_TASK]), False)
    manager, full = managers[includes]
    if spec.task is not None:
        if spec.task not in manager.task_index and not full:  # index lm-eval's own tasks too
            manager = runner.task_manager(includes)
            managers[includes] = (manager, True)
        try:
            runner.check_names(manager, [runner.TaskRequest(spec.task)], f"{KEY}.include_path")
        except KeyError as err:
            raise ConfigError(f"{spec.key}.task: {err.args[0]}") from None
        try:
            reads_hub = runner.check_local_data(manager, [runner.TaskRequest(spec.task)])
        except FileNotFoundError as err:
            raise ConfigError(f"{spec.key}.task: {err}") from None
        offline = runner.offline_requested() or (reads_hub and not runner.hub_reachable())
        if offline:
            runner.go_offline()  # read the datasets cache only: no minutes of retries against the Hub
    try:
        loaded = manager.load([target])
    except Exception as err:  # datasets and lm-eval raise many types for a task they cannot build
        reason = " ".join(str(err).split())[:300] or type(err).__name__
        hub = (
            " (its data is not in the local datasets cache and the Hub cannot be reached)" if offline else ""
        )
        raise ConfigError(f"{spec.key}: task {name} could not be loaded{hub}: {reason}") from None
    for task in loaded["tasks"].values():
        if task.get_config("output_type") == "generate_until":
            raise ConfigError(
                f"{spec.key}: task {task.config.task} generates text, which in-training evaluation does not "
                f"run (multiple_choice and log-likelihood tasks only); score it after training with "
                f"`llmshearing evaluate MODEL --tasks {name}`"
            )
        task.set_config(key="num_fewshot", value=spec.num_fewshot)
        if spec.num_fewshot:
            available = runner.fewshot_available(task)
            if spec.num_fewshot > available:
                raise ConfigError(
                    f"{spec.key}.num_fewshot: {spec.num_fewshot}-shot asks for more examples than the few-shot "
                    f"pool of {task.config.task} holds ({available}); lower num_fewshot"
                )
    return LoadedTask(spec, name, loaded)


def find_tokenizer(model_path: str, override: str | None) -> str:
    """The tokenizer directory: ``eval_tasks.tokenizer``, else the one beside ``model.path``."""
    from llmshearing.harness.model import _has_tokenizer

    if override is not None:
        if not _has_tokenizer(Path(override)):
            raise ConfigError(f"{KEY}.tokenizer {override} holds no tokenizer.json or tokenizer_config.json")
        return override
    where = Path(model_path)
    for candidate in (where, where.parent, where.parent.parent):
        if candidate.is_dir() and _has_tokenizer(candidate):
            return str(candidate)
    raise ConfigError(
        f"{KEY}: no tokenizer found with model.path {model_path}; set {KEY}.tokenizer=DIR (the source model's "
        "directory, as `llmshearing convert hf-to-composer` writes it)"
    )


def prepare_eval_tasks(
    model_path: str, device_eval_batch_size: int, config: EvalTasksConfig
) -> PreparedTasks:
    """Load every task of ``eval_tasks`` and the tokenizer (beside ``model_path`` unless ``eval_tasks.tokenizer``
    names one), checking what the recipe cannot show."""
    from llmshearing.checkpoint.loading import checkpoint_vocab_size
    from llmshearing.harness import runner
    from llmshearing.harness.model import load_tokenizer

    runner.quiet_lm_eval()
    tokenizer_dir = find_tokenizer(model_path, config.tokenizer)
    try:
        tokenizer = load_tokenizer(Path(tokenizer_dir))
    except ValueError as err:
        raise ConfigError(
            f"{KEY}: {err}".replace("pass --tokenizer DIR", f"set {KEY}.tokenizer=DIR")
        ) from None
    vocab = checkpoint_vocab_size(model_path)
    if vocab is not None and len(tokenizer) > vocab:
        raise ConfigError(
            f"{KEY}: the tokenizer in {tokenizer_dir} has {len(tokenizer)} tokens but model.path has {vocab} token "
            f"embeddings; set {KEY}.tokenizer to the model's own tokenizer"
        )
    import datasets

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # a start-up error stays one line; the data is small and local
    try:
        managers: dict[tuple[str, ...], tuple[Any, bool]] = {}
        loaded = [_load(spec, config, managers) for spec in config.tasks]
    finally:
        if bars:
            datasets.enable_progress_bars()
    batch = config.batch_size or device_eval_batch_size
    return PreparedTasks(loaded, tokenizer_dir, batch)


@contextlib.contextmanager
def kept_random_state() -> Iterator[None]:
    """Put python's, numpy's and torch's random states back as they were (lm-eval seeds them)."""
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def task_metrics(results: dict[str, Any], name: str) -> dict[str, float]:
    """``{metric: value}`` of a task (or group) from lm-eval's results; a filter other than ``none`` is
    appended to the metric's name."""
    row = (results.get("groups") or {}).get(name) or results["results"][name]
    metrics = {}
    for key, value in row.items():
        if "," not in key or "_stderr," in key or not is_number(value):
            continue
        metric, _, filt = key.partition(",")
        metrics[metric if filt == "none" else f"{metric}_{filt}"] = float(value)
    return metrics


def _documents(task_dict: dict[str, Any], limit: float | None) -> int:
    """The fewest documents any leaf task scores under ``limit``."""
    from lm_eval.evaluator_utils import get_sample_size

    counts = []
    for task in task_dict["tasks"].values():
        size = get_sample_size(task, limit)
        counts.append(len(task.eval_docs) if size is None else size)
    return min(counts)


class InContextEval(Callback):
    """Score ``eval_tasks`` at the end of the run's evaluations and log ``icl/<label>/<metric>``.

    A task with ``every: N`` is scored at every Nth evaluation (the evaluation at batch ``b`` is number
    ``b // eval_interval``, so the count survives a resume) and always at the last one.
    """

    def __init__(self, prepared: PreparedTasks, eval_interval: int, hf_config: dict[str, Any]) -> None:
        self.prepared = prepared
        self.eval_interval = eval_interval
        self.hf_config = hf_config
        self._lm: Any = None
        self.last: dict[str, float] = {}  # the metrics of the last scoring, for inspection

    def _due(self, state: State) -> list[LoadedTask]:
        batch = int(state.timestamp.batch)
        index = batch // self.eval_interval
        final = state.max_duration is not None and batch >= int(state.max_duration.value)
        return [t for t in self.prepared.tasks if final or index % t.spec.every == 0]

    def _language_model(self, state: State) -> Any:
        from composer.core.precision import get_precision_context

        from llmshearing.harness.live import LiveModel, RankedLM, hf_config_object

        if self._lm is not None:
            return self._lm
        model = state.model
        model = getattr(model, "module", model)  # DDP: the module itself (its forward needs no collective)
        device = next(model.parameters()).device

        def forward(ids: torch.Tensor) -> torch.Tensor:
            with get_precision_context(state.precision, state.precision_config):
                return model({"input_ids": ids}).logits.float()

        live = LiveModel(forward, hf_config_object(self.hf_config), device)
        self._lm = RankedLM(live, self.prepared.tokenizer, self.prepared.batch_size)
        return self._lm

    def eval_end(self, state: State, logger: Logger) -> None:
        if state.dataloader_label != "eval":
            return
        due = self._due(state)
        if not due:
            return
        started = time.perf_counter()
        lm = self._language_model(state)
        metrics: dict[str, float] = {}
        model = state.model
        was_training = model.training
        model.eval()
        try:
            with kept_random_state(), torch.no_grad():
                for loaded in due:
                    for metric, value in self._score(lm, loaded).items():
                        metrics[f"icl/{loaded.spec.label}/{metric}"] = value
        finally:
            model.train(was_training)
        metrics = _from_rank_zero(metrics)
        metrics["wall_clock/icl"] = time.perf_counter() - started
        self.last = metrics
        logger.log_metrics(metrics)

    def _score(self, lm: Any, loaded: LoadedTask) -> dict[str, float]:
        from composer.utils import dist
        from lm_eval.evaluator import evaluate
        from lm_eval.utils import set_torch_seed

        spec = loaded.spec
        random.seed(SEEDS[0])
        np.random.seed(SEEDS[1])
        set_torch_seed(SEEDS[2])
        for task in loaded.task_dict["tasks"].values():
            task.set_config(key="num_fewshot", value=spec.num_fewshot)
            task.set_fewshot_seed(seed=SEEDS[3])
        limit = None if spec.limit is None else (int(spec.limit) if spec.limit >= 1 else spec.limit)
        world = dist.get_world_size()
        # lm-eval draws a task's few-shot examples from one random stream in document order, so a share of the
        # documents would get other examples than one process gives them: few-shot tasks are scored whole
        split = world > 1 and spec.num_fewshot == 0 and _documents(loaded.task_dict, limit) >= world
        lm.share(dist.get_global_rank() if split else 0, world if split else 1)
        with contextlib.redirect_stderr(
            io.StringIO()
        ):  # lm-eval's progress bars, one per task and evaluation
            results = evaluate(
                lm=lm, task_dict=loaded.task_dict, limit=limit, bootstrap_iters=0, log_samples=False
            )
        return {} if results is None else task_metrics(results, loaded.name)


def _from_rank_zero(metrics: dict[str, float]) -> dict[str, float]:
    """Rank 0's metrics on every process (the others hold a share's results or none)."""
    from composer.utils import dist

    if dist.get_world_size() == 1:
        return metrics
    carrier = [metrics]
    dist.broadcast_object_list(carrier, src=0)
    return carrier[0]
