"""``from_pretrained``: load any checkpoint the project reads into a ready-to-use ``Decoder``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from llmshearing.convert.checkpoint import expected_shapes, open_checkpoint
from llmshearing.models.decoder import Decoder


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create module parameters on the meta device (no memory, no init); buffers stay real."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


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
    """
    with open_checkpoint(path, config_path) as ckpt:
        if ckpt.has_l0_state():
            raise ValueError(
                f"{path} is a pruning checkpoint (it holds l0_module.* masks): loading it as a model would "
                "drop the masks and use the unpruned model; fold it first with `llmshearing prune-model CKPT OUT` "
                "and use OUT"
            )
        config = ckpt.config if attn_impl is None else ckpt.config.replace(attn_impl=attn_impl)
        with parameters_on_meta():
            model = Decoder(config)
        state = {}
        for key in expected_shapes(config):
            tensor = ckpt.tensors.get(key)
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            state[key] = tensor.to(device)
    model.load_state_dict(state, strict=True, assign=True)
    model.reset_rope()
    return model.eval()
