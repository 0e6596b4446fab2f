"""Targeted structured pruning: hard-concrete L0 masks toward an exact target shape.

Importing this package is light; the Composer pieces load on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "HardConcrete",
    "L0Config",
    "L0Module",
    "L0Output",
    "L0Pruning",
    "attach_l0_module",
    "l0_param_groups",
    "prune_decoder",
    "prune_state_dict",
    "set_l0_step",
    "set_multiplier_beta1",
]

_LOCATIONS = {
    "HardConcrete": "llmshearing.pruning.hard_concrete",
    "L0Config": "llmshearing.pruning.targets",
    "L0Module": "llmshearing.pruning.l0_module",
    "L0Output": "llmshearing.pruning.l0_module",
    "L0Pruning": "llmshearing.pruning.algorithm",
    "attach_l0_module": "llmshearing.pruning.algorithm",
    "l0_param_groups": "llmshearing.pruning.algorithm",
    "set_l0_step": "llmshearing.pruning.algorithm",
    "set_multiplier_beta1": "llmshearing.pruning.algorithm",
    "prune_decoder": "llmshearing.pruning.fold",
    "prune_state_dict": "llmshearing.pruning.fold",
}


def __getattr__(name: str) -> Any:
    if name not in _LOCATIONS:
        raise AttributeError(f"module 'llmshearing.pruning' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LOCATIONS[name]), name)
