"""Dynamic batch loading: the callback that re-weights the training domains from their losses.

See ``README.md`` in this folder for the keys, the update rule, what is logged and the functional API.
"""

from llmshearing.callbacks.dynamic_loading.callback import DynamicLoadingCallback

__all__ = ["DynamicLoadingCallback"]
