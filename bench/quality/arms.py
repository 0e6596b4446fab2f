"""How the quality benchmark runs an arm: the ``key=value`` overrides of the demo recipes for each stage
(data mix, distillation, L0 masks, learning-rate warm-up), the one-shot pruning whose scores also start
the L0 masks, the scratch arm's random initialisation, and ``run_arm``, which runs every stage of one arm
and records its stages, losses, mixes, FLOPs and sparsity."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any

from llmshearing.pruning.targets import L0Config
from llmshearing.training.recipes import CONTINUE_RECIPE, PRUNE_RECIPE, Steps

from .budget import Budget, Stage, arm_flops, stage_flops
from .sources import (
    TARGET,
    Inputs,
    distill_summary,
    evaluate,
    final_weights,
    l0_sparsity,
    run_totals,
    structure_change,
)

ARM_TITLES = {
    "source": "source model (reference)",
    "l0-dynamic": "L0 pruning + continued, dynamic mix",
    "l0-constant": "L0 pruning + continued, constant mix",
    "l0-distill": "L0 pruning + continued with distillation, dynamic mix",
    "oneshot": "one-shot importance pruning + continued",
    "oneshot-distill": "one-shot importance pruning + distillation",
    "scratch": "target shape from random init",
    "l0-default": "L0 pruning from the default mask start + continued with distillation, dynamic mix",
    "l0-held": "arm 3's stages with the masks held at the one-shot cut (nothing learns but the weights)",
}
CHECKPOINT = Path("checkpoints") / "latest-rank0.pt"
L0_DEFAULTS = {field.name: field.default for field in dataclass_fields(L0Config)}
# log-alpha bound of arm 8's held masks: ranked within 12-16 of it, a sample leaves 0 or 1 with probability < 3.1e-5
HELD_BOUND = 16.0


# ------------------------------------------------------------------------------------------ stages
def mix_overrides(args: Any, interval: int) -> list[str]:
    """The data-mix stabilisers of ``callbacks.data_loading`` (defaults: the paper's rule)."""
    return [
        f"callbacks.data_loading.eta={args.mix_eta}",
        f"callbacks.data_loading.loss_ema={args.mix_ema}",
        f"callbacks.data_loading.min_proportion={args.mix_floor}",
        f"callbacks.data_loading.update_warmup={args.mix_warmup * interval}ba",
        f"callbacks.data_loading.excess={args.mix_excess}",
    ]


def distill_overrides(args: Any, teacher: Path) -> list[str]:
    """``model.distillation`` with the source as the teacher."""
    top_k = "null" if args.kd_top_k is None else args.kd_top_k
    return [
        f"model.distillation.teacher={teacher}",
        f"model.distillation.alpha={args.kd_alpha}",
        f"model.distillation.temperature={args.kd_temperature}",
        f"model.distillation.kind={args.kd_kind}",
        f"model.distillation.top_k={top_k}",
    ]


def l0_overrides(args: Any, scores: Path | None, steps: int) -> list[str]:
    """``model.l0_module`` settings of a pruning stage: mask initialisation and learning rates.

    Untrained masks warm the target up over the first 20% of the stage; ranked ones (``scores``) over
    ``--l0-warmup`` of it (default none: the target from the first step), from where their masks begin."""
    share = (args.l0_warmup or 0.0) if scores else 0.2
    warmup_steps = max(1, round(steps * share)) if share else 0
    return [
        f"model.l0_module.init_from={scores if scores else 'null'}",
        f"model.l0_module.lagrangian_warmup_steps={warmup_steps}ba",
        f"model.l0_module.log_alpha_clamp={args.l0_clamp}",
        f"model.l0_module.init_log_alpha={args.l0_clamp}",
        f"model.l0_module.mask_lr={args.mask_lr}",
        f"model.l0_module.multiplier_lr={args.multiplier_lr}",
        f"model.l0_module.init_scale={args.l0_init_scale if scores and args.l0_init_scale else 'null'}",
        f"model.l0_module.bounded_scores={str(bool(args.l0_bounded)).lower()}",
        f"model.l0_module.schedule_l0_lr={'masks' if args.l0_schedule_lr == 'masks' else str(bool(args.l0_schedule_lr)).lower()}",
        f"model.l0_module.multiplier_beta1={'null' if args.multiplier_beta1 is None else args.multiplier_beta1}",
        f"model.l0_module.penalty_per_unit={str(bool(args.l0_per_unit)).lower()}",
        *(
            [f"model.l0_module.fix_shape_at={max(1, round(steps * args.l0_fix_shape))}ba"]
            if args.l0_learned_shape and args.l0_fix_shape
            else []
        ),
        f"model.l0_module.hold_ranked=[{','.join(args.l0_hold) if scores and args.l0_hold else ''}]",
    ]


def default_l0_overrides(steps: int) -> list[str]:
    """Arm 7's masks: the library's defaults (no ranked start), the target warmed up over 20% of the stage."""
    return [
        "model.l0_module.init_from=null",
        f"model.l0_module.lagrangian_warmup_steps={max(1, round(steps * 0.2))}ba",
        *(
            f"model.l0_module.{key}={L0_DEFAULTS[key]}"
            for key in ("log_alpha_clamp", "init_log_alpha", "mask_lr", "multiplier_lr")
        ),
        "model.l0_module.init_scale=null",
        "model.l0_module.bounded_scores=false",
    ]


def held_l0_overrides(scores: Path) -> list[str]:
    """Arm 8's masks: the one-shot cut (ranked near the bound 16, where samples are 0 or 1) with nothing
    learning (mask and multiplier lr 0), so its pruning stage trains the one-shot pruned model's weights on
    arm 3's tokens, steps and lr: what arm 3's mask learning is measured against."""
    return [
        f"model.l0_module.init_from={scores}",
        "model.l0_module.lagrangian_warmup_steps=0ba",
        f"model.l0_module.log_alpha_clamp={HELD_BOUND}",
        f"model.l0_module.init_log_alpha={HELD_BOUND}",
        "model.l0_module.mask_lr=0.0",
        "model.l0_module.multiplier_lr=0.0",
        "model.l0_module.init_scale=null",
        "model.l0_module.bounded_scores=false",
        "model.l0_module.schedule_l0_lr=false",
        "model.l0_module.multiplier_beta1=null",
        "model.l0_module.penalty_per_unit=false",
        "model.l0_module.hold_ranked=[]",
    ]


def warmup_batches(steps: int, share: float) -> int:
    """Learning-rate warm-up of a ``steps``-batch stage: ``share`` of it, at least one batch, and always
    shorter than the stage (a one-batch stage has none)."""
    return min(max(1, round(steps * share)), steps - 1)


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
        f"global_train_batch_size={stage.batch_size(budget)}",
        f"device_train_microbatch_size={min(args.microbatch or budget.batch, stage.batch_size(budget))}",
        f"device_eval_batch_size={args.eval_batch}",
        f"eval_loader.dataset.samples_per_domain={args.train_eval_samples}",
        f"scheduler.t_warmup={warmup_batches(stage.steps, warmup_share)}ba",
        f"precision={args.precision}",
        f"callbacks.data_loading.set_names=[{','.join(inputs.domains)}]",
        f"callbacks.data_loading.proportion=[{','.join(f'{p:.6f}' for p in mix)}]",
        # a continued stage starts from the previous stage's final mix; its floor stays a share of the data's
        f"callbacks.data_loading.floor_proportion=[{','.join(f'{p:.6f}' for p in inputs.proportion)}]",
        f"callbacks.data_loading.target_loss=[{','.join(f'{v:.4f}' for v in reference)}]",
        *mix_overrides(args, interval),
        f"progress_bar={'false' if args.no_progress else 'true'}",
        "autoresume=false",
        "callbacks.speed_monitor.time_unit=seconds",
    ]
    if stage.kind == "l0":
        overrides.append("callbacks.data_loading.reference=null")
    # the demo recipes distil; an arm without distillation turns it off
    overrides += distill_overrides(args, inputs.source) if stage.distill else ["model.distillation=null"]
    return overrides


def normalised(weights: Mapping[str, float], domains: Sequence[str]) -> list[float]:
    values = [max(0.0, float(weights[d])) for d in domains]
    total = sum(values)
    return [v / total for v in values]


def build_scratch(source: Path, out: Path, seed: int, target: Mapping[str, int] = TARGET) -> dict[str, Any]:
    """A randomly initialised ``Decoder`` of the ``target`` shape, saved as a project checkpoint."""
    import torch

    from llmshearing.checkpoint.format import save_checkpoint
    from llmshearing.checkpoint.reading import open_checkpoint
    from llmshearing.hf.config import hf_config_from_model
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
    after_pruning: dict[str, dict[str, float]] | None = None  # its losses, once measured


def target_overrides(args: Any, shape_only: bool = False) -> list[str]:
    """``model.l0_module`` target of an L0 stage: the target shape, or (``--l0-learned-shape M``, unless
    ``shape_only``) a budget of the target's non-embedding parameters whose shape the masks learn, rounded at the
    fold to multiples of M."""
    learned = args.l0_learned_shape and not shape_only
    families = ["layer", "head", "intermediate", "hidden"]
    if learned or args.target["n_kv_heads"] != args.source_cfg.n_kv_heads:
        families.insert(2, "kv_head")  # a target that drops KV groups, or a shape left to the masks
    overrides = [f"model.l0_module.pruning_modules=[{','.join(families)}]"]
    if learned:
        return overrides + [
            "model.l0_module.target_model=null",
            f"model.l0_module.target_budget.non_embedding_params={args.target_cfg.num_params(False)}",
            f"model.l0_module.target_budget.multiple={args.l0_learned_shape}",
            "model.l0_module.budget_shape=learned",
        ]
    return overrides + [f"model.l0_module.target_model.{k}={v}" for k, v in args.target.items()]


def final_shape(model: Path) -> dict[str, int]:
    """The shape of a checkpoint (a project checkpoint folder or a run's Composer checkpoint), from its config."""
    from llmshearing.checkpoint.reading import model_config_if_readable

    config = model_config_if_readable(model)
    if config is None:
        raise RuntimeError(f"{model}: no readable config.json to take the trained shape from")
    return {key: int(getattr(config, key)) for key in TARGET}


def run_oneshot(inputs: Inputs, root: Path, args: Any, steps: Steps) -> OneShot:
    """``prune-oneshot`` of the source, calibrated on the train split; also saves the importance scores."""
    folder = root / "oneshot"
    folder.mkdir(parents=True, exist_ok=True)
    pruned, scores = folder / "pruned", folder / "importance-scores.safetensors"
    target = ",".join(f"{k}={v}" for k, v in args.target.items())
    command = [sys.executable, "-m", "llmshearing.cli", "prune-oneshot", inputs.source, pruned]
    command += ["--data", inputs.mds, "--split", "train", "--samples", args.calibration_samples]
    command += ["--target", target, "--scores-out", scores, "--overwrite"]
    if args.oneshot_compensate:
        command.append("--compensate")
        if args.oneshot_damping is not None:
            command += ["--damping", args.oneshot_damping]
    steps.run("oneshot: prune-oneshot (its scores also initialise the L0 masks)", command)
    return OneShot(pruned, scores, steps.timings[-1][1], args.calibration_samples)


@dataclass
class StageResult:
    name: str
    steps: int
    tokens: int
    seconds: float
    detail: str = ""
    flops: int = 0
    distill: bool = False


def stage_lr(arm: str, stage: Stage, args: Any) -> float:
    """Peak lr of one training stage's weights: ``--scratch-lr``, ``--prune-lr`` or ``--continue-lr``."""
    if arm == "scratch":
        return args.scratch_lr
    return args.prune_lr if stage.kind == "l0" else args.continue_lr


def is_dynamic(arm: str, baseline_mix: str) -> bool:
    """Whether an arm's mix is dynamic: the L0 arms by design, the baselines by ``--baseline-mix``."""
    if arm in ("l0-dynamic", "l0-distill", "l0-default", "l0-held"):
        return True
    return arm in ("oneshot", "oneshot-distill", "scratch") and baseline_mix == "dynamic"


def run_arm(
    arm: str, stages: Sequence[Stage], budget: Budget, inputs: Inputs, root: Path, args: Any, steps: Steps
) -> dict[str, Any]:
    """Run every stage of one arm in ``root/arm``; returns its stages, losses, mixes, FLOPs and sparsity.

    Losses are measured on ``args.report_split`` (test; eval in a study) and, unless that is eval, also on
    eval (``eval_losses``: what later choices may read)."""
    python = sys.executable
    cli = [python, "-m", "llmshearing.cli"]
    folder = root / arm
    folder.mkdir(parents=True, exist_ok=True)
    dynamic = is_dynamic(arm, args.baseline_mix)
    mix = list(inputs.proportion)
    model: Path = inputs.source
    record: dict[str, Any] = {
        "title": ARM_TITLES[arm],
        "seed": args.seed,
        "dynamic": dynamic,
        "stages": [],
        "mixes": {},
    }

    def timed(stage: Stage, command: list[Any] | None = None, func: Any = None, detail: str = "") -> Any:
        result = steps.run(f"{arm} (seed {args.seed}): {stage.name}", command, func)
        flops = stage_flops(stage, budget, args.source_cfg, args.target_cfg)
        result_row = StageResult(
            stage.name, stage.steps, stage.tokens(budget), steps.timings[-1][1], detail, flops, stage.distill
        )
        record["stages"].append(asdict(result_row))
        return result

    for stage in stages:
        if stage.kind in ("l0", "train"):
            run = folder / stage.name
            recipe = PRUNE_RECIPE if stage.kind == "l0" else CONTINUE_RECIPE
            # lr warm-up: 10% of a run that starts from the source or from random weights, 3% after pruning
            warmup = 0.03 if stage.kind == "train" and arm != "scratch" else 0.1
            overrides = train_overrides(budget, stage, inputs, model, run, mix, args, warmup)
            overrides.append(f"callbacks.data_loading.dynamic={'true' if dynamic else 'false'}")
            overrides.append(f"optimizer.lr={stage_lr(arm, stage, args)}")
            detail = "distillation from the source" if stage.distill else ""
            if (
                stage.kind == "l0" and arm == "l0-held"
            ):  # the target shape, never a learned one: the cut is held
                overrides += held_l0_overrides(args.oneshot.scores)
                overrides += target_overrides(args, shape_only=True)
                start = "masks held at the one-shot cut"
            elif stage.kind == "l0":
                ranked = args.oneshot is not None and args.l0_init == "importance" and arm != "l0-default"
                scores = args.oneshot.scores if ranked else None
                overrides += (
                    default_l0_overrides(stage.steps)
                    if arm == "l0-default"
                    else l0_overrides(args, scores, stage.steps)
                )
                overrides += target_overrides(args)
                start = (
                    "masks start from the one-shot importance scores" if scores else "masks start untrained"
                )
            if stage.kind == "l0":
                detail = "; ".join(filter(None, [start, detail]))
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
            if stage.distill:
                record["stages"][-1]["distill_summary"] = distill_summary(run)
            if stage.kind == "l0":
                record["sparsity"] = l0_sparsity(run)
                if args.oneshot is not None:
                    record["structure"] = structure_change(run, args.oneshot.pruned)
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
            timed(stage, func=lambda init=init: build_scratch(inputs.source, init, args.seed, args.target))
            model = init
        if stage.kind == "fold":
            print(
                f"--- {arm}: {args.report_split} loss after pruning (before continued pretraining)",
                flush=True,
            )
            record["after_pruning"] = evaluate(model, inputs.mds, args.eval_samples, args.report_split)
        elif stage.kind == "oneshot":  # one model shared by the one-shot arms and seeds: measured once
            if args.oneshot.after_pruning is None:
                print(f"--- {args.report_split} loss of the one-shot pruned model", flush=True)
                args.oneshot.after_pruning = evaluate(model, inputs.mds, args.eval_samples, args.report_split)
            record["after_pruning"] = args.oneshot.after_pruning
    record["shape"] = final_shape(model)
    print(f"--- {arm}: final {args.report_split} loss", flush=True)
    record["losses"] = evaluate(model, inputs.mds, args.eval_samples, args.report_split)
    if args.tasks:  # downstream accuracy on tasks built from the test split
        record["downstream"] = args.downstream.score(model, args.tasks)
    if args.lm_eval_tasks:
        record["lm_eval"] = args.downstream.score_lm_eval(model, args.lm_eval_tasks, args.lm_eval_limit)
    if args.report_split != "eval":
        record["eval_losses"] = evaluate(model, inputs.mds, args.eval_samples, "eval")
    record["tokens"] = sum(s["tokens"] for s in record["stages"])
    record["seconds"] = sum(s["seconds"] for s in record["stages"])
    record["flops"] = arm_flops(stages, budget, args.source_cfg, args.target_cfg, args.calibration_flops)
    if not args.keep_checkpoints:
        for stage in stages:
            shutil.rmtree(folder / stage.name / "checkpoints", ignore_errors=True)
    return record
