"""Dynamic batch loading: re-weight the training domains from their losses at every update interval.

See ``README.md`` in this folder for the keys, the update rule, what is logged and the functional API.
Importing this package is light; the Composer pieces load on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "KEY",
    "DataLoadingConfig",
    "DynamicLoadingCallback",
    "build_train_dataloader",
    "resolve_reference",
    "update_weights",
]

_LOCATIONS = {
    "KEY": "llmshearing.dynamic_loading.config",
    "DataLoadingConfig": "llmshearing.dynamic_loading.config",
    "DynamicLoadingCallback": "llmshearing.dynamic_loading.callback",
    "build_train_dataloader": "llmshearing.dynamic_loading.loader",
    "resolve_reference": "llmshearing.dynamic_loading.reference_loss",
    "update_weights": "llmshearing.dynamic_loading.mixing",
}


def __getattr__(name: str) -> Any:
    if name not in _LOCATIONS:
        raise AttributeError(f"module 'llmshearing.dynamic_loading' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LOCATIONS[name]), name)
