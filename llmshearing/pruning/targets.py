"""The ``model.l0_module`` config: parsing, validation against the source model, and per-family targets.

A target is an exact shape (``target_model``), a budget (``target_budget``: parameters, memory or speed,
resolved to a shape by :mod:`llmshearing.pruning.budget` before training) or a plain fraction of
prunable parameters to remove (``target_sparsity``). A shape is turned into one target sparsity and one exact kept size per
mask family; every problem is reported as a ``ValueError`` naming the config key and the fix.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from llmshearing.config_base import is_int, parse_batches, refuse_unknown_keys
from llmshearing.models.config import ModelConfig

FAMILIES = ("layer", "head_layer", "head", "kv_head", "mlp", "intermediate", "hidden")
BLOCK_FAMILIES = ("head_layer", "mlp")  # per-layer attention and MLP masks: they must drop the same layers
SHAPE_KEYS = ("n_layers", "n_heads", "n_kv_heads", "d_model", "intermediate_size")
BUDGET_SHAPES = ("proportional", "learned")  # how model.l0_module.target_budget becomes a shape
FIXED_SHAPE_KEYS = ("vocab_size", "head_dim")  # accepted in target_model only when equal to the source
PREFIX = "model.l0_module"
# the closing multipliers: the LR schedule scales the mask lr alone and the multipliers step on the current gap
# without momentum, so masks that learn end at their target (the pruning README; off by default)
CLOSING_MULTIPLIERS = {"schedule_l0_lr": "masks", "multiplier_beta1": 0.0}


def prunable_params(config: ModelConfig) -> int:
    """Parameters the masks can remove: attention and MLP matrices (no embeddings, output head, norms, biases)."""
    d, hd = config.d_model, config.head_dim
    attention = d * hd * (2 * config.n_heads + 2 * config.n_kv_heads)
    return config.n_layers * (attention + 3 * d * config.intermediate_size)


@dataclass
class L0Config:
    """Settings of the L0 pruning; field names are the keys accepted under ``model.l0_module``."""

    pruning_modules: list[str] = field(default_factory=lambda: ["layer", "head", "intermediate", "hidden"])
    target_model: dict[str, int] | None = None
    # a budget ({params: 1.3e9}, {memory: 6GB, dtype: bf16}, {tokens_per_second: 2}): resolved to a
    # target_model against the source before training (llmshearing.pruning.budget)
    target_budget: dict[str, Any] | None = None
    target_sparsity: float | None = None
    budget_choice: str | None = None  # written by the run: which shape the budget resolved to, and why
    # how a target_budget becomes a shape: "proportional" resolves it to one shape before training (the
    # valid shape closest to a proportional shrink); "learned" lets the masks learn the shape under a global
    # target and rounds their expected sizes to the nearest valid shape within the budget at the fold
    budget_shape: str = "proportional"
    # with budget_shape: learned, the batch from which the shape is no longer learned: the masks' expected
    # shape is rounded there (as at the fold) and becomes the per-family target of the rest of pruning, so the
    # masks adapt to the sizes the fold will cut to. null: learned to the end, rounded only at the fold
    fix_shape_at: int | None = None
    start_sparsity: float = 0.0
    lagrangian_warmup_steps: int = 0
    eval_target_model: bool = True
    temperature: float = 2.0 / 3.0
    limit_a: float = -0.1
    limit_b: float = 1.1
    init_log_alpha: float = math.log(100.0)
    log_alpha_clamp: float | None = math.log(100.0)
    bounded_scores: bool = False  # expected sizes count a unit at -clamp as removed and at +clamp as kept
    mask_lr: float = 1.0
    multiplier_lr: float = 1.0
    # true: the run's LR schedule (warm-up, decay) scales the mask and multiplier groups; "masks": the mask
    # group only, the multipliers keep multiplier_lr, so they can still close a gap when the schedule has decayed
    schedule_l0_lr: bool | str = False
    # the multipliers' first-moment coefficient (AdamW's beta1); 0 steps them on the current gap alone, without
    # momentum that carries them past the target. null: the optimizer's own
    multiplier_beta1: float | None = None
    # each family's penalty times its number of units, so its linear term is the paper's lambda * (sum(z) - T):
    # the multipliers price one unit of any family, not a fraction of it, and a family of many units
    # (hidden, intermediate) meets its target as fast as one of few
    penalty_per_unit: bool = False
    clip_l0_grads: bool = False
    init_from: str | None = None  # "importance" (measured on the data's train split) or a saved scores file
    init_samples: int = 256  # calibration sequences for init_from: importance
    # prune to a target whose d_model is not a multiple of n_heads (its export loads in transformers < 5 only)
    allow_indivisible_d_model: bool = False
    # largest |log-alpha| of a ranked start (init_from); null: the log-alpha bound. Inside the bound the
    # ranked masks start in the interior, where their samples leave 0 and 1 and the loss moves them.
    init_scale: float | None = None
    # families cut by the ranking of init_from and held there: their masks are the ranked cut (0/1) from the first
    # step, with no noise, no gradient and no Lagrangian term; the other families learn around them
    hold_ranked: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        modules = list(self.pruning_modules) if not isinstance(self.pruning_modules, str) else None
        if not modules:
            raise ValueError(
                f"{PREFIX}.pruning_modules must be a non-empty list of mask families from {list(FAMILIES)}, "
                f"got {self.pruning_modules!r}"
            )
        unknown = [m for m in modules if m not in FAMILIES]
        if unknown:
            raise ValueError(
                f"{PREFIX}.pruning_modules has unknown families {unknown}; valid: {list(FAMILIES)}"
            )
        if len(set(modules)) != len(modules):
            raise ValueError(f"{PREFIX}.pruning_modules lists a family twice: {modules}")
        self.pruning_modules = [m for m in FAMILIES if m in modules]  # canonical order
        if self.budget_shape not in BUDGET_SHAPES:
            raise ValueError(
                f"{PREFIX}.budget_shape must be one of {list(BUDGET_SHAPES)}, got {self.budget_shape!r}"
            )
        if self.budget_shape != "proportional" and self.target_budget is None:
            raise ValueError(
                f"{PREFIX}.budget_shape={self.budget_shape} needs {PREFIX}.target_budget (e.g. {{params: 1.3e9}}); "
                "set a budget or remove budget_shape"
            )
        if self.target_budget is not None:
            from llmshearing.pruning.budget import recipe_budget

            if self.target_model is not None or self.target_sparsity is not None:
                other = "target_model" if self.target_model is not None else "target_sparsity"
                raise ValueError(
                    f"set either {PREFIX}.target_budget (a budget the run resolves to a shape) or "
                    f"{PREFIX}.{other}, not both; remove one of them"
                )
            if not isinstance(self.target_budget, Mapping):
                raise ValueError(
                    f"{PREFIX}.target_budget must be a mapping such as {{params: 1.3e9}}, got {self.target_budget!r}"
                )
            self.target_budget = dict(self.target_budget)
            recipe_budget(self.target_budget, f"{PREFIX}.target_budget")
        elif self.target_model is not None:
            self.target_model = dict(self.target_model)
            if self.target_sparsity is not None:
                raise ValueError(
                    f"set either {PREFIX}.target_model (an exact shape) or {PREFIX}.target_sparsity "
                    "(a fraction of prunable parameters), not both"
                )
        elif self.target_sparsity is None:
            raise ValueError(
                f"{PREFIX} needs a target: set target_model.{{{', '.join(SHAPE_KEYS)}}}, target_budget "
                "(e.g. {params: 1.3e9}) or target_sparsity"
            )
        elif not 0.0 < float(self.target_sparsity) < 1.0:
            raise ValueError(f"{PREFIX}.target_sparsity must be in (0, 1), got {self.target_sparsity}")
        if not 0.0 <= float(self.start_sparsity) < 1.0:
            raise ValueError(f"{PREFIX}.start_sparsity must be in [0, 1), got {self.start_sparsity}")
        self.lagrangian_warmup_steps = parse_batches(
            self.lagrangian_warmup_steps, f"{PREFIX}.lagrangian_warmup_steps"
        )
        if self.fix_shape_at is not None:
            if self.target_budget is None or self.budget_shape != "learned":
                raise ValueError(
                    f"{PREFIX}.fix_shape_at fixes the shape the masks learn under a budget; it needs "
                    f"{PREFIX}.target_budget with {PREFIX}.budget_shape=learned (or remove fix_shape_at)"
                )
            self.fix_shape_at = parse_batches(self.fix_shape_at, f"{PREFIX}.fix_shape_at")
            if self.fix_shape_at <= 0:
                raise ValueError(
                    f"{PREFIX}.fix_shape_at must be a positive number of batches (e.g. 384ba), got "
                    f"{self.fix_shape_at}; remove it to learn the shape to the end"
                )
        if self.log_alpha_clamp is not None and self.log_alpha_clamp <= 0:
            raise ValueError(
                f"{PREFIX}.log_alpha_clamp must be > 0 (symmetric bound) or null, got {self.log_alpha_clamp}"
            )
        if self.bounded_scores and self.log_alpha_clamp is None:
            raise ValueError(
                f"{PREFIX}.bounded_scores rescales P(z > 0) between its values at the log-alpha bounds and needs "
                f"{PREFIX}.log_alpha_clamp; set a clamp (e.g. 4.605) or bounded_scores: false"
            )
        for key in ("mask_lr", "multiplier_lr"):
            if float(getattr(self, key)) < 0:
                raise ValueError(f"{PREFIX}.{key} must be >= 0, got {getattr(self, key)}")
        if not (isinstance(self.schedule_l0_lr, bool) or self.schedule_l0_lr == "masks"):
            raise ValueError(
                f"{PREFIX}.schedule_l0_lr must be true (the LR schedule scales the mask and multiplier lrs), false "
                f"(neither) or masks (the mask lr only), got {self.schedule_l0_lr!r}"
            )
        beta1 = self.multiplier_beta1
        if beta1 is not None and (
            isinstance(beta1, bool) or not isinstance(beta1, (int, float)) or not 0 <= beta1 < 1
        ):
            raise ValueError(
                f"{PREFIX}.multiplier_beta1 must be in [0, 1) (the multipliers' AdamW beta1) or null for the "
                f"optimizer's, got {beta1!r}"
            )
        if (
            self.init_from is not None
            and self.init_from != "importance"
            and not str(self.init_from).endswith(".safetensors")
        ):
            raise ValueError(
                f"{PREFIX}.init_from must be null, 'importance' (scores measured on the data's train split "
                f"before training) or a scores file from `prune-oneshot --scores-out`, got {self.init_from!r}"
            )
        if (
            self.init_from is not None
            and self.lagrangian_warmup_steps > 0
            and float(self.start_sparsity) != 0.0
        ):
            raise ValueError(
                f"{PREFIX}.start_sparsity is set by the ranked start with {PREFIX}.init_from: its warm-up starts "
                f"from the expected sparsity the ranked masks begin at; remove {PREFIX}.start_sparsity (or set "
                f"{PREFIX}.lagrangian_warmup_steps=0ba to hold the target from the first step)"
            )
        if self.init_scale is not None:
            if isinstance(self.init_scale, bool) or not float(self.init_scale) > 0:
                raise ValueError(
                    f"{PREFIX}.init_scale must be > 0 or null (the log-alpha bound), got {self.init_scale!r}"
                )
            if self.log_alpha_clamp is not None and float(self.init_scale) > self.log_alpha_clamp:
                raise ValueError(
                    f"{PREFIX}.init_scale={self.init_scale} exceeds {PREFIX}.log_alpha_clamp={self.log_alpha_clamp}: "
                    "the ranked start would be clamped flat at the bound; set init_scale <= log_alpha_clamp"
                )
        if not isinstance(self.penalty_per_unit, bool):
            raise ValueError(
                f"{PREFIX}.penalty_per_unit must be true or false, got {self.penalty_per_unit!r}"
            )
        if self.penalty_per_unit and self.global_term:
            raise ValueError(
                f"{PREFIX}.penalty_per_unit scales the per-family terms of a target shape (target_model, or a "
                "target_budget the run resolves to one); a target_sparsity or a learned budget shape has one global "
                f"term over parameters, with no unit to price: set {PREFIX}.penalty_per_unit=false"
            )
        self._check_hold_ranked()
        if not isinstance(self.init_samples, int) or self.init_samples <= 0:
            raise ValueError(f"{PREFIX}.init_samples must be a positive integer, got {self.init_samples!r}")
        if not isinstance(self.allow_indivisible_d_model, bool):
            raise ValueError(
                f"{PREFIX}.allow_indivisible_d_model must be true or false, got {self.allow_indivisible_d_model!r}"
            )

    def _check_hold_ranked(self) -> None:
        key = f"{PREFIX}.hold_ranked"
        held = self.hold_ranked
        if isinstance(held, str) or not isinstance(held, (list, tuple)):
            raise ValueError(f"{key} must be a list of mask families (e.g. [hidden]), got {held!r}")
        outside = [f for f in held if f not in self.pruning_modules]
        if outside:
            raise ValueError(
                f"{key} lists {outside}, which {PREFIX}.pruning_modules {self.pruning_modules} does not prune; "
                "hold only pruned families"
            )
        self.hold_ranked = [f for f in self.pruning_modules if f in held]  # canonical order, no repeats
        if not self.hold_ranked:
            return
        if self.init_from is None:
            raise ValueError(
                f"{key} holds families at the importance ranking's cut and needs {PREFIX}.init_from "
                "(importance, or a scores file from `prune-oneshot --scores-out`); set it or remove hold_ranked"
            )
        if self.global_term:
            raise ValueError(
                f"{key} cuts each held family to its size in a target shape: it needs {PREFIX}.target_model or a "
                f"target_budget with budget_shape: proportional, not "
                + ("target_sparsity" if self.target_sparsity is not None else "a learned budget shape")
            )
        if len(self.hold_ranked) == len(self.pruning_modules):
            raise ValueError(
                f"{key} holds every pruned family, so no mask is left to learn: prune with "
                "`llmshearing prune-oneshot` instead, or hold fewer families"
            )
        tied = [f for f in BLOCK_FAMILIES if f in self.pruning_modules]
        if len(tied) == 2 and len([f for f in tied if f in self.hold_ranked]) == 1:
            raise ValueError(
                f"{key} holds one of head_layer and mlp, which drop the same layers: hold both or neither"
            )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | L0Config) -> L0Config:
        """Build from a plain dict or OmegaConf node; unknown keys are an error listing the valid ones."""
        if isinstance(values, L0Config):
            return values
        try:  # OmegaConf nodes become plain containers
            from omegaconf import DictConfig, OmegaConf

            if isinstance(values, DictConfig):
                values = OmegaConf.to_container(values, resolve=True)  # type: ignore[assignment]
        except ImportError:  # pragma: no cover - omegaconf is a dependency
            pass
        if not isinstance(values, Mapping):
            raise ValueError(f"{PREFIX} must be a mapping of settings, got {type(values).__name__}")
        refuse_unknown_keys(values, [f.name for f in dataclasses.fields(cls)], PREFIX)
        return cls(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def global_term(self) -> bool:
        """The target is a fraction of the parameters under one global term (``target_sparsity``, or a
        ``target_budget`` whose shape the masks learn), with no unit for ``penalty_per_unit`` to price."""
        return self.target_sparsity is not None or (
            self.target_budget is not None and self.budget_shape == "learned"
        )

    @property
    def scheduled_groups(self) -> tuple[str, ...]:
        """The L0 optimizer groups whose learning rate the run's LR schedule scales (``schedule_l0_lr``)."""
        if self.schedule_l0_lr == "masks":
            return ("masks",)
        return ("masks", "multipliers") if self.schedule_l0_lr else ()

    def resolve(self, source: ModelConfig) -> TargetPlan:
        """Validate the target against the source model and derive per-family targets."""
        return TargetPlan.build(self, source)


@dataclass(frozen=True)
class TargetPlan:
    """Per-family target sparsity and exact kept size per row for a validated target.

    ``keep`` is the number of units each row keeps at the target: layers for ``layer``/``head_layer``/``mlp``,
    KV groups per layer for ``kv_head``, query heads per block of ``head_block`` heads for ``head``,
    intermediate dims per layer, hidden dims. Both are empty when only a global ``target_sparsity`` is given.

    ``head_block`` is the number of query heads among which ``head`` selects: one KV group, or the whole
    layer when the source has one query head per KV group (multi-head attention) and ``kv_head`` is not
    enabled: there ``head`` removes whole heads with their keys and values.
    """

    families: tuple[str, ...]
    target: ModelConfig | None
    family_sparsity: dict[str, float]
    keep: dict[str, int]
    global_sparsity: float
    head_block: int

    @property
    def blocks_tied(self) -> bool:
        """Both ``head_layer`` and ``mlp`` are pruned: their deterministic masks choose the same layers."""
        return set(BLOCK_FAMILIES) <= set(self.families)

    @classmethod
    def build(cls, config: L0Config, source: ModelConfig) -> TargetPlan:
        families = tuple(config.pruning_modules)
        head_block = source.n_heads if _heads_are_groups(families, source) else source.heads_per_group
        if (
            config.target_model is None
            and config.target_budget is not None
            and config.budget_shape == "learned"
        ):
            from llmshearing.pruning.budget import learned_budget_sparsity

            _check_lone_block_family(families)
            return cls(families, None, {}, {}, learned_budget_sparsity(config, source), head_block)
        if config.target_model is None and config.target_budget is not None:
            raise ValueError(
                f"{PREFIX}.target_budget is resolved to a target_model against the source before the masks are "
                "built (llmshearing.pruning.budget.resolve_l0_budget); resolve it first"
            )
        if config.target_model is None:
            _check_lone_block_family(families)
            sparsity = float(config.target_sparsity)  # type: ignore[arg-type]
            reachable = 1.0 - _min_prunable_fraction(families, source)
            if sparsity >= reachable:
                raise ValueError(
                    f"{PREFIX}.target_sparsity={sparsity} cannot be reached with pruning_modules {list(families)}: "
                    f"removing everything they control removes at most {reachable:.4f} of the prunable "
                    "parameters; lower the target or enable more families"
                )
            return cls(families, None, {}, {}, sparsity, head_block)
        target = target_config(config.target_model, source)
        _check_families(families, target, source)
        hpg_s, hpg_t = source.heads_per_group, target.heads_per_group
        if head_block != hpg_s:  # whole heads of a multi-head-attention layer
            hpg_s, hpg_t = source.n_heads, target.n_heads
        layers_by_blocks = "layer" not in families
        keep = {
            "layer": target.n_layers,
            "head_layer": target.n_layers if layers_by_blocks else source.n_layers,
            "mlp": target.n_layers if layers_by_blocks else source.n_layers,
            "kv_head": target.n_kv_heads,
            "head": hpg_t,
            "intermediate": target.intermediate_size,
            "hidden": target.d_model,
        }
        size = {
            "layer": source.n_layers,
            "head_layer": source.n_layers,
            "mlp": source.n_layers,
            "kv_head": source.n_kv_heads,
            "head": hpg_s,
            "intermediate": source.intermediate_size,
            "hidden": source.d_model,
        }
        keep = {f: keep[f] for f in families}
        family_sparsity = {f: 1.0 - keep[f] / size[f] for f in families}
        global_sparsity = 1.0 - prunable_params(target) / prunable_params(source)
        return cls(families, target, family_sparsity, keep, global_sparsity, head_block)


def check_loadable_shape(
    target: ModelConfig, key: str, opt_out: str, source: ModelConfig | None = None
) -> None:
    """Refuse a target whose ``d_model`` is not a multiple of ``n_heads``: transformers >= 5 refuses to
    load such a config (although ``head_dim`` is set), so its export would load in transformers 4.x
    only. The message names the nearest valid sizes (at most the source's) and ``opt_out``, how to
    accept the shape anyway (``set <key>=true``, ``pass <flag>``); ``key`` names where the target was given."""
    d_model, heads = target.d_model, target.n_heads
    if d_model % heads == 0:
        return
    limit = source.d_model if source is not None else None
    below, above = d_model // heads * heads, (d_model // heads + 1) * heads
    sizes = [size for size in (below, above) if size > 0 and (limit is None or size <= limit)]
    options = " or ".join(f"d_model={size}" for size in sizes) or f"a d_model that n_heads={heads} divides"
    conventional = heads * target.head_dim
    if conventional not in sizes and (limit is None or conventional <= limit):
        options += f" (or {conventional} = n_heads x head_dim, as LLaMA models are shaped)"
    raise ValueError(
        f"{key}: d_model={d_model} is not a multiple of n_heads={heads}; transformers >= 5 refuses to load "
        f"such a model (transformers 4.x loads it): choose {options}, or {opt_out} to prune to it "
        "anyway (the export then loads in transformers < 5 only)"
    )


def _heads_are_groups(families: tuple[str, ...], source: ModelConfig) -> bool:
    """Multi-head attention pruned by ``head`` alone: each query head is its own KV group."""
    return source.heads_per_group == 1 and "head" in families and "kv_head" not in families


def _check_lone_block_family(families: tuple[str, ...]) -> None:
    """With a plain target sparsity, a lone ``head_layer`` or ``mlp`` mask would remove one block of a layer only."""
    lone = [f for f in BLOCK_FAMILIES if f in families]
    if len(lone) == 1:
        other = next(f for f in BLOCK_FAMILIES if f not in lone)
        raise ValueError(
            f"{PREFIX}.pruning_modules {list(families)} has '{lone[0]}' without '{other}': with "
            f"{PREFIX}.target_sparsity it would remove the {'attention' if lone[0] == 'head_layer' else 'MLP'} "
            "of some layers only, which no uniform model can hold; add "
            f"'{other}' (the two then drop the same layers), use 'layer' instead, or give a target_model"
        )


def target_config(target_model: Mapping[str, Any], source: ModelConfig) -> ModelConfig:
    """The shape ``target_model`` asks of ``source`` (keys it leaves out are the source's; multi-head
    attention stays multi-head), or a ``ValueError`` naming the key and the fix."""
    key = f"{PREFIX}.target_model"
    refuse_unknown_keys(target_model, [*SHAPE_KEYS, *FIXED_SHAPE_KEYS], key)
    for name in FIXED_SHAPE_KEYS:
        if name in target_model and target_model[name] != getattr(source, name):
            raise ValueError(
                f"{key}.{name}={target_model[name]} differs from the source ({getattr(source, name)}); "
                f"{name} is not pruned: remove it or set it to {getattr(source, name)}"
            )
    shape = {}
    defaults = {name: getattr(source, name) for name in SHAPE_KEYS}
    if source.heads_per_group == 1:  # multi-head attention stays multi-head attention
        defaults["n_kv_heads"] = target_model.get("n_heads", source.n_heads)
    for name in SHAPE_KEYS:
        value = target_model.get(name, defaults[name])
        if not is_int(value) or value <= 0:
            raise ValueError(f"{key}.{name} must be a positive integer, got {value!r}")
        if value > getattr(source, name):
            raise ValueError(
                f"{key}.{name}={value} is larger than the source model's {name}={getattr(source, name)}; "
                "pruning only removes structure: set it to at most the source value"
            )
        shape[name] = value
    if shape["n_heads"] % shape["n_kv_heads"]:
        raise ValueError(
            f"{key}.n_heads={shape['n_heads']} is not divisible by {key}.n_kv_heads={shape['n_kv_heads']}; "
            "every KV group must serve the same number of query heads: pick n_heads as a multiple of n_kv_heads"
        )
    if shape["n_heads"] // shape["n_kv_heads"] > source.heads_per_group:
        raise ValueError(
            f"{key}.n_heads / {key}.n_kv_heads = {shape['n_heads'] // shape['n_kv_heads']} query heads per KV "
            f"group exceeds the source's {source.heads_per_group}; query heads stay in their KV group, so lower "
            "n_heads or keep more KV groups"
        )
    return source.replace(**shape)


def _check_families(families: tuple[str, ...], target: ModelConfig, source: ModelConfig) -> None:
    key = f"{PREFIX}.target_model"
    enabled = set(families)

    def need(condition: bool, name: str, wanted: str) -> None:
        if condition:
            raise ValueError(
                f"{key}.{name}={getattr(target, name)} differs from the source ({getattr(source, name)}) but "
                f"{PREFIX}.pruning_modules {list(families)} lacks {wanted}: add it or keep {name} at the source value"
            )

    need(
        target.n_layers < source.n_layers and "layer" not in enabled and not {"head_layer", "mlp"} <= enabled,
        "n_layers",
        "'layer' (or both 'head_layer' and 'mlp')",
    )
    need(
        target.n_kv_heads < source.n_kv_heads
        and "kv_head" not in enabled
        and not _heads_are_groups(families, source),
        "n_kv_heads",
        "'kv_head'"
        + (" (or 'head': the source has one query head per KV group)" if source.heads_per_group == 1 else ""),
    )
    if target.heads_per_group < source.heads_per_group and "head" not in enabled:
        raise ValueError(
            f"{key}.n_heads={target.n_heads} with n_kv_heads={target.n_kv_heads} keeps "
            f"{target.heads_per_group} of {source.heads_per_group} query heads per KV group, but "
            f"{PREFIX}.pruning_modules {list(families)} lacks 'head': add it, or prune whole KV groups only "
            f"(n_heads = n_kv_heads * {source.heads_per_group})"
        )
    need(
        target.intermediate_size < source.intermediate_size and "intermediate" not in enabled,
        "intermediate_size",
        "'intermediate'",
    )
    need(target.d_model < source.d_model and "hidden" not in enabled, "d_model", "'hidden'")


def _min_prunable_fraction(families: tuple[str, ...], source: ModelConfig) -> float:
    """Fraction of prunable parameters left when every enabled family removes all it controls."""
    enabled = set(families)
    if enabled & {"hidden", "layer"}:
        return 0.0
    d, hd, L = source.d_model, source.head_dim, source.n_layers
    attention = (
        0
        if enabled & {"head_layer", "head", "kv_head"}
        else d * hd * (2 * source.n_heads + 2 * source.n_kv_heads)
    )
    mlp = 0 if enabled & {"mlp", "intermediate"} else 3 * d * source.intermediate_size
    return L * (attention + mlp) / prunable_params(source)
