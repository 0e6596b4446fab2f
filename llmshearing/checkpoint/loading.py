"""Load checkpoints as models: ``from_pretrained`` (a ready-to-use ``Decoder``) and a distillation teacher."""

from __future__ import annotations

from pathlib import Path

import torch

from llmshearing.checkpoint.format import CONFIG_NAME, refuse_pruning_checkpoint
from llmshearing.checkpoint.reading import open_checkpoint, read_any_config
from llmshearing.models.decoder import Decoder, parameters_on_meta
from llmshearing.models.schema import state_shapes
from llmshearing.models.teacher import Teacher


def from_pretrained(
    path: str | Path,
    config_path: str | Path | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    attn_impl: str | None = None,
) -> Decoder:
    """A ``Decoder`` in eval mode holding the weights at ``path``.

    ``path`` is an HF model directory (``config.json`` + safetensors or ``pytorch_model*.bin``), a
    project checkpoint directory, or a Composer training checkpoint (its ``config.json`` is found
    beside it or in the run folder, or given as ``config_path``). A pruning run's checkpoint is
    refused: its masks would be dropped and the unpruned model used in their place.
    ``dtype`` casts floating weights; ``attn_impl`` overrides the config's attention kernel choice.
    ``device="meta"`` reads the config alone: the parameters stay on the meta device, without storage,
    for a rank that receives its weights from rank 0 once FSDP has sharded the model (the RoPE
    frequencies are real: they come from the config).
    """
    with open_checkpoint(path, config_path) as ckpt:
        refuse_pruning_checkpoint(
            ckpt.tensors.keys(),
            (
                f"{path} is a pruning checkpoint (it holds l0_module.* masks): loading it as a model would "
                "drop the masks and use the unpruned model; fold it first with `llmshearing prune-model CKPT OUT` "
                "and use OUT"
            ),
        )
        config = ckpt.config if attn_impl is None else ckpt.config.replace(attn_impl=attn_impl)
        with parameters_on_meta():
            model = Decoder(config)
        if torch.device(device).type == "meta":  # the shape alone: no tensor is read
            return (model if dtype is None else model.to(dtype)).eval()
        state = {}
        for key in state_shapes(config):
            tensor = ckpt.tensors.get(key)
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            state[key] = tensor.to(device)
    model.load_state_dict(state, strict=True, assign=True)
    model.reset_rope()
    return model.eval()


def load_teacher(path: str, dtype: torch.dtype, attn_impl: str, on_meta: bool = False) -> Teacher:
    """The frozen teacher at ``path`` with ``dtype`` weights (the student's).

    ``on_meta``: build it on the meta device without reading its weights (``model.init_device: mixed`` on
    ranks other than 0, and every rank of a teacher with sharded weights under FSDP2 on several ranks;
    :func:`llmshearing.training.fsdp.shard_teacher` broadcasts rank 0's weights or fills each rank's slices).
    """
    device = "meta" if on_meta else "cpu"
    return Teacher(from_pretrained(path, dtype=dtype, attn_impl=attn_impl, device=device), path)


def checkpoint_vocab_size(path: str) -> int | None:
    """Vocabulary size from a checkpoint directory's ``config.json`` (None for a file checkpoint)."""
    directory = Path(path)
    if not directory.is_dir():
        return None
    return read_any_config(directory / CONFIG_NAME)[0].vocab_size
