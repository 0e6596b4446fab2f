"""One-shot structured pruning from activation importance (``llmshearing prune-oneshot``).

The dense source model scores every structure on calibration data (:mod:`llmshearing.pruning.importance`);
the top-ranked units are kept at exactly the target shape, uniformly per layer and GQA-aware (the kept
KV groups of a layer each keep their best ``n_heads / n_kv_heads`` query heads, as the L0 module's
deterministic masks do, and a KV group is ranked by the heads it keeps); the 0/1 masks are folded and sliced with ``prune_decoder``. The same ranking
can instead initialise an ``L0Module``'s log-alphas (:func:`importance_log_alpha`).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llmshearing.models.config import ModelConfig
from llmshearing.models.decoder import Decoder
from llmshearing.pruning.importance import (
    ImportanceScores,
    calibration_batches,
    compute_importance,
    scores_by_family,
)
from llmshearing.pruning.l0_module import mask_shapes
from llmshearing.pruning.targets import PREFIX, SHAPE_KEYS, L0Config, TargetPlan

# Every family a target shape can shrink; families whose size does not change keep all their units.
ONESHOT_FAMILIES = ("layer", "head", "kv_head", "intermediate", "hidden")
DEFAULT_MARGIN = 0.25
RECORD_NAME = "oneshot.json"
MASKS_NAME = "oneshot_masks.safetensors"
DTYPE_OF = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


# --------------------------------------------------------------------------------------- target
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
            raise ValueError(f"--target: unknown key {key!r}; valid keys are {list(SHAPE_KEYS)}")
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
    try:
        document = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except Exception as err:  # omegaconf/yaml raise several types for malformed files
        raise ValueError(f"--target-config {path} is not valid YAML ({err})") from err
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


def resolve_target(
    source: ModelConfig, target_model: Mapping[str, Any], flag: str = "--target"
) -> TargetPlan:
    """Validate ``target_model`` against ``source`` with the L0 target rules; errors name ``flag``."""
    try:
        l0 = L0Config(pruning_modules=list(ONESHOT_FAMILIES), target_model=dict(target_model))
        return l0.resolve(source)
    except ValueError as err:
        message = str(err).replace(f"{PREFIX}.target_model.", "").replace(f"{PREFIX}.target_model", flag)
        raise ValueError(f"{flag}: {message}") from None


# ---------------------------------------------------------------------------------------- ranks
def _rows(family: str, tensor: Tensor, config: ModelConfig, plan: TargetPlan) -> Tensor:
    """Arrange a family's tensor so that units compete within the last dim.

    Query heads compete within blocks of ``plan.head_block`` heads: their KV group, or the whole layer
    for a multi-head-attention source pruned by ``head`` alone.
    """
    if family == "head":
        return tensor.reshape(config.n_layers, -1, plan.head_block)
    return tensor


def _ranks(scores: Tensor) -> Tensor:
    """Rank of each unit within its row (0 = highest score); ties go to the lower index."""
    order = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    positions = torch.arange(scores.shape[-1]).expand_as(order)
    return ranks.scatter_(-1, order, positions)


def _family_sizes(config: ModelConfig, plan: TargetPlan) -> dict[str, int]:
    """Units per row of each family, as :func:`_rows` arranges them."""
    return {
        "layer": config.n_layers,
        "head_layer": config.n_layers,
        "mlp": config.n_layers,
        "head": plan.head_block,
        "kv_head": config.n_kv_heads,
        "intermediate": config.intermediate_size,
        "hidden": config.d_model,
    }


def surviving_group_scores(head: Tensor, config: ModelConfig, kept_heads: int) -> Tensor:
    """Score [L, Hkv] of each KV group: the sum of its ``kept_heads`` best query-head scores.

    Only those heads survive in a kept group, so a group is worth what it keeps, not all its heads.
    """
    grouped = head.float().reshape(config.n_layers, config.n_kv_heads, config.heads_per_group)
    return torch.sort(grouped, dim=-1, descending=True).values[..., :kept_heads].sum(-1)


def ranking_scores(
    scores: ImportanceScores | Mapping[str, Tensor], config: ModelConfig, plan: TargetPlan
) -> dict[str, Tensor]:
    """The score that ranks each family of ``plan``, shaped like the family's mask.

    * ``kv_head``: :func:`surviving_group_scores` with the query heads per group the target keeps;
    * ``head_layer`` and ``mlp`` (pruned together): both rank layers by the sum of the two branch
      influences, so they drop the same layers (as the L0 module's deterministic masks do);
    * every other family: its own importance score.
    """
    by_family = scores_by_family(scores)
    ranked = {family: _checked(family, by_family[family], config) for family in plan.families}
    if "kv_head" in ranked:
        kept_heads = plan.keep.get("head", config.heads_per_group)  # all of them when heads are not pruned
        ranked["kv_head"] = surviving_group_scores(
            _checked("head", by_family["head"], config), config, kept_heads
        )
    if plan.blocks_tied:
        ranked["head_layer"] = ranked["mlp"] = ranked["head_layer"].float() + ranked["mlp"].float()
    return ranked


def oneshot_masks(
    scores: ImportanceScores | Mapping[str, Tensor], config: ModelConfig, plan: TargetPlan
) -> dict[str, Tensor]:
    """0/1 masks that keep exactly ``plan.keep`` top-ranked units per row of each family in ``plan``.

    Units are ranked by :func:`ranking_scores`; heads are chosen within their KV group (or layer, see
    :class:`TargetPlan`); heads of a dropped KV group are dropped with it.
    """
    if plan.target is None:
        raise ValueError("one-shot pruning needs an exact target shape (target_model), not a target_sparsity")
    masks = {}
    for family, score in ranking_scores(scores, config, plan).items():
        masks[family] = (
            (_ranks(_rows(family, score, config, plan)) < plan.keep[family]).float().reshape(score.shape)
        )
    if "head" in masks and "kv_head" in masks:
        masks["head"] = masks["head"] * masks["kv_head"].repeat_interleave(config.heads_per_group, dim=1)
    return masks


def importance_log_alpha(
    scores: ImportanceScores | Mapping[str, Tensor],
    model_config: ModelConfig,
    l0_config: L0Config | Mapping[str, Any],
    margin: float = DEFAULT_MARGIN,
) -> dict[str, Tensor]:
    """Initial log-alphas for an ``L0Module`` from an importance ranking, one tensor per pruned family.

    Within each row (per layer; per KV group, or per layer for a multi-head source pruned by ``head``
    alone) units are ranked by :func:`ranking_scores`. The units the target keeps start at ``+bound``
    (best) down to ``+(1 - margin) * bound``; the others from ``-(1 - margin) * bound`` down to ``-bound``
    (worst), linearly in rank, so the values are strictly monotone in the score, the L0 module's
    deterministic masks at the target keep exactly the top-ranked units, and every unit sits near a
    bound, which starts the expected sparsity near the target (``P(z > 0)`` at ``-bound`` is 0.047 for
    the default bound ``log 100``, 1e-6 for 16). ``bound`` is
    ``log_alpha_clamp`` (``init_log_alpha`` when unclamped). With a ``target_sparsity`` instead of a
    target shape every unit lies above the cut-off.
    """
    l0 = L0Config.from_dict(l0_config)
    plan = l0.resolve(model_config)
    if not 0.0 < margin < 1.0:
        raise ValueError(f"margin must be in (0, 1), got {margin}")
    bound = float(l0.log_alpha_clamp if l0.log_alpha_clamp is not None else l0.init_log_alpha)
    if bound <= 0:
        raise ValueError(
            f"{PREFIX}.init_log_alpha must be > 0 to place kept units above the cut-off, got {bound}"
        )
    sizes = _family_sizes(model_config, plan)
    values = {}
    for family, score in ranking_scores(scores, model_config, plan).items():
        n = sizes[family]
        keep = plan.keep.get(family, n)
        inner = (1.0 - margin) * bound
        table = torch.cat([_spread(bound, inner, keep), _spread(-inner, -bound, n - keep)])
        ranks = _ranks(_rows(family, score, model_config, plan))
        values[family] = table[ranks].reshape(score.shape)
    return values


def initialize_from_importance(
    l0_module: Any, decoder: Decoder, data_dir: str | Path | None = None, batch_size: int = 8
) -> ImportanceScores:
    """Set ``l0_module``'s log-alphas from an importance ranking (``model.l0_module.init_from``).

    With ``init_from: importance`` the scores are measured on ``init_samples`` sequences of
    ``data_dir``'s train split (never the held-out eval split) with ``decoder`` (the source
    model); otherwise ``init_from`` names a
    scores file written by ``prune-oneshot --scores-out``.
    """
    config = l0_module.l0_config
    if config.init_from == "importance":
        if data_dir is None:
            raise ValueError(
                f"{PREFIX}.init_from: importance needs the data root (data_local) for calibration"
            )
        total, batches = calibration_batches(data_dir, config.init_samples, batch_size, split="train")
        scores = compute_importance(decoder, batches, total=total)
    else:
        path = Path(str(config.init_from))
        if not path.is_file():
            raise FileNotFoundError(
                f"{PREFIX}.init_from = {path} does not exist; write it with `llmshearing prune-oneshot ... --scores-out FILE`"
            )
        scores = ImportanceScores.load(path)
    values = importance_log_alpha(scores, l0_module.model_config, config)
    with torch.no_grad():
        for family, value in values.items():
            l0_module.log_alpha[family].copy_(value.to(l0_module.log_alpha[family]))
    return scores


def _spread(first: float, last: float, count: int) -> Tensor:
    if count == 1:
        return torch.tensor([first])
    return torch.linspace(first, last, count)


def _checked(family: str, score: Tensor, config: ModelConfig) -> Tensor:
    """The family's score, which must be shaped like the decoder's mask of that name."""
    expected = mask_shapes(config)[family]
    if tuple(score.shape) != expected:
        raise ValueError(
            f"importance score {family!r} has shape {tuple(score.shape)}, expected {expected} for this model; "
            "compute the scores on the same model"
        )
    return score


# --------------------------------------------------------------------------------------- prune
@dataclass
class OneShotResult:
    out: Path
    hf_out: Path | None
    source: ModelConfig
    pruned: ModelConfig
    samples: int
    tokens: int
    seconds: float


def _shape(config: ModelConfig) -> dict[str, int]:
    return {key: getattr(config, key) for key in (*SHAPE_KEYS, "head_dim")}


def _check_fresh(path: Path, flag: str, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise ValueError(f"{flag} {path} already exists; remove it, choose another path or pass --overwrite")


def prune_oneshot(
    src: str | Path,
    out: str | Path,
    data: str | Path,
    target_model: Mapping[str, Any],
    samples: int = 256,
    batch_size: int = 8,
    hf_out: str | Path | None = None,
    split: str = "train",
    dtype: str | None = None,
    device: str | None = None,
    scores_out: str | Path | None = None,
    overwrite: bool = False,
    target_flag: str = "--target",
    progress: bool = True,
) -> OneShotResult:
    """Score ``src`` on ``samples`` calibration sequences of ``data``'s ``split``, prune it to ``target_model``, write ``out``.

    ``out`` is a project checkpoint directory (plus ``oneshot.json`` and the masks used); ``hf_out``
    optionally an HF directory. Every input is validated before any work; outputs are staged and
    renamed, so a failure leaves nothing behind.
    """
    from llmshearing.convert.checkpoint import open_checkpoint, write_project_checkpoint
    from llmshearing.convert.hf_config import DTYPE_NAMES
    from llmshearing.convert.tensor_io import StateDictSource
    from llmshearing.models.loading import from_pretrained
    from llmshearing.pruning.fold import prune_decoder
    from llmshearing.pruning.importance import calibration_batches, calibration_domains, compute_importance

    started = time.perf_counter()
    out, hf_path = Path(out), Path(hf_out) if hf_out is not None else None
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPE_NAMES)}, got {dtype!r}")
    _check_fresh(out, "OUT", overwrite)
    if hf_path is not None:
        _check_fresh(hf_path, "--hf-out", overwrite)
        if hf_path.resolve() == out.resolve():
            raise ValueError(f"--hf-out {hf_path} must differ from OUT")
    if samples <= 0 or batch_size <= 0:
        raise ValueError(f"--samples ({samples}) and --batch-size ({batch_size}) must be positive")
    with open_checkpoint(src) as ckpt:
        if ckpt.has_l0_state():
            raise ValueError(
                f"{src} is a pruning run's checkpoint: one-shot pruning it would use the unpruned model and drop "
                "its masks; fold it with `llmshearing prune-model CKPT OUT` (or prune the source model)"
            )
        source, hf_config, tokenizer_dir = ckpt.config, ckpt.hf_config, ckpt.tokenizer_dir
        stored = ckpt.tensors.meta("tok_embeddings.weight").dtype
    plan = resolve_target(source, target_model, target_flag)
    calibration_domains(data, split)
    out_dtype = dtype or DTYPE_OF.get(stored, "fp32")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    decoder = from_pretrained(src, dtype=torch.float32 if device == "cpu" else None, device=device)
    total, batches = calibration_batches(data, samples, batch_size, split)
    scores = compute_importance(decoder, batches, total=total, progress=progress)
    if scores_out is not None:
        scores.save(scores_out)
    masks = oneshot_masks(scores, source, plan)
    pruned = prune_decoder(decoder, masks)
    if _shape(pruned.config) != _shape(plan.target):  # type: ignore[arg-type]
        raise RuntimeError(
            f"pruned shape {_shape(pruned.config)} differs from the target {_shape(plan.target)}"
        )
    del decoder
    record = {
        "method": "oneshot-importance",
        "source": str(src),
        "data": str(data),
        "split": split,
        "samples": scores.samples,
        "tokens": scores.tokens,
        "source_model": _shape(source),
        "target_model": _shape(pruned.config),
        "params_before": source.num_params(),
        "params_after": pruned.config.num_params(),
        "kept_layers": torch.nonzero(masks["layer"]).flatten().tolist(),
    }

    def extra(staging: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in masks.items()}, str(staging / MASKS_NAME))
        (staging / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        if hf_path is not None:
            from llmshearing.convert.project_to_hf import convert_project_to_hf

            convert_project_to_hf(staging, hf_path, dtype=out_dtype, overwrite=overwrite, progress=progress)

    state = StateDictSource({key: value.detach().cpu() for key, value in pruned.state_dict().items()})
    write_project_checkpoint(
        out,
        pruned.config,
        state,
        hf_config,
        tokenizer_dir,
        out_dtype,
        overwrite,
        extra=extra,
        progress=progress,
    )
    seconds = time.perf_counter() - started
    return OneShotResult(out, hf_path, source, pruned.config, scores.samples, scores.tokens, seconds)


# ------------------------------------------------------------------------------------------ CLI
def format_summary(result: OneShotResult) -> str:
    rows = [f"{'':<18}{'source':>14}{'pruned':>14}"]
    for key in (*SHAPE_KEYS, "head_dim"):
        rows.append(f"{key:<18}{getattr(result.source, key):>14}{getattr(result.pruned, key):>14}")
    before, after = result.source.num_params(), result.pruned.num_params()
    rows.append(f"{'parameters':<18}{before:>14,}{after:>14,}  ({after / before:.1%})")
    rows.append(f"calibration: {result.samples} samples, {result.tokens:,} tokens; {result.seconds:.1f} s")
    rows.append(f"wrote {result.out}" + (f" and {result.hf_out}" if result.hf_out else ""))
    return "\n".join(rows)


def run_prune_oneshot(args: argparse.Namespace) -> int:
    if (args.target is None) == (args.target_config is None):
        raise ValueError(
            "give the target shape with exactly one of --target KEY=VALUE,... or --target-config YAML"
        )
    if args.target is not None:
        target, flag = parse_target(args.target), "--target"
    else:
        target, flag = read_target_config(args.target_config), "--target-config"
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
    )
    print(format_summary(result))
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
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
        help="YAML with a target_model mapping (or a pruning recipe with model.l0_module.target_model)",
    )
    parser.add_argument("--samples", type=int, default=256, help="calibration samples (default: 256)")
    parser.add_argument("--batch-size", type=int, default=8, help="calibration batch size (default: 8)")
    parser.add_argument(
        "--split",
        default="train",
        help="split of DATA to calibrate on (default: train; the held-out eval and test splits measure the result)",
    )
    parser.add_argument("--hf-out", metavar="DIR", help="also export the pruned model as an HF directory")
    parser.add_argument(
        "--dtype", choices=("fp32", "bf16", "fp16"), help="stored precision (default: the source's)"
    )
    parser.add_argument("--device", help="device for calibration (default: cuda if available, else cpu)")
    parser.add_argument(
        "--scores-out",
        metavar="FILE",
        help="also save the importance scores (safetensors), e.g. to initialise L0 masks",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT / --hf-out if they exist")
    parser.set_defaults(func=run_prune_oneshot)
