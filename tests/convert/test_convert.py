"""HF <-> project conversion: logits vs transformers, bit-identical round trips, checkpoint kinds, bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import HF_VOCAB, hf_test_config, write_word_tokenizer
from safetensors.torch import load_file, save_file

from llmshearing import cli
from llmshearing.checkpoint.format import save_checkpoint
from llmshearing.checkpoint.loading import from_pretrained
from llmshearing.checkpoint.reading import load_checkpoint, open_checkpoint
from llmshearing.convert.hf_to_project import convert_hf_to_project
from llmshearing.convert.project_to_hf import convert_project_to_hf
from llmshearing.hf.config import hf_config_from_model, model_config_from_hf
from llmshearing.hf.keymaps import KEY_MAPS, KeyMap

LOGIT_ATOL = 1e-4  # fp32 on CPU, project Decoder vs transformers


def cli_main(argv: list[str]) -> int:
    """``llmshearing`` with only the convert commands registered (the other areas are tested elsewhere)."""
    modules = cli.COMMAND_MODULES
    cli.COMMAND_MODULES = ("llmshearing.convert.commands",)
    try:
        return cli.main(argv)
    finally:
        cli.COMMAND_MODULES = modules


FAMILIES = ["llama_gqa_llama3", "mistral", "qwen2", "llama_tied"]


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory) -> dict[str, Path]:
    """One tiny random HF model directory (safetensors + config + tokenizer) per family."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("hf")
    dirs = {}
    for seed, family in enumerate(FAMILIES):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf_test_config(family))
        if family == "qwen2":  # transformers initialises biases to zero; make them matter
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    torch.nn.init.normal_(param, std=0.5)
        model.save_pretrained(root / family)
        write_word_tokenizer(root / family)
        dirs[family] = root / family
    return dirs


@pytest.fixture(scope="module")
def converted(hf_models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("project")
    return {
        family: convert_hf_to_project(src, root / family, progress=False) for family, src in hf_models.items()
    }


def _hf_logits(directory: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        return model(ids).logits


def _ids(seq_len: int = 24) -> torch.Tensor:
    return torch.randint(0, HF_VOCAB, (2, seq_len), generator=torch.Generator().manual_seed(7))


def _leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(name))


@pytest.mark.parametrize("family", FAMILIES)
def test_project_logits_match_transformers(family, hf_models, converted):
    ids = _ids()
    expected = _hf_logits(hf_models[family], ids)
    model = from_pretrained(converted[family])
    assert not model.training
    with torch.no_grad():
        logits = model(ids)
    assert logits.shape == (2, ids.shape[1], HF_VOCAB)
    assert (logits - expected).abs().max().item() <= LOGIT_ATOL


def test_converted_config_carries_every_field(converted, hf_models):
    config, _, hf_config = load_checkpoint(converted["llama_gqa_llama3"])
    assert (config.n_heads, config.n_kv_heads, config.head_dim, config.d_model) == (6, 2, 12, 48)
    assert config.rope_scaling["rope_type"] == "llama3" and config.rope_theta == 50000.0
    assert hf_config == json.loads((hf_models["llama_gqa_llama3"] / "config.json").read_text())
    assert load_checkpoint(converted["mistral"])[0].sliding_window == 7
    assert load_checkpoint(converted["qwen2"])[0].qkv_bias
    tied, state, _ = load_checkpoint(converted["llama_tied"])
    assert tied.tie_word_embeddings and "output.weight" not in state
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (converted["llama_tied"] / name).is_file()


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_bit_identical(family, hf_models, converted, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = convert_project_to_hf(converted[family], tmp_path / "hf", dtype="fp32", progress=False)
    original = load_file(hf_models[family] / "model.safetensors")
    exported = load_file(out / "model.safetensors")
    assert sorted(exported) == sorted(original)
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key

    source_cfg = json.loads((hf_models[family] / "config.json").read_text())
    exported_cfg = json.loads((out / "config.json").read_text())
    for field in (
        "architectures",
        "hidden_size",
        "num_key_value_heads",
        "head_dim",
        "tie_word_embeddings",
        "rope_theta",
        "rope_scaling",
        "intermediate_size",
        "num_hidden_layers",
        "vocab_size",
    ):
        assert exported_cfg.get(field) == source_cfg.get(field, exported_cfg.get(field)), field
    assert exported_cfg["torch_dtype"] == "float32"

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = _ids()
    assert torch.equal(_hf_logits(out, ids), _hf_logits(hf_models[family], ids))
    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("w5") == 5
    with torch.no_grad():  # the project loader also reads HF directories directly
        assert (from_pretrained(out)(ids) - model.eval()(ids).logits).abs().max().item() <= LOGIT_ATOL


def test_cli_bf16_export_and_sharding(hf_models, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    project = tmp_path / "project"
    assert (
        cli_main(["convert", "hf-to-composer", str(hf_models["qwen2"]), str(project), "--dtype", "bf16"]) == 0
    )
    assert all(t.dtype == torch.bfloat16 for t in load_file(project / "model.safetensors").values())
    out = tmp_path / "hf"
    write_word_tokenizer(tmp_path / "other_tokenizer", eos="w3")
    tokenizer = ["--tokenizer", str(tmp_path / "other_tokenizer")]
    assert cli_main(["convert", "composer-to-hf", str(project), str(out), *tokenizer]) == 0  # default: bf16
    assert json.loads((out / "tokenizer_config.json").read_text())["eos_token"] == "w3"
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    original = load_file(hf_models["qwen2"] / "model.safetensors")
    for key, tensor in load_file(out / "model.safetensors").items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, original[key].to(torch.bfloat16)), key

    sharded = convert_project_to_hf(
        project, tmp_path / "sharded", dtype="fp32", max_shard_bytes=20_000, progress=False
    )
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((sharded / s).is_file() for s in shards)
    model, info = AutoModelForCausalLM.from_pretrained(sharded, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    reference = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_sharded_project_checkpoint_round_trip(converted, tmp_path):
    config, state, hf_config = load_checkpoint(converted["llama_gqa_llama3"])
    out = save_checkpoint(
        tmp_path / "sharded", config, state, hf_config, max_shard_bytes=30_000, progress=False
    )
    assert (out / "model.safetensors.index.json").is_file() and not (out / "model.safetensors").exists()
    config2, state2, hf_config2 = load_checkpoint(out)
    assert config2 == config and hf_config2 == hf_config
    assert state2.keys() == state.keys() and all(torch.equal(state2[k], state[k]) for k in state)


def test_keymaps_are_bijective():
    for family, mapping in KEY_MAPS.items():
        keymap = KeyMap(family)
        assert len(set(mapping.values())) == len(mapping)
        for hf_template, project_template in mapping.items():
            hf_key, project_key = hf_template.format(3), project_template.format(3)
            assert keymap.to_project(hf_key) == project_key and keymap.to_hf(project_key) == hf_key
    assert KeyMap("llama").to_project("model.layers.0.self_attn.q_proj.bias") is None
    assert KeyMap("qwen2").to_project("model.layers.0.self_attn.q_proj.bias") == "layers.0.attention.wq.bias"


def test_pruned_shape_exports_a_config_transformers_accepts():
    config = model_config_from_hf(hf_test_config("llama_gqa_llama3").to_dict())
    pruned = config.replace(d_model=40, n_heads=4, n_kv_heads=2, intermediate_size=33, n_layers=1)
    exported = hf_config_from_model(pruned, hf_test_config("llama_gqa_llama3").to_dict(), "bf16")
    assert (
        exported["hidden_size"] == 40 and exported["head_dim"] == 12 and exported["num_key_value_heads"] == 2
    )
    assert model_config_from_hf(exported) == pruned


def _composer_run(tmp_path: Path, project: Path) -> Path:
    """A real Composer checkpoint (one training batch) in ``<run>/checkpoints`` with ``<run>/config.json``."""
    from composer import Trainer

    from llmshearing.models.composer_model import ComposerLlama

    config, state, hf_config = load_checkpoint(project)
    model = ComposerLlama(config)
    model.model.load_state_dict(state)
    batches = torch.utils.data.DataLoader([{"input_ids": row} for row in _ids(16)], batch_size=2)
    run = tmp_path / "run"
    trainer = Trainer(
        model=model,
        train_dataloader=batches,
        max_duration="1ba",
        optimizers=torch.optim.SGD(model.parameters(), lr=0.0),
        save_folder=str(run / "checkpoints"),
        save_interval="1ba",
        device="cpu",
        progress_bar=False,
        log_to_console=False,
    )
    trainer.fit()
    trainer.close()
    description = {
        "model": config.to_dict(),
        "hf_config": hf_config,
        "train": {"model": {"path": str(project)}},
    }
    (run / "config.json").write_text(json.dumps(description))
    return run / "checkpoints" / "latest-rank0.pt"


def test_composer_checkpoint_exports(converted, hf_models, tmp_path):
    ckpt = _composer_run(tmp_path, converted["llama_gqa_llama3"])
    config, state, _ = load_checkpoint(ckpt)
    assert config == load_checkpoint(converted["llama_gqa_llama3"])[0]
    out = convert_project_to_hf(ckpt, tmp_path / "hf", dtype="fp32", progress=False)
    original = load_file(hf_models["llama_gqa_llama3"] / "model.safetensors")
    exported = load_file(out / "model.safetensors")
    assert all(torch.equal(exported[k], original[k]) for k in original)  # lr 0: weights unchanged
    assert (out / "tokenizer.json").is_file()  # from the run's source checkpoint (train.model.path)

    # L0 state: kept or dropped on request; export refuses the unfolded pruning checkpoint
    payload = torch.load(ckpt, weights_only=False)
    payload["state"]["model"]["l0_module.masks.head.z_loga"] = torch.zeros(2, 6)
    pruning_ckpt = ckpt.parent / "pruning.pt"
    torch.save(payload, pruning_ckpt)
    assert "l0_module.masks.head.z_loga" in load_checkpoint(pruning_ckpt)[1]
    assert "l0_module.masks.head.z_loga" not in load_checkpoint(pruning_ckpt, drop_l0=True)[1]
    with pytest.raises(
        ValueError, match=re.escape(f"Run `llmshearing prune-model {pruning_ckpt} OUT` first")
    ):
        convert_project_to_hf(pruning_ckpt, tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused").exists()

    (ckpt.parent.parent / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="--config"):
        load_checkpoint(ckpt)
    config_file = tmp_path / "elsewhere.json"
    config_file.write_text(json.dumps({"model": config.to_dict(), "hf_config": None}))
    assert load_checkpoint(ckpt, config_path=config_file)[0] == config


# ----------------------------------------------------------------------------------------------- bad input


def _cli_error(args: list[str], capsys) -> str:
    assert cli_main(args) == 2
    return capsys.readouterr().err


def test_non_llama_architecture_is_rejected(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50)).save_pretrained(
        tmp_path / "gpt2"
    )
    err = _cli_error(["convert", "hf-to-composer", str(tmp_path / "gpt2"), str(tmp_path / "out")], capsys)
    assert "GPT2LMHeadModel" in err and "LlamaForCausalLM" in err and "Qwen2ForCausalLM" in err
    assert _leftovers(tmp_path, "out") == []


def test_missing_files_are_named(hf_models, tmp_path, capsys):
    err = _cli_error(["convert", "hf-to-composer", str(tmp_path / "nowhere"), str(tmp_path / "out")], capsys)
    assert "nowhere" in err and "not found" in err

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((hf_models["mistral"] / "config.json").read_text())
    err = _cli_error(["convert", "hf-to-composer", str(no_weights), str(tmp_path / "out")], capsys)
    assert "no weights found" in err and "model.safetensors" in err

    no_config = tmp_path / "no_config"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes((hf_models["mistral"] / "model.safetensors").read_bytes())
    err = _cli_error(["convert", "hf-to-composer", str(no_config), str(tmp_path / "out")], capsys)
    assert "config.json" in err and "not found" in err

    err = _cli_error(
        ["convert", "composer-to-hf", str(tmp_path / "missing.pt"), str(tmp_path / "out")], capsys
    )
    assert "missing.pt" in err
    assert _leftovers(tmp_path, "out") == []


def test_corrupt_safetensors_is_reported(hf_models, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((hf_models["llama_tied"] / "config.json").read_text())
    data = (hf_models["llama_tied"] / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated download
    err = _cli_error(["convert", "hf-to-composer", str(broken), str(tmp_path / "out")], capsys)
    assert "model.safetensors" in err and "corrupt" in err
    (broken / "model.safetensors").write_bytes(b"not a safetensors file at all")
    err = _cli_error(["convert", "hf-to-composer", str(broken), str(tmp_path / "out")], capsys)
    assert "not a valid safetensors file" in err
    assert _leftovers(tmp_path, "out") == []


def test_unknown_and_missing_keys_are_named(hf_models, converted, tmp_path, capsys):
    # an HF model with a tensor the architecture does not have
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "config.json").write_text((hf_models["mistral"] / "config.json").read_text())
    tensors = load_file(hf_models["mistral"] / "model.safetensors")
    save_file({**tensors, "model.layers.0.mlp.gate_proj.bias": torch.zeros(80)}, extra / "model.safetensors")
    err = _cli_error(["convert", "hf-to-composer", str(extra), str(tmp_path / "out")], capsys)
    assert "unexpected keys" in err and "model.layers.0.mlp.gate_proj.bias" in err

    # a project checkpoint with an unknown key and a missing one
    bad = tmp_path / "bad_project"
    bad.mkdir()
    (bad / "config.json").write_text((converted["mistral"] / "config.json").read_text())
    state = load_file(converted["mistral"] / "model.safetensors")
    state["layers.9.attention.wq.weight"] = state.pop("layers.1.attention.wq.weight")
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    err = _cli_error(["convert", "composer-to-hf", str(bad), str(tmp_path / "out")], capsys)
    assert "missing keys [layers.1.attention.wq.weight]" in err
    assert "unexpected keys [layers.9.attention.wq.weight]" in err
    with pytest.raises(KeyError, match="layers.9.attention.wq.weight"):
        from_pretrained(bad)

    # a tensor of the wrong shape
    state = load_file(converted["mistral"] / "model.safetensors")
    state["norm.weight"] = torch.ones(47)
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    err = _cli_error(["convert", "composer-to-hf", str(bad), str(tmp_path / "out")], capsys)
    assert "norm.weight is [47], expected [48]" in err
    assert _leftovers(tmp_path, "out") == []


def test_existing_output_is_not_clobbered(hf_models, converted, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    err = _cli_error(["convert", "composer-to-hf", str(converted["qwen2"]), str(out)], capsys)
    assert "already exists" in err and (out / "keep.txt").read_text() == "mine"
    assert cli_main(["convert", "composer-to-hf", str(converted["qwen2"]), str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert _leftovers(tmp_path, "out") == ["out"]


def test_failure_while_writing_leaves_no_output(converted, tmp_path, monkeypatch):
    import llmshearing.convert.project_to_hf as project_to_hf

    def explode(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(project_to_hf, "copy_tokenizer", explode)
    with pytest.raises(RuntimeError, match="disk full"):
        convert_project_to_hf(converted["qwen2"], tmp_path / "out", progress=False)
    assert _leftovers(tmp_path, "out") == []


def test_open_checkpoint_reports_kind(converted, hf_models):
    with open_checkpoint(converted["qwen2"]) as ckpt:
        assert ckpt.kind == "project"
    with open_checkpoint(hf_models["qwen2"]) as ckpt:
        assert ckpt.kind == "hf" and "layers.0.attention.wq.bias" in ckpt.tensors.keys()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ],
)
def test_unsupported_llama_settings_are_rejected(change, message):
    config = {**hf_test_config("llama_tied").to_dict(), "architectures": ["LlamaForCausalLM"], **change}
    with pytest.raises(ValueError, match=message):
        model_config_from_hf(config, "some/config.json")


def test_bf16_source_keeps_its_precision_by_default(hf_models, tmp_path):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(hf_models["mistral"], dtype=torch.bfloat16).save_pretrained(
        tmp_path / "bf16"
    )
    project = convert_hf_to_project(tmp_path / "bf16", tmp_path / "project", progress=False)
    assert all(t.dtype == torch.bfloat16 for t in load_file(project / "model.safetensors").values())
    out = convert_project_to_hf(project, tmp_path / "hf", dtype="bf16", progress=False)
    original, exported = (
        load_file(tmp_path / "bf16" / "model.safetensors"),
        load_file(out / "model.safetensors"),
    )
    assert exported.keys() == original.keys() and all(torch.equal(exported[k], original[k]) for k in original)


def test_pytorch_bin_checkpoints_convert(hf_models, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_models["llama_gqa_llama3"])
    model.save_pretrained(tmp_path / "bin", safe_serialization=False, max_shard_size="40KB")
    assert (tmp_path / "bin" / "pytorch_model.bin.index.json").is_file()
    project = convert_hf_to_project(tmp_path / "bin", tmp_path / "project", progress=False)
    original = load_file(hf_models["llama_gqa_llama3"] / "model.safetensors")
    exported = load_file(
        convert_project_to_hf(project, tmp_path / "hf", dtype="fp32", progress=False) / "model.safetensors"
    )
    assert exported.keys() == original.keys() and all(torch.equal(exported[k], original[k]) for k in original)
