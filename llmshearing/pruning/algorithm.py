"""``L0Pruning``, the Composer Algorithm of targeted structured pruning, and its functional API.

The functional API works without the Trainer:

* :func:`attach_l0_module` puts an :class:`L0Module` on a ``ComposerLlama`` (its forward then samples
  masks in train mode, uses deterministic masks in eval mode, and its loss adds the Lagrangian);
* :func:`l0_param_groups` gives the optimizer groups ``weights`` / ``masks`` / ``multipliers``
  (:func:`set_multiplier_beta1` then gives the multipliers their own AdamW beta1 where the config sets one);
* :func:`set_l0_step` sets the batch counter that drives the target warm-up.

The Algorithm wires these into a Composer run (see ``llmshearing/pruning/README.md``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from composer.core import Algorithm, Event, State, TimeUnit
from composer.loggers import Logger
from composer.utils import dist
from torch import nn

from llmshearing.pruning.hard_concrete import floored_units, log_floored
from llmshearing.pruning.l0_module import L0Module
from llmshearing.pruning.snapshots import (
    changed_units,
    describe_moved,
    folded_structure,
    mask_snapshot_path,
    read_start_structure,
    save_masks,
    start_snapshot_path,
)
from llmshearing.pruning.targets import L0Config

log = logging.getLogger(__name__)

MIN_MOVABLE = 1e-3  # below this share of samples off the bounds the masks are reported frozen
GAP_TOLERANCE = 0.02  # |expected - target| sparsity at the end of pruning beyond which a run warns


def unwrap(model: nn.Module) -> nn.Module:
    """The ComposerModel inside a DDP wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def l0_module_of(model: nn.Module) -> L0Module | None:
    return getattr(unwrap(model), "l0_module", None)


@contextlib.contextmanager
def masks_disabled(composer_model: nn.Module) -> Iterator[None]:
    """Run ``composer_model`` without its L0 masks inside the block (e.g. to measure the source model)."""
    model = unwrap(composer_model)
    previous = getattr(model, "masks_enabled", True)
    model.masks_enabled = False
    try:
        yield
    finally:
        model.masks_enabled = previous


def attach_l0_module(composer_model: nn.Module, l0_config: L0Config | Mapping[str, Any]) -> L0Module:
    """Create the L0 module for ``composer_model.model``'s shape and attach it as ``composer_model.l0_module``.

    Do this before building the optimizer (use :func:`l0_param_groups`) and before DDP/FSDP wrapping.
    If a module with the same config is already attached it is returned unchanged.
    """
    config = L0Config.from_dict(l0_config)
    model = unwrap(composer_model)
    existing = getattr(model, "l0_module", None)
    if existing is not None:
        if existing.l0_config != config:
            raise ValueError(
                "the model already carries an l0_module with a different config; "
                "build the model once with model.l0_module and pass the same settings to L0Pruning"
            )
        return existing
    decoder = model.model
    reference = next(decoder.parameters())
    module = L0Module(decoder.config, config).to(device=reference.device)
    model.l0_module = module
    return module


def l0_group_params(module: L0Module) -> dict[str, list[nn.Parameter]]:
    """The parameters of the L0 optimizer groups, by group name: ``masks`` (log-alphas), ``multipliers``."""
    return {"masks": list(module.log_alpha.values()), "multipliers": list(module.multipliers.values())}


def _l0_groups(module: L0Module, mask_lr: float, multiplier_lr: float) -> list[dict]:
    """The ``masks`` and ``multipliers`` optimizer groups, without weight decay."""
    lrs = {"masks": mask_lr, "multipliers": multiplier_lr}
    return [
        {"name": name, "params": params, "lr": lrs[name], "weight_decay": 0.0}
        for name, params in l0_group_params(module).items()
    ]


def l0_param_groups(composer_model: nn.Module, lr: float, mask_lr: float, multiplier_lr: float) -> list[dict]:
    """Optimizer groups: ``weights`` (lr), ``masks`` (log-alphas, mask_lr), ``multipliers`` (multiplier_lr).

    The L0 groups use no weight decay. The multipliers are maximised through their negated gradient,
    so every learning rate is positive.
    """
    module = l0_module_of(composer_model)
    if module is None:
        raise ValueError("the model has no l0_module; call attach_l0_module(model, l0_config) first")
    l0_ids = {id(p) for p in module.parameters()}
    weights = [p for p in unwrap(composer_model).parameters() if p.requires_grad and id(p) not in l0_ids]
    return [{"name": "weights", "params": weights, "lr": lr}, *_l0_groups(module, mask_lr, multiplier_lr)]


def set_multiplier_beta1(optimizer: torch.optim.Optimizer, module: L0Module) -> None:
    """Give the optimizer group of the multipliers the module's ``multiplier_beta1`` (no-op when it is null)."""
    beta1 = module.l0_config.multiplier_beta1
    if beta1 is None:
        return
    ids = {id(p) for p in l0_group_params(module)["multipliers"]}
    for group in optimizer.param_groups:
        if not ids & {id(p) for p in group["params"]}:
            continue
        if "betas" not in group:
            raise ValueError(
                f"model.l0_module.multiplier_beta1 sets an Adam-type beta1, but the optimizer "
                f"{type(optimizer).__name__} has no betas; remove multiplier_beta1"
            )
        group["betas"] = (float(beta1), group["betas"][1])


def set_l0_step(composer_model: nn.Module, step: int) -> None:
    """Tell the L0 module how many optimizer batches are done (drives the target warm-up)."""
    module = l0_module_of(composer_model)
    if module is not None:
        module.set_step(step)


def describe_movable(module: L0Module) -> tuple[float, str]:
    """The share of mask samples that can move at the module's current log-alphas, and a sentence on it.

    Below ``MIN_MOVABLE`` the sentence says the masks are frozen where they start and names the keys.
    """
    fraction = module.movable_fraction()
    cfg = module.l0_config
    message = (
        f"L0 masks at start: {fraction:.3%} of mask samples lie strictly between 0 and 1 and carry a gradient"
    )
    if module.held:
        message += f" ({module.held_note})"
    if fraction < MIN_MOVABLE:
        message += (
            f" (below {MIN_MOVABLE:.1%}): almost every sample is clamped at 0 or 1, so the masks stay where they "
            f"start (model.l0_module.init_log_alpha={cfg.init_log_alpha}, log_alpha_clamp={cfg.log_alpha_clamp}, "
            f"temperature={cfg.temperature:.4g}, limit_a={cfg.limit_a}, limit_b={cfg.limit_b}"
            f"{', init_from=' + str(cfg.init_from) if cfg.init_from else ''}); to let them learn, lower "
            "log_alpha_clamp / init_log_alpha (log 100 = 4.6 leaves 4.5% of samples free) or start them in the "
            "interior (init_log_alpha: 0)"
        )
    return fraction, message


def report_movable(module: L0Module, logger: Logger | None = None) -> float:
    """Log (and warn, when the masks are frozen) the share of mask samples that can move; returns it."""
    fraction, message = describe_movable(module)
    (log.warning if fraction < MIN_MOVABLE else log.info)(message)
    if logger is not None:
        logger.log_hyperparameters({"l0/movable_at_start": fraction})
    return fraction


def sparsity_gaps(module: L0Module) -> dict[str, float]:
    """Expected minus final target sparsity: overall (``"all"``) and per family with a target of its own."""
    stats = module.stats()
    gaps = {"all": float(stats["expected_sparsity"]) - module.plan.global_sparsity}
    for family, target in module.plan.family_sparsity.items():
        gaps[family] = float(stats[f"expected_sparsity/{family}"]) - target
    return gaps


def ends_off_target(gaps: Mapping[str, float], final: bool) -> bool:
    """Pruning ends (``final``) with the masks' expected sparsity farther than ``GAP_TOLERANCE`` from the target."""
    return final and abs(gaps["all"]) > GAP_TOLERANCE


def describe_gap(module: L0Module, gaps: Mapping[str, float], batch: int, final: bool) -> str:
    """A sentence on the sparsity ``gaps`` (:func:`sparsity_gaps`) at ``batch``; at the end of pruning (``final``)
    a gap beyond ``GAP_TOLERANCE`` adds what it means for the fold and which keys to change."""
    expected = gaps["all"] + module.plan.global_sparsity
    families = sorted((f for f in gaps if f != "all"), key=lambda f: -abs(gaps[f]))
    message = (
        f"masks at batch {batch}: expected sparsity {expected:.3f} against the target "
        f"{module.plan.global_sparsity:.3f} (gap {gaps['all']:+.3f}"
        + (
            f"; farthest families {', '.join(f'{f} {gaps[f]:+.3f}' for f in families[:2])}"
            if families
            else ""
        )
        + ")"
    )
    if ends_off_target(gaps, final):
        side = "short of" if gaps["all"] < 0 else "past"
        message += (
            f": pruning ends {side} the target by more than {GAP_TOLERANCE}, so the fold "
            f"{'removes' if gaps['all'] < 0 else 'keeps'} the difference without the training having adapted to it; "
            + "; ".join(gap_remedies(module.l0_config))
            + " (llmshearing/pruning/README.md)"
        )
    return message


def gap_remedies(config: L0Config) -> list[str]:
    """The settings that bring the masks to the target by the end of pruning, for the end-gap warning."""
    remedies = [
        "train longer (max_duration, lagrangian_warmup_steps) or raise model.l0_module.multiplier_lr",
    ]
    if "multipliers" in config.scheduled_groups:
        remedies.append(
            "set model.l0_module.schedule_l0_lr: masks (the LR schedule no longer shrinks the multipliers' steps)"
        )
    if config.multiplier_beta1 != 0:
        remedies.append(
            "set model.l0_module.multiplier_beta1: 0 (multipliers without momentum do not run past the target)"
        )
    if config.fix_shape_at is not None:
        remedies.append(
            "fix the learned shape earlier (model.l0_module.fix_shape_at), so the masks have longer to reach it"
        )
    if not config.penalty_per_unit and not config.global_term:
        remedies.append(
            "or set model.l0_module.penalty_per_unit: true (the masks then stay nearer their start)"
        )
    return remedies


class L0Pruning(Algorithm):
    """Learn hard-concrete masks toward a target shape during training.

    Args:
        l0_config: the ``model.l0_module`` settings (dict, OmegaConf node or :class:`L0Config`).
        save_folder: run folder; the deterministic masks are written to ``{save_folder}/masks/ba{N}.pt``
            after every evaluation, and with a ranked start (``init_from``) the structure the masks start at
            to ``masks/start.pt``, each later snapshot counting the units that moved from it. ``None``
            writes no mask files.
    """

    def __init__(self, l0_config: L0Config | Mapping[str, Any], save_folder: str | None = None) -> None:
        self.l0_config = L0Config.from_dict(l0_config)
        self.save_folder = save_folder
        self._start: dict[str, torch.Tensor] | None = None  # the ranked start's structure, once read

    def __repr__(self) -> str:
        return f"L0Pruning(save_folder={self.save_folder!r})"

    def match(self, event: Event, state: State) -> bool:
        return event in (
            Event.INIT,
            Event.FIT_START,
            Event.BATCH_START,
            Event.BATCH_END,
            Event.EVAL_AFTER_ALL,
        )

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            module = self._attach(state)
            module.set_noise_seed(state.rank_zero_seed)
            module.constrain_()
            report_movable(module, logger)
            if state.fsdp_config is not None:  # FSDP moves only the units it wraps; this one stays whole
                state.device.module_to_device(module)
        elif event == Event.FIT_START:  # the log-alphas are ranked (a new run) or resumed by now
            self._write_start(state)
        elif event == Event.BATCH_START:
            set_l0_step(state.model, int(state.timestamp.batch.value))
            self._reset_l0_lr(state)
        elif event == Event.BATCH_END:  # after the optimizer step
            l0_module_of(state.model).constrain_()
            self._log_stats(state, logger)
        elif event == Event.EVAL_AFTER_ALL:
            self._write_masks(state, logger)

    # ------------------------------------------------------------------------------------ INIT
    def _attach(self, state: State) -> L0Module:
        module = attach_l0_module(state.model, self.l0_config)
        l0_params = {id(p) for p in module.parameters()}
        for optimizer in state.optimizers:
            grouped = [
                (group, {id(p) for p in group["params"]} & l0_params) for group in optimizer.param_groups
            ]
            mixed = [g for g, ids in grouped if ids and len(ids) != len(g["params"])]
            if mixed:
                raise ValueError(
                    "the optimizer puts L0 mask parameters in one group with model weights; build it from "
                    "llmshearing.pruning.l0_param_groups(model, lr, mask_lr, multiplier_lr)"
                )
            present = set().union(*(ids for _, ids in grouped)) if grouped else set()
            if present and present != l0_params:
                raise ValueError(
                    "the optimizer holds only some of the L0 parameters; build it with l0_param_groups"
                )
            if not present:  # attached here: give the optimizer the new parameters
                for group in _l0_groups(module, self.l0_config.mask_lr, self.l0_config.multiplier_lr):
                    optimizer.add_param_group(group)
        for optimizer in state.optimizers:
            set_multiplier_beta1(optimizer, module)
        if not self.l0_config.clip_l0_grads:
            self._guard_gradient_clipping(state)
        return module

    def _guard_gradient_clipping(self, state: State) -> None:
        """Surround every GradientClipping with guards that hide the L0 gradients from it.

        ``AFTER_*`` events run algorithms in reverse order, so a guard placed after the clipping
        algorithm in the list runs before it (hide) and one placed before it runs after it (restore).
        """
        from composer.algorithms import GradientClipping

        clippers = [a for a in state.algorithms if isinstance(a, GradientClipping)]
        if not clippers:  # under FSDP the run clips with FSDPGradients, which leaves the L0 groups out itself
            return
        stash: dict[int, torch.Tensor | None] = {}
        algorithms = list(state.algorithms)
        for clipper in clippers:
            index = next(i for i, a in enumerate(algorithms) if a is clipper)
            algorithms.insert(index + 1, _L0GradGuard("hide", stash))
            algorithms.insert(index, _L0GradGuard("restore", stash))
        state.algorithms = algorithms

    # ------------------------------------------------------------------------------ per batch
    def _reset_l0_lr(self, state: State) -> None:
        """Undo the LR schedule for the L0 groups it does not scale (``schedule_l0_lr``: false, or masks)."""
        module = l0_module_of(state.model)
        if module is None:
            return
        l0_params = {
            id(p)
            for name, params in l0_group_params(module).items()
            if name not in self.l0_config.scheduled_groups
            for p in params
        }
        if not l0_params:  # schedule_l0_lr: true, the schedule scales every L0 group
            return
        for optimizer in state.optimizers:
            for group in optimizer.param_groups:
                if "initial_lr" in group and any(id(p) in l0_params for p in group["params"]):
                    group["lr"] = group["initial_lr"]

    def _log_stats(self, state: State, logger: Logger) -> None:
        l0 = getattr(state.outputs, "l0", None)
        if l0 is None:
            return
        stats = dict(l0.stats)
        if l0.penalty is not None:
            stats["penalty"] = l0.penalty.detach()
        if not stats:
            return
        values = torch.stack([v.detach().float().reshape(()) for v in stats.values()]).cpu().tolist()
        logger.log_metrics({f"l0/{name}": value for name, value in zip(stats, values, strict=True)})

    # --------------------------------------------------------------------------------- eval
    def _structure(self, module: L0Module, batch: int) -> dict[str, Any]:
        """A snapshot's masks: as evaluated (``eval_target_model``), and at the target where they differ."""
        at_target = self.l0_config.eval_target_model
        payload: dict[str, Any] = {
            "batch": batch,
            "at_target": at_target,
            "masks": {k: v.cpu() for k, v in module.deterministic_masks(at_target=at_target).items()},
        }
        if module.plan.target is not None and not at_target:
            payload["target_masks"] = {
                k: v.cpu() for k, v in module.deterministic_masks(at_target=True).items()
            }
        return payload

    def _write_start(self, state: State) -> None:
        """Write the ranked start's structure once, at batch 0 of a run with ``init_from`` (rank 0)."""
        module = l0_module_of(state.model)
        if (
            module is None
            or self.save_folder is None
            or self.l0_config.init_from is None
            or dist.get_global_rank() != 0
            or int(state.timestamp.batch.value) != 0
        ):
            return
        payload = self._structure(module, 0)
        save_masks(start_snapshot_path(self.save_folder), payload)
        self._start = folded_structure(payload)

    def _moved(self, payload: Mapping[str, Any]) -> dict[str, tuple[int, int]] | None:
        """The units of ``payload``'s folded structure that differ from the ranked start, when the run has one."""
        if self._start is None and self.save_folder is not None and self.l0_config.init_from is not None:
            self._start = read_start_structure(self.save_folder)  # a resumed run's start
        return None if self._start is None else changed_units(folded_structure(payload), self._start)

    def _write_masks(self, state: State, logger: Logger) -> None:
        """Save the snapshot of this evaluation's masks (rank 0). The last one of pruning also prints its sparsity
        gap and the units moved from the ranked start, which the default logging would not show."""
        module = l0_module_of(state.model)
        if module is None or self.save_folder is None or dist.get_global_rank() != 0:
            return
        batch = int(state.timestamp.batch.value)
        at_target = self.l0_config.eval_target_model
        payload = self._structure(module, batch)
        masks = payload["masks"]
        payload["keep"] = module.keep_counts(at_target=at_target)
        payload["floored"] = floored_units(masks)  # kept units whose learned value is at the floor
        log_floored(payload["floored"], f"masks at batch {batch}")
        final = state.max_duration is not None and (
            state.max_duration.unit == TimeUnit.BATCH and batch >= int(state.max_duration.value)
        )
        gaps = payload["sparsity_gap"] = sparsity_gaps(module)
        lines = [describe_gap(module, gaps, batch, final)]
        off_target = ends_off_target(gaps, final)
        (log.warning if off_target else log.info)(lines[0])
        if at_target and module.learns_budget_shape:
            payload["shape_choice"] = module.learned_shape()[1]
            lines.append(f"masks at batch {batch}: {payload['shape_choice']}")
            log.info(lines[-1])
        moved = self._moved(payload)
        if moved is not None:
            payload["moved"] = moved
            lines.append(
                f"masks at batch {batch}: units moved from the ranked start: {describe_moved(moved)}"
            )
            log.info(lines[-1])
            logger.log_metrics({"l0/units_moved": sum(changed for changed, _ in moved.values())})
        save_masks(mask_snapshot_path(self.save_folder, batch), payload)
        if final:  # the warning already reached the console; the rest is info
            for line in lines[1 if off_target else 0 :]:
                print(f"llmshearing: {line}", flush=True)


class _L0GradGuard(Algorithm):
    """Hides (``hide``) or restores (``restore``) the L0 gradients around gradient clipping."""

    def __init__(self, role: str, stash: dict[int, torch.Tensor | None]) -> None:
        self.role, self.stash = role, stash

    def __repr__(self) -> str:
        return f"_L0GradGuard({self.role!r})"

    def match(self, event: Event, state: State) -> bool:
        return event == Event.AFTER_TRAIN_BATCH

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        module = l0_module_of(state.model)
        if module is None:
            return
        if self.role == "hide":
            self.stash.clear()
            for p in module.parameters():
                self.stash[id(p)] = p.grad
                p.grad = None
        else:
            for p in module.parameters():
                if id(p) in self.stash:
                    p.grad = self.stash[id(p)]
            self.stash.clear()
