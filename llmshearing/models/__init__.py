"""LLaMA-family decoder with pruning masks, its schema, its Composer model and metrics.

Checkpoint I/O (``from_pretrained``) lives in :mod:`llmshearing.checkpoint.loading`: ``models/`` imports
no other part of the package.

Exports are resolved lazily so that importing ``llmshearing.models.config`` does not import
torch or Composer.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ModelConfig": "llmshearing.models.config",
    "Decoder": "llmshearing.models.decoder",
    "ComposerLlama": "llmshearing.models.composer_model",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'llmshearing.models' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
