"""``L0Module``: learnable hard-concrete masks for the chosen families, their Lagrangian and sizes.

The module holds one log-alpha parameter per family (shaped like the decoder's mask of that name)
and the Lagrange multipliers (1-d, one value each), so the model's optimizer, DDP and checkpoints see
them. Calling it returns an :class:`L0Output`: sampled masks and the penalty in training,
deterministic masks in eval.

Under FSDP the module stays whole on every rank (``_fsdp_wrap = False``): its few values keep fp32
whatever the mixed-precision policy, every rank reads the full log-alphas anywhere (mask files, keep
counts, logs), and ``L0Pruning`` averages its gradients across ranks as DDP would.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from llmshearing.models.config import ModelConfig
from llmshearing.models.schema import mask_shapes
from llmshearing.pruning.hard_concrete import HardConcrete, top_units
from llmshearing.pruning.lagrangian import family_penalty, warmed_target
from llmshearing.pruning.targets import BLOCK_FAMILIES, SHAPE_KEYS, L0Config, TargetPlan, prunable_params


def expected_num_params(config: ModelConfig, scores: Mapping[str, Tensor]) -> Tensor:
    """Expected prunable parameters given per-unit keep probabilities of independent masks.

    ``scores`` maps a family to ``P(z > 0)`` per unit (absent families keep everything). Query and
    output projections count per query head, key and value projections per KV group that keeps at
    least one query head, the MLP ``3 * d`` per intermediate dim, everything times the expected hidden
    size. With 0/1 indicators of a concrete mask set this is the exact count of the pruned model.
    """
    L, H, Hkv, hd = config.n_layers, config.n_heads, config.n_kv_heads, config.head_dim
    ref = next(iter(scores.values())) if scores else torch.ones(())
    ones_l = ref.new_ones(L)
    layer = scores.get("layer", ones_l)
    attn = layer * scores.get("head_layer", ones_l)  # [L]
    mlp = layer * scores.get("mlp", ones_l)  # [L]
    head = scores.get("head", ref.new_ones(L, H)).reshape(L, Hkv, H // Hkv)
    kv = scores.get("kv_head", ref.new_ones(L, Hkv))
    query = attn[:, None] * kv * head.sum(-1)  # expected kept query heads per group [L, Hkv]
    any_head = 1.0 - torch.prod(1.0 - head, dim=-1)
    groups = attn[:, None] * kv * any_head  # expected kept KV groups [L, Hkv]
    inter = (
        mlp * scores["intermediate"].sum(-1) if "intermediate" in scores else mlp * config.intermediate_size
    )
    width = scores["hidden"].sum() if "hidden" in scores else ref.new_tensor(float(config.d_model))
    per_width = 2 * hd * (query.sum() + groups.sum()) + 3 * inter.sum()
    return width * per_width


@dataclass
class L0Output:
    """What one call of :class:`L0Module` produces."""

    masks: dict[str, Tensor]
    penalty: Tensor | None
    stats: dict[str, Tensor] = field(default_factory=dict)


class L0Module(nn.Module):
    """Hard-concrete masks for ``l0_config.pruning_modules`` of a model shaped like ``model_config``."""

    _fsdp_wrap = False  # Composer's FSDP (1 and 2) leaves this child of the model unsharded

    def __init__(self, model_config: ModelConfig, l0_config: L0Config | Mapping[str, Any]) -> None:
        super().__init__()
        self.model_config = model_config
        self.l0_config = L0Config.from_dict(l0_config)
        self.plan: TargetPlan = self.l0_config.resolve(model_config)
        cfg = self.l0_config
        self.distribution = HardConcrete(cfg.temperature, cfg.limit_a, cfg.limit_b)
        shapes = mask_shapes(model_config)
        self.log_alpha = nn.ParameterDict(
            {f: nn.Parameter(torch.full(shapes[f], float(cfg.init_log_alpha))) for f in self.plan.families}
        )
        # a learned budget shape fixed at fix_shape_at has both: one global term, then one per family; a family
        # held at its ranked cut has none
        names = self.learned if self.plan.target is not None else ("",)
        if self.fixes_shape:
            names = ("", *self.plan.families)
        self.multipliers = nn.ParameterDict(
            {f"lambda_{i}{'_' + f if f else ''}": nn.Parameter(torch.zeros(1)) for f in names for i in (1, 2)}
        )
        self.register_buffer("step", torch.zeros((), dtype=torch.long), persistent=False)
        self.prunable_size = prunable_params(model_config)
        self.noise_seed: int | None = None
        self._budget_candidates: list[Any] | None = None  # valid shapes of a learned budget, found once
        self._step = 0  # host copy of ``step``: seeds the noise without a device sync
        self._register_load_state_dict_pre_hook(_scalar_multipliers_as_vectors)
        self.warmup_start = self._warmup_start()
        self._budget_plan = self.plan
        if self.fixes_shape:  # the fixed shape and the expected sizes it was rounded from; -1: not fixed yet
            self.register_buffer("fixed_shape", torch.full((len(SHAPE_KEYS),), -1, dtype=torch.long))
            self.register_buffer("fixed_from", torch.zeros(len(SHAPE_KEYS)))
            self.register_load_state_dict_post_hook(lambda module, _: module._apply_fixed_shape())

    @property
    def families(self) -> tuple[str, ...]:
        return self.plan.families

    @property
    def held(self) -> tuple[str, ...]:
        """Families held at the ranked cut of their start (``hold_ranked``): not sampled, not learned."""
        return tuple(self.l0_config.hold_ranked)

    @property
    def held_note(self) -> str:
        """What the run says about its held families (empty when none is held)."""
        if not self.held:
            return ""
        return f"{', '.join(self.held)} held at the ranked cut (model.l0_module.hold_ranked): not sampled, not learned"

    @property
    def learned(self) -> tuple[str, ...]:
        """Families whose masks learn: sampled, and priced by the Lagrangian."""
        return tuple(f for f in self.families if f not in self.held)

    def set_step(self, step: int) -> None:
        """Number of optimizer batches done; drives the target warm-up (and seeds the noise), and at
        ``fix_shape_at`` fixes a learned budget shape as the target."""
        self.step.fill_(int(step))
        self._step = int(step)
        if self.fixes_shape and self.plan.target is None and self._step >= self.l0_config.fix_shape_at:
            self._fix_shape()

    @property
    def fixes_shape(self) -> bool:
        """A learned budget shape that becomes the per-family target at ``fix_shape_at``."""
        return self.learns_budget_shape and self.l0_config.fix_shape_at is not None

    @property
    def shape_fixed(self) -> bool:
        """The learned shape has been fixed: its plan is the target now."""
        return self.plan is not self._budget_plan

    @torch.no_grad()
    def _fix_shape(self) -> None:
        """Round the masks' expected shape (as the fold does) and make it the target from now on; a module
        restored after that batch finds the shape in its state instead (so a resumed run keeps it)."""
        if self.fixed_shape.is_meta:  # built on meta for rank-0 loading: the values arrive later
            return
        if int(self.fixed_shape[0]) < 0:
            shape, expected = self._round_expected()
            self.fixed_shape.copy_(torch.tensor([shape[k] for k in SHAPE_KEYS]))
            self.fixed_from.copy_(torch.tensor([expected[k] for k in SHAPE_KEYS]))
        self._apply_fixed_shape()

    def _apply_fixed_shape(self) -> None:
        """The plan of the fixed shape in ``fixed_shape``, or the budget's while it is unset."""
        if self.fixed_shape.is_meta:  # built on meta for rank-0 loading: the values arrive later
            return
        sizes = [int(v) for v in self.fixed_shape.tolist()]
        fixed = sizes[0] >= 0
        self.plan = self._plan_for(dict(zip(SHAPE_KEYS, sizes, strict=True))) if fixed else self._budget_plan

    def set_noise_seed(self, seed: int | None) -> None:
        """Derive the sampling noise from ``(seed, step)`` instead of the global RNG.

        One mask sample per optimizer step, shared by every micro-batch and every data-parallel
        rank: a run's result does not depend on how its global batch is split across processes and
        micro-batches, and a resumed run draws exactly the noise of an uninterrupted one, whatever
        else consumes random numbers.
        """
        self.noise_seed = None if seed is None else int(seed)

    def _noise(self, device: torch.device) -> torch.Generator | None:
        if self.noise_seed is None:
            return None
        generator = torch.Generator(device=device)
        generator.manual_seed((self.noise_seed * 1_000_003 + self._step) % (2**63 - 1))
        return generator

    @torch.no_grad()
    def constrain_(self) -> None:
        """Clamp every stored log-alpha into ``[-log_alpha_clamp, log_alpha_clamp]`` in place.

        ``L0Pruning`` calls it after every optimizer step (never inside forward, where the parameters
        may be views that autograd or FSDP own), so each step starts from clamped values.
        """
        bound = self.l0_config.log_alpha_clamp
        if bound is not None:
            for log_alpha in self.log_alpha.values():
                log_alpha.clamp_(-bound, bound)

    def clamped_log_alpha(self) -> dict[str, Tensor]:
        """The log-alphas clamped to the bound, with the gradient of the identity.

        Equal to the stored values whenever :meth:`constrain_` ran after the last update, so a caller
        that never calls it (the functional API) still sees bounded masks.
        """
        bound = self.l0_config.log_alpha_clamp
        if bound is None:
            return dict(self.log_alpha.items())
        return {f: la + (la.clamp(-bound, bound) - la).detach() for f, la in self.log_alpha.items()}

    def forward(self) -> L0Output:
        if self.training:
            generator = self._noise(next(iter(self.log_alpha.values())).device)
            log_alpha = self.clamped_log_alpha()
            masks = {f: self.distribution.sample(log_alpha[f], generator) for f in self.learned}
            masks.update(self._held_cut(log_alpha))
            penalty, stats = self._penalty_and_stats()
            return L0Output(masks, penalty, stats)
        masks = self.deterministic_masks(at_target=self.l0_config.eval_target_model)
        return L0Output(masks, None, self.stats())

    @torch.no_grad()
    def movable_fraction(self) -> float:
        """Mean over the units of the learned families (held ones are not sampled) of ``P(0 < z < 1)`` at the
        current log-alphas: the share of mask samples that carry a gradient (see :meth:`HardConcrete.prob_interior`)."""
        log_alpha = self.clamped_log_alpha()
        probs = [self.distribution.prob_interior(log_alpha[f].float()).flatten() for f in self.learned]
        return float(torch.cat(probs).mean().item())

    # ----------------------------------------------------------------------------------- sizes
    def scores(self) -> dict[str, Tensor]:
        """``P(z > 0)`` per unit, per family (differentiable): what the expected sizes count.

        With ``bounded_scores`` it is rescaled linearly so that a unit at the lower log-alpha bound counts
        0 and one at the upper bound counts 1: a unit pushed to the lower bound is counted as removed (as
        the deterministic masks remove it) while its samples still leave 0 now and then, so the loss can
        bring it back. A held family (``hold_ranked``) counts its ranked cut: 1 for a kept unit, 0 otherwise.
        """
        return self._scores_of(self.clamped_log_alpha())

    def _scores_of(self, log_alpha: Mapping[str, Tensor]) -> dict[str, Tensor]:
        scores = {f: self.distribution.prob_nonzero(log_alpha[f]) for f in self.learned}
        bound = self.l0_config.log_alpha_clamp
        if self.l0_config.bounded_scores and bound is not None:
            ends = self.distribution.prob_nonzero(torch.tensor([-bound, bound], dtype=torch.float64))
            low, span = float(ends[0]), float(ends[1] - ends[0])
            scores = {f: ((s - low) / span).clamp(0.0, 1.0) for f, s in scores.items()}
        scores.update(self._held_cut(log_alpha))
        return {f: scores[f] for f in log_alpha}

    def _held_cut(self, log_alpha: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The mask of each held family: 1 for the target's top units of each row by log-alpha, else 0."""
        cut = {}
        for f in self.held:
            _, rank_by = self._in_rows(f, log_alpha)
            kept = top_units(rank_by.detach(), self.plan.keep[f])
            cut[f] = kept.to(log_alpha[f].dtype).reshape(log_alpha[f].shape)
        return cut

    def _in_rows(self, family: str, log_alpha: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``family``'s log-alphas and the scores that rank them, shaped into the rows among which the
        deterministic masks keep their top units: tied blocks rank layers by the sum of both log-alphas (so
        both drop the same layers), query heads rank within each KV group (or layer, see TargetPlan)."""
        la = rank_by = log_alpha[family]
        if self.plan.blocks_tied and family in BLOCK_FAMILIES:
            rank_by = log_alpha["head_layer"] + log_alpha["mlp"]
        if family == "head":
            rows = (self.model_config.n_layers, -1, self.plan.head_block)
            return la.reshape(rows), rank_by.reshape(rows)
        return la, rank_by

    def expected_num_params(self) -> Tensor:
        return expected_num_params(self.model_config, self.scores())

    def row_sparsity(self, scores: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Expected sparsity per row, a row being the units among which the fold keeps its top ``keep``.

        Per layer for kv_head and intermediate, per block of ``head_block`` query heads (a KV group, or
        the layer) for head, one value for the others. Rows that match the fold's rows keep the masks
        from meeting a target in a way the fold cannot realise: with per-layer rows, query heads could
        meet their share by dropping whole KV groups (which the kv_head masks drop anyway) while keeping
        every head of the kept groups.
        """
        rows = {}
        for f, s in scores.items():
            if f == "head":
                s = s.reshape(s.shape[0], -1, self.plan.head_block)
            rows[f] = 1.0 - (s.mean(-1) if s.dim() >= 2 else s.mean())
        return rows

    @torch.no_grad()
    def _warmup_start(self) -> tuple[dict[str, float], float]:
        """Where the target warm-up starts, per family and overall: ``start_sparsity``, or for a ranked start
        (``init_from``) the expected sparsity its masks begin at, so the target moves on from where they are.

        The ranked start's values are known from the config alone (:func:`ranked_start_log_alpha`), so a
        resumed run warms up exactly as the uninterrupted one did."""
        cfg = self.l0_config
        if cfg.init_from is None or cfg.lagrangian_warmup_steps <= 0:
            return {f: float(cfg.start_sparsity) for f in self.plan.family_sparsity}, float(
                cfg.start_sparsity
            )
        from llmshearing.pruning.ranking import ranked_start_log_alpha

        bound = cfg.log_alpha_clamp
        with torch.device("cpu"):  # real values even where the model is built on meta
            values = ranked_start_log_alpha(self.model_config, cfg)
            if bound is not None:
                values = {f: v.clamp(-bound, bound) for f, v in values.items()}
            scores = self._scores_of(values)
            rows = self.row_sparsity(scores)
            overall = 1.0 - expected_num_params(self.model_config, scores) / self.prunable_size
        return {f: float(rows[f].mean()) for f in self.plan.family_sparsity}, float(overall)

    def targets(self) -> tuple[dict[str, Tensor], Tensor]:
        """Current (warmed-up) target sparsity per family and overall (no host sync); a fixed learned shape's
        targets hold from the batch it was fixed on."""
        step, warmup = self.step, self.l0_config.lagrangian_warmup_steps
        if self.shape_fixed:
            fixed = {f: warmed_target(0.0, t, step, 0) for f, t in self.plan.family_sparsity.items()}
            return fixed, warmed_target(0.0, self.plan.global_sparsity, step, 0)
        starts, start = self.warmup_start
        per_family = {
            f: warmed_target(starts[f], t, step, warmup) for f, t in self.plan.family_sparsity.items()
        }
        return per_family, warmed_target(start, self.plan.global_sparsity, step, warmup)

    @torch.no_grad()
    def stats(self) -> dict[str, Tensor]:
        """What a training step logs, without the penalty: expected and (warmed-up) target sparsity, overall and
        per family, the expected parameter count and the multipliers."""
        return self._penalty_and_stats()[1]

    def _penalty_and_stats(self) -> tuple[Tensor, dict[str, Tensor]]:
        scores = self.scores()
        rows = self.row_sparsity(scores)
        expected = expected_num_params(self.model_config, scores)
        sparsity = 1.0 - expected / self.prunable_size
        family_targets, global_target = self.targets()
        lam = {name: _ascent(p) for name, p in self.multipliers.items()}
        if self.plan.target is not None:
            per_unit = self.l0_config.penalty_per_unit
            terms = [
                family_penalty(rows[f], family_targets[f], lam[f"lambda_1_{f}"], lam[f"lambda_2_{f}"])
                * (self.log_alpha[f].numel() if per_unit else 1)
                for f in self.learned
            ]
            # held log-alphas get a zero gradient (DDP expects one for every parameter), so they never move
            terms += [0.0 * self.log_alpha[f].sum() for f in self.held]
            penalty = torch.stack(terms).sum()
            if self.shape_fixed:
                # the global term stays, toward the fixed shape's sparsity: the pressure the masks learned
                # under carries over while the family multipliers build up from 0
                penalty = penalty + family_penalty(sparsity, global_target, lam["lambda_1"], lam["lambda_2"])
        else:
            penalty = family_penalty(sparsity, global_target, lam["lambda_1"], lam["lambda_2"])
            # a learned shape not fixed yet: its family terms get a zero gradient, as DDP expects of parameters
            for name in lam:
                if name not in ("lambda_1", "lambda_2"):
                    penalty = penalty + 0.0 * lam[name].sum()
        stats: dict[str, Tensor] = {
            "expected_params": expected.detach(),
            "expected_sparsity": sparsity.detach(),
            "target_sparsity": global_target,
        }
        for f in self.families:
            stats[f"expected_sparsity/{f}"] = rows[f].detach().mean()
            if f in family_targets:
                stats[f"target_sparsity/{f}"] = family_targets[f]
        for name, p in self.multipliers.items():
            stats[name.replace("lambda_1_", "lambda_1/").replace("lambda_2_", "lambda_2/")] = (
                p.detach().clone()
            )
        return penalty, stats

    # --------------------------------------------------------------------------- deterministic
    @torch.no_grad()
    def keep_counts(self, at_target: bool = True) -> dict[str, int]:
        """Units kept per row by the deterministic masks: the exact target, or the current expected size.

        The expected size is averaged over rows and rounded, so every row keeps the same number of
        units (for ``head``: query heads per KV group).
        """
        if at_target and self.plan.target is not None:
            return dict(self.plan.keep)
        if at_target and self.learns_budget_shape:
            shape, _ = self.learned_shape()
            return dict(self._plan_for(shape).keep)
        scores = self.scores()
        counts = {}
        for f, s in scores.items():
            n = self.plan.head_block if f == "head" else s.shape[-1]
            counts[f] = int(torch.round(s.float().mean() * n).item())
        if self.plan.blocks_tied:  # attention and MLP blocks leave the same layers
            both = torch.stack([scores["head_layer"], scores["mlp"]]).float()
            counts["head_layer"] = counts["mlp"] = int(torch.round(both.mean() * both.shape[-1]).item())
        return counts

    @property
    def learns_budget_shape(self) -> bool:
        """The target is a budget whose shape the masks learn (``budget_shape: learned``)."""
        return self.l0_config.target_budget is not None and self.l0_config.budget_shape == "learned"

    @torch.no_grad()
    def expected_shape(self) -> dict[str, float]:
        """The model shape the masks currently expect (``SHAPE_KEYS`` -> fractional size): kept layers,
        query heads, KV groups, hidden and intermediate sizes; families not pruned keep the source's."""
        cfg = self.model_config
        scores = {f: s.float() for f, s in self.scores().items()}
        if "layer" in scores:
            layers = float(scores["layer"].sum())
        elif self.plan.blocks_tied:
            layers = float(torch.stack([scores["head_layer"], scores["mlp"]]).mean(0).sum())
        else:
            layers = float(cfg.n_layers)
        head_share = float(scores["head"].mean()) if "head" in scores else 1.0
        if self.plan.head_block != cfg.heads_per_group:  # whole heads of a multi-head-attention source
            n_heads = n_kv = head_share * cfg.n_heads
        else:
            n_kv = float(scores["kv_head"].mean()) * cfg.n_kv_heads if "kv_head" in scores else cfg.n_kv_heads
            n_heads = n_kv * head_share * cfg.heads_per_group
        d_model = float(scores["hidden"].sum()) if "hidden" in scores else float(cfg.d_model)
        inter = (
            float(scores["intermediate"].mean()) * cfg.intermediate_size if "intermediate" in scores else None
        )
        return {
            "n_layers": layers,
            "n_heads": n_heads,
            "n_kv_heads": n_kv,
            "d_model": d_model,
            "intermediate_size": float(cfg.intermediate_size) if inter is None else inter,
        }

    def learned_shape(self) -> tuple[dict[str, int], str]:
        """For a budget whose shape the masks learn: the valid shape within the budget nearest to the
        expected shape (:func:`llmshearing.pruning.budget.nearest_shape`), and a line saying which and why."""
        from llmshearing.pruning.budget import shape_label

        if not self.learns_budget_shape:
            raise ValueError("learned_shape needs model.l0_module.target_budget with budget_shape: learned")
        if self.shape_fixed:
            shape = {k: int(v) for k, v in zip(SHAPE_KEYS, self.fixed_shape.tolist(), strict=True)}
            sizes = "/".join(f"{v:.1f}" for v in self.fixed_from.tolist())
            label = shape_label(self.model_config.replace(**shape))
            return shape, (
                f"learned shape {label}: fixed as the target at batch {self.l0_config.fix_shape_at} "
                f"(model.l0_module.fix_shape_at), where the masks expected {sizes} ({'/'.join(SHAPE_KEYS)}), "
                f"rounded to the nearest valid shape within the budget (source {shape_label(self.model_config)})"
            )
        shape, expected = self._round_expected()
        sizes = "/".join(f"{expected[k]:.1f}" for k in SHAPE_KEYS)
        why = (
            f"learned shape {shape_label(self.model_config.replace(**shape))}: the masks expect {sizes} "
            f"({'/'.join(SHAPE_KEYS)}), rounded to the nearest of {len(self._budget_candidates)} valid shapes "
            f"within the budget (source {shape_label(self.model_config)})"
        )
        return shape, why

    def _round_expected(self) -> tuple[dict[str, int], dict[str, float]]:
        """The valid shape within the budget nearest to the masks' expected shape, and that expected shape."""
        from llmshearing.pruning.budget import budget_candidates, nearest_shape

        if self._budget_candidates is None:
            self._budget_candidates = budget_candidates(self.l0_config, self.model_config)
        expected = self.expected_shape()
        return nearest_shape(self._budget_candidates, expected).shape, expected

    def _plan_for(self, shape: Mapping[str, int]) -> TargetPlan:
        settings = {"pruning_modules": list(self.families), "target_model": dict(shape)}
        return L0Config(**settings, allow_indivisible_d_model=True).resolve(self.model_config)

    @torch.no_grad()
    def deterministic_masks(self, at_target: bool = True) -> dict[str, Tensor]:
        """Masks with exactly ``keep_counts(at_target)`` survivors per row (see :meth:`HardConcrete.deterministic`)."""
        cfg = self.model_config
        self.constrain_()
        keep = self.keep_counts(at_target)
        held = self._held_cut(self.log_alpha)  # a held family keeps its cut (the target's size) in any case
        masks = {}
        for f, la in self.log_alpha.items():
            rows, rank_by = self._in_rows(f, self.log_alpha)
            mask = held[f] if f in held else self.distribution.deterministic(rows, keep[f], rank_by=rank_by)
            masks[f] = mask.reshape(la.shape)
        if "head" in masks and "kv_head" in masks:  # heads of a dropped KV group are dropped too
            alive = (masks["kv_head"] != 0).repeat_interleave(cfg.heads_per_group, dim=1)
            masks["head"] = masks["head"] * alive
        return masks


def _scalar_multipliers_as_vectors(state_dict: dict, prefix: str, *args: Any) -> None:
    """Read checkpoints that stored the multipliers as 0-d tensors (FSDP refuses 0-d parameters)."""
    del args
    for key, value in list(state_dict.items()):
        if key.startswith(prefix + "multipliers.") and isinstance(value, Tensor) and value.dim() == 0:
            state_dict[key] = value.reshape(1)


def _ascent(multiplier: Tensor) -> Tensor:
    """The multiplier with its gradient negated, so a descent step on the loss maximises over it."""
    if not (torch.is_grad_enabled() and multiplier.requires_grad):
        return multiplier
    reversed_grad = multiplier.clone()
    reversed_grad.register_hook(torch.neg)
    return reversed_grad
