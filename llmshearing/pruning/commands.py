"""The pruning sub-commands of ``llmshearing``: ``prune-model`` and ``prune-oneshot``.

Only argument parsing lives here; the pipelines are :mod:`llmshearing.pruning.prune_model` and
:mod:`llmshearing.pruning.oneshot`, imported when a command runs so that building the parser stays
free of torch.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from llmshearing.config_base import closest_key
from llmshearing.pruning.targets import SHAPE_KEYS

DTYPES = ("fp32", "bf16", "fp16")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    _add_prune_model(subparsers)
    _add_prune_oneshot(subparsers)


def _add_prune_model(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prune-model",
        help="fold the learned masks into the weights: pruning checkpoint -> smaller dense checkpoint",
        description="Compute the deterministic masks of a pruning checkpoint at the exact target shape, fold "
        "them into the weights, slice, renumber the layers and write an llmshearing checkpoint directory "
        "(and optionally a Hugging Face directory) of exactly the target shape.",
    )
    parser.add_argument(
        "ckpt", help="Composer checkpoint of a pruning run: a .pt file or a sharded checkpoint directory"
    )
    parser.add_argument("out", help="output checkpoint directory (must not exist unless --overwrite)")
    parser.add_argument(
        "--hf-out", metavar="DIR", help="also export the pruned model as a Hugging Face directory"
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="the run's config.json with the model and model.l0_module settings (default: beside CKPT or "
        "in its parent folder)",
    )
    parser.add_argument("--dtype", choices=DTYPES, help="stored precision of OUT (default: as in CKPT)")
    parser.add_argument(
        "--hf-dtype", choices=DTYPES, default="bf16", help="precision of --hf-out (default: bf16)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT / --hf-out if they exist")
    _add_allow_indivisible(parser)
    parser.set_defaults(func=run_prune_model)


def run_prune_model(args: argparse.Namespace) -> int:
    from llmshearing.pruning.prune_model import prune_checkpoint

    summary = prune_checkpoint(
        args.ckpt,
        args.out,
        hf_out=args.hf_out,
        config_path=args.config,
        dtype=args.dtype,
        hf_dtype=args.hf_dtype,
        overwrite=args.overwrite,
        allow_indivisible_d_model=args.allow_indivisible_d_model,
    )
    print(summary.describe())
    return 0


def _add_prune_oneshot(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prune-oneshot",
        help="prune a model to a target shape in one shot from activation importance (no training)",
        description="Score heads, KV groups, intermediate dims, hidden dims and layers of SRC on calibration "
        "samples of DATA, keep the most important ones at exactly the target shape (uniform per layer, "
        "GQA-aware) and write the smaller model as a project checkpoint OUT.",
    )
    parser.add_argument("src", help="source checkpoint: project checkpoint dir, HF model dir or Composer .pt")
    parser.add_argument("out", help="output project checkpoint directory (must not exist unless --overwrite)")
    parser.add_argument("--data", required=True, help="prepared MDS root holding <split>/<domain>/")
    parser.add_argument(
        "--target",
        help="target shape, e.g. n_layers=24,n_heads=16,n_kv_heads=4,d_model=2048,"
        "intermediate_size=5504 (omitted keys keep the source size)",
    )
    parser.add_argument(
        "--target-config",
        metavar="YAML",
        help="YAML with a target_model mapping (or a pruning recipe with model.l0_module.target_model), "
        "e.g. the target.yaml of `llmshearing search-shape`",
    )
    parser.add_argument(
        "--budget",
        metavar="KIND=VALUE",
        help="prune to a budget instead of a shape: params=1.3e9, non_embedding_params=4e7, "
        "memory=6GB[,dtype=bf16][,context=TOKENS] or tokens_per_second=2 (x the source, forward-FLOPs cost "
        "model); the shape is the proportional shrink closest to the budget (README: Budgets)",
    )
    parser.add_argument("--samples", type=int, default=256, help="calibration samples (default: 256)")
    parser.add_argument("--batch-size", type=int, default=8, help="calibration batch size (default: 8)")
    parser.add_argument(
        "--split",
        default="train",
        help="split of DATA to calibrate on (default: train; the held-out eval and test splits measure the result)",
    )
    parser.add_argument("--hf-out", metavar="DIR", help="also export the pruned model as an HF directory")
    parser.add_argument("--dtype", choices=DTYPES, help="stored precision (default: the source's)")
    parser.add_argument("--device", help="device for calibration (default: cuda if available, else cpu)")
    parser.add_argument(
        "--scores-out",
        metavar="FILE",
        help="also save the importance scores (safetensors), e.g. to initialise L0 masks",
    )
    parser.add_argument(
        "--compensate",
        action="store_true",
        help="choose the MLP neurons and query heads by least squares and re-fit w2 and wo to make up for the "
        "removed ones (calibration holds a Gram matrix per layer and projection; llmshearing/pruning/README.md)",
    )
    parser.add_argument(
        "--damping",
        type=float,
        metavar="D",
        help="with --compensate: the fit's ridge, a share of each Gram matrix's mean diagonal added to it "
        "(default: 0.001; larger keeps the re-fitted columns closer to the source's, smaller follows the "
        "calibration data more closely; llmshearing/pruning/README.md)",
    )
    parser.add_argument(
        "--start-out",
        metavar="DIR",
        help="with --compensate: also write the source-shaped model with w2 and wo re-fitted (the removed units' "
        "columns zero) and DIR/cut_scores.safetensors ranking exactly the cut, for L0 masks to start from it: "
        "model.path=DIR model.l0_module.init_from=DIR/cut_scores.safetensors model.distillation.teacher=SRC",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace OUT / --hf-out / --start-out if they exist"
    )
    _add_allow_indivisible(parser)
    parser.set_defaults(func=run_prune_oneshot)


def _add_allow_indivisible(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-indivisible-d-model",
        action="store_true",
        help="accept a target whose d_model is not a multiple of n_heads; transformers >= 5 refuses to load "
        "the result (transformers 4.x loads it)",
    )


def run_prune_oneshot(args: argparse.Namespace) -> int:
    given = [args.target, args.target_config, args.budget]
    if sum(value is not None for value in given) != 1:
        raise ValueError(
            "give the target with exactly one of --target KEY=VALUE,..., --target-config YAML or --budget KIND=VALUE"
        )
    target: dict[str, Any] | None
    if args.target is not None:
        target, flag = parse_target(args.target), "--target"
    elif args.target_config is not None:
        target, flag = read_target_config(args.target_config), "--target-config"
    else:
        from llmshearing.pruning.budget import parse_budget

        parse_budget(args.budget, "--budget")  # a malformed budget is told before the source is read
        target, flag = None, "--budget"
    from llmshearing.pruning.oneshot import prune_oneshot

    result = prune_oneshot(
        args.src,
        args.out,
        args.data,
        target,
        samples=args.samples,
        batch_size=args.batch_size,
        hf_out=args.hf_out,
        split=args.split,
        dtype=args.dtype,
        device=args.device,
        scores_out=args.scores_out,
        overwrite=args.overwrite,
        target_flag=flag,
        allow_indivisible_d_model=args.allow_indivisible_d_model,
        budget=args.budget,
        compensate=args.compensate,
        damping=args.damping,
        start_out=args.start_out,
    )
    print(result.describe())
    return 0


def parse_target(text: str) -> dict[str, int]:
    """``"n_layers=2,n_heads=4"`` -> ``{"n_layers": 2, "n_heads": 4}``; unknown keys and non-integers raise."""
    target: dict[str, int] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise ValueError(f"--target {text!r}: expected comma-separated KEY=VALUE pairs, got {item!r}")
        if key not in SHAPE_KEYS:
            close = closest_key(key, SHAPE_KEYS)
            hint = f"did you mean {close}?" if close else f"valid keys are {list(SHAPE_KEYS)}"
            raise ValueError(f"--target: unknown key {key!r}; {hint}")
        if key in target:
            raise ValueError(f"--target: {key} is given twice")
        try:
            target[key] = int(value)
        except ValueError:
            raise ValueError(f"--target: {key}={value!r} is not an integer") from None
    if not target:
        raise ValueError(
            f"--target is empty; give e.g. n_layers=..,n_heads=..; valid keys are {list(SHAPE_KEYS)}"
        )
    return target


def read_target_config(path: str | Path) -> dict[str, Any]:
    """The ``target_model`` mapping of a YAML file (top level, or under ``model.l0_module`` of a recipe)."""
    from omegaconf import OmegaConf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--target-config {path} not found")
    from llmshearing.recipe_file import read_recipe

    try:
        document = OmegaConf.to_container(read_recipe(str(path)), resolve=True)
    except ValueError as err:  # not YAML, or not a mapping: the message names the file and the line
        raise ValueError(f"--target-config: {err}") from None
    except Exception as err:  # an interpolation that does not resolve
        raise ValueError(f"--target-config {path}: {str(err).strip().splitlines()[0]}") from None
    if not isinstance(document, dict):
        raise ValueError(f"--target-config {path} must hold a mapping with a target_model key")
    target = document.get("target_model")
    if target is None:
        target = ((document.get("model") or {}).get("l0_module") or {}).get("target_model")
    if not isinstance(target, dict):
        raise KeyError(
            f"--target-config {path} has no target_model mapping; write "
            f"target_model: {{{', '.join(f'{k}: ...' for k in SHAPE_KEYS)}}}"
        )
    return dict(target)
