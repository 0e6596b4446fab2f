"""Every recipe in ``yamls/`` loads, validates and builds its model and L0 plan for its stated source.

The sources of the GPU recipes are not at hand, so each is described by its HF config and the model is
built on the meta device; each recipe's ``fsdp_config`` is resolved as on a GPU node (FSDP1) and with
``FSDP_VERSION=2``. A new recipe must be added to ``SOURCES`` (the test fails until it is).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL
from omegaconf import OmegaConf

from llmshearing.data.layout import write_token_root
from llmshearing.hf.config import model_config_from_hf
from llmshearing.models.composer_model import ComposerLlama
from llmshearing.models.config import ModelConfig
from llmshearing.pruning import attach_l0_module
from llmshearing.training.config import load_config, validate_config
from llmshearing.training.fsdp_settings import FSDPConfigError, resolve_fsdp

YAMLS = Path(__file__).resolve().parents[2] / "yamls"
LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}
LLAMA3_8B = {
    **LLAMA2_7B,
    "intermediate_size": 14336,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
}
SMOLLM2_135M = {
    **LLAMA2_7B,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
}
# recipe -> (the source it states, the pruning recipe whose target it continues from, processes)
SOURCES = {
    "pruning/llama2-7b-to-1.3b.yaml": (LLAMA2_7B, None, 8),
    "pruning/llama2-7b-to-2.7b.yaml": (LLAMA2_7B, None, 8),
    "pruning/llama3-8b-to-3b.yaml": (LLAMA3_8B, None, 8),
    "pruning/smollm2-135m-demo.yaml": (SMOLLM2_135M, None, 1),
    "continued/sheared-llama-1.3b.yaml": (LLAMA2_7B, "pruning/llama2-7b-to-1.3b.yaml", 8),
    "continued/sheared-llama-2.7b.yaml": (LLAMA2_7B, "pruning/llama2-7b-to-2.7b.yaml", 8),
    "continued/smollm2-135m-demo.yaml": (SMOLLM2_135M, "pruning/smollm2-135m-demo.yaml", 1),
    "tiny/prune.yaml": (None, None, 1),
    "tiny/continued.yaml": (None, None, 1),
}


def _recipes() -> list[str]:
    return sorted(str(p.relative_to(YAMLS)) for p in YAMLS.rglob("*.yaml"))


def test_every_recipe_states_its_source():
    assert _recipes() == sorted(SOURCES), "add the new recipe and its source shape to SOURCES"


def _source_config(name: str) -> ModelConfig:
    hf, pruned_by, _ = SOURCES[name]
    if hf is None:
        return ModelConfig(**TINY_MODEL)
    config = model_config_from_hf(hf, name)
    if pruned_by is not None:  # a continued recipe starts from the pruning recipe's target shape
        l0 = load_config(str(YAMLS / pruned_by), _placeholders(Path("."), Path("."))).model.l0_module
        plan = attach_l0_module(ComposerLlama(config, init_device="meta"), l0).plan
        config = plan.target
    return config


def _placeholders(source: Path, data: Path) -> list[str]:
    return [f"model.path={source}", f"data_local={data}", "save_folder=unused"]


def _write_data(root: Path, domains: list[str], seq_len: int) -> None:
    """Two sequences per domain and split in the prepared layout: validation checks the recipe's domains, splits
    and sequence length against the data."""
    tokens = np.arange(seq_len) % 7
    samples = {split: {domain: [tokens, tokens] for domain in domains} for split in ("train", "eval", "test")}
    write_token_root(root, samples, vocab_size=7)


def _write_source(folder: Path, config: ModelConfig) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"format": "llmshearing", "model": config.to_dict()}))
    return folder


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_recipe_validates_and_builds_its_plan(name, tmp_path):
    source_config = _source_config(name)
    source, data = _write_source(tmp_path / "source", source_config), tmp_path / "mds"
    data.mkdir()
    _, _, processes = SOURCES[name]
    cfg = load_config(str(YAMLS / name), _placeholders(source, data))
    for key in OmegaConf.missing_keys(cfg):  # what a recipe leaves to its caller (the demo passes it)
        callers = {
            "callbacks.data_loading.target_loss": [2.0] * len(cfg.callbacks.data_loading.set_names),
            "model.distillation.teacher": str(source),
        }
        assert key in callers, f"{name} leaves {key} unset"
        OmegaConf.update(cfg, key, callers[key])
    _write_data(data, list(cfg.callbacks.data_loading.set_names), int(cfg.max_seq_len))
    values = validate_config(cfg, processes)
    loading = values.callbacks.data_loading
    assert len(loading.set_names) == len(loading.proportion)

    model = ComposerLlama(source_config, domains=loading.set_names, init_device="meta")
    assert all(p.is_meta for p in model.model.parameters())
    l0 = values.model.l0_module
    if l0 is not None:
        module = attach_l0_module(model, l0)
        plan = module.plan
        assert plan.families and plan.global_sparsity > 0
        if plan.target is not None:  # the exact shape the fold will produce
            for key, value in (l0.target_model or {}).items():
                assert getattr(plan.target, key) == value, key
        assert all(p.dtype == torch.float32 for p in module.parameters())

    if values.fsdp_config is not None:
        gpu = resolve_fsdp(values.fsdp_config, cuda=True, environ={})
        assert gpu.version == 1
        try:
            fsdp2 = resolve_fsdp(values.fsdp_config, cuda=False, environ={"FSDP_VERSION": "2"})
        except FSDPConfigError as err:  # only strategies FSDP2 lacks may be refused, with the fix
            assert "FULL_SHARD or SHARD_GRAD_OP" in str(err)
        else:
            assert fsdp2.version == 2
