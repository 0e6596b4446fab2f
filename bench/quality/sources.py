"""What the quality benchmark reads and measures: the source model and its data (the RedPajama sample or
the demo corpus, converted and prepared once; ``Inputs``), the switch to the miniature source, and the
evaluation helpers: per-domain losses of a checkpoint, the source's cached losses, and what a run's
``metrics.jsonl`` and mask snapshots say it did (totals, final mix, L0 sparsity, structure, distillation)."""

from __future__ import annotations

import gzip
import json
import shutil
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from llmshearing.data.stdlib_corpus import build_corpus
from llmshearing.hf.gguf import smollm2_gguf
from llmshearing.io.staging import write_text_atomic
from llmshearing.training.recipes import CONTINUE_RECIPE, REPO, Steps

from .budget import SPARSITY_TOLERANCE, Budget, make_budget

REDPAJAMA = REPO.parent / "shared" / "data" / "redpajama-sample"
# RedPajama's sampling rates (the initial mix of Sheared-LLaMA's pruning run)
REDPAJAMA_MIX = {
    "arxiv": 0.025,
    "book": 0.045,
    "c4-rp": 0.15,
    "cc": 0.67,
    "github": 0.045,
    "stackexchange": 0.02,
    "wiki": 0.045,
}
TARGET = {"n_layers": 22, "n_heads": 6, "n_kv_heads": 3, "d_model": 480, "intermediate_size": 1024}
TARGET_DESC = "22L / 6 heads over 3 KV groups / 480d / 1024I"
MIN_DOCUMENTS = 3  # a domain needs one document for each of train, eval and test


# -------------------------------------------------------------------------------------------- data
@dataclass
class Inputs:
    source: Path
    mds: Path
    corpus: str
    domains: list[str]
    proportion: list[float]
    excluded: dict[str, str]


def initial_mix(domains: Sequence[str], uniform: bool = False) -> list[float]:
    """RedPajama's sampling rates when the domains are RedPajama's (renormalised), else uniform."""
    if not uniform and domains and all(d in REDPAJAMA_MIX for d in domains):
        rates = [REDPAJAMA_MIX[d] for d in domains]
        return [r / sum(rates) for r in rates]
    return [1.0 / len(domains)] * len(domains)


def has_jsonl_domains(root: Path) -> bool:
    return root.is_dir() and any(any(d.glob("*.jsonl*")) for d in root.iterdir() if d.is_dir())


def count_documents(domain: Path) -> int:
    """Non-blank lines of a domain's ``*.jsonl`` / ``*.jsonl.gz`` files (compressed otherwise: not counted)."""
    total = 0
    for path in sorted(domain.glob("*.jsonl*")):
        if path.name.endswith(".jsonl"):
            opener: Any = open
        elif path.name.endswith(".jsonl.gz"):
            opener = gzip.open
        else:
            return MIN_DOCUMENTS  # another compression: prepare_mds checks the splits itself
        with opener(path, "rt", encoding="utf-8") as handle:
            total += sum(1 for line in handle if line.strip())
    return total


def usable_domains(raw: Path) -> tuple[list[str], dict[str, str]]:
    """Domains of ``raw`` with enough documents for disjoint train / eval / test, and why the others
    are left out."""
    kept, excluded = [], {}
    for domain in sorted(d for d in raw.iterdir() if d.is_dir() and any(d.glob("*.jsonl*"))):
        documents = count_documents(domain)
        if documents < MIN_DOCUMENTS:
            excluded[domain.name] = (
                f"{documents} documents: train, eval and test need {MIN_DOCUMENTS} disjoint ones"
            )
        else:
            kept.append(domain.name)
    return kept, excluded


def domain_view(raw: Path, domains: Sequence[str], view: Path) -> Path:
    """A directory of links to ``domains`` of ``raw`` (what ``prepare_mds.py`` reads)."""
    if view.is_dir() and sorted(p.name for p in view.iterdir()) == sorted(domains):
        return view
    shutil.rmtree(view, ignore_errors=True)
    view.mkdir(parents=True)
    for domain in domains:
        (view / domain).symlink_to((raw / domain).resolve(), target_is_directory=True)
    return view


def prepare_inputs(work: Path, seq_len: int, held_out: int, uniform: bool, steps: Steps) -> Inputs:
    """Convert the source and prepare the MDS data (train, eval, test) once; later runs reuse both."""
    from llmshearing.data.layout import split_domains

    python = sys.executable
    excluded: dict[str, str] = {}
    if has_jsonl_domains(REDPAJAMA):
        raw, corpus = REDPAJAMA, "redpajama-sample"
        kept, excluded = usable_domains(raw)
        if excluded:
            raw = domain_view(raw, kept, work / "raw-redpajama-sample")
    else:
        raw, corpus = work / "raw-demo", "demo-corpus"
        if not raw.is_dir():
            steps.run("build the demo corpus", func=lambda: print(build_corpus(raw)))
    source = work / "source"
    if not (source / "config.json").is_file():
        command = [python, "-m", "llmshearing.cli", "convert", "hf-to-composer", smollm2_gguf(), source]
        steps.run("convert SmolLM2-135M from GGUF", command)
    mds = work / f"mds-{corpus}-seq{seq_len}-eval{held_out}-test{held_out}"
    if not (mds / "manifest.json").is_file():
        shutil.rmtree(mds, ignore_errors=True)  # a run killed mid-way; prepare_mds stages its own output
        command = [python, REPO / "data_prep" / "prepare_mds.py", "--input", raw, "--output", mds]
        command += ["--tokenizer", source, "--seq-len", seq_len, "--eval-seqs", held_out]
        command += ["--test-seqs", held_out, "--workers", 2]
        steps.run(f"prepare MDS data ({corpus})", command)
    domains = split_domains(str(mds), "eval")
    return Inputs(source, mds, corpus, domains, initial_mix(domains, uniform), excluded)


def use_miniature(inputs: Inputs, work: Path, args: Any, steps: Steps) -> tuple[Inputs, Budget]:
    """Switch the benchmark to the miniature source (built and cached on first use): its data, its
    target shape and a budget in the paper's regime (unless ``--steps`` sets T)."""
    from . import miniature

    built = steps.run(
        "miniature source: tokenizer, data, pretraining to a plateau (cached)",
        func=lambda: miniature.build_miniature(
            work, inputs.mds, inputs.source, CONTINUE_RECIPE, lambda command: steps.run("pretrain", command)
        ),
    )
    args.target, args.target_desc, args.miniature = (
        dict(miniature.TARGET),
        miniature.TARGET_DESC,
        built.record,
    )
    budget = miniature_budget(args, built.record["params"]["total"], built.record["spec"]["seq_len"])
    print(
        f"miniature: T = {budget.tokens:,} tokens per arm, pruning share {budget.prune_share:.4f}", flush=True
    )
    return replace(inputs, source=built.source, mds=built.mds), budget


def miniature_budget(args: Any, source_params: int, seq_len: int) -> Budget:
    """The miniature's budget: the paper's regime (unless ``--steps`` sets T), its L0 stages at
    ``miniature.PRUNE_BATCH`` sequences per step and its weights' lrs ``miniature.CONTINUE_LR`` and
    ``miniature.PRUNE_LR``, unless ``--prune-batch`` / ``--continue-lr`` / ``--prune-lr`` say otherwise (recorded
    in ``args``)."""
    from . import miniature

    if args.steps is None:
        total, share = miniature.paper_regime_steps(source_params, args.batch, seq_len)
    else:
        total, share = args.steps, args.prune_share
    if args.prune_batch is None:
        args.prune_batch = miniature.PRUNE_BATCH
    if args.continue_lr is None:
        args.continue_lr = miniature.CONTINUE_LR
    if args.prune_lr is None:
        args.prune_lr = miniature.PRUNE_LR
    return make_budget(
        args.quick, args.scale, args.batch, seq_len, share, 4 if args.quick else total, args.prune_batch
    )


# -------------------------------------------------------------------------------------- evaluation
def evaluate(model: Path, mds: Path, max_samples: int, split: str) -> dict[str, dict[str, float]]:
    """Per-domain token-weighted loss of a checkpoint (directory or Composer ``.pt``) on ``split``."""
    from llmshearing.evaluate import domain_losses, format_table, load_model_fn

    results = domain_losses(load_model_fn(str(model)), str(mds), split=split, max_samples=max_samples)
    print(f"({split} split)\n" + format_table(results), flush=True)
    return {r.domain: {"loss": r.loss, "perplexity": r.perplexity, "tokens": r.tokens} for r in results}


def average_loss(losses: Mapping[str, Mapping[str, float]]) -> float:
    """Unweighted mean of the per-domain losses (every domain counts the same)."""
    return sum(v["loss"] for v in losses.values()) / len(losses)


def source_losses(
    inputs: Inputs, work: Path, max_samples: int, split: str, steps: Steps
) -> dict[str, dict[str, float]]:
    """The source model's losses on ``split``, cached beside the data they were measured on."""
    cache = work / f"source-{split}-{inputs.mds.name}-n{max_samples}.json"
    if cache.is_file():
        return json.loads(cache.read_text(encoding="utf-8"))
    losses = steps.run(
        f"evaluate the source model ({split} split)",
        func=lambda: evaluate(inputs.source, inputs.mds, max_samples, split),
    )
    write_text_atomic(cache, json.dumps(losses, indent=2))
    return losses


def final_weights(run: Path) -> dict[str, float]:
    """The last domain weights a run logged (``data/weight/<domain>`` in its ``metrics.jsonl``)."""
    from llmshearing.training.metrics_log import read_metrics

    path = run / "metrics.jsonl"
    if not path.is_file():
        return {}
    metrics = read_metrics(str(path))
    return {k.split("/", 2)[2]: v[-1][1] for k, v in metrics.items() if k.startswith("data/weight/") and v}


def run_totals(run: Path) -> dict[str, float]:
    """What a run's ``metrics.jsonl`` says it did: batches, tokens (Composer's ``time/token``) and
    seconds spent training and evaluating (``time/train``, ``time/val``; the recipe logs seconds)."""
    from llmshearing.training.metrics_log import read_metrics

    metrics = read_metrics(str(run / "metrics.jsonl"))

    def last(name: str) -> float:
        return metrics[name][-1][1] if metrics.get(name) else 0.0

    return {
        "steps": max((step for series in metrics.values() for step, _ in series), default=0),
        "tokens": last("time/token"),
        "train_seconds": last("time/train"),
        "eval_seconds": last("time/val"),
    }


def l0_sparsity(run: Path) -> dict[str, Any]:
    """The expected and target sparsity an L0 run logged last (``l0/expected_sparsity``,
    ``l0/target_sparsity``), their gap, whether it is within :data:`SPARSITY_TOLERANCE`, and the last gap
    of each mask family that logged its own (``l0/expected_sparsity/<family>``): an overall gap near 0
    can hide families that missed theirs in opposite directions."""
    from llmshearing.training.metrics_log import read_metrics

    metrics = read_metrics(str(run / "metrics.jsonl"))
    series = [metrics.get(f"l0/{name}_sparsity") for name in ("expected", "target")]
    if not all(series):
        raise RuntimeError(f"{run}/metrics.jsonl has no l0/expected_sparsity and l0/target_sparsity")
    first, expected, target = series[0][0][1], series[0][-1][1], series[1][-1][1]
    gap = expected - target
    families = {}
    for name, logged in metrics.items():
        family = name.removeprefix("l0/expected_sparsity/")
        if family != name and logged and metrics.get(f"l0/target_sparsity/{family}"):
            families[family] = logged[-1][1] - metrics[f"l0/target_sparsity/{family}"][-1][1]
    return {
        "initial": first,
        "expected": expected,
        "target": target,
        "gap": gap,
        "ok": abs(gap) <= SPARSITY_TOLERANCE,
        "families": families,
    }


def structure_change(run: Path, oneshot: Path) -> dict[str, Any]:
    """How the structure an L0 run folds differs from the one-shot cut (the masks ``prune-oneshot``
    saved beside the model it wrote to ``oneshot``).

    Reads the run's last mask snapshot (``masks/ba<N>.pt``: the deterministic masks at the target, what
    ``prune-model`` folds) and counts, per mask family, the units one keeps and the other drops.
    """
    import torch
    from safetensors.torch import load_file

    from llmshearing.pruning.oneshot import MASKS_NAME
    from llmshearing.pruning.snapshots import changed_units, folded_structure, latest_mask_snapshot

    cut = oneshot / MASKS_NAME
    latest = latest_mask_snapshot(run)
    if latest is None:
        raise RuntimeError(f"{run}/masks has no ba<N>.pt mask snapshots to compare with the one-shot cut")
    payload = torch.load(latest, map_location="cpu", weights_only=True)
    try:
        moved = changed_units(folded_structure(payload), load_file(str(cut)))
    except ValueError as err:
        raise RuntimeError(f"{latest} against the one-shot cut {cut}: {err}") from None
    return {
        "batch": int(payload["batch"]),
        "changed": {family: n for family, (n, _) in moved.items()},
        "units": {family: u for family, (_, u) in moved.items()},
    }


def distill_summary(run: Path) -> dict[str, float]:
    """Mean LM and KD losses over a distillation run and the teacher's mean share of step time."""
    from llmshearing.training.metrics_log import read_metrics

    metrics = read_metrics(str(run / "metrics.jsonl"))
    names = {"lm": "loss/train/ce", "kd": "loss/train/kd", "teacher_time_share": "distill/teacher_time_share"}
    return {
        key: statistics.fmean(v for _, v in metrics[name]) for key, name in names.items() if metrics.get(name)
    }


def read_target(spec: str) -> dict[str, int]:
    """A target shape from ``--target``: ``key=value`` pairs of every shape key, or a YAML file holding a
    ``target_model`` mapping (as ``llmshearing search-shape --out`` writes) or the mapping itself."""
    path = Path(spec)
    if path.is_file():
        import yaml

        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        shape = loaded.get("target_model", loaded) if isinstance(loaded, dict) else loaded
        if not isinstance(shape, dict):
            raise ValueError(f"{path} holds no target_model mapping")
    else:
        shape = {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"expected key=value pairs or a YAML file, got {item!r}")
            shape[key.strip()] = value.strip()
    from llmshearing.pruning.targets import SHAPE_KEYS

    if sorted(shape) != sorted(SHAPE_KEYS):
        raise ValueError(f"a target names exactly {list(SHAPE_KEYS)}, got {sorted(shape)}")
    try:
        values = {key: int(shape[key]) for key in SHAPE_KEYS}
    except (TypeError, ValueError):
        raise ValueError(f"every size must be an integer, got {shape}") from None
    if min(values.values()) < 1:
        raise ValueError(f"every size must be positive, got {values}")
    return values


def shape_desc(shape: Mapping[str, int]) -> str:
    """``22L / 6 heads over 3 KV groups / 480d / 1024I``."""
    groups = shape["n_kv_heads"]
    return (
        f"{shape['n_layers']}L / {shape['n_heads']} heads over {groups} KV group{'s' if groups != 1 else ''} / "
        f"{shape['d_model']}d / {shape['intermediate_size']}I"
    )
