"""`llmshearing evaluate MODEL DATA`: per-domain held-out loss and perplexity of a model;
`llmshearing evaluate MODEL --tasks ...`: downstream tasks through lm-evaluation-harness
(:mod:`llmshearing.harness`).

MODEL is a project checkpoint (converted, pruned) or, with ``--transformers``, any HF model
directory loaded by plain transformers (the check that an exported model works without this
package). DATA is a prepared MDS root (``DATA/<split>/<domain>/``); ``--split test`` measures on
the documents that training never reads. The options, the data's shards and its token ids (against
the model's vocabulary) are checked before any sample is evaluated.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from llmshearing.data.layout import SPLITS, TokenSamples, domain_dir, split_domains, token_batches
from llmshearing.io.staging import refuse_existing_output


@dataclass
class DomainLoss:
    domain: str
    tokens: int
    loss: float

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50.0))


class ModelFn:
    """``input_ids -> logits`` of a loaded model, with the number of token embeddings it has."""

    def __init__(self, forward: Callable[[Any], Any], vocab_size: int) -> None:
        self._forward = forward
        self.vocab_size = vocab_size

    def __call__(self, ids: Any) -> Any:
        return self._forward(ids)


def load_model_fn(path: str, use_transformers: bool = False) -> ModelFn:
    """The model at ``path``: a project checkpoint or (``use_transformers``) an HF directory."""
    import torch

    if use_transformers:
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
        except (OSError, ValueError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"cannot load {path} with transformers: {reason}") from err
        model.eval()
        from llmshearing.checkpoint.tensor_io import check_finite

        for name, tensor in model.state_dict().items():  # NaN weights would print nan losses, exit 0
            check_finite(tensor, name, path)
        vocab = model.get_input_embeddings().weight.shape[0]
        return ModelFn(lambda ids: model(ids).logits, int(vocab))
    from llmshearing.checkpoint.loading import from_pretrained

    decoder = from_pretrained(path).float().eval()
    return ModelFn(decoder, int(decoder.config.vocab_size))


def _config_vocab_size(path: str, use_transformers: bool) -> int | None:
    """The vocabulary in ``<path>/config.json`` when there is one (read without loading weights)."""
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return None
    if use_transformers:
        from transformers import AutoConfig

        try:
            return int(AutoConfig.from_pretrained(path, local_files_only=True).get_text_config().vocab_size)
        except (OSError, ValueError, AttributeError, TypeError):
            return None  # loading the model reports what is wrong
    from pathlib import Path

    from llmshearing.checkpoint.reading import read_any_config

    return int(read_any_config(Path(config))[0].vocab_size)


def check_options(batch_size: int, max_samples: int | None) -> None:
    """Raise ``ValueError`` naming the option for a batch size or sample count below 1."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    if max_samples is not None and max_samples < 1:
        raise ValueError(
            f"--max-samples must be at least 1 (or left out for every sample), got {max_samples}"
        )


def _summed_loss(
    model_fn: Callable, directory: str, batch_size: int, max_samples: int | None, progress: bool
) -> tuple[float, int, int]:
    """Summed next-token cross-entropy, predicted tokens and samples read of one MDS directory."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    total, tokens = 0.0, 0
    with TokenSamples(directory) as samples, torch.no_grad():
        count = len(samples) if max_samples is None else min(len(samples), max_samples)
        name = os.path.basename(directory.rstrip(os.sep))
        with tqdm(total=count, desc=f"eval {name}", unit="seq", disable=not progress, leave=False) as bar:
            for rows in token_batches([samples], [(0, i) for i in range(count)], batch_size, samples.label):
                ids = torch.from_numpy(rows)
                logits = model_fn(ids).float()
                loss = F.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
                )
                total += float(loss)
                tokens += ids[:, 1:].numel()
                bar.update(len(rows))
    return total, tokens, count


def domain_losses(
    model_fn: Callable,
    data_dir: str,
    split: str = "eval",
    batch_size: int = 8,
    max_samples: int | None = None,
    domains: Sequence[str] | None = None,
    progress: bool = True,
) -> list[DomainLoss]:
    """Token-weighted next-token cross-entropy of every sample of each domain's MDS split."""
    from llmshearing.data.checks import check_shards

    check_options(batch_size, max_samples)
    directories = {d: domain_dir(data_dir, split, d) for d in domains or split_domains(data_dir, split)}
    for directory in directories.values():
        check_shards(directory)
    results = []
    for domain, directory in directories.items():
        total, tokens, count = _summed_loss(model_fn, directory, batch_size, max_samples, progress)
        if tokens == 0:
            raise ValueError(
                f"{directory}: no token to predict in {count} samples (samples of one token or none): "
                "prepare the data with --seq-len 2 or more"
            )
        results.append(DomainLoss(domain, tokens, total / tokens))
    return results


def format_table(results: Sequence[DomainLoss]) -> str:
    lines = [f"{'domain':<16} {'tokens':>10} {'loss':>8} {'ppl':>10}"]
    for r in results:
        lines.append(f"{r.domain:<16} {r.tokens:>10} {r.loss:>8.4f} {r.perplexity:>10.2f}")
    if results:
        mean = sum(r.loss for r in results) / len(results)
        lines.append(f"{'average':<16} {'':>10} {mean:>8.4f} {math.exp(mean):>10.2f}")
    return "\n".join(lines)


LOSS_ONLY = ("split", "max_samples", "transformers", "json")
TASKS_ONLY = ("num_fewshot", "limit", "device", "include_path", "output", "seed", "dtype", "tokenizer")


def _given(args: argparse.Namespace, names: Sequence[str]) -> list[str]:
    defaults = {"split": "eval", "transformers": False, "include_path": []}
    return [
        "--" + name.replace("_", "-")
        for name in names
        if getattr(args, name) not in (None, defaults.get(name))
    ]


def _run(args: argparse.Namespace) -> int:
    if args.tasks is not None:
        return _run_tasks(args)
    if args.data is None:
        raise ValueError(
            "give DATA (a prepared MDS root: per-domain loss) or --tasks NAMES (downstream tasks through lm-eval)"
        )
    if extra := _given(args, TASKS_ONLY):
        raise ValueError(f"{', '.join(extra)}: only with --tasks (downstream evaluation)")
    args.batch_size = 8 if args.batch_size is None else _int_batch_size(args.batch_size)
    return _run_loss(args)


def _int_batch_size(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(
            f"--batch-size must be a whole number for the loss evaluation, got {value!r}"
        ) from None


def _run_tasks(args: argparse.Namespace) -> int:
    from llmshearing.harness.runner import evaluate_tasks

    if args.data is not None:
        raise ValueError(
            f"--tasks evaluates downstream tasks and reads no MDS data: leave out {args.data!r} "
            "(run the loss evaluation separately)"
        )
    if extra := _given(args, LOSS_ONLY):
        raise ValueError(
            f"{', '.join(extra)}: only for the loss evaluation (without --tasks); with --tasks, --output writes JSON"
        )
    if args.output is not None and not os.path.isdir(args.output):
        refuse_existing_output(args.output, args.overwrite)
    evaluate_tasks(
        args.model,
        args.tasks,
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        batch_size=args.batch_size or "8",
        device=args.device,
        include_paths=args.include_path,
        output=args.output,
        seed=args.seed,
        dtype=args.dtype or "auto",
        tokenizer=args.tokenizer,
    )
    return 0


def _run_loss(args: argparse.Namespace) -> int:
    from llmshearing.data.checks import check_shards, check_vocab

    check_options(args.batch_size, args.max_samples)
    if args.json and os.path.isdir(args.json):
        raise ValueError(f"--json {args.json} is a directory; give the path of the JSON file to write")
    if args.json:
        refuse_existing_output(args.json, args.overwrite)
    if not os.path.exists(args.model):
        raise FileNotFoundError(f"model {args.model!r} does not exist")
    domains = split_domains(args.data, args.split)
    for domain in domains:
        check_shards(domain_dir(args.data, args.split, domain))
    vocab = _config_vocab_size(args.model, args.transformers) if os.path.isdir(args.model) else None
    if vocab is not None:
        check_vocab(args.data, vocab, args.model)
    model_fn = load_model_fn(args.model, args.transformers)
    check_vocab(args.data, model_fn.vocab_size, args.model)
    results = domain_losses(model_fn, args.data, args.split, args.batch_size, args.max_samples, domains)
    print(format_table(results))
    if args.json:
        from llmshearing.io.staging import write_text_atomic

        data = {r.domain: {"tokens": r.tokens, "loss": r.loss, "perplexity": r.perplexity} for r in results}
        write_text_atomic(args.json, json.dumps(data, indent=2) + "\n")
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="per-domain held-out loss and perplexity of a model, or downstream tasks (--tasks) through lm-eval",
        description="MODEL DATA: per-domain loss and perplexity on prepared MDS data. MODEL --tasks NAMES: "
        "lm-evaluation-harness tasks on MODEL (a project checkpoint directory, a prune-model output, a Composer "
        "checkpoint of a continued run, or an HF directory), with no export step.",
    )
    parser.add_argument("model", help="project checkpoint dir, Composer .pt, or an HF model dir")
    parser.add_argument("data", nargs="?", default=None, help="prepared MDS root (holds <split>/<domain>/)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json / --output file")
    loss = parser.add_argument_group("loss evaluation (MODEL DATA)")
    loss.add_argument(
        "--split",
        default="eval",
        choices=SPLITS,
        help="split of DATA: eval (default), test (never read during training) or train",
    )
    parser.add_argument(
        "--batch-size",
        default=None,
        help="samples per forward pass (default: 8); with --tasks also 'auto' (lm-eval's search)",
    )
    loss.add_argument("--max-samples", type=int, default=None, help="at most this many samples per domain")
    loss.add_argument("--transformers", action="store_true", help="load MODEL with plain transformers")
    loss.add_argument("--json", default=None, help="also write the results to this JSON file")
    tasks = parser.add_argument_group("downstream evaluation (MODEL --tasks NAMES)")
    tasks.add_argument(
        "--tasks",
        default=None,
        help="comma-separated lm-eval task, group or tag names and presets (sheared-llama, minitron); "
        "shipped local tasks: local_mc, local_cloze",
    )
    tasks.add_argument(
        "--num-fewshot", type=int, default=None, help="few-shot examples for the tasks outside presets"
    )
    tasks.add_argument(
        "--limit", type=float, default=None, help="at most this many examples per task (a fraction if < 1)"
    )
    tasks.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    tasks.add_argument(
        "--include-path",
        action="append",
        default=[],
        metavar="DIR",
        help="directory of extra lm-eval task YAMLs (repeatable)",
    )
    tasks.add_argument("--output", default=None, metavar="FILE.json", help="write lm-eval's results as JSON")
    tasks.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed for python, numpy, torch and few-shot sampling (default: lm-eval's 0,1234,1234,1234)",
    )
    tasks.add_argument(
        "--dtype",
        default=None,
        choices=("auto", "fp32", "bf16", "fp16"),
        help="weights' dtype (default auto: as stored)",
    )
    tasks.add_argument(
        "--tokenizer", default=None, metavar="DIR", help="tokenizer directory, if not with MODEL"
    )
    parser.set_defaults(func=_run)
