"""Any checkpoint the project reads, as an in-memory Hugging Face model for lm-evaluation-harness.

The model is built from the same config and tensor names `convert composer-to-hf` writes, and loaded
through transformers' own ``from_pretrained`` (with the state dict in hand instead of files), so it is
the model lm-eval's ``--model hf`` would load from the exported directory, with no export step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmshearing.checkpoint.format import TORCH_DTYPES, refuse_pruning_checkpoint
from llmshearing.checkpoint.reading import OpenCheckpoint

DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")


def stored_dtype(ckpt: OpenCheckpoint) -> str:
    """The dtype name (fp32 | bf16 | fp16) the checkpoint's floating weights are stored in."""
    from llmshearing.models.schema import state_shapes

    names = {dtype: name for name, dtype in TORCH_DTYPES.items()}
    for key in state_shapes(ckpt.config):
        dtype = ckpt.tensors.meta(key).dtype
        if dtype.is_floating_point:
            return names.get(dtype, "fp32")
    return "fp32"


def check_loadable(ckpt: OpenCheckpoint) -> None:
    """Raise ``ValueError`` for a pruning checkpoint (its masks would be dropped)."""
    refuse_pruning_checkpoint(
        ckpt.tensors.keys(),
        (
            f"{ckpt.path} is a pruning checkpoint (it holds l0_module.* masks): evaluating it would drop the "
            f"masks and score the unpruned model; fold it first with `llmshearing prune-model {ckpt.path} OUT` "
            "and evaluate OUT"
        ),
    )


def hf_config_dict(ckpt: OpenCheckpoint, dtype: str) -> dict[str, Any]:
    """The ``config.json`` `convert composer-to-hf --dtype DTYPE` would write for this checkpoint."""
    from llmshearing.hf.config import hf_config_from_model

    return hf_config_from_model(ckpt.config, ckpt.hf_config, dtype)


def build_hf_model(ckpt: OpenCheckpoint, dtype: str, device: str) -> Any:
    """A transformers ``*ForCausalLM`` in eval mode holding the checkpoint's weights in ``dtype`` on ``device``."""
    import transformers
    from transformers import CONFIG_MAPPING

    from llmshearing.hf.keymaps import KeyMap
    from llmshearing.models.schema import state_shapes

    check_loadable(ckpt)
    config_dict = hf_config_dict(ckpt, dtype)
    config = CONFIG_MAPPING[config_dict["model_type"]].from_dict(config_dict)
    keymap = KeyMap(ckpt.config.family)
    target = TORCH_DTYPES[dtype]
    state = {}
    for key in state_shapes(ckpt.config):
        tensor = ckpt.tensors.get(key)
        state[keymap.to_hf(key)] = tensor.to(target) if tensor.is_floating_point() else tensor
    model_class = getattr(transformers, config_dict["architectures"][0])
    model = model_class.from_pretrained(None, config=config, state_dict=state, dtype=target)
    del state
    return model.to(device).eval()


def _has_tokenizer(directory: Path) -> bool:
    return (directory / "tokenizer.json").is_file() or (directory / "tokenizer_config.json").is_file()


def tokenizer_dir(ckpt: OpenCheckpoint, override: str | None) -> Path:
    """The tokenizer directory: ``override`` (``--tokenizer``) or the one found with the checkpoint."""
    if override is not None:
        if not _has_tokenizer(Path(override)):
            raise FileNotFoundError(
                f"--tokenizer {override} holds no tokenizer.json or tokenizer_config.json"
            )
        return Path(override)
    if ckpt.tokenizer_dir is None or not _has_tokenizer(ckpt.tokenizer_dir):
        raise FileNotFoundError(
            f"no tokenizer found with {ckpt.path} (beside it, in its run folder or its source checkpoint): "
            "pass --tokenizer DIR (the source model's directory)"
        )
    return ckpt.tokenizer_dir


def load_tokenizer(directory: Path) -> Any:
    """The tokenizer in ``directory``, loaded as lm-eval's HFLM loads it."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as err:
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise ValueError(
            f"cannot load the tokenizer in {directory} ({reason}); pass --tokenizer DIR"
        ) from err


def check_vocabulary(tokenizer: Any, ckpt: OpenCheckpoint, tok_dir: Path) -> None:
    """Raise ``ValueError`` when the tokenizer produces ids the model has no embedding for."""
    size = len(tokenizer)
    if size > ckpt.config.vocab_size:
        raise ValueError(
            f"the tokenizer in {tok_dir} has {size} tokens but the model {ckpt.path} has "
            f"{ckpt.config.vocab_size} token embeddings: pass the model's own tokenizer with --tokenizer DIR"
        )
