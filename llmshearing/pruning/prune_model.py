"""Fold a pruning checkpoint into a dense model of exactly the target shape (``llmshearing prune-model``).

The run's ``config.json`` (found as :func:`llmshearing.checkpoint.run_config.find_run_config` finds it)
gives the ``l0_module`` settings; the checkpoint must be the one that description was written for. The
L0 module's deterministic masks at the target are folded into the weights (:mod:`llmshearing.pruning.fold`)
and the result is written, staged and renamed, as a project checkpoint (and optionally an HF directory).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmshearing.checkpoint.composer_files import checkpoint_file_problem, read_recorded_identity
from llmshearing.checkpoint.format import L0_PREFIX, write_project_checkpoint
from llmshearing.checkpoint.reading import open_checkpoint
from llmshearing.checkpoint.run_config import differences, find_run_config, parse_run_config
from llmshearing.checkpoint.sharded import is_sharded_checkpoint
from llmshearing.checkpoint.tensor_io import StateDictSource
from llmshearing.convert.project_to_hf import convert_project_to_hf
from llmshearing.io.staging import check_distinct_outputs
from llmshearing.models.config import ModelConfig
from llmshearing.pruning.fold import prune_state_dict
from llmshearing.pruning.hard_concrete import describe_floored, floored_units
from llmshearing.pruning.l0_module import L0Module
from llmshearing.pruning.snapshots import changed_units, describe_moved, read_start_structure
from llmshearing.pruning.targets import SHAPE_KEYS, L0Config, check_loadable_shape, prunable_params


@dataclass
class PruneSummary:
    """Shapes and sizes before and after pruning."""

    source: ModelConfig
    pruned: ModelConfig
    at_target: bool
    out: Path
    hf_out: Path | None
    floored: dict[str, int] | None = None  # kept units per family whose learned value is at the floor
    shape_choice: str | None = None  # a learned budget shape: which shape the fold chose, and why
    moved: dict[str, tuple[int, int]] | None = None  # units the fold keeps or drops against the ranked start

    def describe(self) -> str:
        rows = [f"{'':20s}{'source':>16s}{'pruned':>16s}"]
        for name in SHAPE_KEYS:
            rows.append(f"{name:20s}{getattr(self.source, name):>16,d}{getattr(self.pruned, name):>16,d}")
        rows.append(f"{'parameters':20s}{self.source.num_params():>16,d}{self.pruned.num_params():>16,d}")
        rows.append(
            f"{'prunable params':20s}{prunable_params(self.source):>16,d}{prunable_params(self.pruned):>16,d}"
        )
        if self.shape_choice is not None:  # learned to the end, or fixed as the target part-way
            how = "the shape the masks learned within the budget"
        elif self.at_target:
            how = "the exact target shape"
        else:
            how = "the current expected size (no target_model)"
        floored = sum((self.floored or {}).values())
        rows.append(f"{'kept units at floor':20s}{'':>16s}{floored:>16,d}")
        lines = [f"pruned to {how}:", *rows]
        if self.shape_choice is not None:
            lines.append(self.shape_choice)
        if self.moved is not None:
            lines.append(f"units moved from the ranked start (init_from): {describe_moved(self.moved)}")
        warning = describe_floored(self.floored or {})
        if warning is not None:
            lines.append(f"warning: {warning}")
        lines.append(f"wrote {self.out}")
        if self.hf_out is not None:
            lines.append(f"wrote {self.hf_out}")
        return "\n".join(lines)


def read_l0_settings(config_file: Path) -> dict[str, Any]:
    """The ``l0_module`` settings recorded in a run's ``config.json``."""
    try:
        data = parse_run_config(config_file)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{config_file} is not valid JSON ({err}); pass the run's config.json with --config"
        ) from err
    settings = data.get("l0_module") if isinstance(data, dict) else None
    if settings is None and isinstance(data, dict):  # a training config with the model section
        settings = (data.get("train") or {}).get("model", {}).get("l0_module")
    if not settings:
        raise KeyError(
            f"{config_file} has no l0_module settings: it is not the config of a pruning run; pass the pruning "
            "run's config.json with --config"
        )
    return dict(settings)


def prune_checkpoint(
    ckpt: str | Path,
    out: str | Path,
    hf_out: str | Path | None = None,
    config_path: str | Path | None = None,
    dtype: str | None = None,
    hf_dtype: str = "bf16",
    overwrite: bool = False,
    allow_indivisible_d_model: bool = False,
) -> PruneSummary:
    """Load a pruning checkpoint, fold its deterministic masks and write the pruned checkpoint(s).

    A pruned shape whose ``d_model`` is not a multiple of ``n_heads`` (which transformers >= 5 refuses
    to load) is refused before anything is written, unless ``allow_indivisible_d_model`` or the run's
    ``model.l0_module.allow_indivisible_d_model`` accepts it.
    """
    ckpt = Path(ckpt)
    if not ckpt.exists():
        raise FileNotFoundError(f"{ckpt} not found; pass the Composer checkpoint (.pt) of a pruning run")
    if not ckpt.is_file() and not is_sharded_checkpoint(ckpt):
        raise ValueError(
            f"{ckpt} is a directory but not a sharded checkpoint (no .metadata); prune-model needs a Composer "
            "checkpoint of a pruning run: a .pt file, or the directory of a sharded FSDP checkpoint"
        )
    problem = checkpoint_file_problem(ckpt) if ckpt.is_file() else None
    if problem is not None:
        raise ValueError(f"{problem}; prune-model needs the Composer checkpoint (.pt) of a pruning run")
    check_distinct_outputs({"OUT": out, "--hf-out": hf_out})
    for path in (Path(out), Path(hf_out) if hf_out else None):
        if path is not None and path.exists() and not overwrite:
            raise ValueError(f"{path} already exists; remove it, choose another path or pass --overwrite")
    run_config = find_run_config(ckpt, Path(config_path) if config_path else None)
    l0_config = L0Config.from_dict(read_l0_settings(run_config))
    check_description_matches(ckpt, run_config, l0_config.to_dict())

    with open_checkpoint(ckpt, run_config) as source:
        config, hf_config = source.config, source.hf_config
        tokenizer_dir = source.tokenizer_dir
        l0_state = {
            k[len(L0_PREFIX) :]: source.tensors.get(k)
            for k in source.tensors.keys()
            if k.startswith(L0_PREFIX)
        }
        if not l0_state:
            raise ValueError(
                f"{ckpt} holds no l0_module.* tensors: it is not a pruning checkpoint (already pruned, or trained "
                "without model.l0_module)"
            )
        weights = {k: source.tensors.get(k) for k in source.tensors.keys() if not k.startswith(L0_PREFIX)}

    module = L0Module(config, l0_config)
    result = module.load_state_dict(l0_state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{ckpt}: the l0_module tensors do not match the l0_module settings in {run_config} "
            f"(missing {result.missing_keys}, unexpected {result.unexpected_keys}); pass the run's own config.json"
        )
    at_target = module.plan.target is not None
    allowed = allow_indivisible_d_model or l0_config.allow_indivisible_d_model
    where = f"the target of {ckpt} ({run_config}: model.l0_module.target_model)"
    opt_out = "pass --allow-indivisible-d-model"
    if at_target and not allowed:  # before the fold: refused at once
        check_loadable_shape(module.plan.target, where, opt_out, config)
    masks = module.deterministic_masks(at_target=True)
    shape_choice = module.learned_shape()[1] if module.learns_budget_shape else None
    floored = floored_units(masks)
    start = read_start_structure(run_config.parent) if l0_config.init_from is not None else None
    moved = changed_units(masks, start) if start is not None else None
    pruned_state, pruned_config = prune_state_dict(weights, config, masks, progress=True)
    if at_target and pruned_config != module.plan.target:
        raise ValueError(f"pruned shape {pruned_config} differs from the target {module.plan.target}")
    if not allowed:  # a target_sparsity run's shape is known once folded
        check_loadable_shape(pruned_config, f"the pruned shape of {ckpt}", opt_out, config)

    write_project_checkpoint(
        out, pruned_config, StateDictSource(pruned_state), hf_config, tokenizer_dir, dtype, overwrite
    )
    if hf_out is not None:
        convert_project_to_hf(out, hf_out, dtype=hf_dtype, overwrite=overwrite, run_config=run_config)
    return PruneSummary(
        config,
        pruned_config,
        at_target,
        Path(out),
        Path(hf_out) if hf_out else None,
        floored,
        shape_choice,
        moved,
    )


def check_description_matches(ckpt: Path, run_config: Path, l0_settings: dict[str, Any]) -> None:
    """The run description must describe the checkpoint: the model shape and the mask settings the
    checkpoint recorded when it was written (checkpoints without a record are not checked)."""
    recorded = read_recorded_identity(ckpt)
    if recorded is None or recorded.get("l0_module") is None:  # no record, or not a pruning run (told later)
        return
    model = parse_run_config(run_config).get("model")
    changed = differences({"model": model, "l0_module": l0_settings}, recorded)
    if changed:
        raise ValueError(
            f"{run_config} does not describe {ckpt}: {'; '.join(changed[:6])} ({run_config.name} vs the "
            "checkpoint); the run's config.json was replaced after this checkpoint was written: pass the "
            "description the run was trained with via --config"
        )
