"""Budgets a pruned model must meet, and the uniform shapes of a source that meet them.

A budget is one of

* ``params``: total parameters (embeddings and output head included, as "a 1.3B model" counts them);
* ``non_embedding_params``: parameters of the decoder blocks and the final norm;
* ``memory``: bytes (``6GB``: binary units, as ``llmshearing plan`` reads sizes) of the weights at ``dtype`` (``num_params x bytes per element``), plus the KV cache of
  ``context`` tokens (``2 x n_layers x n_kv_heads x head_dim x context`` elements) when ``context`` is set;
* ``tokens_per_second``: speed relative to the source, e.g. ``2`` for twice the source's tokens per second,
  under the cost model "time per token is proportional to the forward FLOPs per token",
  ``2 N + 4 n_layers n_heads head_dim context`` (``N``: the parameters in matrix multiplies, the output
  head included; the second term the attention scores and values over ``context`` tokens, default 512),
  i.e. a third of :meth:`ModelConfig.train_flops_per_token`.

A shape meets a budget when its cost is at most the budget's limit and at least ``1 - tolerance`` of it
(default 5%: a shape far below the budget wastes it). Shapes are uniform (every layer alike) and GQA-valid:
``n_heads = n_kv_heads x heads per group`` with at most the source's heads per group (query heads stay in
their KV group), ``d_model`` a multiple of ``multiple`` and of ``n_heads`` (transformers >= 5 loads it),
``intermediate_size`` a multiple of ``multiple``; the source's own sizes are always allowed.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from llmshearing.config_base import is_number
from llmshearing.models.config import ModelConfig
from llmshearing.pruning.targets import SHAPE_KEYS, prunable_params

KINDS = ("params", "non_embedding_params", "memory", "tokens_per_second")
DTYPE_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5}
DEFAULT_DTYPE = "bf16"
DEFAULT_SPEED_CONTEXT = 512
DEFAULT_TOLERANCE = 0.05
DEFAULT_MULTIPLE = 64
# binary units, as `llmshearing plan` reads sizes (6GB = 6 GiB, what a "6 GB" GPU holds)
_UNITS = {"": 1, "b": 1, "kb": 2**10, "mb": 2**20, "gb": 2**30, "tb": 2**40}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?(?:e[+-]?\d+)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE)
_OPTIONS = ("dtype", "context", "tolerance")
# the keys a recipe's target_budget takes beside the budget's own (search-shape takes them as flags)
RECIPE_OPTIONS = ("multiple",)


class BudgetError(ValueError):
    """A budget no shape meets (or that nothing needs pruned to), naming the nearest valid shapes."""


@dataclass(frozen=True)
class Budget:
    """One budget: ``kind`` and its ``value`` (parameters, bytes, or a speed-up over the source)."""

    kind: str
    value: float
    dtype: str = DEFAULT_DTYPE
    context: int | None = None
    tolerance: float = DEFAULT_TOLERANCE

    @property
    def context_tokens(self) -> int:
        if self.context is not None:
            return self.context
        return DEFAULT_SPEED_CONTEXT if self.kind == "tokens_per_second" else 0

    def describe(self) -> str:
        """``params=1.3e+09`` or ``memory=6GB,dtype=bf16``: how the user would write it."""
        if self.kind == "memory":
            text = f"memory={_bytes(self.value)},dtype={self.dtype}"
        elif self.kind == "tokens_per_second":
            text = f"tokens_per_second={self.value:g}"
        else:
            text = f"{self.kind}={self.value:.4g}"
        if self.context is not None:
            text += f",context={self.context}"
        return text

    def to_dict(self) -> dict[str, Any]:
        """The recipe form (``model.l0_module.target_budget``)."""
        value: Any = _bytes(self.value) if self.kind == "memory" else self.value
        out: dict[str, Any] = {self.kind: value}
        if self.kind == "memory":
            out["dtype"] = self.dtype
        if self.context is not None:
            out["context"] = self.context
        if self.tolerance != DEFAULT_TOLERANCE:
            out["tolerance"] = self.tolerance
        return out

    def cost(self, config: ModelConfig) -> float:
        """The quantity the budget bounds, for a model of shape ``config`` (lower is smaller/faster)."""
        if self.kind == "params":
            return float(config.num_params())
        if self.kind == "non_embedding_params":
            return float(config.num_params(include_embeddings=False))
        if self.kind == "memory":
            kv = 2 * config.n_layers * config.n_kv_heads * config.head_dim * self.context_tokens
            return (config.num_params() + kv) * DTYPE_BYTES[self.dtype]
        return float(forward_flops_per_token(config, self.context_tokens))

    def limit(self, source: ModelConfig) -> float:
        """The largest cost a shape may have."""
        if self.kind == "tokens_per_second":
            return self.cost(source) / self.value
        return self.value


def forward_flops_per_token(config: ModelConfig, context: int) -> int:
    """Forward FLOPs per token at ``context`` tokens: a third of the planner's training FLOPs per token."""
    return config.train_flops_per_token(context) // 3


def _bytes(value: float) -> str:
    for unit in ("TB", "GB", "MB", "KB"):
        scale = _UNITS[unit.lower()]
        if value >= scale:
            return f"{value / scale:.4g}{unit}"
    return f"{value:g}B"


def parse_size(value: Any, key: str) -> float:
    """``6GB`` or ``6GiB`` (both 2^30 bytes each), ``500MB``, or a number of bytes."""
    if is_number(value):
        size = float(value)
    else:
        match = _SIZE.fullmatch(str(value)) if isinstance(value, str) else None
        if match is None or match.group(2).lower() not in _UNITS:
            raise ValueError(f"{key} must be a size such as 6GB, 6GiB or 500MB, got {value!r}")
        size = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if not math.isfinite(size) or size <= 0:
        raise ValueError(f"{key} must be a positive size such as 6GB, got {value!r}")
    return size


def parse_budget(spec: Mapping[str, Any] | str, key: str, options: tuple[str, ...] = ()) -> Budget:
    """A budget from its recipe mapping (``{params: 1.3e9}``) or CLI text (``params=1.3e9``); errors name ``key``.
    ``options``: the other keys the caller takes beside the budget's (already removed from ``spec``), named
    with the budget's own in the message for an unknown key."""
    if isinstance(spec, str):
        spec = _parse_text(spec, key)
    if not isinstance(spec, Mapping):
        raise ValueError(f"{key} must be a mapping such as {{params: 1.3e9}}, got {spec!r}")
    kinds = [k for k in spec if k in KINDS]
    unknown = sorted(str(k) for k in spec if k not in KINDS and k not in _OPTIONS)
    if unknown:
        raise ValueError(
            f"{key} has unknown keys {unknown}; give one of {list(KINDS)} and optionally "
            f"{[*_OPTIONS, *options]}"
        )
    if len(kinds) != 1:
        raise ValueError(
            f"{key} must name exactly one budget of {list(KINDS)} (e.g. params: 1.3e9), got {sorted(kinds) or 'none'}"
        )
    kind, raw = kinds[0], spec[kinds[0]]
    if kind == "memory":
        value = parse_size(raw, f"{key}.memory")
    else:
        value = _number(raw, f"{key}.{kind}")
        if value <= 0:
            raise ValueError(f"{key}.{kind} must be positive, got {raw!r}")
    dtype = spec.get("dtype", DEFAULT_DTYPE)
    if "dtype" in spec and kind != "memory":
        raise ValueError(f"{key}.dtype applies to a memory budget only; remove it or budget memory")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"{key}.dtype must be one of {list(DTYPE_BYTES)}, got {dtype!r}")
    context = spec.get("context")
    if context is not None:
        if kind not in ("memory", "tokens_per_second"):
            raise ValueError(f"{key}.context applies to memory (KV cache) and tokens_per_second budgets only")
        context = int(_number(context, f"{key}.context"))
        if context < 0:
            raise ValueError(f"{key}.context must be >= 0 tokens, got {spec['context']!r}")
    tolerance = _number(spec.get("tolerance", DEFAULT_TOLERANCE), f"{key}.tolerance")
    if not 0 < tolerance < 1:
        raise ValueError(
            f"{key}.tolerance must be in (0, 1) (the band below the budget a shape may use), got {tolerance}"
        )
    return Budget(kind, value, str(dtype), context, tolerance)


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{key} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{key} must be finite, got {value!r}")
    return number


def _parse_text(text: str, key: str) -> dict[str, str]:
    spec: dict[str, str] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ValueError(f"{key} {text!r}: expected KIND=VALUE[,dtype=..,context=..], e.g. params=1.3e9")
        spec[name.strip()] = value.strip()
    return spec


@dataclass(frozen=True)
class ShapeSpace:
    """The grid searched: size multiples and the range of depths, and how the user who set them spells the
    settings an error suggests (``search-shape``'s flags by default; a recipe's keys: :meth:`for_recipe`)."""

    multiple: int = DEFAULT_MULTIPLE
    min_layers: int = 1
    max_layers: int | None = None
    frozen: frozenset[str] = frozenset()  # SHAPE_KEYS kept at the source's size (families not pruned)
    relax: str | None = "a smaller --multiple or --min-layers"  # None: the grid is fixed where it was set
    tolerance: str = "tolerance=0.1"  # a wider tolerance, as the user writes it

    @classmethod
    def for_recipe(cls, key: str, multiple: int, frozen: frozenset[str]) -> ShapeSpace:
        """The grid of a recipe's budget at ``key`` (its ``multiple`` a key under it; every depth)."""
        return cls(
            multiple, frozen=frozen, relax=f"a smaller {key}.multiple", tolerance=f"{key}.tolerance=0.1"
        )

    def check(self, source: ModelConfig) -> tuple[int, int]:
        if isinstance(self.multiple, bool) or not isinstance(self.multiple, int) or self.multiple <= 0:
            raise ValueError(f"--multiple must be a positive integer, got {self.multiple!r}")
        top = source.n_layers if self.max_layers is None else self.max_layers
        if not 1 <= self.min_layers <= top <= source.n_layers:
            raise ValueError(
                f"--min-layers {self.min_layers} / --max-layers {top} must satisfy 1 <= min <= max <= "
                f"the source's {source.n_layers} layers"
            )
        return self.min_layers, top


@dataclass(frozen=True)
class Candidate:
    """One shape that meets the budget; ``prior`` is its distance from a proportional shrink (lower first)."""

    source: ModelConfig
    sizes: tuple[int, ...]  # in SHAPE_KEYS order
    cost: float
    prior: float

    @property
    def shape(self) -> dict[str, int]:
        return dict(zip(SHAPE_KEYS, self.sizes, strict=True))

    @property
    def config(self) -> ModelConfig:
        return self.source.replace(**self.shape)

    def label(self) -> str:
        return shape_label(self.config)


def shape_label(config: ModelConfig) -> str:
    c = config
    return f"{c.n_layers}L/{c.n_heads}H/{c.n_kv_heads}KV/{c.d_model}d/{c.intermediate_size}I"


def _sizes(top: int, step: int) -> list[int]:
    """Multiples of ``step`` up to ``top``, and ``top`` itself."""
    return sorted({*range(step, top + 1, step), top})


def _grid(source: ModelConfig, space: ShapeSpace) -> Iterator[tuple[int, int, int, int, list[int]]]:
    """``(n_layers, n_heads, n_kv_heads, d_model, intermediate sizes)`` of every valid shape, sizes ascending."""
    low, high = space.check(source)
    if "n_layers" in space.frozen:
        low = high = source.n_layers
    inter = _sizes(source.intermediate_size, space.multiple)
    if "intermediate_size" in space.frozen:
        inter = [source.intermediate_size]
    kv_low = source.n_kv_heads if "n_kv_heads" in space.frozen else 1
    group_low = source.heads_per_group if "n_heads" in space.frozen else 1
    for n_layers in range(low, high + 1):
        for kv in range(kv_low, source.n_kv_heads + 1):
            for per_group in range(group_low, source.heads_per_group + 1):
                heads = kv * per_group
                step = math.lcm(space.multiple, heads)
                widths = [source.d_model] if "d_model" in space.frozen else _sizes(source.d_model, step)
                for d_model in widths:
                    if d_model % heads == 0:
                        yield n_layers, heads, kv, d_model, inter


def proportional_distance(sizes: tuple[int, ...], source: ModelConfig) -> float:
    """Spread of the per-dimension keep ratios (``sizes`` in ``SHAPE_KEYS`` order: layers, query heads, KV
    groups, d_model, intermediate) in log space: 0 when every dimension keeps the same fraction, as a
    paper-like proportional shrink does."""
    logs = [math.log(size / getattr(source, k)) for k, size in zip(SHAPE_KEYS, sizes, strict=True)]
    mean = sum(logs) / len(logs)
    return sum((x - mean) ** 2 for x in logs)


def _linear_cost(budget: Budget, base: ModelConfig, sizes: list[int]) -> tuple[float, float]:
    """``cost = a + b x intermediate_size`` for shapes that differ only in ``intermediate_size`` (every
    cost is affine in it); exact for integer costs up to 2^53."""
    first, last = sizes[0], sizes[-1]
    c0 = budget.cost(base.replace(intermediate_size=first))
    if last == first:
        return c0, 0.0
    c1 = budget.cost(base.replace(intermediate_size=last))
    slope = (c1 - c0) / (last - first)
    return c0 - slope * first, slope


def enumerate_shapes(
    source: ModelConfig, budget: Budget, space: ShapeSpace = ShapeSpace()
) -> list[Candidate]:
    """Every valid shape whose cost lies in the budget's band, best ``prior`` first; a ``BudgetError``
    naming the budget and the nearest valid shapes when there is none or the budget is not below the source."""
    limit = budget.limit(source)
    source_cost = budget.cost(source)
    if limit >= source_cost and budget.kind == "tokens_per_second":
        raise BudgetError(
            f"budget {budget.describe()} is not faster than the source ({shape_label(source)}: "
            f"{_amount(source_cost, budget)}): a speed budget is the speed-up over the source and must be above 1 "
            "(tokens_per_second=2: twice as fast); nearest valid shape: the source itself"
        )
    if limit >= source_cost:
        raise BudgetError(
            f"budget {budget.describe()} is not below the source ({shape_label(source)}: "
            f"{_amount(source_cost, budget)}): pruning cannot meet it or has nothing to do; "
            f"nearest valid shape: the source itself; lower the budget"
        )
    low = (1.0 - budget.tolerance) * limit
    found: list[Candidate] = []
    below: list[tuple[float, ModelConfig]] = []  # nearest shapes under the band and over the limit
    above: list[tuple[float, ModelConfig]] = []
    smallest: tuple[float, ModelConfig] | None = None
    for n_layers, heads, kv, d_model, inter in _grid(source, space):
        base = source.replace(n_layers=n_layers, n_heads=heads, n_kv_heads=kv, d_model=d_model)
        a, b = _linear_cost(budget, base, inter)
        if smallest is None or a + b * inter[0] < smallest[0]:
            smallest = (a + b * inter[0], base.replace(intermediate_size=inter[0]))
        costs = [a + b * size for size in inter]  # ascending
        first, stop = bisect.bisect_left(costs, low), bisect.bisect_right(costs, limit)
        if first > 0:
            _keep_nearest(below, low - costs[first - 1], base.replace(intermediate_size=inter[first - 1]))
        if stop < len(inter):
            _keep_nearest(above, costs[stop] - limit, base.replace(intermediate_size=inter[stop]))
        for index in range(first, stop):
            sizes = (n_layers, heads, kv, d_model, inter[index])
            found.append(Candidate(source, sizes, costs[index], proportional_distance(sizes, source)))
    if not found:
        assert smallest is not None
        relax = f" or relax the grid ({space.relax})" if space.relax else ""
        if limit < smallest[0]:
            speed = budget.kind == "tokens_per_second"  # a higher budget asks for a smaller shape
            raise BudgetError(
                f"budget {budget.describe()} "
                + ("asks for more speed than the fastest" if speed else "is below the smallest")
                + f" valid shape of the search space ({shape_label(smallest[1])}: "
                f"{_amount(smallest[0], budget)}, {space.min_layers} layer(s) at the narrowest sizes, multiples "
                f"of {space.multiple}); nearest valid shapes: {_named(above, budget)}; "
                f"{'lower' if speed else 'raise'} the budget{relax}"
            )
        change = ", change the budget" if relax else " or change the budget"
        raise BudgetError(
            f"budget {budget.describe()}: no valid shape costs between {_amount(low, budget)} and "
            f"{_amount(limit, budget)} (multiples of {space.multiple}, {space.min_layers}-"
            f"{space.max_layers or source.n_layers} layers); nearest valid shapes: below {_named(below, budget)}; "
            f"above {_named(above, budget)}; widen the budget's tolerance (e.g. {space.tolerance}){change}{relax}"
        )
    found.sort(key=lambda c: (c.prior, -c.cost, c.sizes))
    return found


def _keep_nearest(
    kept: list[tuple[float, ModelConfig]], distance: float, config: ModelConfig, n: int = 2
) -> None:
    if len(kept) == n and distance >= kept[-1][0]:
        return
    kept.append((distance, config))
    kept.sort(key=lambda item: item[0])
    del kept[n:]


def _amount(cost: float, budget: Budget) -> str:
    if budget.kind == "memory":
        return _bytes(cost)
    if budget.kind == "tokens_per_second":
        return f"{cost:,.0f} FLOPs/token"
    if budget.kind == "non_embedding_params":
        return f"{cost:,.0f} non-embedding params"
    return f"{cost:,.0f} params"


def _named(kept: list[tuple[float, ModelConfig]], budget: Budget) -> str:
    if not kept:
        return "none"
    return ", ".join(f"{shape_label(c)} ({_amount(budget.cost(c), budget)})" for _, c in kept)


def choose_shape(
    source: ModelConfig, budget: Budget, space: ShapeSpace = ShapeSpace()
) -> tuple[Candidate, str]:
    """The shape a budget resolves to without a search, and one line saying which and why.

    Rule: among the shapes in the budget's band, the one closest to a proportional shrink (every
    dimension keeping the same fraction, as the paper's shapes roughly do), ties to the larger cost."""
    found = enumerate_shapes(source, budget, space)
    best = found[0]
    ratios = ", ".join(f"{k} {getattr(best.config, k)}/{getattr(source, k)}" for k in SHAPE_KEYS)
    amount = _amount(best.cost, budget)
    if budget.kind != "params":
        amount += f", {best.config.num_params():,} params in total"
    why = (
        f"budget {budget.describe()} resolves to {best.label()} ({amount}): of {len(found)} valid shapes within "
        f"{budget.tolerance:.0%} below the budget, the closest to a proportional shrink of "
        f"{shape_label(source)} (kept {ratios}); `llmshearing search-shape` scores alternatives"
    )
    return best, why


def frozen_keys(families: tuple[str, ...] | list[str], source: ModelConfig) -> frozenset[str]:
    """The shape sizes ``pruning_modules`` cannot change (kept at the source's)."""
    enabled = set(families)
    frozen = set()
    if "layer" not in enabled and not {"head_layer", "mlp"} <= enabled:
        frozen.add("n_layers")
    heads_are_groups = source.heads_per_group == 1 and "head" in enabled
    if "kv_head" not in enabled and not heads_are_groups:
        frozen.add("n_kv_heads")
    if "head" not in enabled:
        frozen.add("n_heads")  # query heads per group
    if "intermediate" not in enabled:
        frozen.add("intermediate_size")
    if "hidden" not in enabled:
        frozen.add("d_model")
    return frozenset(frozen)


def recipe_budget(spec: Mapping[str, Any], key: str) -> tuple[Budget, int]:
    """A recipe's ``target_budget`` mapping: its budget and the grid multiple of the shapes it may become
    (``multiple``: ``d_model`` and ``intermediate_size`` in multiples of it, default 64; small sources
    want a finer grid)."""
    if not isinstance(spec, Mapping):
        return parse_budget(spec, key), DEFAULT_MULTIPLE  # refused there, naming the key
    values = dict(spec)
    multiple = values.pop(RECIPE_OPTIONS[0], DEFAULT_MULTIPLE)
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple <= 0:
        raise ValueError(
            f"{key}.multiple must be a positive integer (the grid of d_model and intermediate_size), got {multiple!r}"
        )
    return parse_budget(values, key, RECIPE_OPTIONS), multiple


def _l0_budget(l0: Any, source: ModelConfig) -> tuple[Budget, ShapeSpace]:
    from llmshearing.pruning.targets import PREFIX

    key = f"{PREFIX}.target_budget"
    budget, multiple = recipe_budget(l0.target_budget, key)
    return budget, ShapeSpace.for_recipe(key, multiple, frozen_keys(l0.pruning_modules, source))


def resolve_l0_budget(settings: Mapping[str, Any], source: ModelConfig) -> tuple[dict[str, Any], str]:
    """``model.l0_module`` settings with ``target_budget`` replaced by the ``target_model`` it resolves
    to (:func:`choose_shape`, within what ``pruning_modules`` can prune), and the line saying why."""
    from llmshearing.pruning.targets import L0Config

    changes, why = budget_resolution(L0Config.from_dict(dict(settings)), source)
    return {**dict(settings), **changes}, why


def budget_resolution(l0: Any, source: ModelConfig) -> tuple[dict[str, Any], str]:
    """The settings an ``L0Config``'s ``target_budget`` changes (``target_model`` and ``budget_choice``;
    nothing without a budget) and the line saying why."""
    from llmshearing.pruning.targets import PREFIX

    if l0.target_budget is None:
        return {}, ""
    key = f"{PREFIX}.target_budget"
    budget, space = _l0_budget(l0, source)
    try:
        best, why = choose_shape(source, budget, space)
    except BudgetError as err:
        raise BudgetError(f"{key}: {err}") from None
    if l0.budget_shape == "learned":  # the budget stays: the masks learn the shape, the fold rounds it
        sparsity = 1.0 - prunable_params(best.config) / prunable_params(source)
        why = (
            f"budget {budget.describe()}, shape learned: the masks learn where to cut under a global target "
            f"sparsity of {sparsity:.4f} (the prunable parameters of {best.label()}, the budget's proportional "
            "shape); the fold rounds their expected sizes to the nearest valid shape within the budget"
        )
        return {"budget_choice": why}, why
    return {"target_budget": None, "target_model": best.shape, "budget_choice": why}, why


def learned_budget_sparsity(l0: Any, source: ModelConfig) -> float:
    """The global target sparsity under which masks learn a shape for ``l0.target_budget``: the share of
    prunable parameters that the budget's proportional shape (:func:`choose_shape`) removes."""
    budget, space = _l0_budget(l0, source)
    best, _ = choose_shape(source, budget, space)
    return 1.0 - prunable_params(best.config) / prunable_params(source)


def budget_candidates(l0: Any, source: ModelConfig) -> list[Candidate]:
    """Every valid shape within ``l0.target_budget`` that ``l0.pruning_modules`` can reach."""
    budget, space = _l0_budget(l0, source)
    return enumerate_shapes(source, budget, space)


def kept_fractions(source: ModelConfig, sizes: Mapping[str, float]) -> tuple[float, ...]:
    """The share of each mask family's units that ``sizes`` keep: layers, KV groups, query heads per KV group,
    hidden dimensions and MLP units, each against the source's."""
    groups = max(float(sizes["n_kv_heads"]), 0.5)
    return (
        float(sizes["n_layers"]) / source.n_layers,
        groups / source.n_kv_heads,
        float(sizes["n_heads"]) / groups / source.heads_per_group,
        float(sizes["d_model"]) / source.d_model,
        float(sizes["intermediate_size"]) / source.intermediate_size,
    )


def nearest_shape(candidates: list[Candidate], expected: Mapping[str, float]) -> Candidate:
    """The candidate closest to ``expected`` sizes (``SHAPE_KEYS`` -> fractional size); ties to the larger cost.

    Distance: the sum over mask families of the difference in the share of the family's units kept
    (:func:`kept_fractions`), i.e. how far each family's masks are from the candidate in units of the family:
    the share the fold cuts (or keeps) beyond what the masks trained for, and the gap a target fixed there
    (``fix_shape_at``) asks them to close. Every family counts alike, whatever its parameters."""
    if not candidates:
        raise ValueError("nearest_shape needs at least one candidate shape")
    source = candidates[0].source
    target = kept_fractions(source, expected)

    def distance(c: Candidate) -> tuple[float, float]:
        kept = kept_fractions(source, c.shape)
        return sum(abs(a - b) for a, b in zip(kept, target, strict=True)), -c.cost

    return min(candidates, key=distance)


SCORING_POOL = 50  # the most proportional depth-and-attention layouts the scored shapes are drawn from


def scoring_candidates(found: list[Candidate], count: int) -> list[Candidate]:
    """``count`` shapes to score, spread over the trade-offs between depth, attention and width.

    Rule: keep the most proportional shape of each layout (``n_layers``, ``n_heads``, ``n_kv_heads``) and
    the ``SCORING_POOL`` most proportional layouts; start from the most proportional, then repeatedly add
    the shape farthest (in log sizes) from those already taken. Once every layout of the pool is taken, a
    larger ``count`` goes on the same way among the other shapes, so the other splits of a layout's width
    between ``d_model`` and ``intermediate_size`` are scored too. The first ``k`` of ``count`` are the ``k``
    shapes a smaller ``count`` picks, so a search can be extended."""
    seen: set[tuple[int, ...]] = set()
    pool: list[Candidate] = []
    rest: list[Candidate] = []
    for candidate in found:  # already best prior first
        if candidate.sizes[:3] not in seen and len(pool) < SCORING_POOL:
            seen.add(candidate.sizes[:3])
            pool.append(candidate)
        else:
            rest.append(candidate)
    if not pool:
        return []
    picked = _farthest_first([], pool, count)
    return picked + _farthest_first(picked, rest, count - len(picked))


def _farthest_first(taken: list[Candidate], shapes: list[Candidate], count: int) -> list[Candidate]:
    """Up to ``count`` of ``shapes``, each the one farthest in log sizes from all taken so far (the first of
    ``shapes`` first when nothing is taken; ties to the earlier, more proportional shape)."""
    if count <= 0 or not shapes:
        return []
    points = [[math.log(size) for size in c.sizes] for c in shapes]
    anchors = [[math.log(size) for size in c.sizes] for c in taken]
    nearest = [min((math.dist(p, a) for a in anchors), default=math.inf) for p in points]
    picked: list[int] = []
    while len(picked) < min(count, len(shapes)):
        index = max((i for i in range(len(shapes)) if i not in picked), key=lambda i: (nearest[i], -i))
        picked.append(index)
        nearest = [min(d, math.dist(p, points[index])) for d, p in zip(nearest, points, strict=True)]
    return [shapes[i] for i in picked]
