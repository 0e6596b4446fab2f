"""The ``README.md`` model card an exported HF directory carries (Hugging Face's metadata header first).

What is known is written, nothing is guessed: the shape and parameter counts always; for a Composer
checkpoint of a training run, from its run folder (``config.json``, ``metrics.jsonl``): the source model, the
method (pruning toward a target, or training the dense model, with or without distillation), the data domains
with their first and last weights, the tokens seen, the last per-domain losses, and the downstream results of
``llmshearing evaluate --tasks ... --output RUN/<name>.json`` files kept in the run folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llmshearing.checkpoint.reading import OpenCheckpoint
from llmshearing.checkpoint.run_config import find_run_config, parse_run_config
from llmshearing.config_base import is_number


def _run_folder(ckpt: OpenCheckpoint, run_config: Path | None) -> tuple[Path, dict[str, Any]] | None:
    """The run folder and its description: ``run_config``'s, or a Composer checkpoint's own run."""
    if run_config is None and ckpt.kind != "composer":
        return None
    try:
        config_path = run_config or find_run_config(ckpt.path, None)
        description = parse_run_config(config_path)
    except (OSError, ValueError):
        return None
    if not isinstance(description, dict) or not ("train" in description or "l0_module" in description):
        return None  # not a run's description (a source checkpoint's config.json)
    return config_path.parent, description


def _metrics(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Series per metric name of the run's ``metrics.jsonl`` (the last value logged at each step).

    Lines that are not records (a run killed mid-write) are skipped: the card leaves out what it cannot read.
    """
    path = run / "metrics.jsonl"
    if not path.is_file():
        return {}
    latest: dict[str, dict[int, float]] = {}
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            try:
                record = json.loads(line)
                step = int(record.pop("step"))
            except (ValueError, TypeError, KeyError, AttributeError):
                continue
            for name, value in record.items():
                if is_number(value):
                    latest.setdefault(name, {})[step] = float(value)
    return {name: sorted(values.items()) for name, values in latest.items()}


def _downstream(run: Path) -> list[tuple[str, dict[str, Any]]]:
    """``evaluate --tasks --output`` files in the run folder: (file name, results)."""
    found = []
    for path in sorted(run.glob("*.json")):
        if path.name == "config.json" or path.stat().st_size > 50_000_000:
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("results"), dict) and "llmshearing" in data:
            found.append((path.name, data))
    return found


def _shape_lines(ckpt: OpenCheckpoint) -> list[str]:
    config = ckpt.config
    total, body = config.num_params(), config.num_params(include_embeddings=False)
    return [
        "| | |",
        "|---|---|",
        f"| family | {config.family} |",
        f"| layers | {config.n_layers} |",
        f"| hidden size | {config.d_model} |",
        f"| attention heads (KV heads) | {config.n_heads} ({config.n_kv_heads}) |",
        f"| head dim | {config.head_dim} |",
        f"| MLP intermediate size | {config.intermediate_size} |",
        f"| vocabulary | {config.vocab_size} |",
        f"| parameters | {total:,} ({body:,} without embeddings) |",
    ]


def _run_lines(run: Path, description: dict[str, Any]) -> list[str]:
    train = description.get("train") or {}
    model = train.get("model") or {}
    l0 = description.get("l0_module") or model.get("l0_module")
    lines = [f"Produced by an llmshearing training run in `{run}`."]
    source = (description.get("source") or {}).get("path") or model.get("path")
    if source:
        lines.append(f"- source model: `{source}`")
    if l0:
        target = l0.get("target_model") or (
            {"target_sparsity": l0["target_sparsity"]} if l0.get("target_sparsity") is not None else None
        )
        lines.append(f"- method: structured pruning with hard-concrete (L0) masks toward {target}")
    else:
        lines.append("- method: training of the dense model (continued pretraining)")
    if model.get("distillation"):
        teacher = model["distillation"].get("teacher") or source
        lines.append(f"- distillation from `{teacher}` (alpha {model['distillation'].get('alpha', 0.5)})")
    metrics = _metrics(run)
    steps = max((series[-1][0] for series in metrics.values() if series), default=0)
    batch, seq = train.get("global_train_batch_size"), train.get("max_seq_len")
    if steps and isinstance(batch, int) and isinstance(seq, int):
        lines.append(f"- tokens seen: {steps * batch * seq:,} ({steps} batches of {batch} x {seq} tokens)")
    weights = {k[len("data/weight/") :]: v for k, v in metrics.items() if k.startswith("data/weight/") and v}
    losses = {k[len("data/loss/") :]: v for k, v in metrics.items() if k.startswith("data/loss/") and v}
    if weights or losses:
        lines += ["", "| domain | first weight | last weight | last loss |", "|---|---|---|---|"]
        for domain in sorted(set(weights) | set(losses)):
            first = f"{weights[domain][0][1]:.4f}" if domain in weights else "-"
            last = f"{weights[domain][-1][1]:.4f}" if domain in weights else "-"
            loss = f"{losses[domain][-1][1]:.4f}" if domain in losses else "-"
            lines.append(f"| {domain} | {first} | {last} | {loss} |")
    return lines


def _downstream_lines(found: list[tuple[str, dict[str, Any]]]) -> list[str]:
    lines = ["| file | task | n-shot | metric | value |", "|---|---|---|---|---|"]
    for name, data in found:
        for task, row in sorted(data["results"].items()):
            shots = (data.get("n-shot") or {}).get(task, "")
            for key, value in row.items():
                if "," in key and "_stderr," not in key and isinstance(value, (int, float)):
                    lines.append(f"| {name} | {task} | {shots} | {key} | {value:.4f} |")
        for preset, summary in ((data.get("llmshearing") or {}).get("presets") or {}).items():
            if summary.get("average") is not None:
                lines.append(f"| {name} | {preset} (average) | | percent | {summary['average']:.2f} |")
    return lines


def model_card(ckpt: OpenCheckpoint, out_dir: Path, dtype: str, run_config: Path | None = None) -> str:
    """The model card text for the HF directory ``out_dir`` exported from ``ckpt`` in ``dtype``.

    ``run_config`` is the ``config.json`` of the run the model comes from when ``ckpt`` does not lead to it
    (``prune-model --hf-out`` passes the pruning run's).
    """
    run = _run_folder(ckpt, run_config)
    pruned = bool(
        run and (run[1].get("l0_module") or ((run[1].get("train") or {}).get("model") or {}).get("l0_module"))
    )
    tags = ["llmshearing", ckpt.config.family] + (["structured-pruning"] if pruned else [])
    header = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags:"]
    header += [f"- {tag}" for tag in tags] + ["---", ""]
    body = [
        f"# {out_dir.name}",
        "",
        f"A {ckpt.config.family} decoder exported by llmshearing from `{ckpt.path}` ({dtype}).",
        "",
    ]
    body += _shape_lines(ckpt) + [""]
    if run is not None:
        body += ["## How it was made", ""] + _run_lines(*run) + [""]
        found = _downstream(run[0])
        if found:
            body += ["## Downstream results (lm-evaluation-harness)", ""] + _downstream_lines(found) + [""]
    body += [
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{out_dir.name}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{out_dir.name}")',
        "```",
        "",
    ]
    return "\n".join(header + body)
