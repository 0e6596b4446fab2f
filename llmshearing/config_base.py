"""What every config section is built on: ``ConfigError``, durations in batches, unknown keys and sections.

The bottom of the package: it imports nothing from it. The run config (:mod:`llmshearing.training.config`),
the pruning, distillation and data-loading sections, the loaders and the commands share these pieces:

* ``ConfigError``: a bad value in a recipe; the message names the key and the fix;
* ``parse_batches`` (``640`` or ``"640ba"``), ``batches`` (``"100ba"`` only: Composer reads a bare integer as
  epochs) and ``duration_in_batches`` (``"100ba"`` or a fraction of the run, ``"0.1dur"``);
* ``closest_key`` and ``refuse_unknown_keys``: a key no section knows, named with the closest valid one;
* ``Section`` and ``section_from_mapping``: a dataclass section made from a recipe's mapping; it keeps which
  keys the recipe gave, in their order, so ``to_dict`` writes back what was read;
* the names a recipe may choose from (optimizers, schedulers, precisions, ...).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar


class ConfigError(ValueError):
    """A problem in the training configuration; the message names the key and the fix."""


OPTIMIZERS = ("decoupled_adamw",)
SCHEDULERS = ("cosine_with_warmup", "linear_with_warmup", "constant_with_warmup")
CLIPPING_TYPES = ("norm", "value", "adaptive")
PRECISIONS = ("fp32", "amp_bf16", "amp_fp16", "amp_fp8")
DEVICES = (None, "cpu", "gpu")
LOG_LEVELS = (None, "debug", "info", "warning", "error", "critical")
INIT_DEVICES = ("cpu", "mixed")

_BATCHES = re.compile(r"(\d+)ba")
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)dur")


def is_number(value: Any) -> bool:
    """An int or a float, not a bool (YAML's ``true`` is no number of anything)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_int(value: Any) -> bool:
    """An int, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(key: str, value: Any, low: int) -> int:
    """``value`` when it is an integer >= ``low``; a ``ConfigError`` naming ``key`` otherwise."""
    if not is_int(value) or value < low:
        raise ConfigError(f"{key} must be an integer >= {low}, got {value!r}")
    return value


def parse_batches(value: Any, key: str) -> int:
    """A number of batches given as an int or a Composer time string in batches (``"640ba"``); a
    ``ValueError`` naming ``key`` otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"{key} must be a number of batches (e.g. 640 or '640ba'), got {value!r}")
    if isinstance(value, int):
        steps = value
    elif isinstance(value, str) and value.strip().endswith("ba") and value.strip()[:-2].isdigit():
        steps = int(value.strip()[:-2])
    elif isinstance(value, str) and value.strip().isdigit():
        steps = int(value.strip())
    else:
        raise ValueError(f"{key} must be a number of batches (e.g. 640 or '640ba'), got {value!r}")
    if steps < 0:
        raise ValueError(f"{key} must be >= 0, got {steps}")
    return steps


def batches(key: str, value: Any, allow_zero: bool = False) -> int:
    """An interval given in batches (``100ba``); Composer would read a bare integer as epochs."""
    match = _BATCHES.fullmatch(str(value).strip()) if isinstance(value, str) else None
    if match is None or (int(match.group(1)) == 0 and not allow_zero):
        smallest = 0 if allow_zero else 1
        raise ConfigError(
            f"{key} must be a number of batches >= {smallest} written like {key}=100ba, got {value!r}"
        )
    return int(match.group(1))


def duration_in_batches(key: str, value: Any, total: int) -> float:
    """A scheduler time, ``<n>ba`` or a fraction of the run ``<f>dur``, in batches."""
    text = str(value).strip() if isinstance(value, str) else ""
    match = _DURATION.fullmatch(text)
    if match is not None:
        fraction = float(match.group(1))
        if fraction > 1:
            raise ConfigError(f"{key} = {value!r} is more than the whole run (1dur)")
        return fraction * total
    if _BATCHES.fullmatch(text):
        return batches(key, value, allow_zero=True)
    raise ConfigError(
        f"{key} must be given in batches (e.g. 100ba) or as a fraction of the run (e.g. 0.1dur), got {value!r}"
    )


def closest_key(key: Any, valid: Iterable[Any]) -> str | None:
    """The valid key closest in spelling to ``key`` (difflib), None when none is close."""
    close = difflib.get_close_matches(str(key), [str(k) for k in valid], n=1)
    return close[0] if close else None


def unknown_key_message(key: Any, valid: Iterable[Any], prefix: str = "") -> str:
    """``unknown config key 'a.b'; did you mean a.c?`` (or the valid keys here when none is close)."""
    close = closest_key(key, valid)
    hint = f"; did you mean {prefix}{close}?" if close else f"; valid keys here: {sorted(valid)}"
    return f"unknown config key {f'{prefix}{key}'!r}{hint}"


def refuse_unknown_keys(values: Mapping[str, Any], valid: Iterable[str], where: str) -> None:
    """A ``ValueError`` naming the first key of ``values`` (sorted) that ``valid`` lacks, as ``<where>.<key>``,
    and the closest valid key (or the valid keys when none is close), as :func:`unknown_key_message` does."""
    known = list(valid)
    unknown = sorted(set(values) - set(known), key=str)
    if unknown:
        raise ValueError(unknown_key_message(unknown[0], known, f"{where}." if where else ""))


# --- sections: dataclasses made from a recipe's mappings -------------------------------------------------

OMIT = "omit"  # field metadata: no default value; the key is absent from a recipe that does not set it
SECTION = "section"  # field metadata: the field is a nested Section (its class)
PARSED = "parsed"  # field metadata: a section another module defines and validates; its mapping is kept
SCHEMA = "schema"  # field metadata: the keys accepted inside a free-form or parsed field (None: any)


def optional(schema: Any = None) -> Any:
    """A field a recipe may leave out: ``None`` then, absent from the defaults and from ``to_dict``."""
    return dataclasses.field(default=None, metadata={OMIT: True, SCHEMA: schema})


def section(cls: type) -> Any:
    """A nested section (a ``Section`` subclass); made with its defaults when the recipe leaves it out."""
    return dataclasses.field(default_factory=cls, metadata={SECTION: cls})


def parsed(schema: Any = None, omit: bool = False) -> Any:
    """A section that another module defines and validates (``None`` by default); ``schema``: its keys when
    they are checked with the others (None: it checks its own keys); ``omit``: absent from the defaults."""
    return dataclasses.field(default=None, metadata={PARSED: True, SCHEMA: schema, OMIT: omit})


class Section:
    """Base of a dataclass section of the run config.

    A section made by :func:`section_from_mapping` remembers the keys the recipe gave, in their order, and the
    mappings of the sections parsed elsewhere, so that :meth:`to_dict` returns what was read (a run's
    ``config.json`` keeps the recipe as written); one made directly returns its fields.
    """

    def keys(self) -> list[str]:
        """The keys the recipe gave, in its order (a section made directly: its fields, less the optional
        ones left unset)."""
        keys = getattr(self, "_keys", None)
        if keys is not None:
            return list(keys)
        return [
            f.name
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
            if not (f.metadata.get(OMIT) and getattr(self, f.name) is None)
        ]

    def items(self) -> list[tuple[str, Any]]:
        """``(key, value)`` of every key the recipe gave (for ``callbacks`` and ``loggers``: each one named)."""
        return [(key, getattr(self, key)) for key in self.keys()]

    def to_dict(self) -> dict[str, Any]:
        """The section as the plain mapping it was read from (values changed since: their new values)."""
        keys = self.keys()
        raw = getattr(self, "_raw", {})
        out: dict[str, Any] = {}
        for key in keys:
            value = getattr(self, key)
            if key in raw:
                out[key] = copy.deepcopy(raw[key])
            elif dataclasses.is_dataclass(value) and hasattr(value, "to_dict"):
                out[key] = value.to_dict()
            else:
                out[key] = copy.deepcopy(value)
        return out

    def put(self, key: str, value: Any, raw: Any = None) -> None:
        """Set ``key`` as if the recipe had given it; ``raw``: the mapping ``to_dict`` writes for a parsed
        section (None: the value's own ``to_dict``)."""
        setattr(self, key, value)
        keys = getattr(self, "_keys", None)
        if keys is not None and key not in keys:
            keys.append(key)
        kept = self.__dict__.setdefault("_raw", {})
        if raw is not None:
            kept[key] = raw
        else:
            kept.pop(key, None)


def schema_of(cls: type) -> dict[str, Any]:
    """The keys of a section: ``{name: schema of the nested section}`` or ``{name: keys | None}`` (None: a
    free-form value, or a section that checks its own keys)."""
    schema: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        nested = f.metadata.get(SECTION)
        schema[f.name] = schema_of(nested) if nested is not None else f.metadata.get(SCHEMA)
    return schema


def defaults_of(cls: type) -> dict[str, Any]:
    """The default of every field that has one (a nested section: its own defaults), in field order."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        nested = f.metadata.get(SECTION)
        if nested is not None:
            out[f.name] = defaults_of(nested)
        elif f.metadata.get(OMIT):
            continue
        elif f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def required_of(cls: type) -> tuple[str, ...]:
    """The fields without a default: the keys a recipe must set."""
    return tuple(
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    )


def check_keys(values: Any, schema: Any, prefix: str = "") -> None:
    """Reject keys ``schema`` does not know, naming the closest valid key (``ConfigError``)."""
    if schema is None or not isinstance(values, dict):
        return
    for key, value in values.items():
        if key not in schema:
            raise ConfigError(unknown_key_message(key, schema, prefix))
        check_keys(value, schema[key], f"{prefix}{key}.")


SectionT = TypeVar("SectionT", bound=Section)


def section_from_mapping(cls: type[SectionT], values: Any, prefix: str = "") -> SectionT:
    """The section ``cls`` made from ``values``, a mapping of its keys (None: its defaults).

    An unknown key is a ``ConfigError`` naming ``<prefix><key>`` and the closest valid key; so is a nested
    section that is not a mapping, and a field without a default that the mapping lacks. Sections parsed
    elsewhere (``parsed()``) are taken as they are, their mapping kept for ``to_dict``: their owner puts the
    parsed value in their place (:meth:`Section.put`).
    """
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise ConfigError(
            f"{prefix.rstrip('.') or 'the recipe'} must be a mapping of settings, got {values!r}"
        )
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    raw: dict[str, Any] = {}
    for key, value in values.items():
        f = names.get(key)
        if f is None:
            raise ConfigError(unknown_key_message(key, names, prefix))
        nested = f.metadata.get(SECTION)
        if nested is not None:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{prefix}{key} must be a mapping of settings, got {value!r}")
            kwargs[key] = section_from_mapping(nested, value, f"{prefix}{key}.")
        else:
            kwargs[key] = value
            if f.metadata.get(PARSED) and value is not None:
                raw[key] = value
    missing = [name for name in required_of(cls) if name not in kwargs]
    if missing:
        raise ConfigError(f"config key {f'{prefix}{missing[0]}'!r} is required")
    made = cls(**kwargs)
    made.__dict__["_keys"] = list(values)
    made.__dict__["_raw"] = raw
    return made
