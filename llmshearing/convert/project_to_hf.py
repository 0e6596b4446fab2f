"""Project checkpoint (dir, pruned dir or Composer ``.pt``) -> Hugging Face model directory."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from torch import Tensor

from llmshearing.checkpoint.format import (
    CONFIG_NAME,
    TORCH_DTYPES,
    copy_tokenizer,
    refuse_pruning_checkpoint,
    tensor_progress,
)
from llmshearing.checkpoint.reading import open_checkpoint
from llmshearing.checkpoint.tensor_io import DEFAULT_MAX_SHARD_BYTES, TensorMeta, write_safetensors
from llmshearing.convert.model_card import model_card
from llmshearing.hf.config import DTYPE_NAMES, hf_config_from_model
from llmshearing.hf.keymaps import KeyMap
from llmshearing.io.staging import staged_dir
from llmshearing.models.schema import state_shapes


def convert_project_to_hf(
    ckpt: str | Path,
    out_dir: str | Path,
    tokenizer: str | Path | None = None,
    dtype: str = "bf16",
    config_path: str | Path | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
    run_config: str | Path | None = None,
) -> Path:
    """Export a checkpoint as an HF directory: ``config.json``, safetensors, the tokenizer and a model card.

    The tokenizer comes from ``tokenizer`` (a directory) or else from the checkpoint's directory.
    A pruning checkpoint that still holds L0 masks is refused: fold them with ``prune-model`` first.
    ``run_config`` (the producing run's ``config.json``) feeds the model card when the checkpoint does not
    lead to its run folder.
    """
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_NAMES)}, got {dtype!r}")
    tokenizer_dir = Path(tokenizer) if tokenizer is not None else None
    if tokenizer_dir is not None and not tokenizer_dir.is_dir():
        raise FileNotFoundError(f"--tokenizer {tokenizer_dir} is not a directory holding tokenizer files")
    with open_checkpoint(ckpt, config_path) as source:
        refuse_pruning_checkpoint(
            source.tensors.keys(),
            (
                f"{ckpt} holds L0 pruning state (l0_module.*): it is the unpruned model with masks. "
                f"Run `llmshearing prune-model {ckpt} OUT` first and export the pruned checkpoint it writes (OUT)"
            ),
        )
        config = source.config
        hf_config = hf_config_from_model(config, source.hf_config, dtype)
        keymap = KeyMap(config.family)
        target = TORCH_DTYPES[dtype]
        hf_names: dict[str, str] = {}
        metas: dict[str, TensorMeta] = {}
        for key, shape in state_shapes(config).items():
            hf_key = keymap.to_hf(key)
            if hf_key is None:
                raise KeyError(f"no Hugging Face name for project key {key!r} in the {config.family} key map")
            hf_names[hf_key] = key
            stored = source.tensors.meta(key).dtype
            metas[hf_key] = TensorMeta(target if stored.is_floating_point else stored, shape)

        def produce(hf_key: str) -> Tensor:
            return source.tensors.get(hf_names[hf_key]).to(metas[hf_key].dtype)

        tokenizer_dir = tokenizer_dir or source.tokenizer_dir
        with staged_dir(out_dir, overwrite) as staging:
            tick, close = tensor_progress(len(metas), f"exporting {Path(out_dir).name}", progress)
            try:
                write_safetensors(staging, metas, produce, max_shard_bytes, tick)
            finally:
                close()
            (staging / CONFIG_NAME).write_text(
                json.dumps(hf_config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
            )
            copied = copy_tokenizer(tokenizer_dir, staging) if tokenizer_dir is not None else []
            (staging / "README.md").write_text(
                model_card(source, Path(out_dir), dtype, Path(run_config) if run_config else None),
                encoding="utf-8",
            )
    if not any(name.startswith("tokenizer") for name in copied):
        print(f"warning: {out_dir} has no tokenizer; pass --tokenizer DIR to include one", file=sys.stderr)
    return Path(out_dir)
