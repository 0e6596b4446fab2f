"""``llmshearing plan``: what a recipe needs on the stated GPUs, before anything is launched.

The recipe is read and validated as training reads it (``load_config`` / ``validate_config``), but
without its files: the source's shape comes from ``model.path``'s ``config.json`` when it exists,
else from ``--source-config`` (a Hugging Face or llmshearing ``config.json``; ``yamls/sources/``
holds the paper's sources). No weights are read, and Composer is not imported (the callbacks' and
loggers' settings, checked against Composer's classes, are left to the run, which checks them first).
Exit status: 0 when every stage fits, 1 when one does not (the last line names the stage, the shortfall
and the fewest GPUs that fit), 2 for bad input.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

EXIT_DOES_NOT_FIT = 1
PLACEHOLDER = "<not needed to plan>"
SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)


def parse_size(text: str, flag: str) -> int:
    """Bytes of ``80GB``, ``80GiB``, ``141G``, ``1TB`` (binary units: 80GB = 80 GiB, what an
    A100-80GB reports)."""
    match = SIZE.match(str(text))
    if not match or float(match.group(1)) <= 0:
        raise ValueError(
            f"{flag} {text!r} is not a size; write e.g. {flag} 80GB (binary units: 80GB = 80 GiB)"
        )
    power = " KMGT".index(match.group(2).upper() or " ")
    return int(float(match.group(1)) * 1024**power)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="per-rank GPU memory, host memory, FLOPs and hours a recipe needs on N GPUs (estimates)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("recipe", help="a training recipe (yamls/...)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, as training takes them")
    parser.add_argument("--gpus", type=int, required=True, help="number of GPUs (ranks) the run would use")
    parser.add_argument("--gpu-memory", default="80GB", help="memory of one GPU (default 80GB)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    parser.add_argument(
        "--host-memory", default=None, help="host memory of one node, e.g. 1TB (checked when given)"
    )
    parser.add_argument(
        "--gpu-tflops",
        type=float,
        default=312.0,
        help="peak dense bf16 TFLOP/s of one GPU (default 312: A100)",
    )
    parser.add_argument(
        "--mfu", type=float, default=0.4, help="model FLOPs utilisation to assume (default 0.4)"
    )
    parser.add_argument(
        "--source-config", default=None, help="config.json of the source when model.path is absent"
    )
    parser.add_argument(
        "--teacher-config",
        default=None,
        help="config.json of the distillation teacher when its path is absent",
    )
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.set_defaults(func=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    check_config_file("--source-config", args.source_config)  # before torch is imported (seconds)
    check_config_file("--teacher-config", args.teacher_config)
    from llmshearing.planning.plan import Hardware, make_plan

    if args.gpus is None or args.gpus < 1:
        raise ValueError(f"--gpus must be a positive number of GPUs, got {args.gpus}")
    if args.gpus_per_node < 1:
        raise ValueError(f"--gpus-per-node must be positive, got {args.gpus_per_node}")
    if not 0 < args.mfu <= 1:
        raise ValueError(f"--mfu must be in (0, 1], got {args.mfu} (e.g. --mfu 0.4 for 40%)")
    if args.gpu_tflops <= 0:
        raise ValueError(f"--gpu-tflops must be positive, got {args.gpu_tflops}")
    hardware = Hardware(
        gpus=args.gpus,
        gpu_memory=parse_size(args.gpu_memory, "--gpu-memory"),
        gpus_per_node=args.gpus_per_node,
        host_memory=parse_size(args.host_memory, "--host-memory") if args.host_memory else None,
        gpu_flops=args.gpu_tflops * 1e12,
        mfu=args.mfu,
    )
    shape, sources = read_run(args.recipe, args.overrides, args.gpus, args.source_config, args.teacher_config)
    plan = make_plan(shape, hardware)
    if args.json:
        print(json.dumps(plan_json(plan, args.recipe, sources), indent=2))
    else:
        print(plan_text(plan, args.recipe, sources))
    failing = plan.failing
    if failing:
        print(f"llmshearing plan: error: {shortfall_line(plan)}", file=sys.stderr, flush=True)
        return EXIT_DOES_NOT_FIT
    return 0


def read_run(
    recipe: str,
    overrides: list[str],
    gpus: int,
    source_config: str | None,
    teacher_config: str | None,
) -> tuple[Any, dict[str, str]]:
    """The recipe validated as training validates it (without its files) and the configs it names."""
    from omegaconf import OmegaConf

    from llmshearing.config_base import ConfigError
    from llmshearing.planning.plan import run_shape
    from llmshearing.training.config import load_config, validate_config

    cfg = load_config(recipe, overrides)
    if OmegaConf.is_missing(cfg, "data_local"):
        cfg.data_local = PLACEHOLDER
    if OmegaConf.is_missing(cfg.model, "path"):
        if source_config is None:
            raise ConfigError(
                f"{recipe} leaves model.path to be set (???): pass model.path=DIR (a checkpoint with config.json) "
                "or --source-config FILE (the source's config.json; yamls/sources/ holds the paper's sources)"
            )
        cfg.model.path = PLACEHOLDER
    run = validate_config(cfg, gpus, check_paths=False, check_components=False)
    model = run.model
    student, where = _source_config(model.path, source_config, "--source-config", "model.path")
    sources = {"source": where}
    teacher = None
    distillation = model.distillation
    if distillation is not None:
        path = distillation.teacher
        if teacher_config is None and path == model.path:
            teacher, sources["teacher"] = student, f"{where} (the source)"
        else:
            teacher, sources["teacher"] = _source_config(
                path, teacher_config, "--teacher-config", "model.distillation.teacher"
            )
        if teacher.vocab_size != student.vocab_size:
            raise ConfigError(
                f"the teacher ({sources['teacher']}) has a vocabulary of {teacher.vocab_size} tokens and the "
                f"student ({where}) {student.vocab_size}; distil from a model with the student's tokenizer"
            )
    if model.l0_module is not None:
        try:  # the target must be reachable from this source, as the run checks it
            model.l0_module.resolve(student)
        except ValueError as err:
            raise ConfigError(f"{recipe}: {err}") from None
    try:
        return run_shape(run, student, teacher), sources
    except ValueError as err:
        raise ConfigError(f"{recipe}: {err}") from None


def check_config_file(flag: str, given: str | None) -> None:
    """A ``ConfigError`` when ``given`` (a ``--*-config`` flag's value) is set and is not a file."""
    from llmshearing.config_base import ConfigError

    if given is not None and not Path(given).is_file():
        raise ConfigError(f"{flag} {given} does not exist; pass a config.json (Hugging Face or llmshearing)")


def _source_config(path: str, given: str | None, flag: str, key: str) -> tuple[Any, str]:
    """The ModelConfig of ``given`` (a config.json) or of the checkpoint at ``path``, and where it came from."""
    from llmshearing.checkpoint.format import CONFIG_NAME
    from llmshearing.checkpoint.reading import read_any_config
    from llmshearing.checkpoint.run_config import find_run_config
    from llmshearing.config_base import ConfigError

    if given is not None:
        check_config_file(flag, given)
        return read_any_config(Path(given))[0], given
    checkpoint = Path(path)
    if checkpoint.is_dir():
        return read_any_config(checkpoint / CONFIG_NAME)[0], str(checkpoint / CONFIG_NAME)
    if checkpoint.is_file():
        found = find_run_config(checkpoint, None)
        return read_any_config(found)[0], str(found)
    shown = "is not set" if path == PLACEHOLDER else f"{path!r} does not exist here"
    raise ConfigError(
        f"{key} {shown}, and the plan needs its shape: pass {flag} FILE (its config.json, Hugging Face or "
        "llmshearing; yamls/sources/ holds Llama-2-7B, Llama-3-8B and the Sheared-LLaMA shapes)"
    )


# ----------------------------------------------------------------------------------------- output
def gib(value: float) -> str:
    """Bytes as GiB (MiB below a tenth of a GiB)."""
    if abs(value) < 0.1 * 1024**3:
        return f"{value / 1024**2:,.1f} MiB"
    return f"{value / 1024**3:,.1f} GiB"


def _shape_line(config: Any) -> str:
    n = config.num_params()
    return (
        f"{config.family} {config.n_layers}L, {config.n_heads} heads over {config.n_kv_heads} KV groups, "
        f"{config.d_model}d, {config.intermediate_size}I, vocab {config.vocab_size}: {n / 1e9:.2f} B parameters"
    )


def settings_line(plan: Any) -> str:
    from llmshearing.planning.plan import micro_batch_for, shards

    shape, hw = plan.shape, plan.hardware
    if shape.fsdp:
        how = (
            f"FSDP {shape.strategy} (weights sharded over {shards(shape, hw.gpus, hw.gpus_per_node)} ranks), "
            f"mixed precision {shape.mixed_precision}"
        )
    else:
        how = "no FSDP (every rank holds the whole model)"
    checkpointing = "on" if shape.checkpointing else "off"
    attention = "FlashAttention-2" if shape.flash else "SDPA"
    per_rank = shape.global_batch // hw.gpus
    return (
        f"{how}, precision {shape.precision}, activation checkpointing {checkpointing}, {attention}; global batch "
        f"{shape.global_batch} x {shape.seq_len} tokens, {per_rank} per rank in micro-batches of "
        f"{micro_batch_for(shape, hw.gpus)}"
    )


def plan_text(plan: Any, recipe: str, sources: dict[str, str]) -> str:
    from llmshearing.planning.plan import fits

    hw, shape = plan.hardware, plan.shape
    nodes = f"{hw.nodes} node{'s' if hw.nodes > 1 else ''} of {hw.ranks_per_node}"
    lines = [
        f"llmshearing plan (estimates): {recipe} on {hw.gpus} x {gib(hw.gpu_memory)} GPUs ({nodes}); "
        f"a rank may use {gib(hw.usable)} (90%, less 1 GiB for the CUDA context)",
        f"  source:  {_shape_line(shape.student)} ({sources['source']})",
    ]
    if shape.teacher is not None:
        lines.append(f"  teacher: {_shape_line(shape.teacher)} ({sources['teacher']})")
    lines.append(f"  {settings_line(plan)}")
    for stage in plan.stages:
        verdict = "fits" if fits(stage, hw) else f"DOES NOT FIT (short by {gib(stage.total - hw.usable)})"
        lines.append("")
        lines.append(
            f"{stage.name}: {gib(stage.total)} per GPU, {verdict}; peak in the {stage.phase} ({stage.note})"
        )
        width = max(len(name) for name in stage.parts)
        for name, value in stage.parts.items():
            lines.append(f"    {name:<{width}}  {gib(value):>11}")
    lines.append("")
    host = " + ".join(f"{gib(v)} {k}" for k, v in plan.host.items())
    stated = f" of {gib(hw.host_memory)} stated" if hw.host_memory else ""
    verdict = "" if plan.host_fits else " DOES NOT FIT"
    sliced_teacher = shape.teacher is not None and shape.sliced_teacher and hw.gpus > 1
    whole_teacher = shape.teacher is not None and not sliced_teacher
    read = "the whole source and the whole teacher" if whole_teacher else "the whole source"
    who = "rank 0 alone reads" if shape.rank0_loading else "every rank reads"  # init_device: mixed or cpu
    how = f"{who} {read} into host memory before FSDP shards them"
    if shape.sliced_source and hw.gpus > 1:
        how = "each rank reads its own shards of the sharded source once FSDP2 has sharded the model"
    if sliced_teacher:
        how += "; each rank reads its own shards of the teacher's sharded weights once its blocks are sharded"
    lines.append(f"host memory per node at start-up: {gib(plan.host_total)}{stated}{verdict} ({host}; {how})")
    speed = plan.speed
    lines.append(
        f"compute: {speed.flops_per_token:.3g} FLOPs per token, {speed.flops_per_step:.3g} per step of "
        f"{speed.tokens_per_step:,} tokens; at {hw.mfu:.0%} MFU of {hw.gpu_flops / 1e12:g} TFLOP/s per GPU: "
        f"{speed.tokens_per_second:,.0f} tokens/s, {speed.hours:,.1f} h for {shape.steps:,} steps "
        f"({speed.hours * hw.gpus:,.0f} GPU-hours; evaluations not counted)"
    )
    fewest = (
        f"{plan.fewest}"
        if plan.fewest is not None
        else "none (no GPU count that divides the global batch fits)"
    )
    lines.append(f"fewest {gib(hw.gpu_memory)} GPUs that fit this recipe: {fewest}")
    if plan.changes:
        lines.append("to fit, change one of:")
        for change in plan.changes:
            lines.append(f"    {change.override:<45} {change.why}")
    return "\n".join(lines)


def shortfall_line(plan: Any) -> str:
    """One line: the first stage that does not fit, by how much, and the fewest GPUs that fit."""
    stage = plan.failing[0]
    hw = plan.hardware
    fewest = (
        f"the fewest {gib(hw.gpu_memory)} GPUs that fit: {plan.fewest}"
        if plan.fewest is not None
        else "no GPU count that divides global_train_batch_size fits with these settings"
    )
    change = (
        f"; or set {plan.changes[0].override}"
        if plan.changes and not plan.changes[0].override.startswith("--")
        else ""
    )
    return (
        f"{stage.name} needs {gib(stage.total)} per GPU, {gib(stage.total - hw.usable)} more than the "
        f"{gib(hw.usable)} a {gib(hw.gpu_memory)} GPU leaves; {fewest}{change}"
    )


def plan_json(plan: Any, recipe: str, sources: dict[str, str]) -> dict[str, Any]:
    from llmshearing.planning.plan import fits

    hw, shape = plan.hardware, plan.shape
    return {
        "recipe": recipe,
        "estimate": True,
        "hardware": asdict(hw) | {"usable_bytes": hw.usable},
        "sources": sources,
        "source": shape.student.to_dict(),
        "teacher": shape.teacher.to_dict() if shape.teacher is not None else None,
        "settings": {k: v for k, v in asdict(shape).items() if k not in ("student", "teacher")},
        "stages": [
            {
                "name": s.name,
                "bytes": s.total,
                "fits": fits(s, hw),
                "phase": s.phase,
                "note": s.note,
                "parts": s.parts,
            }
            for s in plan.stages
        ],
        "host_bytes_per_node": plan.host_total,
        "host_parts": plan.host,
        "host_fits": plan.host_fits,
        "flops_per_token": plan.speed.flops_per_token,
        "flops_per_step": plan.speed.flops_per_step,
        "tokens_per_step": plan.speed.tokens_per_step,
        "tokens_per_second": plan.speed.tokens_per_second,
        "hours": plan.speed.hours,
        "gpu_hours": plan.speed.hours * hw.gpus,
        "fewest_gpus": plan.fewest,
        "fits": not plan.failing,
        "changes": [asdict(c) for c in plan.changes],
    }
