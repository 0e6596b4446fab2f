"""Fold-and-slice: the masked decoder equals the physically pruned decoder (fp32, CPU, atol 1e-5)."""

import pytest
import torch

from llmshearing.models.config import ModelConfig
from llmshearing.models.decoder import Decoder
from llmshearing.pruning.fold import kept_structure, prune_decoder, prune_state_dict
from llmshearing.pruning.l0_module import L0Module
from llmshearing.pruning.targets import FAMILIES

TOL = 1e-5
TIED = ModelConfig(
    vocab_size=96,
    d_model=32,
    n_layers=4,
    n_heads=8,
    n_kv_heads=4,
    head_dim=8,
    intermediate_size=40,
    tie_word_embeddings=True,
)
UNTIED = TIED.replace(tie_word_embeddings=False, qkv_bias=True, family="qwen2")


def random_decoder(config: ModelConfig, seed: int = 0) -> Decoder:
    torch.manual_seed(seed)
    decoder = Decoder(config)
    with torch.no_grad():
        for name, p in decoder.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.25)
    return decoder.eval()


def uniform_masks(config: ModelConfig, families, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random mask values in [0.3, 1.3] with structured zeros that leave a uniform model."""
    g = torch.Generator().manual_seed(seed)
    L, hpg, Hkv = config.n_layers, config.heads_per_group, config.n_kv_heads

    def values(*shape):
        return torch.rand(*shape, generator=g) + 0.3

    def keep_k(rows: int, n: int, k: int) -> torch.Tensor:
        order = torch.rand(rows, n, generator=g).argsort(-1)[:, :k]
        return torch.zeros(rows, n).scatter_(-1, order, 1.0)

    masks = {}
    for f in families:
        if f == "layer":
            masks[f] = values(L) * torch.tensor([1.0, 0.0, 1.0, 1.0])
        elif f in ("head_layer", "mlp"):
            masks[f] = values(L)
        elif f == "head":
            masks[f] = values(L, config.n_heads) * keep_k(L * Hkv, hpg, 1).reshape(L, -1)
        elif f == "kv_head":
            masks[f] = values(L, Hkv) * keep_k(L, Hkv, 3)
        elif f == "intermediate":
            masks[f] = values(L, config.intermediate_size) * keep_k(L, config.intermediate_size, 24)
        elif f == "hidden":
            masks[f] = values(config.d_model) * keep_k(1, config.d_model, 20)[0]
    return masks


def assert_equivalent(decoder: Decoder, masks: dict[str, torch.Tensor]) -> Decoder:
    ids = torch.randint(0, decoder.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        masked = decoder(ids, masks=masks)
        pruned = prune_decoder(decoder, masks)
        sliced = pruned(ids)
    assert masked.abs().max() > 1.0  # logits of a meaningful size, so the tolerance is not vacuous
    assert (sliced - masked).abs().max().item() <= TOL
    return pruned


COMBOS = [[f] for f in FAMILIES] + [
    list(FAMILIES),
    ["layer", "head", "intermediate", "hidden"],
    ["head", "kv_head"],
    ["kv_head", "intermediate", "hidden"],
    ["head_layer", "mlp", "hidden"],
]


@pytest.mark.parametrize("config", [TIED, UNTIED], ids=["tied-gqa", "untied-qkv-bias"])
@pytest.mark.parametrize("families", COMBOS, ids=["+".join(c) for c in COMBOS])
def test_masked_equals_pruned_for_mask_values(config, families):
    decoder = random_decoder(config)
    masks = uniform_masks(config, families)
    pruned = assert_equivalent(decoder, masks)
    cfg = pruned.config
    assert cfg.n_layers == (3 if "layer" in families else 4)
    assert cfg.d_model == (20 if "hidden" in families else 32)
    assert cfg.intermediate_size == (24 if "intermediate" in families else 40)
    assert cfg.n_kv_heads == (3 if "kv_head" in families else 4)
    assert cfg.n_heads == cfg.n_kv_heads * (1 if "head" in families else 2)


TARGETS = {
    "paper": (
        ["layer", "head", "intermediate", "hidden"],
        {"n_layers": 3, "n_heads": 4, "d_model": 16, "intermediate_size": 20},
    ),
    "gqa-groups": (["kv_head", "intermediate"], {"n_kv_heads": 2, "n_heads": 4, "intermediate_size": 16}),
    "all": (
        list(FAMILIES),
        {"n_layers": 2, "n_heads": 2, "n_kv_heads": 2, "d_model": 24, "intermediate_size": 8},
    ),
    "blocks": (["head_layer", "mlp", "head"], {"n_layers": 3, "n_heads": 4}),
}


@pytest.mark.parametrize("config", [TIED, UNTIED], ids=["tied-gqa", "untied-qkv-bias"])
@pytest.mark.parametrize("name", list(TARGETS))
def test_deterministic_masks_at_target_prune_to_the_target_shape(config, name):
    families, target = TARGETS[name]
    l0 = L0Module(config, {"pruning_modules": families, "target_model": target})
    with torch.no_grad():
        g = torch.Generator().manual_seed(7)
        for la in l0.log_alpha.values():
            la.copy_(torch.randn(la.shape, generator=g) * 3)
        if "head_layer" in families:  # the same layers lose both blocks
            l0.log_alpha["mlp"].copy_(l0.log_alpha["head_layer"])
    masks = l0.deterministic_masks(at_target=True)
    pruned = assert_equivalent(random_decoder(config, seed=1), masks)
    assert pruned.config == config.replace(**target)


def test_multi_head_attention_source_prunes_to_fewer_heads_and_kv_heads():
    mha = TIED.replace(n_kv_heads=8)
    families, target = (
        ["layer", "head", "intermediate", "hidden"],
        {"n_layers": 3, "n_heads": 5, "d_model": 16},
    )
    l0 = L0Module(mha, {"pruning_modules": families, "target_model": target})
    with torch.no_grad():
        g = torch.Generator().manual_seed(8)
        for la in l0.log_alpha.values():
            la.copy_(torch.randn(la.shape, generator=g) * 3)
    pruned = assert_equivalent(random_decoder(mha, seed=2), l0.deterministic_masks(at_target=True))
    assert pruned.config == mha.replace(n_layers=3, n_heads=5, n_kv_heads=5, d_model=16)


def test_tied_head_uses_scaled_embedding_and_unscaled_final_norm():
    decoder = random_decoder(TIED)
    masks = uniform_masks(TIED, ["hidden"])
    state, _ = prune_state_dict(decoder.state_dict(), TIED, masks)
    kept = torch.nonzero(masks["hidden"]).flatten()
    original = decoder.state_dict()
    assert torch.equal(state["norm.weight"], original["norm.weight"][kept])
    assert torch.allclose(
        state["tok_embeddings.weight"], (original["tok_embeddings.weight"] * masks["hidden"])[:, kept]
    )


def test_untied_head_is_never_scaled_by_hidden():
    decoder = random_decoder(UNTIED)
    masks = uniform_masks(UNTIED, ["hidden"])
    state, _ = prune_state_dict(decoder.state_dict(), UNTIED, masks)
    kept = torch.nonzero(masks["hidden"]).flatten()
    original = decoder.state_dict()
    assert torch.equal(state["output.weight"], original["output.weight"][:, kept])
    assert torch.allclose(state["norm.weight"], (original["norm.weight"] * masks["hidden"])[kept])


def test_dropped_layers_are_renumbered_consecutively():
    decoder = random_decoder(TIED)
    masks = {"layer": torch.tensor([1.0, 0.0, 0.0, 1.0])}
    state, config = prune_state_dict(decoder.state_dict(), TIED, masks)
    original = decoder.state_dict()
    assert config.n_layers == 2
    assert torch.equal(state["layers.1.attention.wq.weight"], original["layers.3.attention.wq.weight"])
    assert torch.equal(state["layers.1.ffn_norm.weight"], original["layers.3.ffn_norm.weight"])
    assert not any(k.startswith("layers.2.") for k in state)


def test_kept_heads_keep_their_kv_group():
    masks = {
        "kv_head": torch.tensor([[0.0, 1.0, 0.0, 1.0]] * 4),
        "head": torch.tensor([[1.0, 0, 0, 1, 1, 0, 0, 1]] * 4),
    }
    structure = kept_structure(TIED, masks)
    assert structure.heads[0].tolist() == [3, 7]
    assert structure.groups[0].tolist() == [1, 3]


def test_dtype_is_preserved():
    decoder = random_decoder(TIED).to(torch.bfloat16)
    state, _ = prune_state_dict(decoder.state_dict(), TIED, uniform_masks(TIED, list(FAMILIES)))
    assert {v.dtype for v in state.values()} == {torch.bfloat16}


@pytest.mark.parametrize(
    "masks, match",
    [
        (
            {"head_layer": torch.tensor([0.0, 1.0, 1.0, 1.0])},
            r"keep the MLP of layer 0 but remove its attention.*'layer' family",
        ),
        ({"mlp": torch.tensor([1.0, 1.0, 0.0, 1.0])}, r"keep the attention of layer 2 but remove its MLP"),
        (
            {"head": torch.tensor([[1.0, 1, 1, 0, 1, 1, 1, 1]] * 4)},
            r"layer 0 keeps \[2, 1, 2, 2\] query heads",
        ),
        (
            {"intermediate": torch.cat([torch.ones(1, 40), torch.ones(3, 40) * (torch.arange(40) < 20)])},
            r"layer 1 keeps 20 intermediate dims but layer 0 keeps 40",
        ),
        ({"layer": torch.zeros(4)}, "remove every layer"),
        ({"hidden": torch.zeros(32)}, "removes every hidden dimension"),
        ({"neuron": torch.ones(3)}, r"unknown mask keys \['neuron'\]"),
    ],
)
def test_non_uniform_or_invalid_masks_are_rejected(masks, match):
    with pytest.raises(ValueError, match=match):
        prune_decoder(random_decoder(TIED), masks)


def test_state_dict_must_match_config():
    state = random_decoder(TIED).state_dict()
    state.pop("layers.0.attention.wq.weight")
    with pytest.raises(ValueError, match=r"missing \['layers\.0\.attention\.wq\.weight'\]"):
        prune_state_dict(state, TIED, {})
