"""L0Pruning with Composer's Trainer: attach, warm-up, logging, mask files, LR/clipping flags, resume."""

from __future__ import annotations

import logging
import math
import os

import pytest
import torch
from composer import Callback, Trainer
from composer.algorithms import GradientClipping
from composer.loggers import InMemoryLogger
from composer.optim import ConstantWithWarmupScheduler, DecoupledAdamW, DecoupledSGDW
from conftest import PRUNABLE_MODEL, PRUNABLE_TARGET
from torch.utils.data import DataLoader, Dataset

from llmshearing.models.composer_model import ComposerLlama
from llmshearing.models.config import ModelConfig
from llmshearing.pruning import L0Pruning, attach_l0_module, l0_param_groups
from llmshearing.pruning.algorithm import GAP_TOLERANCE
from llmshearing.pruning.hard_concrete import floored_units

CONFIG = ModelConfig(**PRUNABLE_MODEL)
TARGET = PRUNABLE_TARGET
FAMILIES = ["layer", "head", "kv_head", "intermediate", "hidden"]
LEARNED_BUDGET = {
    "target_model": None,
    "target_budget": {
        "non_embedding_params": CONFIG.replace(**TARGET).num_params(False), "multiple": 8, "tolerance": 0.3,
    },
    "budget_shape": "learned",
}  # fmt: skip


class PatternTokens(Dataset):
    """Sequences of an arithmetic token pattern (learnable), one per index."""

    def __init__(self, n: int = 64, seq_len: int = 16, vocab: int = 64) -> None:
        starts, steps = torch.arange(n) % vocab, torch.arange(n) % 5 + 1
        self.tokens = (starts[:, None] + steps[:, None] * torch.arange(seq_len)[None, :]) % vocab

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[index]}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not fight other processes for the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def l0_settings(**changes) -> dict:
    return {
        "pruning_modules": FAMILIES,
        "target_model": TARGET,
        "lagrangian_warmup_steps": 20,
        "mask_lr": 0.2,
        "multiplier_lr": 0.2,
        **changes,
    }


def pruning_trainer(
    l0: dict, max_duration: str = "4ba", attach: bool = True, optimizer=None, run_folder=None, **kwargs
) -> Trainer:
    torch.manual_seed(0)
    model = ComposerLlama(CONFIG)
    if attach:
        attach_l0_module(model, l0)
    if optimizer is None:
        optimizer = DecoupledAdamW(l0_param_groups(model, 1e-3, l0["mask_lr"], l0["multiplier_lr"]), lr=1e-3)
    elif callable(optimizer):
        optimizer = optimizer(model)
    algorithms = [L0Pruning(l0, save_folder=run_folder), *kwargs.pop("algorithms", [])]
    return Trainer(
        model=model,
        train_dataloader=DataLoader(PatternTokens(), batch_size=8),
        optimizers=optimizer,
        max_duration=max_duration,
        algorithms=algorithms,
        device="cpu",
        precision="fp32",
        progress_bar=False,
        seed=17,
        **kwargs,
    )


def l0_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.state.model.l0_module.state_dict().items()}


def test_short_run_reaches_target_expected_sparsity_and_prunes_to_target_shape(tmp_path):
    from llmshearing.checkpoint.reading import load_checkpoint
    from llmshearing.cli import main
    from llmshearing.training.builders import write_run_description

    l0 = l0_settings()
    trainer = pruning_trainer(
        l0, max_duration="200ba", save_folder=str(tmp_path / "checkpoints"), save_interval="200ba"
    )
    trainer.fit()
    module = trainer.state.model.l0_module
    module.train()
    stats = module().stats
    for family in FAMILIES:
        target = module.plan.family_sparsity[family]
        assert stats[f"target_sparsity/{family}"].item() == pytest.approx(target)
        assert stats[f"expected_sparsity/{family}"].item() == pytest.approx(target, abs=0.02), family

    trainer.close()
    write_run_description(str(tmp_path), {"model": CONFIG.to_dict(), "hf_config": None, "l0_module": l0})
    (checkpoint,) = (tmp_path / "checkpoints").glob("ep*-ba200-rank0.pt")
    assert main(["prune-model", str(checkpoint), str(tmp_path / "pruned")]) == 0
    config, _, _ = load_checkpoint(tmp_path / "pruned")
    assert config == CONFIG.replace(**TARGET)


def test_algorithm_attaches_module_and_adds_param_groups_at_init():
    l0 = l0_settings()
    trainer = pruning_trainer(
        l0, attach=False, optimizer=lambda m: DecoupledAdamW(m.parameters(), lr=1e-3), max_duration="3ba"
    )
    model = trainer.state.model
    assert model.l0_module is not None
    groups = {g.get("name"): g for g in trainer.state.optimizers[0].param_groups}
    assert groups["masks"]["lr"] == l0["mask_lr"] and groups["multipliers"]["lr"] == l0["multiplier_lr"]
    assert groups["masks"]["weight_decay"] == 0.0
    before = l0_state(trainer)
    trainer.fit()
    after = l0_state(trainer)
    assert not torch.equal(before["log_alpha.head"], after["log_alpha.head"])


def test_mixed_optimizer_group_is_rejected():
    def everything_together(model):
        return DecoupledAdamW(model.parameters(), lr=1e-3)

    with pytest.raises(ValueError, match="l0_param_groups"):
        pruning_trainer(l0_settings(), optimizer=everything_together)


def test_one_mask_sample_per_step_shared_by_its_microbatches():
    trainer = pruning_trainer(l0_settings(), max_duration="3ba", device_train_microbatch_size=4)
    module = trainer.state.model.l0_module
    calls = []
    module.register_forward_hook(
        lambda mod, args, out: calls.append((int(mod.step), out.masks["head"].clone()))
    )
    trainer.fit()
    assert [step for step, _ in calls] == [0, 0, 1, 1, 2, 2]
    assert torch.equal(calls[0][1], calls[1][1])  # every micro-batch of a step uses the step's sample
    assert not torch.equal(calls[0][1], calls[2][1])  # a fresh sample per step


def test_logs_expected_and_target_sizes_multipliers_and_penalty():
    logger = InMemoryLogger()
    trainer = pruning_trainer(l0_settings(), max_duration="3ba", loggers=[logger])
    trainer.fit()
    data = logger.data
    for key in (
        "l0/expected_sparsity/head",
        "l0/target_sparsity/head",
        "l0/expected_params",
        "l0/expected_sparsity",
        "l0/lambda_1/hidden",
        "l0/lambda_2/layer",
        "l0/penalty",
    ):
        assert key in data and len(data[key]) == 3, key
    assert data["l0/target_sparsity/head"][-1][1] == pytest.approx(2 / 20 * 0.5)  # warm-up at batch 2
    assert data["l0/expected_params"][0][1] > 0
    assert "loss/train/lagrangian" in data


def test_masks_written_after_each_evaluation(tmp_path, caplog, capsys):
    caplog.set_level(logging.INFO, logger="llmshearing.pruning.algorithm")
    trainer = pruning_trainer(
        l0_settings(eval_target_model=False),
        max_duration="4ba",
        run_folder=str(tmp_path),
        eval_dataloader=DataLoader(PatternTokens(n=8), batch_size=4),
        eval_interval="2ba",
    )
    trainer.fit()
    files = sorted(os.listdir(tmp_path / "masks"))
    assert files == ["ba2.pt", "ba4.pt"]
    saved = torch.load(tmp_path / "masks" / "ba4.pt")
    assert saved["batch"] == 4 and saved["at_target"] is False
    assert set(saved["masks"]) == set(FAMILIES)
    target = saved["target_masks"]
    assert int((target["layer"] != 0).sum()) == 3 and int((target["hidden"] != 0).sum()) == 16
    expected = trainer.state.model.l0_module.deterministic_masks(at_target=False)
    assert all(torch.equal(saved["masks"][f], expected[f]) for f in FAMILIES)
    assert saved["floored"] == floored_units(expected)  # kept units at the floor value, per family
    # the gap to the final target, overall and per family, as the run's last stats measure it
    module = trainer.state.model.l0_module
    module.train()
    stats = module().stats
    gap = saved["sparsity_gap"]
    assert gap["all"] == pytest.approx(float(stats["expected_sparsity"]) - module.plan.global_sparsity)
    assert set(gap) == {"all", *FAMILIES}
    assert gap["hidden"] == pytest.approx(float(stats["expected_sparsity/hidden"]) - 0.5)
    # 4 of the 20 warm-up batches: far short of the target; the last snapshot warns and names the keys
    assert gap["all"] < -GAP_TOLERANCE
    records = [r for r in caplog.records if "expected sparsity" in r.getMessage()]
    assert [r.getMessage().split(":")[0] for r in records] == ["masks at batch 2", "masks at batch 4"]
    assert records[0].levelno == logging.INFO and "multiplier_lr" not in records[0].getMessage()
    assert records[1].levelno == logging.WARNING
    assert "pruning ends short of the target" in records[1].getMessage()
    assert "penalty_per_unit" in records[1].getMessage()
    # the warning reaches the console through logging; no run here has a ranked start, so nothing is printed
    assert "llmshearing: masks" not in capsys.readouterr().out


def test_a_ranked_start_is_written_and_each_snapshot_counts_the_units_moved_from_it(tmp_path, caplog, capsys):
    """With ``init_from`` the structure the masks start at is ``masks/start.pt`` (batch 0 only), and every
    snapshot counts the units its folded structure keeps or drops against it (logged as ``l0/units_moved``, and
    printed for the last snapshot of pruning), also after a resume."""
    from composer.loggers import InMemoryLogger

    from llmshearing.pruning.snapshots import changed_units, describe_moved

    caplog.set_level(logging.INFO, logger="llmshearing.pruning.algorithm")
    l0 = l0_settings(
        init_from="scores.safetensors", lagrangian_warmup_steps=0, eval_target_model=False, mask_lr=0.5
    )
    evaluation = {"eval_dataloader": DataLoader(PatternTokens(n=8), batch_size=4), "eval_interval": "2ba"}

    def ranked(trainer: Trainer) -> dict[str, torch.Tensor]:
        """A ranked start near the interior, where a few steps move units; returns its structure."""
        module = trainer.state.model.l0_module
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for value in module.log_alpha.values():
                value.copy_(0.3 * torch.randn(value.shape, generator=generator))
        return {k: v.clone() for k, v in module.deterministic_masks(at_target=True).items()}

    straight = tmp_path / "straight"
    in_memory = InMemoryLogger()
    trainer = pruning_trainer(l0, run_folder=str(straight), loggers=in_memory, **evaluation)
    start = ranked(trainer)
    trainer.fit()
    assert sorted(os.listdir(straight / "masks")) == ["ba2.pt", "ba4.pt", "start.pt"]
    saved_start = torch.load(straight / "masks" / "start.pt")
    assert saved_start["batch"] == 0
    assert all(torch.equal(saved_start["target_masks"][f], start[f]) for f in FAMILIES)
    last = torch.load(straight / "masks" / "ba4.pt")
    moved = {
        f: (int(((last["target_masks"][f] > 0) != (start[f] > 0)).sum()), start[f].numel())
        for f in sorted(FAMILIES)
    }
    assert last["moved"] == moved and sum(n for n, _ in moved.values()) > 0  # the masks moved some units
    lines = [r.getMessage() for r in caplog.records if "moved from the ranked start" in r.getMessage()]
    assert len(lines) == 2 and lines[-1].endswith(describe_moved(moved))
    logged = [(t.batch.value, value) for t, value in in_memory.data["l0/units_moved"]]
    assert logged[-1] == (4, sum(n for n, _ in moved.values())) and len(logged) == 2
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("llmshearing: masks")]
    gap = [r.getMessage() for r in caplog.records if r.getMessage().startswith("masks at batch 4: expected")]
    assert printed == [  # the last snapshot only: its gap (on target here, so info) and the units moved
        f"llmshearing: {gap[0]}",
        f"llmshearing: masks at batch 4: units moved from the ranked start: {describe_moved(moved)}",
    ]
    assert changed_units(start, start) == {f: (0, start[f].numel()) for f in sorted(FAMILIES)}

    resumed = tmp_path / "resumed"
    first = pruning_trainer(
        l0,
        run_folder=str(resumed),
        save_folder=str(resumed / "checkpoints"),
        save_interval="2ba",
        **evaluation,
    )
    ranked(first)
    first.fit(duration="2ba")
    first.close()
    again = pruning_trainer(
        l0, run_folder=str(resumed), load_path=str(resumed / "checkpoints" / "ep0-ba2-rank0.pt"), **evaluation
    )
    again.fit()  # its start (batch 2) is not a ranked start: start.pt stays the first leg's
    assert torch.load(resumed / "masks" / "start.pt")["batch"] == 0
    assert torch.load(resumed / "masks" / "ba4.pt")["moved"] == moved


def test_end_gap_warning_names_the_keys_the_target_form_takes():
    from llmshearing.pruning.algorithm import describe_gap, sparsity_gaps
    from llmshearing.pruning.l0_module import L0Module

    shape = L0Module(CONFIG, l0_settings())
    global_term = L0Module(CONFIG, l0_settings(target_model=None, target_sparsity=0.5))
    fixed = L0Module(CONFIG, l0_settings(**LEARNED_BUDGET, fix_shape_at=3))
    fixed.set_step(3)  # the learned shape is now the per-family target
    assert fixed.plan.target is not None
    for module, names_per_unit in ((shape, True), (global_term, False), (fixed, False)):
        gaps = sparsity_gaps(module)
        message = describe_gap(module, gaps, 7, final=True)  # masks start near 1: far short of the target
        assert gaps["all"] < -GAP_TOLERANCE and "pruning ends short of the target" in message
        assert "multiplier_lr" in message
        assert ("penalty_per_unit" in message) is names_per_unit  # refused with one global term
        assert ("fix_shape_at" in message) is (module is fixed)
        assert "multiplier_beta1: 0" in message and "schedule_l0_lr" not in message  # nothing scheduled here
        assert describe_gap(module, gaps, 7, final=False).endswith(")")  # mid-run: the numbers only
    # the multipliers on the schedule, without momentum: the warning names the schedule, not beta1
    scheduled = L0Module(CONFIG, l0_settings(schedule_l0_lr=True, multiplier_beta1=0.0))
    message = describe_gap(scheduled, sparsity_gaps(scheduled), 7, final=True)
    assert "schedule_l0_lr: masks" in message and "multiplier_beta1" not in message


@pytest.mark.parametrize("schedule", [False, True, "masks"])
def test_lr_schedule_applies_to_l0_groups_only_when_asked(schedule):
    l0 = l0_settings(schedule_l0_lr=schedule)
    trainer = pruning_trainer(l0, max_duration="4ba", schedulers=ConstantWithWarmupScheduler(t_warmup="10ba"))
    seen = []  # learning rates in effect at each optimizer step
    optimizer = trainer.state.optimizers[0]
    optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: seen.append({g["name"]: g["lr"] for g in opt.param_groups})
    )
    trainer.fit()
    assert len(seen) == 4
    assert seen[-1]["weights"] > 0 and max(lrs["weights"] for lrs in seen) < 1e-3 / 2  # warming up
    for lrs in seen:
        factor = lrs["weights"] / 1e-3 if schedule else 1.0
        assert lrs["masks"] == pytest.approx(l0["mask_lr"] * factor)
        # "masks": the multipliers keep their own lr while the schedule scales the masks'
        assert lrs["multipliers"] == pytest.approx(
            l0["multiplier_lr"] * (1.0 if schedule == "masks" else factor)
        )


def test_multiplier_beta1_sets_the_multipliers_group_only():
    trainer = pruning_trainer(l0_settings(multiplier_beta1=0.0), max_duration="2ba")
    betas = {g["name"]: tuple(g["betas"]) for g in trainer.state.optimizers[0].param_groups}
    assert betas == {"weights": (0.9, 0.95), "masks": (0.9, 0.95), "multipliers": (0.0, 0.95)}
    trainer.fit()
    default = pruning_trainer(l0_settings(), max_duration="2ba")
    default.fit()
    # AdamW's first step is lr * sign(g) at any beta1; the second differs only through the first moment
    for name, p in trainer.state.model.l0_module.multipliers.items():
        q = default.state.model.l0_module.multipliers[name]
        assert not torch.allclose(p, q, rtol=0, atol=1e-7), name
    with pytest.raises(
        ValueError, match="multiplier_beta1 sets an Adam-type beta1, but the optimizer DecoupledSGDW"
    ):
        pruning_trainer(
            l0_settings(multiplier_beta1=0.0),
            optimizer=lambda model: DecoupledSGDW(l0_param_groups(model, 0.1, 1.0, 1.0), lr=0.1),
        )


def _one_sgd_batch(clip: bool | None) -> dict[str, torch.Tensor]:
    """L0 state after one SGD batch: no clipping (None), clipping with L0 grads excluded (False) or included."""
    # no clamp: at the default bound (= the initial value) both updates would be clamped back alike
    l0 = l0_settings(clip_l0_grads=bool(clip), lagrangian_warmup_steps=0, log_alpha_clamp=None)
    algorithms = [] if clip is None else [GradientClipping(clipping_type="norm", clipping_threshold=1e-4)]

    def sgd(model):
        return DecoupledSGDW(l0_param_groups(model, 0.1, 1.0, 1.0), lr=0.1)

    trainer = pruning_trainer(l0, max_duration="1ba", optimizer=sgd, algorithms=algorithms)
    with torch.no_grad():  # multipliers away from 0 so log-alpha gets a gradient in the first batch
        for p in trainer.state.model.l0_module.multipliers.values():
            p.fill_(1.0)
    trainer.fit()
    return l0_state(trainer)


def test_gradient_clipping_skips_l0_parameters_unless_asked():
    unclipped, excluded, included = _one_sgd_batch(None), _one_sgd_batch(False), _one_sgd_batch(True)
    for key in unclipped:
        assert torch.equal(unclipped[key], excluded[key]), key
    moved = unclipped["log_alpha.head"] - included["log_alpha.head"]
    assert (
        moved.abs().max() > 1e-5
    )  # clipping to 1e-4 changed the L0 update when included (float noise ~5e-7)


class ConsumeRandomness(Callback):
    """Draws from the global RNG at every batch start, as a data pipeline or another algorithm may."""

    def batch_start(self, state, logger) -> None:
        torch.rand(7)


@pytest.mark.filterwarnings("ignore:ConsumeRandomness is not in the state_dict")
@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"schedule_l0_lr": "masks", "multiplier_beta1": 0.0},
        {**LEARNED_BUDGET, "fix_shape_at": 2},  # fixed before the checkpoint: restored from it
        {**LEARNED_BUDGET, "fix_shape_at": 4},  # fixed after the resume: rounded from the same masks
        {"init_from": "scores.safetensors", "hold_ranked": ["hidden"]},
    ],
    ids=["defaults", "closing-multipliers", "shape-fixed-before", "shape-fixed-after", "hidden-held"],
)
def test_resume_gives_bit_identical_l0_parameters(tmp_path, changes):
    l0 = l0_settings(**changes)

    def trainer(**kwargs) -> Trainer:  # a warming-up schedule, so the mask-only schedule differs from none
        return pruning_trainer(
            l0, max_duration="6ba", schedulers=ConstantWithWarmupScheduler(t_warmup="4ba"), **kwargs
        )

    full = trainer()
    full.fit()

    first = trainer(save_folder=str(tmp_path), save_interval="3ba")
    first.fit(duration="3ba")
    first.close()
    checkpoint = tmp_path / "ep0-ba3-rank0.pt"
    assert checkpoint.is_file()
    resumed = trainer(load_path=str(checkpoint), callbacks=[ConsumeRandomness()])
    if "multiplier_beta1" in changes:  # the multipliers' beta1 comes back with the optimizer state
        betas = {g["name"]: tuple(g["betas"]) for g in resumed.state.optimizers[0].param_groups}
        assert betas["multipliers"] == (0.0, 0.95) and betas["masks"] == (0.9, 0.95)
    assert resumed.state.timestamp.batch.value == 3
    resumed.fit()
    if "fix_shape_at" in changes:
        for run in (full, resumed):
            module = run.state.model.l0_module
            assert module.plan.target is not None and int(module.fixed_shape[0]) > 0
    if "hold_ranked" in changes:  # the held family never moved from its start
        held = full.state.model.l0_module.log_alpha["hidden"].detach()
        assert torch.all(held == torch.tensor(math.log(100.0)))
    expected, got = l0_state(full), l0_state(resumed)
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    weights = dict(full.state.model.model.named_parameters())
    for name, p in resumed.state.model.model.named_parameters():
        assert torch.equal(p, weights[name]), name
