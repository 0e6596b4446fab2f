"""One-shot structured pruning from activation importance: the pipeline of ``llmshearing prune-oneshot``.

The dense source model scores every structure on calibration data (:mod:`llmshearing.pruning.importance`);
the top-ranked units are kept at exactly the target shape, uniformly per layer and GQA-aware
(:func:`llmshearing.pruning.ranking.oneshot_masks`); the 0/1 masks are folded and sliced with
``prune_decoder`` and the smaller model is written as a project checkpoint.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmshearing.io.staging import check_distinct_outputs
from llmshearing.models.config import ModelConfig
from llmshearing.pruning.ranking import oneshot_masks
from llmshearing.pruning.start_record import start_overrides, write_start_files
from llmshearing.pruning.targets import (
    CLOSING_MULTIPLIERS,
    PREFIX,
    SHAPE_KEYS,
    L0Config,
    TargetPlan,
    check_loadable_shape,
)

# Every family a target shape can shrink; families whose size does not change keep all their units.
ONESHOT_FAMILIES = ("layer", "head", "kv_head", "intermediate", "hidden")
RECORD_NAME = "oneshot.json"
MASKS_NAME = "oneshot_masks.safetensors"
DTYPE_OF = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


ALLOW_INDIVISIBLE_FLAG = "--allow-indivisible-d-model"


def resolve_target(
    source: ModelConfig,
    target_model: Mapping[str, Any],
    flag: str = "--target",
    allow_indivisible_d_model: bool = False,
) -> TargetPlan:
    """Validate ``target_model`` against ``source`` with the L0 target rules; errors name ``flag``.

    A ``d_model`` that is not a multiple of ``n_heads`` is refused (transformers >= 5 cannot load the
    result) unless ``allow_indivisible_d_model``.
    """
    try:
        l0 = L0Config(pruning_modules=list(ONESHOT_FAMILIES), target_model=dict(target_model))
        plan = l0.resolve(source)
    except ValueError as err:
        message = str(err).replace(f"{PREFIX}.target_model.", "").replace(f"{PREFIX}.target_model", flag)
        raise ValueError(f"{flag}: {message}") from None
    if not allow_indivisible_d_model and plan.target is not None:
        check_loadable_shape(plan.target, flag, f"pass {ALLOW_INDIVISIBLE_FLAG}", source)
    return plan


@dataclass
class OneShotResult:
    out: Path
    hf_out: Path | None
    source: ModelConfig
    pruned: ModelConfig
    samples: int
    tokens: int
    seconds: float
    choice: str | None = None  # how a --budget resolved to the shape
    start: Path | None = None  # --start-out: the re-fitted source an L0 run can start from
    source_path: str = ""

    def describe(self) -> str:
        """Shapes and parameters before and after, the calibration cost and what was written."""
        rows = [f"{'':<18}{'source':>14}{'pruned':>14}"]
        for key in (*SHAPE_KEYS, "head_dim"):
            rows.append(f"{key:<18}{getattr(self.source, key):>14}{getattr(self.pruned, key):>14}")
        before, after = self.source.num_params(), self.pruned.num_params()
        rows.append(f"{'parameters':<18}{before:>14,}{after:>14,}  ({after / before:.1%})")
        rows.append(f"calibration: {self.samples} samples, {self.tokens:,} tokens; {self.seconds:.1f} s")
        rows.append(f"wrote {self.out}" + (f" and {self.hf_out}" if self.hf_out else ""))
        if self.start is not None:
            closing = " ".join(f"{PREFIX}.{key}={value}" for key, value in CLOSING_MULTIPLIERS.items())
            rows.append(
                f"wrote {self.start}: the source with w2 / wo re-fitted to this cut; L0 masks start from it with "
                + " ".join(start_overrides(self.start, self.source_path))
                + f" (to end at the target sparsity, also {closing})"
            )
        if self.choice:
            rows.insert(0, self.choice)
        return "\n".join(rows)


def _shape(config: ModelConfig) -> dict[str, int]:
    return {key: getattr(config, key) for key in (*SHAPE_KEYS, "head_dim")}


def _check_fresh(path: Path, flag: str, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise ValueError(f"{flag} {path} already exists; remove it, choose another path or pass --overwrite")


def check_damping(damping: float | None, compensate: bool) -> float:
    """The least-squares fit's damping (``DEFAULT_DAMPING`` when ``None``); refused without ``compensate``
    (nothing would read it) or unless a positive finite number."""
    import math

    from llmshearing.pruning.compensation import DEFAULT_DAMPING

    if damping is None:
        return DEFAULT_DAMPING
    if not compensate:
        raise ValueError(
            f"--damping {damping} sets the least-squares fit of --compensate; add --compensate or drop --damping"
        )
    if (
        isinstance(damping, bool)
        or not isinstance(damping, (int, float))
        or not math.isfinite(damping)
        or damping <= 0
    ):
        raise ValueError(
            f"--damping must be a positive number (a share of each Gram matrix's mean diagonal added to it, "
            f"e.g. 0.01 or 0.001), got {damping!r}"
        )
    return float(damping)


def prune_oneshot(
    src: str | Path,
    out: str | Path,
    data: str | Path,
    target_model: Mapping[str, Any] | None,
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
    allow_indivisible_d_model: bool = False,
    budget: str | Mapping[str, Any] | None = None,
    scores: Any = None,
    compensate: bool = False,
    damping: float | None = None,
    start_out: str | Path | None = None,
) -> OneShotResult:
    """Score ``src`` on ``samples`` calibration sequences of ``data``'s ``split``, prune it to ``target_model``, write ``out``.

    ``out`` is a project checkpoint directory (plus ``oneshot.json`` and the masks used); ``hf_out``
    optionally an HF directory. Every input is validated before any work; outputs are staged and
    renamed, so a failure leaves nothing behind. With ``budget`` (``params=1.3e9``, ``{memory: 6GB}``, ...)
    instead of ``target_model`` the shape is the one the budget resolves to
    (:func:`llmshearing.pruning.budget.choose_shape`). ``scores`` (:class:`ImportanceScores` of ``src``)
    skips the calibration. With ``compensate`` the MLP neurons and the query heads are chosen, and ``w2`` and
    ``wo`` re-fitted, by least squares (:mod:`llmshearing.pruning.compensation`) instead of kept by rank;
    ``damping`` (default ``DEFAULT_DAMPING``) is the fit's ridge, a share of each Gram matrix's mean diagonal.
    ``start_out`` (with ``compensate``) also writes the source-shaped model with the re-fitted ``w2`` / ``wo``
    (the removed units' columns zero) and, in it, ``cut_scores.safetensors``, whose ranking is the
    compensated cut, for L0 masks to start from that cut (``model.path`` = ``start_out``, ``init_from`` = the
    scores, the source as the distillation teacher).
    """
    from llmshearing.checkpoint.format import refuse_pruning_checkpoint, write_project_checkpoint
    from llmshearing.checkpoint.loading import from_pretrained
    from llmshearing.checkpoint.reading import open_checkpoint
    from llmshearing.checkpoint.tensor_io import StateDictSource
    from llmshearing.hf.config import DTYPE_NAMES
    from llmshearing.pruning.fold import prune_decoder
    from llmshearing.pruning.importance import calibration_batches, calibration_domains, compute_importance

    started = time.perf_counter()
    out, hf_path = Path(out), Path(hf_out) if hf_out is not None else None
    start_path = Path(start_out) if start_out is not None else None
    if start_path is not None and not compensate:
        raise ValueError(
            "--start-out writes the least-squares cut's re-fitted source for L0 masks to start from; add "
            "--compensate (without it the start is the source itself: use --scores-out and model.path=SRC)"
        )
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPE_NAMES)}, got {dtype!r}")
    check_distinct_outputs({"OUT": out, "--hf-out": hf_path, "--start-out": start_path})
    _check_fresh(out, "OUT", overwrite)
    if hf_path is not None:
        _check_fresh(hf_path, "--hf-out", overwrite)
    if start_path is not None:
        _check_fresh(start_path, "--start-out", overwrite)
    if samples <= 0 or batch_size <= 0:
        raise ValueError(f"--samples ({samples}) and --batch-size ({batch_size}) must be positive")
    damping = check_damping(damping, compensate)
    with open_checkpoint(src) as ckpt:
        refuse_pruning_checkpoint(
            ckpt.tensors.keys(),
            (
                f"{src} is a pruning run's checkpoint: one-shot pruning it would use the unpruned model and drop "
                "its masks; fold it with `llmshearing prune-model CKPT OUT` (or prune the source model)"
            ),
        )
        source, hf_config, tokenizer_dir = ckpt.config, ckpt.hf_config, ckpt.tokenizer_dir
        stored = ckpt.tensors.meta("tok_embeddings.weight").dtype
    choice = None
    if budget is not None:
        from llmshearing.pruning.budget import ShapeSpace, choose_shape, parse_budget

        if target_model is not None:
            raise ValueError("give the target as a shape or as --budget, not both")
        fixed = ShapeSpace(relax=None)  # prune-oneshot has no grid options: its errors suggest none
        best, choice = choose_shape(source, parse_budget(budget, "--budget"), fixed)
        target_model = best.shape
    elif target_model is None:
        raise ValueError("give a target shape (--target, --target-config) or a --budget")
    plan = resolve_target(source, target_model, target_flag, allow_indivisible_d_model)
    if compensate and scores is not None and scores.grams is None:
        raise ValueError(
            "--compensate needs the calibration's Gram matrices, which saved scores do not hold; "
            "calibrate (leave out the scores) or drop --compensate"
        )
    if scores is None:
        calibration_domains(data, split)
    out_dtype = dtype or DTYPE_OF.get(stored, "fp32")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")

    decoder = from_pretrained(src, dtype=torch.float32 if device == "cpu" else None, device=device)
    if scores is None:
        total, batches = calibration_batches(data, samples, batch_size, split)
        scores = compute_importance(decoder, batches, total=total, progress=progress, grams=compensate)
    if scores_out is not None:
        scores.save(scores_out)
    masks = oneshot_masks(scores, source, plan)
    if compensate:
        from llmshearing.pruning.compensation import compensate as compensate_cut

        masks = compensate_cut(decoder, scores.grams, masks, plan, damping=damping, progress=progress)
    start = None
    if start_path is not None:  # the re-fitted source, before the fold; its scores rank exactly the cut
        from llmshearing.pruning.ranking import scores_of_cut

        cut_scores = scores_of_cut(scores, masks, source, plan)
        # the fold copies what it keeps, so these tensors stay the re-fitted source's
        start = StateDictSource({key: value.detach().cpu() for key, value in decoder.state_dict().items()})
    pruned = prune_decoder(decoder, masks)
    if _shape(pruned.config) != _shape(plan.target):  # type: ignore[arg-type]
        raise RuntimeError(
            f"pruned shape {_shape(pruned.config)} differs from the target {_shape(plan.target)}"
        )
    del decoder
    record = {
        "method": "oneshot-importance" + ("+compensation" if compensate else ""),
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
    if compensate:
        record["damping"] = damping
    if start_path is not None:
        record["start_out"] = str(start_path)

    def extra(staging: Path) -> None:
        from llmshearing.checkpoint.tensor_io import save_tensors

        save_tensors(staging / MASKS_NAME, masks)
        (staging / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        if hf_path is not None:
            from llmshearing.convert.project_to_hf import convert_project_to_hf

            convert_project_to_hf(staging, hf_path, dtype=out_dtype, overwrite=overwrite, progress=progress)
        if start is not None:
            write_project_checkpoint(
                start_path,
                source,
                start,
                hf_config,
                tokenizer_dir,
                out_dtype,
                overwrite,
                extra=lambda start_staging: write_start_files(start_staging, cut_scores, src, damping),
                progress=progress,
            )

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
    return OneShotResult(
        out,
        hf_path,
        source,
        pruned.config,
        scores.samples,
        scores.tokens,
        seconds,
        choice,
        start_path,
        str(src),
    )
