"""``llmshearing prune-model``: a Composer pruning checkpoint -> checkpoint (and HF dir) of the target shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from composer import Trainer
from composer.optim import DecoupledAdamW
from conftest import PRUNABLE_MODEL, PRUNABLE_TARGET
from torch.utils.data import DataLoader, Dataset

from llmshearing.checkpoint.reading import load_checkpoint
from llmshearing.cli import main
from llmshearing.models.composer_model import ComposerLlama
from llmshearing.models.config import ModelConfig
from llmshearing.models.decoder import Decoder
from llmshearing.pruning import attach_l0_module, l0_param_groups
from llmshearing.pruning.algorithm import L0Pruning

TIED = ModelConfig(**PRUNABLE_MODEL, init_std=0.2)
UNTIED = TIED.replace(tie_word_embeddings=False, qkv_bias=True, family="qwen2")
TARGET = PRUNABLE_TARGET
ALL = ["layer", "head_layer", "head", "kv_head", "mlp", "intermediate", "hidden"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class RandomTokens(Dataset):
    def __init__(self, n: int = 32, seq_len: int = 16, vocab: int = 64) -> None:
        self.tokens = torch.randint(0, vocab, (n, seq_len), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[index]}


def pruning_run(
    run: Path, config: ModelConfig, l0: dict | None, batches: int = 4, log_alpha: dict | None = None
) -> tuple[Path, ComposerLlama]:
    """Train a few batches, save a Composer checkpoint under ``run/checkpoints`` and the run's config.json
    (the checkpoint records the run's identity, as the training entry point's checkpoints do)."""
    from llmshearing.checkpoint.run_config import write_run_description
    from llmshearing.training.run_record import RunRecord

    torch.manual_seed(0)
    model = ComposerLlama(config)
    if l0 is not None:
        module = attach_l0_module(model, l0)
        groups = l0_param_groups(model, 1e-3, 0.5, 0.2)
    else:
        groups = [{"params": list(model.parameters())}]
    description = {
        "model": config.to_dict(),
        "hf_config": None,
        "l0_module": module.l0_config.to_dict() if l0 else None,
    }
    trainer = Trainer(
        model=model,
        train_dataloader=DataLoader(RandomTokens(), batch_size=8),
        optimizers=DecoupledAdamW(groups, lr=1e-3),
        max_duration=f"{batches}ba",
        algorithms=[L0Pruning(l0)] if l0 is not None else [],
        device="cpu",
        precision="fp32",
        progress_bar=False,
        save_folder=str(run / "checkpoints"),
        save_interval=f"{batches}ba",
        callbacks=[RunRecord(description)],
    )
    trainer.fit()
    if log_alpha:
        with torch.no_grad():
            for family, values in log_alpha.items():
                module.log_alpha[family].copy_(values)
        trainer.save_checkpoint(str(run / "checkpoints" / "edited.pt"))
    trainer.close()
    write_run_description(str(run), description)
    name = "edited.pt" if log_alpha else f"ep0-ba{batches}-rank0.pt"
    return run / "checkpoints" / name, model


def masked_logits(model: ComposerLlama, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        masks = model.l0_module.deterministic_masks(at_target=True)
        return model.model(ids, masks=masks)


@pytest.mark.parametrize("config", [TIED, UNTIED], ids=["tied-llama", "untied-qwen2"])
def test_prune_model_writes_target_shape_equal_to_masked_model(tmp_path, capsys, config):
    from transformers import AutoModelForCausalLM

    ckpt, model = pruning_run(tmp_path / "run", config, {"pruning_modules": ALL, "target_model": TARGET})
    out, hf_out = tmp_path / "pruned", tmp_path / "hf"
    assert main(["prune-model", str(ckpt), str(out), "--hf-out", str(hf_out), "--hf-dtype", "fp32"]) == 0
    printed = capsys.readouterr().out
    assert (
        "- method: structured pruning with hard-concrete (L0) masks toward"
        in (hf_out / "README.md").read_text()
    )
    assert (
        "exact target shape" in printed and "n_kv_heads" in printed and f"{config.num_params():,d}" in printed
    )

    pruned_config, state, _ = load_checkpoint(out)
    assert pruned_config == config.replace(**TARGET)
    assert not any(k.startswith("l0_module") for k in state)
    decoder = Decoder(pruned_config)
    decoder.load_state_dict(state, strict=True)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    reference = masked_logits(model, ids)
    assert reference.abs().max() > 1.0
    with torch.no_grad():
        assert (decoder.eval()(ids) - reference).abs().max().item() <= 1e-5
        hf = AutoModelForCausalLM.from_pretrained(hf_out, torch_dtype=torch.float32).eval()
        assert (hf(ids).logits - reference).abs().max().item() <= 1e-4
    assert (
        hf.config.num_key_value_heads == 2
        and hf.config.hidden_size == 16
        and hf.config.num_hidden_layers == 3
    )
    assert not list(tmp_path.glob("*.tmp-*"))  # nothing half-written left behind


def test_target_sparsity_run_prunes_to_current_expected_size(tmp_path, capsys):
    l0 = {"pruning_modules": ["head", "intermediate"], "target_sparsity": 0.3}
    log_alpha = {
        "head": torch.linspace(-4, 4, 32).reshape(4, 8),
        "intermediate": torch.linspace(-4, 4, 192).reshape(4, 48),
    }
    ckpt, model = pruning_run(tmp_path / "run", TIED, l0, batches=1, log_alpha=log_alpha)
    assert main(["prune-model", str(ckpt), str(tmp_path / "pruned")]) == 0
    assert "current expected size" in capsys.readouterr().out
    keep = model.l0_module.keep_counts(at_target=False)
    config, _, _ = load_checkpoint(tmp_path / "pruned")
    assert (config.n_heads, config.intermediate_size) == (keep["head"] * 4, keep["intermediate"])
    assert config.n_heads < 8 and config.intermediate_size < 48


def test_blocks_learned_in_different_layers_drop_the_same_layer_and_report_the_floor(tmp_path, capsys):
    l0 = {"pruning_modules": ["head_layer", "mlp"], "target_model": {"n_layers": 3}}
    log_alpha = {
        "head_layer": torch.tensor([-3.0, 3.0, 3.0, 3.0]),
        "mlp": torch.tensor([3.0, -3.0, 3.0, 3.0]),
    }
    ckpt, _ = pruning_run(tmp_path / "run", TIED, l0, batches=1, log_alpha=log_alpha)
    assert main(["prune-model", str(ckpt), str(tmp_path / "pruned")]) == 0
    printed = capsys.readouterr().out
    # layers 0 and 1 tie; layer 1 goes, and layer 0 keeps its attention at the floor value
    assert load_checkpoint(tmp_path / "pruned")[0] == TIED.replace(n_layers=3)
    assert "kept units at floor" in printed and "1 kept units" in printed and "head_layer: 1" in printed


def test_user_errors_are_one_line_with_the_fix(tmp_path, capsys):
    ckpt, _ = pruning_run(
        tmp_path / "run", TIED, {"pruning_modules": ["head"], "target_model": {"n_heads": 4}}, 1
    )
    dense_ckpt, _ = pruning_run(tmp_path / "dense", TIED, None, 1)
    lone = tmp_path / "lone.pt"
    lone.write_bytes(ckpt.read_bytes())
    (tmp_path / "taken").mkdir()
    cases = [
        ([str(tmp_path / "missing.pt"), str(tmp_path / "a")], "missing.pt not found"),
        ([str(lone), str(tmp_path / "b")], "pass --config"),
        ([str(dense_ckpt), str(tmp_path / "c")], "no l0_module settings"),
        (
            [str(dense_ckpt), str(tmp_path / "d"), "--config", str(tmp_path / "run" / "config.json")],
            "no l0_module.*",
        ),
        ([str(ckpt), str(tmp_path / "taken")], "already exists"),
        ([str(tmp_path / "run"), str(tmp_path / "e")], "is a directory"),
    ]
    for args, message in cases:
        assert main(["prune-model", *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err, (args, err)
        assert len(err.strip().splitlines()) == 1


def test_config_override_and_overwrite(tmp_path):
    ckpt, _ = pruning_run(
        tmp_path / "run", TIED, {"pruning_modules": ["head"], "target_model": {"n_heads": 4}}, 1
    )
    moved = tmp_path / "elsewhere" / "model.pt"
    moved.parent.mkdir()
    moved.write_bytes(ckpt.read_bytes())
    out = tmp_path / "pruned"
    out.mkdir()
    args = [
        "prune-model",
        str(moved),
        str(out),
        "--config",
        str(tmp_path / "run" / "config.json"),
        "--overwrite",
    ]
    assert main(args) == 0
    data = json.loads((out / "config.json").read_text())
    assert data["model"]["n_heads"] == 4 and data["model"]["n_kv_heads"] == 4
