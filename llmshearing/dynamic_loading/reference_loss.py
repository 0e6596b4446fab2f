"""Reference losses for dynamic batch loading from a per-domain scaling law ``L(N) = a / N**b + c``.

The fit is least squares over the (size, loss) points of one domain. For a fixed exponent ``b`` the
model is linear in ``a`` and ``c``, so the exponent is found by a bracketed golden-section search on
the residual of that linear solve (variable projection); with three points the curve passes through
all of them. Sizes are scaled by their geometric mean internally, which changes ``a`` but not the
predictions.

The Sheared-LLaMA vectors are available as presets (``PRESETS``); they are what this fit gives from
the LLaMA-2 7B/13B/70B per-domain losses (``LLAMA2_SIZES``, ``LLAMA2_LOSSES``) at the full parameter
count of each target.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from llmshearing.dynamic_loading.config import KEY

PAPER_DOMAINS = ("cc", "github", "book", "stackexchange", "wiki", "arxiv", "c4-rp")

LLAMA2_SIZES = (6_738_415_616, 13_015_864_320, 68_976_648_192)
LLAMA2_LOSSES: dict[str, tuple[float, float, float]] = {
    "cc": (1.7520, 1.6680, 1.4621),
    "github": (0.6216, 0.5791, 0.4890),
    "book": (1.9063, 1.8242, 1.6450),
    "stackexchange": (1.4482, 1.3936, 1.2805),
    "wiki": (1.4844, 1.3945, 1.2118),
    "arxiv": (1.2637, 1.2109, 1.1148),
    "c4-rp": (1.9219, 1.8486, 1.6848),
}

TARGET_SIZES = {"1.3b": 1_345_423_360, "2.7b": 2_701_560_320, "370m": 373_867_520}


def _vector(values: Sequence[float]) -> dict[str, float]:
    return dict(zip(PAPER_DOMAINS, values, strict=True))


PRESETS: dict[str, dict[str, float]] = {
    "sheared-1.3b": _vector((1.9643, 0.7459, 2.1393, 1.6117, 1.7590, 1.4449, 2.1251)),
    "sheared-2.7b": _vector((1.8712, 0.6883, 2.0325, 1.5353, 1.6297, 1.3560, 2.0328)),
    "sheared-370m": _vector((2.1401, 0.8694, 2.3625, 1.7791, 2.0470, 1.6637, 2.3139)),
}

_GOLDEN = (np.sqrt(5.0) - 1.0) / 2.0
_MIN_EXPONENT = 1e-6
_MAX_EXPONENT = 5.0
_EDGE = 1e-3  # an exponent within this fraction of the range's upper end is at its edge


@dataclass(frozen=True)
class PowerLaw:
    """``L(N) = a / (N / scale)**b + c``."""

    a: float
    b: float
    c: float
    scale: float
    residual: float

    def __call__(self, size: float) -> float:
        return float(self.a * (float(size) / self.scale) ** (-self.b) + self.c)

    def predict(self, size: float) -> float:
        """The loss at ``size`` parameters; ``ValueError`` when the law gives no usable loss there."""
        value = self(size)
        if not (np.isfinite(value) and value > 0):
            raise ValueError(
                f"the fit predicts a loss of {value:.4g} at N = {size:.4g}, which is no loss: the target "
                "size lies too far beyond the measured sizes for this fit"
            )
        return value


def _linear_part(x: np.ndarray, y: np.ndarray, b: np.ndarray | float) -> tuple[np.ndarray, ...]:
    """Least-squares ``a``, ``c`` and squared residual of ``y = a x**-b + c`` for each exponent ``b``."""
    xb = x[None, :] ** -np.atleast_1d(b)[:, None]
    xm = xb - xb.mean(axis=1, keepdims=True)
    ym = y - y.mean()
    a = (xm @ ym) / np.einsum("ij,ij->i", xm, xm)
    c = y.mean() - a * xb.mean(axis=1)
    r = xb * a[:, None] + c[:, None] - y[None, :]
    return a, c, np.einsum("ij,ij->i", r, r)


def fit_power_law(sizes: Sequence[float], losses: Sequence[float]) -> PowerLaw:
    """Least-squares fit of ``a / N**b + c`` to at least three (size, loss) points."""
    n = np.asarray(list(sizes), dtype=np.float64)
    y = np.asarray(list(losses), dtype=np.float64)
    if n.shape != y.shape or n.ndim != 1:
        raise ValueError(f"got {n.size} sizes and {y.size} losses: give one loss per model size")
    if n.size < 3:
        raise ValueError(f"a / N^b + c has three parameters: give at least three model sizes, got {n.size}")
    if np.any(n <= 0) or not np.all(np.isfinite(y)):
        raise ValueError("model sizes must be positive and losses finite")
    if len(np.unique(n)) != n.size:
        raise ValueError(f"model sizes must be distinct, got {n.tolist()}")
    scale = float(np.exp(np.log(n).mean()))
    x = n / scale

    grid = np.linspace(_MIN_EXPONENT, _MAX_EXPONENT, 5001)
    best = int(np.argmin(_linear_part(x, y, grid)[2]))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, grid.size - 1)]
    for _ in range(200):
        m1 = hi - _GOLDEN * (hi - lo)
        m2 = lo + _GOLDEN * (hi - lo)
        r1, r2 = _linear_part(x, y, np.array([m1, m2]))[2]
        if r1 < r2:
            hi = m2
        else:
            lo = m1
    b = 0.5 * (lo + hi)
    a, c, residual = (float(v[0]) for v in _linear_part(x, y, b))
    _check_decreasing(n, y, a, float(b))
    return PowerLaw(a=a, b=float(b), c=c, scale=scale, residual=residual)


def _check_decreasing(sizes: np.ndarray, losses: np.ndarray, a: float, b: float) -> None:
    """Refuse a fit whose loss does not fall with size, or that only fits at an exponent bound."""
    order = np.argsort(sizes)
    points = ", ".join(f"{sizes[i]:.3g}: {losses[i]:.4g}" for i in order)
    if not a > 0:
        raise ValueError(
            f"the losses do not decrease with model size ({points}): the best fit of a / N^b + c has "
            f"a = {a:.3g}, a loss that rises or stays flat as N grows; give the losses in the order of "
            "--sizes, measured on the same data"
        )
    if b < 2 * _MIN_EXPONENT or b > _MAX_EXPONENT * (1 - _EDGE):
        raise ValueError(
            f"the losses do not follow a power law that decreases with model size ({points}): the "
            f"best exponent b = {b:.3g} lies at the edge of the range searched, (0, {_MAX_EXPONENT:g}]; "
            "the loss must fall with every larger model, by less at each step; check the sizes and losses"
        )


def fit_reference_losses(
    sizes: Sequence[float], losses: Mapping[str, Sequence[float]], target_size: float
) -> dict[str, float]:
    """Predicted loss of a model with ``target_size`` parameters, per domain (insertion order kept)."""
    if target_size <= 0:
        raise ValueError(f"target size must be a positive parameter count, got {target_size}")
    out = {}
    for domain, values in losses.items():
        try:
            out[domain] = fit_power_law(sizes, values).predict(target_size)
        except ValueError as err:
            raise ValueError(f"domain {domain!r}: {err}") from None
    return out


def preset_reference(name: str) -> dict[str, float]:
    """A named reference vector, e.g. ``sheared-1.3b``."""
    try:
        return dict(PRESETS[name])
    except KeyError:
        raise ValueError(f"unknown reference preset {name!r}; available presets: {sorted(PRESETS)}") from None


def reference_for_domains(values: Mapping[str, float], set_names: Sequence[str], source: str) -> np.ndarray:
    """Order a domain->loss mapping by ``set_names``; every domain must be present."""
    missing = [d for d in set_names if d not in values]
    if missing:
        raise ValueError(
            f"{source} has no reference loss for domains {missing} (it covers {sorted(values)}): "
            f"use matching {KEY}.set_names or give target_loss explicitly"
        )
    return np.array([float(values[d]) for d in set_names], dtype=np.float64)


def parse_size(text: str | int | float) -> int:
    """A parameter count from ``6738415616``, ``6.7e9``, ``1.3b``, ``370m`` or ``125k``."""
    if isinstance(text, int | float):
        value = float(text)
    else:
        s = str(text).strip().lower().replace("_", "").replace(",", "")
        mult = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}.get(s[-1:], None)
        try:
            value = float(s[:-1]) * mult if mult else float(s)
        except ValueError:
            raise ValueError(
                f"cannot read model size {text!r}: use a number such as 6738415616, 6.7e9 or 1.3b"
            ) from None
    if value <= 0 or not np.isfinite(value):
        raise ValueError(f"model size must be positive, got {text!r}")
    return int(round(value))


def resolve_reference(
    set_names: Sequence[str], target_loss: Sequence[float] | None, reference: Any
) -> np.ndarray | None:
    """The reference losses of ``callbacks.data_loading`` in ``set_names`` order: ``target_loss`` as given,
    or from ``reference`` (a preset name or a scaling-law fit ``{sizes, losses, target_size}``); None for
    ``reference: source`` (the losses of the evaluation before training) or no reference."""
    if target_loss is not None:
        return np.asarray([float(v) for v in target_loss], dtype=np.float64)
    if reference is None or reference == "source":
        return None
    if isinstance(reference, str):
        return reference_for_domains(
            preset_reference(reference), set_names, f"reference preset {reference!r}"
        )
    if isinstance(reference, Mapping):
        known = {"sizes", "losses", "target_size"}
        if set(reference) != known:
            raise ValueError(
                f"{KEY}.reference as a scaling-law fit needs exactly the keys {sorted(known)}, "
                f"got {sorted(reference)}"
            )
        losses = reference["losses"]
        if not isinstance(losses, Mapping):
            raise ValueError(f"{KEY}.reference.losses must map each domain to one loss per size")
        fitted = fit_reference_losses(
            [parse_size(s) for s in reference["sizes"]],
            {d: losses[d] for d in set_names if d in losses},
            parse_size(reference["target_size"]),
        )
        return reference_for_domains(fitted, set_names, f"{KEY}.reference.losses")
    raise ValueError(
        f"{KEY}.reference must be 'source', a preset name or {{sizes, losses, target_size}}, got {reference!r}"
    )
