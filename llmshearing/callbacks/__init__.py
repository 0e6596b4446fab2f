"""Composer callbacks of the project.

Exports are resolved lazily so that importing the package does not import Composer.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DynamicLoadingCallback": "llmshearing.callbacks.dynamic_loading",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'llmshearing.callbacks' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
