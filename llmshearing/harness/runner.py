"""`llmshearing evaluate MODEL --tasks ...`: lm-evaluation-harness on any model the project reads.

Tasks are lm-eval's own (names, groups, tags), the local tasks shipped in ``harness/tasks`` and those of
``--include-path`` directories; presets (``sheared-llama``, ``minitron``) expand to their tasks with their
few-shot counts. Everything a user can get wrong (names, YAMLs, data files, few-shot pools, the tokenizer
against the model, the output path) is checked before the model's weights load. A task whose data is on the
Hugging Face Hub and not in the local cache fails at once, naming the task, when the Hub cannot be reached.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import socket
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from llmshearing.harness.presets import PRESETS, Preset

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
LOCAL_TASK = "local_mc"  # a task of TASKS_DIR (task_manager indexes the local tasks alone when asked for it)
# lm-eval's own defaults: python, numpy, torch and few-shot sampler seeds.
DEFAULT_SEEDS = (0, 1234, 1234, 1234)
# datasets builders that read local files named by ``dataset_kwargs.data_files``.
LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas"}
RESULT_KEYS = (
    "results",
    "groups",
    "group_subtasks",
    "configs",
    "versions",
    "n-shot",
    "higher_is_better",
    "n-samples",
)


@dataclass
class TaskRequest:
    """One task, group or tag to evaluate; ``num_fewshot`` and ``preset`` are set for preset members."""

    name: str
    num_fewshot: int | None = None
    preset: str | None = None


def parse_task_spec(spec: str) -> tuple[list[TaskRequest], list[Preset]]:
    """``a,b,PRESET`` -> the task requests (presets expanded, duplicates merged) and the presets named."""
    names = [part.strip() for part in spec.split(",")]
    if not spec.strip() or any(not name for name in names):
        raise ValueError(f"--tasks {spec!r} has an empty name: give task or preset names separated by commas")
    requests: dict[str, TaskRequest] = {}
    presets: list[Preset] = []

    def add(request: TaskRequest) -> None:
        known = requests.get(request.name)
        if known is None:
            requests[request.name] = request
        elif known.num_fewshot != request.num_fewshot:
            shots = {known.preset or "--num-fewshot": known.num_fewshot, request.preset: request.num_fewshot}
            raise ValueError(
                f"--tasks asks for {request.name} with different few-shot counts ({shots}): "
                "evaluate those presets in separate runs"
            )

    for name in names:
        preset = PRESETS.get(name)
        if preset is None:
            add(TaskRequest(name))
            continue
        presets.append(preset)
        for task in preset.tasks:
            add(TaskRequest(task.task, task.num_fewshot, preset.name))
    return list(requests.values()), presets


def check_options(
    limit: float | None, num_fewshot: int | None, batch_size: str, seed: int | None, output: str | None
) -> None:
    """Raise ``ValueError`` naming the option for values lm-eval would refuse or misread."""
    if limit is not None and (limit <= 0 or (limit >= 1 and limit != int(limit))):
        raise ValueError(
            f"--limit must be a whole number of examples >= 1 or a fraction in (0, 1), got {limit:g}"
        )
    if num_fewshot is not None and num_fewshot < 0:
        raise ValueError(f"--num-fewshot must be 0 or more, got {num_fewshot}")
    if batch_size != "auto" and not (batch_size.isdigit() and int(batch_size) >= 1):
        raise ValueError(f"--batch-size must be a whole number >= 1 or 'auto', got {batch_size!r}")
    if seed is not None and seed < 0:
        raise ValueError(f"--seed must be 0 or more, got {seed}")
    if output is not None:
        path = Path(output)
        if path.is_dir():
            raise ValueError(f"--output {output} is a directory; give the path of the JSON file to write")
        if not path.parent.resolve().is_dir():
            raise FileNotFoundError(f"--output {output}: folder {path.parent} does not exist")


def check_include_paths(paths: Sequence[str]) -> None:
    """Every ``--include-path`` is a directory whose task YAMLs parse."""
    from lm_eval.tasks._yaml_loader import load_yaml

    for directory in paths:
        if not Path(directory).is_dir():
            raise FileNotFoundError(f"--include-path {directory} is not a directory of task YAMLs")
        for yaml_file in sorted(Path(directory).rglob("*.yaml")):
            try:
                load_yaml(yaml_file, resolve_func=False, recursive=False)
            except Exception as err:  # yaml raises many types for a bad file
                reason = " ".join(str(err).split())[:200]
                raise ValueError(f"{yaml_file}: not a valid task YAML ({reason})") from err


def task_manager(include_paths: Sequence[str], names: Sequence[str] = ()) -> Any:
    """lm-eval's TaskManager over the shipped local tasks and ``include_paths``, and lm-eval's own tasks
    unless every one of ``names`` is local (indexing lm-eval's ~15,000 task YAMLs takes seconds of CPU).
    """
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR), *include_paths]
    if names:
        local = TaskManager(include_path=paths, include_defaults=False)
        if all(name in local.task_index for name in names):
            return local
    return TaskManager(include_path=paths)


def check_names(manager: Any, requests: Sequence[TaskRequest], include_key: str | None = None) -> None:
    """Raise ``KeyError`` for a name lm-eval does not know, with the closest known names and presets; with
    ``include_key`` (a recipe's key for task YAML directories, e.g. ``eval_tasks.include_path``) the names
    are a recipe's, which takes no presets, and the hint names that key instead of ``--include-path``."""
    presets = list(PRESETS) if include_key is None else []
    for request in requests:
        if request.name in manager.task_index:
            continue
        close = difflib.get_close_matches(request.name, list(manager.all_tasks) + presets, n=4, cutoff=0.6)
        hint = f"closest: {', '.join(close)}" if close else "see `lm-eval ls tasks`"
        if include_key is not None:
            raise KeyError(f"unknown task {request.name!r} ({hint}; local task YAMLs: {include_key}: [DIR])")
        raise KeyError(
            f"unknown task or preset {request.name!r} ({hint}; presets: {', '.join(PRESETS)}; "
            "local task YAMLs: --include-path DIR)"
        )


def _leaf_configs(manager: Any, name: str) -> list[tuple[dict[str, Any], Path | None]]:
    """The raw YAML configs of a registered task (a group or tag: none; they are checked on load)."""
    from lm_eval.tasks._index import Kind
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = manager.task_index[name]
    if entry.kind not in (Kind.TASK,) or entry.yaml_path is None:
        return []
    return [(load_yaml(entry.yaml_path, resolve_func=False), Path(entry.yaml_path))]


def _needs_hub(config: dict[str, Any]) -> bool:
    if config.get("custom_dataset") is not None:
        return False
    path = config.get("dataset_path")
    return isinstance(path, str) and path not in LOCAL_BUILDERS and not Path(path).exists()


def _data_files(config: dict[str, Any]) -> list[str]:
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, str):
        return [files]
    if isinstance(files, list):
        return [str(f) for f in files]
    if isinstance(files, dict):
        out: list[str] = []
        for value in files.values():
            out.extend([value] if isinstance(value, str) else [str(v) for v in value])
        return out
    return []


def check_local_data(manager: Any, requests: Sequence[TaskRequest]) -> bool:
    """Check the data files of local-file tasks; returns whether any requested task reads the Hub."""
    hub = False
    for request in requests:
        leaves = _leaf_configs(manager, request.name)
        if not leaves:
            hub = True  # a group or tag: its children are usually hub tasks
        for config, yaml_path in leaves:
            hub = hub or _needs_hub(config)
            if config.get("dataset_path") not in LOCAL_BUILDERS:
                continue
            for file in _data_files(config):
                if any(ch in file for ch in "*?[") or "://" in file or Path(file).exists():
                    continue
                raise FileNotFoundError(
                    f"task {request.name} ({yaml_path}): data file {file} not found; data_files are read "
                    f"relative to the working directory ({os.getcwd()}): give an absolute path"
                )
    return hub


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hub (``HF_ENDPOINT``) opens within ``timeout`` seconds."""
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # through a proxy: leave it to the Hub client
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    answer: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            answer.append(True)
        except OSError:
            answer.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answer and answer[0])


def offline_requested() -> bool:
    return any(
        os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def go_offline() -> None:
    """Make ``datasets`` and ``huggingface_hub`` read only their local caches (no retries against the Hub)."""
    import datasets.config
    import huggingface_hub.constants

    os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    datasets.config.HF_HUB_OFFLINE = True
    huggingface_hub.constants.HF_HUB_OFFLINE = True


def _hub_message(name: str, dataset: str | None) -> str:
    where = f"{dataset} on the Hugging Face Hub" if dataset else "the Hugging Face Hub"
    return (
        f"task {name}: its data ({where}) is not in the local datasets cache and the Hub cannot be reached "
        "(or HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set): fetch it once where the Hub is reachable "
        "(the cache is HF_HOME, default ~/.cache/huggingface), or point a task at local files: a YAML with "
        "dataset_path: json and dataset_kwargs: {data_files: {test: /abs/path.jsonl}}, passed with --include-path DIR"
    )


def load_tasks(manager: Any, requests: Sequence[TaskRequest], offline: bool) -> dict[str, Any]:
    """Build every requested task (this reads its data); name the task whose data cannot be read."""
    loaded: dict[str, Any] = {}
    for request in requests:
        try:
            result = manager.load([request.name])
        except Exception as err:  # datasets and lm-eval raise many types for a task they cannot build
            leaves = _leaf_configs(manager, request.name)
            dataset = leaves[0][0].get("dataset_path") if leaves else None
            text = f"{type(err).__name__}: {err}"
            if offline and any(
                marker in text for marker in ("OfflineModeIsEnabled", "Couldn't reach", "offline", "Offline")
            ):
                raise ValueError(_hub_message(request.name, dataset)) from err
            reason = " ".join(str(err).split())[:300] or type(err).__name__
            raise ValueError(f"task {request.name}: its data could not be read ({reason})") from err
        groups = result["groups"]
        loaded[request.name] = (
            groups[request.name] if request.name in groups else list(result["tasks"].values())
        )
        if request.num_fewshot is not None:
            for task in result["tasks"].values():
                task.set_config(key="num_fewshot", value=request.num_fewshot)
    return loaded


def _leaves(obj: Any) -> list[Any]:
    if isinstance(obj, list):
        return obj
    return list(obj.get_all_tasks())


def fewshot_available(task: Any) -> int:
    """How many few-shot examples a task can give one document (the document itself is never among
    them when the pool is the evaluated split)."""
    pool = task.fewshot_docs()
    size = len(pool) if hasattr(pool, "__len__") else len(list(pool))
    split = task.config.fewshot_split
    same_as_eval = (
        split == task.config.test_split
        if split
        else not (task.has_training_docs() or task.has_validation_docs())
    )
    return size - 1 if same_as_eval else size


def check_fewshot_pools(
    loaded: dict[str, Any], requests: Sequence[TaskRequest], num_fewshot: int | None
) -> None:
    """Raise ``ValueError`` when a task's few-shot pool holds fewer examples than asked for."""
    for request in requests:
        for task in _leaves(loaded[request.name]):
            configured = task.get_config("num_fewshot")
            shots = request.num_fewshot
            if shots is None:
                shots = configured if num_fewshot is None or configured == 0 else num_fewshot
            if not shots:
                continue
            available = fewshot_available(task)
            if shots > available:
                raise ValueError(
                    f"task {task.task_name}: {shots}-shot asks for more examples than its few-shot pool holds "
                    f"({available}); lower --num-fewshot or give the task a larger training split"
                )


class _DropNotes(logging.Filter):
    """Drops lm-eval's notes that do not apply here (a custom_dataset task's --metadata hint)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


def quiet_lm_eval() -> None:
    """lm-eval logs at INFO; keep its warnings only (its progress bars stay)."""
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    # HFLM warns that a model passed as an object ignores loading options: this one is built on purpose.
    logging.getLogger("lm_eval.models.huggingface").setLevel(logging.ERROR)
    task_logger = logging.getLogger("lm_eval.api.task")
    if not any(isinstance(f, _DropNotes) for f in task_logger.filters):
        task_logger.addFilter(_DropNotes())


def environment_info(storage: dict[str, Any]) -> None:
    """What lm-eval records of the environment with its results, read in-process.

    lm-eval's own ``add_env_info`` calls torch's ``collect_env``, which runs pip, lscpu, gcc, nvcc,
    nvidia-smi, ldconfig and more as subprocesses with no timeout: about 5 s of every evaluation (every
    in-training one too), and a stalled evaluation where one of them blocks.
    """
    import platform
    from importlib.metadata import version

    import torch
    import transformers

    storage.update(
        {
            "pretty_env_info": (
                f"PyTorch {torch.__version__}; Python {platform.python_version()}; {platform.platform()}; "
                f"CUDA available: {torch.cuda.is_available()}"
            ),
            "transformers_version": transformers.__version__,
            "lm_eval_version": version("lm_eval"),
            "upper_git_hash": None,
        }
    )


@contextmanager
def serial_bootstrap() -> Iterator[None]:
    """lm-eval's bootstrapped standard errors (perplexity's, 100,000 resamples) in this process.

    lm-eval otherwise forks a pool of ``cpu_count()`` workers; a fork of a process whose torch, tqdm and
    thread-pool threads hold locks can leave a worker blocked for ever, and the pool's exit waits on it.
    ``DISABLE_MULTIPROC`` is lm-eval's own switch for the single-process loop (same resamples' count).
    """
    before = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["DISABLE_MULTIPROC"]
        else:
            os.environ["DISABLE_MULTIPROC"] = before


def run_groups(
    lm: Any,
    manager: Any,
    loaded: dict[str, Any],
    requests: Sequence[TaskRequest],
    num_fewshot: int | None,
    limit: float | None,
    seeds: tuple[int, int, int, int],
) -> dict[str, Any]:
    """``simple_evaluate`` over the loaded tasks (preset members keep their few-shot counts); merged results."""
    import lm_eval.evaluator
    from lm_eval import simple_evaluate

    # no subprocesses: the environment is read in-process, and the git hash of the working directory (which
    # lm-eval reads with `git describe`) is not part of the results this project writes
    lm_eval.evaluator.add_env_info = environment_info
    lm_eval.evaluator.get_git_commit_hash = lambda: None
    batches: list[tuple[list[Any], int | None]] = []
    preset_objs = [loaded[r.name] for r in requests if r.num_fewshot is not None]
    plain_objs = [loaded[r.name] for r in requests if r.num_fewshot is None]
    if num_fewshot is None:
        batches.append((preset_objs + plain_objs, None))
    else:
        batches += [(objs, shots) for objs, shots in ((preset_objs, None), (plain_objs, num_fewshot)) if objs]
    merged: dict[str, Any] = {key: {} for key in RESULT_KEYS}
    for objs, shots in batches:
        flat: list[Any] = []
        for obj in objs:
            flat.extend(obj if isinstance(obj, list) else [obj])
        with serial_bootstrap():
            results = simple_evaluate(
                model=lm,
                tasks=flat,
                num_fewshot=shots,
                limit=int(limit) if limit is not None and limit >= 1 else limit,
                task_manager=manager,
                log_samples=False,
                random_seed=seeds[0],
                numpy_random_seed=seeds[1],
                torch_random_seed=seeds[2],
                fewshot_random_seed=seeds[3],
            )
        for key in RESULT_KEYS:
            merged[key].update(results.get(key) or {})
        merged.setdefault("config", results.get("config", {}))
    return merged


def metric_value(results: dict[str, Any], task: str, metric: str) -> tuple[float | None, float | None]:
    """``(value, stderr)`` of ``metric`` (``name,filter``) for a task or group, from merged results."""
    for section in ("groups", "results"):
        row = results.get(section, {}).get(task)
        if row and metric in row:
            name, _, filt = metric.partition(",")
            stderr = row.get(f"{name}_stderr,{filt}")
            return float(row[metric]), float(stderr) if isinstance(stderr, (int, float)) else None
    return None, None


def preset_summary(results: dict[str, Any], preset: Preset) -> dict[str, Any]:
    """The preset's per-task scores (percent), their average and the published references."""
    scores = {}
    for task in preset.tasks:
        value, _ = metric_value(results, task.task, task.metric)
        scores[task.task] = None if value is None else 100.0 * value
    done = [v for v in scores.values() if v is not None]
    return {
        "tasks": {
            t.task: {"num_fewshot": t.num_fewshot, "metric": t.metric, "score": scores[t.task]}
            for t in preset.tasks
        },
        "average": sum(done) / len(done) if len(done) == len(scores) else None,
        "reference_average": dict(preset.reference),
        "reference_tasks": {k: dict(v) for k, v in preset.reference_tasks.items()},
    }


def _number(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 1e5 else f"{value:.3e}"


def format_table(results: dict[str, Any]) -> str:
    """One row per task (and group) and metric: n-shot, value, stderr."""
    lines = [f"{'task':<28} {'n-shot':>6} {'metric':<34} {'value':>10} {'stderr':>10}"]
    for section in ("results", "groups"):
        for task, row in sorted(results.get(section, {}).items()):
            if section == "results" and task in results.get("groups", {}):
                continue
            shots = results.get("n-shot", {}).get(task, "")
            for key, value in row.items():
                if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                    continue
                name, _, filt = key.partition(",")
                stderr = row.get(f"{name}_stderr,{filt}")
                err = _number(stderr) if isinstance(stderr, (int, float)) else ""
                lines.append(f"{task:<28} {shots!s:>6} {key:<34} {_number(value):>10} {err:>10}")
    return "\n".join(lines)


def format_preset(summary: dict[str, Any], preset: Preset) -> str:
    average = summary["average"]
    shown = "incomplete" if average is None else f"{average:.1f}"
    lines = [f"{preset.name} average over {len(preset.tasks)} tasks: {shown}"]
    if summary["reference_average"]:
        refs = ", ".join(f"{model} {value:.1f}" for model, value in summary["reference_average"].items())
        lines.append(f"  reported averages: {refs}")
    for model, tasks in summary["reference_tasks"].items():
        refs = ", ".join(f"{task} {value:.1f}" for task, value in tasks.items())
        lines.append(f"  reported for {model}: {refs}")
    return "\n".join(lines)


def to_json(results: dict[str, Any], extra: dict[str, Any]) -> str:
    from lm_eval.utils import handle_non_serializable

    return json.dumps({**results, "llmshearing": extra}, indent=2, default=handle_non_serializable) + "\n"


def seeds_of(seed: int | None) -> tuple[int, int, int, int]:
    """lm-eval CLI's seeds: one ``--seed`` value for all four, else its defaults."""
    return DEFAULT_SEEDS if seed is None else (seed, seed, seed, seed)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str) -> None:
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"--device {device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from err
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available here; use --device cpu")


def read_task_data(
    manager: Any, requests: Sequence[TaskRequest], reads_hub: bool, num_fewshot: int | None
) -> dict[str, Any]:
    """Build the requested tasks (reading their data; offline when the Hub cannot be reached) and check
    their few-shot pools."""
    offline = offline_requested()
    if reads_hub and not offline and not hub_reachable():
        offline = True
    if offline:
        go_offline()
    loaded = load_tasks(manager, requests, offline)
    check_fewshot_pools(loaded, requests, num_fewshot)
    return loaded


def check_tasks(tasks: str, include_paths: Sequence[str] = (), num_fewshot: int | None = None) -> None:
    """Everything ``evaluate_tasks`` checks of ``tasks`` before a model loads (names, YAMLs, data files, the
    data itself, few-shot pools), with no model: for a long job that scores models later."""
    requests, _ = parse_task_spec(tasks)
    check_include_paths(include_paths)
    quiet_lm_eval()
    manager = task_manager(include_paths, [request.name for request in requests])
    check_names(manager, requests)
    read_task_data(manager, requests, check_local_data(manager, requests), num_fewshot)


def evaluate_tasks(
    model: str,
    tasks: str,
    num_fewshot: int | None = None,
    limit: float | None = None,
    batch_size: str = "8",
    device: str | None = None,
    include_paths: Sequence[str] = (),
    output: str | None = None,
    seed: int | None = None,
    dtype: str = "auto",
    tokenizer: str | None = None,
) -> dict[str, Any]:
    """Run lm-eval's tasks on the model at ``model``; print the table and write ``output``; return the results."""
    from llmshearing.checkpoint.reading import open_checkpoint
    from llmshearing.harness import model as hf_model

    check_options(limit, num_fewshot, batch_size, seed, output)
    device = device or default_device()
    check_device(device)
    requests, presets = parse_task_spec(tasks)
    if not os.path.exists(model):
        raise FileNotFoundError(f"model {model!r} does not exist")
    check_include_paths(include_paths)
    quiet_lm_eval()
    manager = task_manager(include_paths, [request.name for request in requests])
    check_names(manager, requests)
    reads_hub = check_local_data(manager, requests)
    with open_checkpoint(model) as ckpt:
        hf_model.check_loadable(ckpt)
        tok_dir = hf_model.tokenizer_dir(ckpt, tokenizer)
        tok = hf_model.load_tokenizer(tok_dir)
        hf_model.check_vocabulary(tok, ckpt, tok_dir)
        loaded = read_task_data(manager, requests, reads_hub, num_fewshot)
        chosen = hf_model.stored_dtype(ckpt) if dtype == "auto" else dtype
        model_obj = hf_model.build_hf_model(ckpt, chosen, device)
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model_obj, tokenizer=str(tok_dir), batch_size=batch_size, device=device)
    results = run_groups(lm, manager, loaded, requests, num_fewshot, limit, seeds_of(seed))
    summaries = {preset.name: preset_summary(results, preset) for preset in presets}
    print(format_table(results))
    for preset in presets:
        print(format_preset(summaries[preset.name], preset))
    extra = {
        "model": str(model),
        "dtype": chosen,
        "device": device,
        "tokenizer": str(tok_dir),
        "tasks": tasks,
        "num_fewshot": num_fewshot,
        "limit": limit,
        "seeds": list(seeds_of(seed)),
        "presets": summaries,
    }
    if output is not None:
        from llmshearing.io.staging import write_text_atomic

        write_text_atomic(output, to_json(results, extra))
    return {**results, "llmshearing": extra}
