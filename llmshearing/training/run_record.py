"""The run's identity in every checkpoint: a resumed run whose checkpoint records another is refused.

The identity (model shape, mask settings) is :mod:`llmshearing.checkpoint.run_config`'s; ``prune-model`` reads
it back to tell whether a run folder's ``config.json`` describes the checkpoint it folds.
"""

from __future__ import annotations

from typing import Any

from composer.core import Callback

from llmshearing.checkpoint.run_config import differences, identity, source_hint
from llmshearing.config_base import ConfigError


class RunRecord(Callback):
    """Stores the run's identity (model shape, mask settings) in every checkpoint; a resumed run
    whose checkpoint records another identity is refused."""

    def __init__(self, description: dict[str, Any]) -> None:
        self.record = identity(description)

    def state_dict(self) -> dict[str, Any]:
        return {"identity": self.record}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("identity")
        if saved is None:
            return
        changed = differences(self.record, saved)
        if changed:
            raise ConfigError(
                f"the checkpoint to resume from belongs to a different run: {'; '.join(changed[:6])} "
                f"(this recipe vs the checkpoint){source_hint(changed)}; resume with the run's own settings or "
                "choose another save_folder"
            )
