"""The project checkpoint format, and its writer.

A project checkpoint is a directory holding

* ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``)
  with the ``Decoder``'s state-dict keys, or, written with ``sharded=True`` (``convert hf-to-composer
  --sharded``), ``model.dcp/``: a ``torch.distributed.checkpoint`` directory (``.metadata`` and one
  ``__0_<i>.distcp`` file per tensor) with the same tensors under ``state.model.model.<key>``, the layout
  of Composer's sharded checkpoints (:mod:`llmshearing.checkpoint.sharded`), read tensor by tensor,
* ``config.json`` = ``{"format": "llmshearing", "model": ModelConfig.to_dict(), "hf_config": {...}}``
  (``hf_config`` is the source model's HF config, used on export),
* the tokenizer files when the source had them.

A pruning run's training checkpoint also holds the masks (``l0_module.*``); every reader that would use the
weights alone refuses it through :func:`refuse_pruning_checkpoint`. :mod:`llmshearing.checkpoint.reading`
reads this format and every other kind of checkpoint. Writers build the directory under a hidden staging
sibling and rename it when complete (:mod:`llmshearing.io.staging`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from llmshearing.checkpoint.sharded import write_sharded_weights
from llmshearing.checkpoint.tensor_io import (
    DEFAULT_MAX_SHARD_BYTES,
    StateDictSource,
    TensorMeta,
    TensorSource,
    finite,
    write_safetensors,
)
from llmshearing.hf.config import DTYPE_NAMES
from llmshearing.hf.gguf import is_gguf_file
from llmshearing.hf.keymaps import check_keys
from llmshearing.io.staging import staged_dir
from llmshearing.models.config import ModelConfig
from llmshearing.models.schema import state_shapes

FORMAT = "llmshearing"
CONFIG_NAME = "config.json"
L0_PREFIX = "l0_module."
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_state(tensors: TensorSource, config: ModelConfig, source: str, allow_l0: bool = False) -> None:
    """Strict check: exactly the decoder's keys (plus ``l0_module.*`` when allowed), right shapes."""
    shapes = state_shapes(config)
    keys = [k for k in tensors.keys() if not (allow_l0 and k.startswith(L0_PREFIX))]
    check_keys(keys, shapes, source)
    wrong = [
        f"{key} is {list(meta.shape)}, expected {list(shapes[key])}"
        for key in shapes
        if (meta := tensors.meta(key)).shape != shapes[key]
    ]
    if wrong:
        raise ValueError(f"{source}: tensor shapes do not match the model config: {'; '.join(wrong[:8])}")


def refuse_pruning_checkpoint(keys: Iterable[str], message: str, error: type[Exception] = ValueError) -> None:
    """Raise ``error(message)`` when ``keys`` (a checkpoint's tensor names) hold a pruning run's
    ``l0_module.*`` masks: a reader that takes the weights alone would drop the masks and use the unpruned
    model. ``message`` says what the caller would have done and how to fold the checkpoint first."""
    if any(key.startswith(L0_PREFIX) for key in keys):
        raise error(message)


def has_tokenizer(directory: Path) -> bool:
    """Whether ``directory`` holds a tokenizer (``tokenizer.json`` or ``tokenizer_config.json``)."""
    return (directory / "tokenizer.json").is_file() or (directory / "tokenizer_config.json").is_file()


def copy_tokenizer(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer (and generation config) files of ``src`` into ``dst``; returns their names.

    A ``tokenizer.model`` that is really a GGUF file (what transformers writes after loading a GGUF
    tokenizer) is skipped.
    """
    if not src.is_dir():
        raise FileNotFoundError(f"tokenizer directory {src} not found")
    copied = []
    for name in TOKENIZER_FILES:
        file = src / name
        if not file.is_file() or (name == "tokenizer.model" and is_gguf_file(file)):
            continue
        shutil.copyfile(file, dst / name)
        copied.append(name)
    return copied


def tensor_progress(
    total: int, desc: str, enabled: bool = True
) -> tuple[Callable[[], None], Callable[[], None]]:
    """A tqdm bar over ``total`` tensors: returns ``(tick, close)``."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="tensor", disable=not enabled)
    return (lambda: bar.update(1)), bar.close


def write_project_checkpoint(
    out: str | Path,
    config: ModelConfig,
    tensors: TensorSource,
    hf_config: dict[str, Any] | None = None,
    tokenizer_dir: str | Path | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    extra: Callable[[Path], None] | None = None,
    progress: bool = True,
    sharded: bool = False,
) -> Path:
    """Write ``tensors`` (project keys, strictly checked) as a project checkpoint at ``out``.

    ``dtype`` ("fp32" | "bf16" | "fp16") casts floating tensors; None keeps them. ``extra`` may add
    files to the staging directory before it is renamed. ``sharded`` writes the weights as ``model.dcp/``
    (``torch.distributed.checkpoint``) instead of safetensors. Either way one tensor is read, cast and
    written at a time: the peak is the largest tensor in the source's dtype plus its cast copy (sharded: plus
    the previous tensor's cast copy, which torch's writer still holds).
    """
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_NAMES)}, got {dtype!r}")
    check_state(tensors, config, "checkpoint to write")
    target = TORCH_DTYPES.get(dtype) if dtype else None
    metas = {}
    for key in state_shapes(config):
        meta = tensors.meta(key)
        metas[key] = TensorMeta(
            target if target is not None and meta.dtype.is_floating_point else meta.dtype, meta.shape
        )

    checked = finite(tensors, f"the weights for {out}")  # a NaN or Inf stops the write; nothing is left

    def produce(key: str) -> Tensor:
        return checked.get(key).to(metas[key].dtype)

    with staged_dir(out, overwrite) as staging:
        tick, close = tensor_progress(len(metas), f"writing {Path(out).name}", progress)
        try:
            if sharded:
                write_sharded_weights(staging, metas, produce, tick)
            else:
                write_safetensors(staging, metas, produce, max_shard_bytes, tick)
        finally:
            close()
        document = {"format": FORMAT, "model": config.to_dict(), "hf_config": hf_config}
        (staging / CONFIG_NAME).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        if tokenizer_dir is not None:
            copy_tokenizer(Path(tokenizer_dir), staging)
        if extra is not None:
            extra(staging)
    return Path(out)


def save_checkpoint(
    out: str | Path,
    config: ModelConfig,
    state_dict: Mapping[str, Tensor],
    hf_config: dict[str, Any] | None = None,
    tokenizer_dir: str | Path | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
) -> Path:
    """Save a ``Decoder`` state dict as a project checkpoint (see ``write_project_checkpoint``)."""
    return write_project_checkpoint(
        out,
        config,
        StateDictSource(state_dict),
        hf_config,
        tokenizer_dir,
        dtype,
        overwrite,
        max_shard_bytes,
        progress=progress,
    )
