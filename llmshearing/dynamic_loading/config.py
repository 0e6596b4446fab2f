"""The ``callbacks.data_loading`` section of a recipe: its keys, their validation and the update interval.

``KEY`` is the one spelling of the section's name: every message about its keys is built from it.
A ``DataLoadingConfig`` is validated once, when it is made (``from_dict``, ``from_callbacks`` or the
constructor); the callback and the train loader take it as it is. Importing this module is light
(numpy only).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from llmshearing.config_base import ConfigError, is_number, refuse_unknown_keys
from llmshearing.data.proportions import validate_proportions
from llmshearing.dynamic_loading.mixing import EXCESS_TYPES, UPDATE_TYPES

KEY = "callbacks.data_loading"
LOSS_SOURCES = ("eval", "train")


@dataclass
class DataLoadingConfig:
    """``callbacks.data_loading``: the domains, their initial mix and how it is updated (every key, its
    default and the update rule: ``llmshearing/dynamic_loading/README.md``). Validated when made.

    Upstream keys: ``dynamic``, ``set_names``, ``proportion``, ``update_type``, ``target_loss``.
    Added: ``reference`` (``source``, a preset name such as ``sheared-1.3b``, or
    ``{sizes, losses, target_size}`` for a scaling-law fit), ``clip``, ``eta``, ``smoothing``,
    ``loss_source`` (``eval`` or ``train``), ``update_interval`` (batches as ``50`` or ``"50ba"``,
    or samples as ``"1600sp"``; default: ``eval_interval``), ``eval_label``.
    Stabilisers: ``loss_ema`` (decay in [0, 1) of an exponential moving average of the per-domain
    losses; 0 = off), ``min_proportion`` (in [0, 1): each domain keeps at least this fraction of its
    initial proportion, i.e. a floor relative to ``proportion``; default 0.5, chosen on the quality
    benchmark's eval split; 0 is the paper's rule), ``floor_proportion`` (the mix the floor is a fraction
    of, default ``proportion``: a continued run that starts from the pruning run's final mix gives the
    pruning run's initial mix here, so the floor does not halve again in every stage),
    ``update_warmup`` (batches before the first update, as ``50`` or ``"50ba"``),
    ``excess`` (``absolute``: ``loss - ref``; ``relative``: ``(loss - ref) / ref``).
    """

    set_names: list[str]
    proportion: list[float] | None = None
    dynamic: bool = False
    update_type: str = "doremi"
    target_loss: list[float] | None = None
    reference: Any = None
    clip: bool = True
    eta: float = 1.0
    smoothing: float = 1e-4
    loss_source: str = "eval"
    update_interval: int | str | None = None
    eval_label: str = "eval"
    loss_ema: float = 0.0
    min_proportion: float = 0.5
    floor_proportion: list[float] | None = None
    update_warmup: int | str = 0
    excess: str = "absolute"

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> DataLoadingConfig:
        """The section as a mapping (YAML), unknown keys refused; nulls take the defaults."""
        known = {f.name for f in fields(cls)}
        if not isinstance(cfg, Mapping):
            raise ValueError(f"{KEY} must be a mapping, got {type(cfg).__name__}")
        refuse_unknown_keys(cfg, known, KEY)
        if cfg.get("set_names") is None:
            raise ValueError(f"{KEY}.set_names is required: list the domain names (the MDS sub-directories)")
        values = {k: v for k, v in cfg.items() if v is not None or k in ("target_loss", "reference")}
        return cls(**values)

    @classmethod
    def from_callbacks(cls, callbacks: Mapping[str, Any]) -> DataLoadingConfig:
        """The recipe's ``callbacks.data_loading``, which every run needs (at least its domains and mix)."""
        section = callbacks.get("data_loading")
        return cls.from_dict(section) if section else cls.required(None)

    @staticmethod
    def required(config: DataLoadingConfig | None) -> DataLoadingConfig:
        """``config``, which every run needs: None (the recipe has no section) is refused, naming the keys."""
        if config is None:
            raise ValueError(
                f"{KEY} is required: at least set_names (the domains, i.e. the MDS sub-directories) "
                "and proportion (their mix)"
            )
        return config

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every key and normalise in place (lists of str and float, ``update_warmup`` in batches).

        Runs once, when the config is made; the callback and the loader trust a ``DataLoadingConfig``.
        """
        names = self.set_names
        if isinstance(names, str) or not isinstance(names, Sequence) or not names:
            raise ValueError(f"{KEY}.set_names must be a non-empty list of domain names, got {names!r}")
        names = [str(n) for n in names]
        if len(set(names)) != len(names):
            raise ValueError(f"{KEY}.set_names has duplicates: {names}")
        self.set_names = names
        if self.proportion is None:
            raise ValueError(
                f"{KEY}.proportion is required: one initial weight per domain in set_names, summing to 1"
            )
        validate_proportions(self.proportion, names, key=f"{KEY}.proportion")
        self.proportion = [float(p) for p in self.proportion]
        if self.update_type not in UPDATE_TYPES:
            raise ValueError(
                f"{KEY}.update_type must be one of {list(UPDATE_TYPES)}, got {self.update_type!r}"
            )
        if self.loss_source not in LOSS_SOURCES:
            raise ValueError(
                f"{KEY}.loss_source must be one of {list(LOSS_SOURCES)}, got {self.loss_source!r}"
            )
        if self.target_loss is not None:
            if self.reference is not None:
                raise ValueError(f"give either {KEY}.target_loss or {KEY}.reference, not both")
            if isinstance(self.target_loss, str) or len(self.target_loss) != len(names):
                raise ValueError(
                    f"{KEY}.target_loss must hold one loss per domain ({len(names)} for {names}), "
                    f"got {self.target_loss!r}"
                )
            self.target_loss = [float(v) for v in self.target_loss]
        if (
            self.dynamic
            and self.update_type == "doremi"
            and self.target_loss is None
            and self.reference is None
        ):
            raise ValueError(
                f"{KEY}.update_type doremi needs reference losses: set {KEY}.target_loss (one per domain) "
                f"or {KEY}.reference (source, a preset such as sheared-1.3b, or a scaling-law fit)"
            )
        if not (is_number(self.eta) and self.eta >= 0 and math.isfinite(self.eta)):
            raise ValueError(
                f"{KEY}.eta must be a non-negative number (the step size; 1.0 in the paper), got {self.eta!r}"
            )
        if not (is_number(self.smoothing) and 0 <= self.smoothing < 1):
            raise ValueError(f"{KEY}.smoothing must be in [0, 1), got {self.smoothing!r}")
        if not (is_number(self.loss_ema) and 0 <= self.loss_ema < 1):
            raise ValueError(
                f"{KEY}.loss_ema must be a decay in [0, 1) (0 turns the moving average off, 0.5 halves the "
                f"weight of older losses each update), got {self.loss_ema!r}"
            )
        if not (is_number(self.min_proportion) and 0 <= self.min_proportion < 1):
            raise ValueError(
                f"{KEY}.min_proportion must be in [0, 1): the fraction of its initial proportion each domain "
                f"keeps at least (0 = no floor), got {self.min_proportion!r}"
            )
        if self.floor_proportion is not None:
            validate_proportions(self.floor_proportion, names, key=f"{KEY}.floor_proportion")
            self.floor_proportion = [float(p) for p in self.floor_proportion]
        self.update_warmup = warmup_batches(self.update_warmup)
        if self.excess not in EXCESS_TYPES:
            raise ValueError(f"{KEY}.excess must be one of {list(EXCESS_TYPES)}, got {self.excess!r}")

    @property
    def floors(self) -> list[float] | None:
        """Lower bound of each domain's proportion (``min_proportion`` times its ``floor_proportion``,
        by default its initial proportion), or None."""
        if not self.min_proportion:
            return None
        anchor = self.proportion if self.floor_proportion is None else self.floor_proportion
        return [self.min_proportion * p for p in anchor]  # type: ignore[union-attr]


def warmup_batches(value: Any) -> int:
    """``update_warmup`` as a number of batches (``50`` or ``"50ba"``)."""
    text = str(value).strip().lower()
    digits = text[:-2] if text.endswith("ba") else text
    if isinstance(value, bool) or not digits.isdigit():
        raise ValueError(
            f"{KEY}.update_warmup must be a number of batches >= 0 (e.g. 100 or '100ba'), got {value!r}"
        )
    return int(digits)


def interval_in_batches(interval: int | str, global_batch_size: int, key: str) -> int:
    """An update interval given as batches (``50``, ``"50ba"``) or samples (``"1600sp"``) in batches."""
    text = str(interval).strip().lower()
    try:
        if text.endswith("ba"):
            batches = int(text[:-2])
        elif text.endswith("sp"):
            samples = int(text[:-2])
            if samples % global_batch_size:
                raise ValueError(
                    f"{key} = {interval} is not a whole number of global batches of {global_batch_size} "
                    "samples: choose a multiple of the global batch size"
                )
            batches = samples // global_batch_size
        else:
            batches = int(text)
    except ValueError as err:
        if "global batch" in str(err):
            raise
        raise ValueError(
            f"{key} = {interval!r} is not an interval in batches (50, '50ba') or samples ('1600sp'); "
            "epochs are not allowed (one dataset epoch is one update interval)"
        ) from None
    if batches <= 0:
        raise ValueError(f"{key} must be positive, got {interval!r}")
    return batches


def resolve_update_interval(
    data_loading: DataLoadingConfig, eval_interval: int | str | None, global_batch_size: int
) -> int:
    """The update interval in batches, checked against ``eval_interval``.

    ``eval_interval`` must be the update interval itself or ``1ep`` (one dataset epoch is one
    interval); with ``loss_source: train`` any ``eval_interval`` is allowed.
    """
    if isinstance(eval_interval, int):  # Composer reads a bare integer as epochs
        eval_interval = f"{eval_interval}ep"
    eval_text = None if eval_interval is None else str(eval_interval).strip().lower()
    eval_is_epoch = eval_text == "1ep"
    if data_loading.update_interval is not None:
        batches = interval_in_batches(
            data_loading.update_interval, global_batch_size, f"{KEY}.update_interval"
        )
    elif eval_text is not None and not eval_text.endswith("ep"):
        batches = interval_in_batches(eval_interval, global_batch_size, "eval_interval")
    else:
        raise ValueError(
            f"the update interval is unknown: set {KEY}.update_interval (e.g. 50ba) or eval_interval in batches"
        )
    needs_eval = data_loading.dynamic and data_loading.loss_source == "eval"
    if needs_eval and eval_text is not None and not eval_is_epoch:
        eval_batches = (
            None
            if eval_text.endswith("ep")
            else interval_in_batches(eval_interval, global_batch_size, "eval_interval")
        )
        if eval_batches != batches:
            raise ValueError(
                f"eval_interval ({eval_interval}) must equal {KEY}.update_interval ({batches}ba) or be 1ep: "
                "the mix is updated from the evaluation at the end of each interval"
            )
    return batches


def check_target_loss(data_loading: Any) -> None:
    """The section as a recipe wrote it (a mapping): one finite, non-negative reference loss per domain, in the
    order of ``set_names``; a :class:`ConfigError` naming the key otherwise. Run before the section is parsed."""
    if not isinstance(data_loading, dict) or data_loading.get("target_loss") is None:
        return
    losses, names = data_loading["target_loss"], data_loading.get("set_names")
    if not isinstance(losses, list):
        raise ConfigError(f"{KEY}.target_loss must be a list of losses, one per domain, got {losses!r}")
    if isinstance(names, list) and len(losses) != len(names):
        raise ConfigError(
            f"{KEY}.target_loss has {len(losses)} values but set_names has {len(names)} domains {names}: "
            "give one reference loss per domain, in the order of set_names"
        )
    for i, loss in enumerate(losses):
        domain = f" ({names[i]})" if isinstance(names, list) else ""
        if not (is_number(loss) and math.isfinite(loss) and loss >= 0):
            raise ConfigError(f"{KEY}.target_loss[{i}]{domain} must be a finite loss >= 0, got {loss!r}")
