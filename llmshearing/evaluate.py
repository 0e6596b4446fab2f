"""`llmshearing evaluate MODEL DATA`: per-domain held-out loss and perplexity of a model.

MODEL is a project checkpoint (converted, pruned) or, with ``--transformers``, any HF model
directory loaded by plain transformers (the check that an exported model works without this
package). DATA is a prepared MDS root (``DATA/<split>/<domain>/``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class DomainLoss:
    domain: str
    tokens: int
    loss: float

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 50.0))


def split_domains(data_dir: str, split: str) -> list[str]:
    root = os.path.join(data_dir, split)
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"{root} is not a directory: DATA must be an MDS root prepared by data_prep/prepare_mds.py "
            f"(holding {split}/<domain>/index.json)"
        )
    domains = sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "index.json")))
    if not domains:
        raise FileNotFoundError(f"{root} holds no MDS domain directories (<domain>/index.json)")
    return domains


def load_model_fn(path: str, use_transformers: bool = False) -> Callable:
    """A function ``input_ids -> logits`` for a project checkpoint or (``use_transformers``) an HF dir."""
    import torch

    if use_transformers:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()
        return lambda ids: model(ids).logits
    from llmshearing.models import from_pretrained

    decoder = from_pretrained(path).float().eval()
    return lambda ids: decoder(ids)


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
    import torch
    import torch.nn.functional as F
    from streaming import LocalDataset
    from tqdm import tqdm

    results = []
    for domain in domains or split_domains(data_dir, split):
        dataset = LocalDataset(os.path.join(data_dir, split, domain))
        count = len(dataset) if max_samples is None else min(len(dataset), max_samples)
        total, tokens = 0.0, 0
        bar = tqdm(total=count, desc=f"eval {domain}", unit="seq", disable=not progress, leave=False)
        with torch.no_grad():
            for start in range(0, count, batch_size):
                rows = [
                    np.asarray(dataset[i]["tokens"], dtype=np.int64)
                    for i in range(start, min(count, start + batch_size))
                ]
                ids = torch.from_numpy(np.stack(rows))
                logits = model_fn(ids).float()
                loss = F.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
                )
                total += float(loss)
                tokens += ids[:, 1:].numel()
                bar.update(len(rows))
        bar.close()
        results.append(DomainLoss(domain, tokens, total / max(tokens, 1)))
    return results


def format_table(results: Sequence[DomainLoss]) -> str:
    lines = [f"{'domain':<16} {'tokens':>10} {'loss':>8} {'ppl':>10}"]
    for r in results:
        lines.append(f"{r.domain:<16} {r.tokens:>10} {r.loss:>8.4f} {r.perplexity:>10.2f}")
    if results:
        mean = sum(r.loss for r in results) / len(results)
        lines.append(f"{'average':<16} {'':>10} {mean:>8.4f} {math.exp(mean):>10.2f}")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    if not os.path.exists(args.model):
        raise FileNotFoundError(f"model {args.model!r} does not exist")
    domains = split_domains(args.data, args.split)
    model_fn = load_model_fn(args.model, args.transformers)
    results = domain_losses(model_fn, args.data, args.split, args.batch_size, args.max_samples, domains)
    print(format_table(results))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(
                {r.domain: {"tokens": r.tokens, "loss": r.loss, "perplexity": r.perplexity} for r in results},
                handle,
                indent=2,
            )
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("evaluate", help="per-domain held-out loss and perplexity of a model")
    parser.add_argument("model", help="project checkpoint dir, or an HF model dir with --transformers")
    parser.add_argument("data", help="prepared MDS root (holds <split>/<domain>/)")
    parser.add_argument("--split", default="eval")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-samples", type=int, default=None, help="at most this many samples per domain")
    parser.add_argument("--transformers", action="store_true", help="load MODEL with plain transformers")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.set_defaults(func=_run)
