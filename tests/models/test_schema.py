"""The decoder's schema: state-dict shapes, mask shapes and the one rule that combines the masks."""

from __future__ import annotations

import pytest
import torch

from llmshearing.models.config import ModelConfig
from llmshearing.models.decoder import Decoder, parameters_on_meta
from llmshearing.models.schema import MASK_KEYS, combine_masks, mask_shapes, state_shapes
from llmshearing.pruning.fold import kept_structure

CONFIG = ModelConfig(
    vocab_size=40, d_model=16, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=4, intermediate_size=12
)


@pytest.mark.parametrize(
    "changes", [{}, {"tie_word_embeddings": True}, {"qkv_bias": True, "family": "qwen2"}, {"n_kv_heads": 4}]
)
def test_state_shapes_are_a_real_decoders_state_dict(changes):
    config = CONFIG.replace(**changes)
    with parameters_on_meta():
        decoder = Decoder(config)
    assert state_shapes(config) == {key: tuple(t.shape) for key, t in decoder.state_dict().items()}


def test_state_shapes_keep_a_stable_order():
    keys = list(state_shapes(CONFIG))
    assert keys == list(state_shapes(CONFIG.replace()))
    assert keys[0] == "tok_embeddings.weight" and keys[-2:] == ["norm.weight", "output.weight"]
    assert keys.index("layers.0.feed_forward.w2.weight") < keys.index("layers.1.attention_norm.weight")


def test_masks_of_the_schema_shapes_are_accepted_and_all_ones_change_nothing():
    shapes = mask_shapes(CONFIG)
    assert tuple(shapes) == MASK_KEYS
    assert shapes["head"] == (3, 4) and shapes["kv_head"] == (3, 2) and shapes["hidden"] == (16,)
    torch.manual_seed(0)
    decoder = Decoder(CONFIG).eval()
    ids = torch.randint(0, CONFIG.vocab_size, (2, 5))
    with torch.no_grad():
        dense = decoder(ids)
        masked = decoder(ids, masks={key: torch.ones(shape) for key, shape in shapes.items()})
    assert torch.equal(dense, masked)


def test_l0_module_reads_the_schemas_mask_shapes():
    from llmshearing.pruning import l0_module

    assert l0_module.mask_shapes is mask_shapes


def test_combine_masks_follows_the_rule():
    generator = torch.Generator().manual_seed(1)
    masks = {key: torch.rand(shape, generator=generator) for key, shape in mask_shapes(CONFIG).items()}
    factors = combine_masks(CONFIG, masks)
    kv_per_head = masks["kv_head"].repeat_interleave(2, dim=1)
    per_layer = (masks["head_layer"] * masks["layer"])[:, None]
    assert torch.allclose(factors.heads, masks["head"] * kv_per_head * per_layer)
    assert torch.equal(factors.mlp, masks["mlp"] * masks["layer"])
    assert torch.equal(factors.intermediate, masks["intermediate"])
    assert torch.allclose(factors.ffn, masks["intermediate"] * factors.mlp[:, None])
    assert torch.equal(factors.dims, masks["hidden"])


def test_combine_masks_leaves_absent_structures_alone():
    none = combine_masks(CONFIG, {})
    assert (none.heads, none.intermediate, none.mlp, none.dims, none.ffn) == (None,) * 5
    layer = torch.tensor([1.0, 0.0, 0.5])
    only_layer = combine_masks(CONFIG, {"layer": layer})
    assert only_layer.heads.shape == (3, 1) and torch.equal(only_layer.heads[:, 0], layer)
    assert torch.equal(only_layer.mlp, layer) and torch.equal(only_layer.ffn[:, 0], layer)
    assert only_layer.intermediate is None and only_layer.dims is None


@pytest.mark.parametrize(
    ("masks", "message"),
    [
        ({"heads": torch.ones(3, 4)}, r"unknown mask keys \['heads'\]; valid keys are"),
        ({"kv_head": torch.ones(3, 4)}, r"mask 'kv_head' has shape \(3, 4\), expected \(3, 2\)"),
        ({"hidden": torch.ones(3, 16)}, r"mask 'hidden' has shape \(3, 16\), expected \(16,\)"),
    ],
)
def test_bad_masks_get_the_same_error_in_the_decoder_and_the_fold(masks, message):
    decoder = Decoder(CONFIG)
    with pytest.raises(ValueError, match=message):
        decoder(torch.zeros(1, 3, dtype=torch.long), masks=masks)
    with pytest.raises(ValueError, match=message):
        kept_structure(CONFIG, masks)
