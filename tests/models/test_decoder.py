"""The masked decoder: dense equivalence, zero mask == removed structure, mask folding, SDPA and GQA."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llmshearing.models.config import ModelConfig
from llmshearing.models.decoder import Decoder

ATOL = 2e-5  # fp32 on CPU: masked model vs physically smaller model (logits are O(1) .. O(10))


def _config(**changes) -> ModelConfig:
    base = ModelConfig(
        vocab_size=64,
        d_model=32,
        n_layers=3,
        n_heads=6,
        n_kv_heads=2,
        head_dim=8,
        intermediate_size=24,
        max_seq_len=64,
        rope_theta=500.0,
        init_std=0.2,
    )
    return base.replace(**changes)


def _model(config: ModelConfig, seed: int = 0) -> Decoder:
    torch.manual_seed(seed)
    model = Decoder(config)
    model.init_weights()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)  # norms that are not all ones make the hidden folding visible
            elif name.endswith("bias"):
                param.normal_(std=0.2)
    return model.eval()


IDS = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(3))


def _logits(model: Decoder, masks: dict | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS, masks=masks)


def fold_and_slice(model: Decoder, masks: dict[str, torch.Tensor]) -> Decoder:
    """Reference folding of masks into weights + slicing (the rules of the masks interface)."""
    cfg, sd = model.config, {k: v.clone() for k, v in model.state_dict().items()}
    L, H, Hkv, hd, n_inter = cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.intermediate_size
    hidden = masks.get("hidden", torch.ones(cfg.d_model))
    layer = masks.get("layer", torch.ones(L))
    head = masks.get("head", torch.ones(L, H)) * masks.get("kv_head", torch.ones(L, Hkv)).repeat_interleave(
        H // Hkv, 1
    )
    head = head * (masks.get("head_layer", torch.ones(L)) * layer)[:, None]
    mlp = masks.get("mlp", torch.ones(L)) * layer
    inter = masks.get("intermediate", torch.ones(L, n_inter))
    keep_d = torch.nonzero(hidden).flatten()

    out = {"tok_embeddings.weight": (sd["tok_embeddings.weight"] * hidden)[:, keep_d]}
    norm = sd["norm.weight"] if cfg.tie_word_embeddings else sd["norm.weight"] * hidden
    out["norm.weight"] = norm[keep_d]
    if not cfg.tie_word_embeddings:
        out["output.weight"] = sd["output.weight"][:, keep_d]
    kept_layers = [i for i in range(L) if layer[i] != 0]
    shapes = set()
    for new, old in enumerate(kept_layers):
        p, q = f"layers.{old}.", f"layers.{new}."
        heads = torch.nonzero(head[old]).flatten()
        groups = torch.unique(heads // (H // Hkv))
        dims = torch.nonzero(inter[old]).flatten()
        shapes.add((len(heads), len(groups), len(dims)))
        q_rows = (heads[:, None] * hd + torch.arange(hd)).flatten()
        kv_rows = (groups[:, None] * hd + torch.arange(hd)).flatten()
        out[q + "attention_norm.weight"] = (sd[p + "attention_norm.weight"] * hidden)[keep_d]
        out[q + "ffn_norm.weight"] = (sd[p + "ffn_norm.weight"] * hidden)[keep_d]
        out[q + "attention.wq.weight"] = sd[p + "attention.wq.weight"][q_rows][:, keep_d]
        out[q + "attention.wk.weight"] = sd[p + "attention.wk.weight"][kv_rows][:, keep_d]
        out[q + "attention.wv.weight"] = sd[p + "attention.wv.weight"][kv_rows][:, keep_d]
        if cfg.qkv_bias:
            out[q + "attention.wq.bias"] = sd[p + "attention.wq.bias"][q_rows]
            out[q + "attention.wk.bias"] = sd[p + "attention.wk.bias"][kv_rows]
            out[q + "attention.wv.bias"] = sd[p + "attention.wv.bias"][kv_rows]
        wo = sd[p + "attention.wo.weight"] * head[old].repeat_interleave(hd)[None, :] * hidden[:, None]
        out[q + "attention.wo.weight"] = wo[keep_d][:, q_rows]
        out[q + "feed_forward.w1.weight"] = sd[p + "feed_forward.w1.weight"][dims][:, keep_d]
        out[q + "feed_forward.w3.weight"] = (sd[p + "feed_forward.w3.weight"] * inter[old][:, None])[dims][
            :, keep_d
        ]
        w2 = sd[p + "feed_forward.w2.weight"] * (mlp[old] * hidden)[:, None]
        out[q + "feed_forward.w2.weight"] = w2[keep_d][:, dims]
    assert len(shapes) == 1, "test masks must leave every layer with the same shape"
    n_heads, n_groups, n_inter = shapes.pop()
    small = Decoder(
        cfg.replace(
            d_model=len(keep_d),
            n_layers=len(kept_layers),
            n_heads=n_heads,
            n_kv_heads=n_groups,
            intermediate_size=n_inter,
        )
    )
    small.load_state_dict(out, strict=True)
    return small.eval()


def test_all_ones_masks_equal_dense_exactly():
    cfg = _config()
    model = _model(cfg)
    ones = {
        "hidden": torch.ones(cfg.d_model),
        "layer": torch.ones(cfg.n_layers),
        "head_layer": torch.ones(cfg.n_layers),
        "head": torch.ones(cfg.n_layers, cfg.n_heads),
        "kv_head": torch.ones(cfg.n_layers, cfg.n_kv_heads),
        "mlp": torch.ones(cfg.n_layers),
        "intermediate": torch.ones(cfg.n_layers, cfg.intermediate_size),
    }
    dense = _logits(model)
    assert torch.equal(_logits(model, ones), dense)
    for key, mask in ones.items():
        assert torch.equal(_logits(model, {key: mask}), dense), key


def test_zero_query_heads_equal_model_without_them():
    cfg = _config()
    model = _model(cfg)
    head = torch.ones(cfg.n_layers, cfg.n_heads)
    head[:, [1, 3]] = 0  # one head of each KV group (3 heads per group)
    head[1, [0, 4]], head[1, [1, 3]] = 0, 1  # other heads in layer 1, still one per group
    small = fold_and_slice(model, {"head": head})
    assert (small.config.n_heads, small.config.n_kv_heads) == (4, 2)
    assert small.layers[0].attention.wq.weight.shape == (4 * 8, 32)
    torch.testing.assert_close(_logits(model, {"head": head}), _logits(small), atol=ATOL, rtol=0)


def test_zero_heads_in_multi_head_attention_remove_their_kv_heads():
    cfg = _config(n_heads=4, n_kv_heads=4, qkv_bias=True, family="qwen2")
    model = _model(cfg)
    head = torch.ones(cfg.n_layers, 4)
    head[:, 2] = 0
    small = fold_and_slice(model, {"head": head})
    assert (small.config.n_heads, small.config.n_kv_heads) == (3, 3)
    torch.testing.assert_close(_logits(model, {"head": head}), _logits(small), atol=ATOL, rtol=0)


def test_zero_kv_head_removes_its_whole_group():
    cfg = _config()
    model = _model(cfg)
    kv = torch.ones(cfg.n_layers, cfg.n_kv_heads)
    kv[:, 0] = 0
    small = fold_and_slice(model, {"kv_head": kv})
    assert (small.config.n_heads, small.config.n_kv_heads) == (3, 1)
    masked = _logits(model, {"kv_head": kv})
    torch.testing.assert_close(masked, _logits(small), atol=ATOL, rtol=0)
    # query head h belongs to KV group h // (H // Hkv)
    head = torch.ones(cfg.n_layers, cfg.n_heads)
    head[:, :3] = 0
    assert torch.equal(_logits(model, {"head": head}), masked)


def test_zero_layer_equals_model_without_that_layer():
    cfg = _config()
    model = _model(cfg)
    layer = torch.tensor([1.0, 0.0, 1.0])
    small = fold_and_slice(model, {"layer": layer})
    assert small.config.n_layers == 2
    torch.testing.assert_close(_logits(model, {"layer": layer}), _logits(small), atol=ATOL, rtol=0)


def test_zero_branch_masks_equal_zeroed_output_projections():
    cfg = _config()
    model = _model(cfg)
    zeroed = _model(cfg)
    with torch.no_grad():
        zeroed.layers[2].attention.wo.weight.zero_()
        zeroed.layers[0].feed_forward.w2.weight.zero_()
    masks = {"head_layer": torch.tensor([1.0, 1.0, 0.0]), "mlp": torch.tensor([0.0, 1.0, 1.0])}
    assert torch.equal(_logits(model, masks), _logits(zeroed))


def test_zero_intermediate_dims_equal_sliced_mlp():
    cfg = _config()
    model = _model(cfg)
    inter = torch.ones(cfg.n_layers, cfg.intermediate_size)
    for i in range(cfg.n_layers):
        inter[i, torch.randperm(cfg.intermediate_size, generator=torch.Generator().manual_seed(i))[:10]] = 0
    small = fold_and_slice(model, {"intermediate": inter})
    assert small.config.intermediate_size == 14
    torch.testing.assert_close(_logits(model, {"intermediate": inter}), _logits(small), atol=ATOL, rtol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_zero_hidden_dims_equal_sliced_residual_stream(tied):
    cfg = _config(tie_word_embeddings=tied)
    model = _model(cfg)
    hidden = torch.ones(cfg.d_model)
    hidden[torch.randperm(cfg.d_model, generator=torch.Generator().manual_seed(1))[:9]] = 0
    small = fold_and_slice(model, {"hidden": hidden})
    assert small.config.d_model == 23
    torch.testing.assert_close(_logits(model, {"hidden": hidden}), _logits(small), atol=ATOL, rtol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_fractional_masks_fold_into_weights(tied):
    """Masks are arbitrary values (deterministic L0 masks are not 0/1): folding keeps the function."""
    cfg = _config(tie_word_embeddings=tied, qkv_bias=True, family="qwen2")
    model = _model(cfg)
    g = torch.Generator().manual_seed(5)
    L, H, Hkv, n_inter, d = cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.intermediate_size, cfg.d_model
    head = torch.rand(L, H, generator=g) + 0.1
    head[:, [2, 5]] = 0  # one head per group removed
    inter = torch.rand(L, n_inter, generator=g) + 0.1
    inter[:, :4] = 0
    hidden = torch.rand(d, generator=g) + 0.1
    hidden[[0, 7, 19]] = 0
    masks = {
        "hidden": hidden,
        "layer": torch.tensor([0.7, 0.0, 1.3]),
        "head_layer": torch.rand(L, generator=g) + 0.5,
        "head": head,
        "kv_head": torch.rand(L, Hkv, generator=g) + 0.5,
        "mlp": torch.rand(L, generator=g) + 0.5,
        "intermediate": inter,
    }
    small = fold_and_slice(model, masks)
    assert (small.config.n_layers, small.config.n_heads, small.config.d_model) == (2, 4, 29)
    torch.testing.assert_close(_logits(model, masks), _logits(small), atol=ATOL, rtol=0)


def reference_forward(model: Decoder, ids: torch.Tensor) -> torch.Tensor:
    """An independent, eager, loop-over-heads implementation of the dense forward."""
    cfg, sd = model.config, model.state_dict()
    B, T = ids.shape
    hd, group = cfg.head_dim, cfg.n_heads // cfg.n_kv_heads
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2).float() / hd))
    angles = torch.outer(torch.arange(T).float(), inv_freq)
    cos, sin = angles.cos(), angles.sin()

    def rope(x):  # x [B, T, hd]; rotate (first half, second half) pairs
        a, b = x[..., : hd // 2], x[..., hd // 2 :]
        return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)

    def rms(x, w):
        return w * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)

    def lin(x, name):
        y = x @ sd[name + ".weight"].T
        return y + sd[name + ".bias"] if name + ".bias" in sd else y

    allowed = torch.ones(T, T).tril().bool()
    if cfg.sliding_window is not None:
        allowed &= ~torch.ones(T, T).tril(-cfg.sliding_window).bool()
    x = sd["tok_embeddings.weight"][ids]
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        h = rms(x, sd[p + "attention_norm.weight"])
        q, k, v = (lin(h, p + f"attention.{w}") for w in ("wq", "wk", "wv"))
        contexts = []
        for head in range(cfg.n_heads):
            kv = head // group
            qh = rope(q[..., head * hd : (head + 1) * hd])
            kh = rope(k[..., kv * hd : (kv + 1) * hd])
            scores = (qh @ kh.transpose(1, 2)) / math.sqrt(hd)
            weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
            contexts.append(weights @ v[..., kv * hd : (kv + 1) * hd])
        x = x + lin(torch.cat(contexts, -1), p + "attention.wo")
        h = rms(x, sd[p + "ffn_norm.weight"])
        x = x + lin(
            F.silu(lin(h, p + "feed_forward.w1")) * lin(h, p + "feed_forward.w3"), p + "feed_forward.w2"
        )
    x = rms(x, sd["norm.weight"])
    return x @ sd["output.weight" if "output.weight" in sd else "tok_embeddings.weight"].T


@pytest.mark.parametrize(
    "changes",
    [
        {},  # GQA, 3 query heads per KV group
        {"n_kv_heads": 6},  # multi-head
        {"n_kv_heads": 1},  # multi-query
        {"sliding_window": 4, "family": "mistral"},
        {"qkv_bias": True, "family": "qwen2", "tie_word_embeddings": True},
    ],
)
def test_sdpa_path_matches_eager_reference(changes):
    cfg = _config(attn_impl="sdpa", **changes)
    model = _model(cfg)
    assert model.attn_impl == "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), reference_forward(model, IDS), atol=ATOL, rtol=0)
    auto = Decoder(cfg.replace(attn_impl="auto"))
    auto.load_state_dict(model.state_dict())
    assert auto.attn_impl == "sdpa"  # no flash-attn on a CPU machine: auto falls back to SDPA
    assert torch.equal(_logits(auto.eval()), _logits(model))


def test_gradients_reach_masks_and_weights():
    cfg = _config()
    model = _model(cfg).train()
    masks = {
        "head": torch.ones(cfg.n_layers, cfg.n_heads, requires_grad=True),
        "hidden": torch.ones(cfg.d_model, requires_grad=True),
        "intermediate": torch.ones(cfg.n_layers, cfg.intermediate_size, requires_grad=True),
    }
    model(IDS, masks=masks).logsumexp(-1).mean().backward()
    assert all(m.grad is not None and m.grad.abs().sum() > 0 for m in masks.values())
    assert model.layers[0].attention.wq.weight.grad.abs().sum() > 0


def test_bad_masks_are_rejected():
    cfg = _config()
    model = _model(cfg)
    with pytest.raises(ValueError, match="unknown mask keys"):
        model(IDS, masks={"heads": torch.ones(3, 6)})
    with pytest.raises(ValueError, match=r"mask 'head' has shape \(6,\), expected \(3, 6\)"):
        model(IDS, masks={"head": torch.ones(6)})


def test_blocks_run_by_hand_with_their_layer_masks_equal_the_forward():
    cfg = _config()
    model = _model(cfg)
    generator = torch.Generator().manual_seed(5)
    masks = {
        "hidden": (torch.rand(cfg.d_model, generator=generator) > 0.3).float(),
        "head": torch.rand(cfg.n_layers, cfg.n_heads, generator=generator),
        "layer": torch.tensor([1.0, 0.5, 1.0]),
        "intermediate": torch.rand(cfg.n_layers, cfg.intermediate_size, generator=generator),
    }
    layer_masks = model.layer_masks(masks, torch.float32)
    assert len(layer_masks) == cfg.n_layers
    assert layer_masks[1].heads.shape == (cfg.n_heads,) and layer_masks[1].ffn.shape == (
        cfg.intermediate_size,
    )
    assert layer_masks[2].n_kept.item() == masks["hidden"].sum().item()
    with torch.no_grad():
        rope = model.rope_tables(IDS.shape[1], torch.float32)
        x = layer_masks[0].keep_dims(model.tok_embeddings(IDS))
        for block, masks_of_block in zip(model.layers, layer_masks, strict=True):
            x = block(x, rope, masks_of_block)
        by_hand = model.head(model.norm(x, layer_masks[0].dims, layer_masks[0].n_kept))
    assert torch.equal(by_hand, _logits(model, masks))
    unmasked = model.layer_masks({}, torch.float32)
    assert all(m.dims is m.heads is m.ffn is None for m in unmasked)


@pytest.mark.parametrize(("head_dim", "theta"), [(64, 10000.0), (128, 500000.0), (16, 1e6)])
def test_plain_rope_table_equals_transformers_default(head_dim, theta):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from llmshearing.models.decoder import rope_inverse_frequencies

    config = ModelConfig(
        vocab_size=8, d_model=4 * head_dim, n_layers=1, n_heads=4, n_kv_heads=4, head_dim=head_dim,
        intermediate_size=8, rope_theta=theta,
    )  # fmt: skip
    ours, scaling = rope_inverse_frequencies(config)
    hf = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim, rope_theta=theta)
    theirs, their_scaling = ROPE_INIT_FUNCTIONS["default"](hf, torch.device("cpu"))
    assert torch.equal(ours, theirs.float()) and scaling == their_scaling == 1.0


def test_casting_every_floating_buffer_to_bf16_leaves_the_logits_unchanged():
    # FSDP1's DEFAULT and PURE mixed precision cast a module's floating buffers to bf16; the rotary
    # frequencies must not be among them (in bf16 they rotate late positions by radians too many)
    config = _config(max_seq_len=1024, rope_theta=10000.0, head_dim=16, n_heads=2, n_kv_heads=2)
    model = _model(config)
    ids = torch.randint(0, 64, (1, 1024), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        before = model(ids)
    for module in model.modules():
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.is_floating_point():
                module._buffers[name] = buffer.to(torch.bfloat16)
    with torch.no_grad():
        after = model(ids)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    # casting the whole module (what `.to(dtype)` and FSDP's parameter casts do) leaves the tables fp32-exact
    tables = model.rope_tables(4096, torch.float32)
    model.to(torch.bfloat16)
    assert model.inv_freq.dtype == torch.float32
    for ours, expected in zip(model.rope_tables(4096, torch.float32), tables, strict=True):
        assert torch.equal(ours, expected)
    exact = torch.arange(4096, dtype=torch.float64)[:, None] * (
        1.0 / 10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    )
    assert (tables[0][:, :8].double() - exact.cos()).abs().max() < 1e-3  # fp32 angles at position 4095


_FLASH_PROBE = """
import torch
torch.cuda.is_available = lambda: True  # a GPU machine, as far as the kernel choice is concerned
from llmshearing.models.config import ModelConfig
from llmshearing.models.decoder import AttentionKernelError, Decoder
config = ModelConfig(vocab_size=16, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=8, intermediate_size=8)
student, teacher = Decoder(config), Decoder(config)  # built twice: one notice
print("impl", student.attn_impl, teacher.attn_impl)
print("logits", tuple(student(torch.zeros(1, 4, dtype=torch.long)).shape))
try:
    Decoder(config.replace(attn_impl="flash"))
except AttentionKernelError as err:
    print("refused", isinstance(err, ValueError), err)
"""


@pytest.mark.parametrize("broken", [True, False])
def test_flash_attn_is_imported_at_model_build_and_falls_back_to_sdpa_in_one_line(tmp_path, broken):
    import os
    import subprocess
    import sys

    package = tmp_path / "flash_attn"
    package.mkdir()
    if broken:  # what a wheel built for another torch does: found by find_spec, fails on import
        body = "raise ImportError('flash_attn_2_cuda.so: undefined symbol: _ZN3c105ErrorC2E')\n"
    else:
        body = "def flash_attn_func(q, k, v, causal=True, window_size=(-1, -1)):\n    raise AssertionError\n"
    (package / "__init__.py").write_text(body)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.getcwd()])}
    env.pop("RANK", None)
    proc = subprocess.run([sys.executable, "-c", _FLASH_PROBE], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    notices = [line for line in proc.stderr.splitlines() if "flash-attn" in line]
    if broken:
        assert "impl sdpa sdpa" in proc.stdout and "logits (1, 4, 16)" in proc.stdout
        assert notices == [
            "llmshearing: flash-attn is installed but does not import (ImportError: flash_attn_2_cuda.so: "
            "undefined symbol: _ZN3c105ErrorC2E); attention runs on torch SDPA"
        ]
        assert "refused True model.attn_impl=flash needs FlashAttention-2" in proc.stdout
        assert "undefined symbol" in proc.stdout.split("refused", 1)[1]
    else:
        assert "impl flash flash" in proc.stdout and not notices and "refused" not in proc.stdout
