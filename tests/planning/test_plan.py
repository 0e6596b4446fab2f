"""`llmshearing plan`: the memory estimates against what real training steps hold on the CPU, the
sharding arithmetic, FLOPs and hours, and the command (fits, does not fit, bad input)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import TINY_MODEL

from llmshearing.cli import main
from llmshearing.models.composer_model import ComposerLlama
from llmshearing.models.config import ModelConfig
from llmshearing.models.decoder import Decoder
from llmshearing.models.schema import state_shapes
from llmshearing.models.teacher import DistillationConfig, Teacher
from llmshearing.planning import memory as mem
from llmshearing.planning.measure import measure_step, saved_bytes
from llmshearing.planning.memory import Dtypes, step_dtypes
from llmshearing.planning.plan import Hardware, RunShape, fewest_gpus, make_plan, stages, throughput
from llmshearing.planning.step import StepSettings, step_memory, weight_bytes
from llmshearing.pruning import attach_l0_module
from llmshearing.training.builders import build_optimizer
from llmshearing.training.run_config import OptimizerSettings

TOLERANCE = 0.15
TINY = ModelConfig(**{**TINY_MODEL, "attn_impl": "sdpa"})
TINY_TARGET = {"n_layers": 2, "n_heads": 2, "n_kv_heads": 2, "d_model": 24, "intermediate_size": 32}
# SmolLM2-135M's shape with two of its 30 blocks (the figures are per block and per token)
SMOLLM2_2L = ModelConfig(
    vocab_size=49152,
    d_model=576,
    n_layers=2,
    n_heads=9,
    n_kv_heads=3,
    head_dim=64,
    intermediate_size=1536,
    tie_word_embeddings=True,
    rope_theta=100000.0,
    attn_impl="sdpa",
)
SMOLLM2_TARGET = {"n_layers": 1, "n_heads": 6, "n_kv_heads": 3, "d_model": 448, "intermediate_size": 1024}
OPTIMIZER = OptimizerSettings(name="decoupled_adamw", lr=1e-4, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.0)
FAMILIES = ("layer", "head", "intermediate", "hidden")
PAPER_PRUNE = "yamls/pruning/llama2-7b-to-1.3b.yaml"
LLAMA2_7B = "yamls/sources/llama2-7b.json"


def _model(config: ModelConfig, target: dict | None, teacher: bool, chunk: int) -> ComposerLlama:
    torch.manual_seed(0)
    model = ComposerLlama(config, domains=["a"])
    if target is not None:
        attach_l0_module(model, {"pruning_modules": list(FAMILIES), "target_model": target})
    if teacher:
        decoder = Decoder(config)
        decoder.init_weights()
        model.attach_teacher(
            Teacher(decoder, "source"), DistillationConfig(teacher="source", chunk_size=chunk)
        )
    return model


def _compare(config: ModelConfig, batch: int, seq: int, checkpointing: bool, target, teacher: bool, chunk=32):
    model = _model(config, target, teacher, chunk)
    inputs = {"input_ids": torch.randint(0, config.vocab_size, (batch, seq))}
    measured = measure_step(model, inputs, build_optimizer(OPTIMIZER, model), checkpointing)
    settings = StepSettings(
        batch,
        seq,
        step_dtypes("fp32", None),
        checkpointing,
        l0_families=FAMILIES if target else (),
        kd_chunk=chunk if teacher else None,
    )
    estimate = step_memory(config, settings, config if teacher else None)
    return measured, estimate, settings


CASES = [  # micro-batch, length, checkpointing, pruning, teacher
    (2, 16, False, False, False),
    (8, 64, False, True, False),
    (8, 64, True, True, False),
    (4, 64, False, False, True),
    (8, 64, True, True, True),
    (16, 32, True, False, False),
]


@pytest.mark.parametrize(("batch", "seq", "checkpointing", "pruning", "teacher"), CASES)
def test_tiny_step_peak_within_15_percent(batch, seq, checkpointing, pruning, teacher):
    measured, estimate, _ = _compare(
        TINY, batch, seq, checkpointing, TINY_TARGET if pruning else None, teacher
    )
    ratio = estimate.total / measured.peak
    assert abs(ratio - 1) <= TOLERANCE, (ratio, estimate.phase, estimate.parts, measured)
    # weights, gradients and optimizer state are exact counts
    params = TINY.num_params() + (mem.l0_params(TINY, FAMILIES) if pruning else 0)
    assert measured.params == measured.grads == 4 * params
    assert abs(measured.optimizer - 8 * params) <= 64 * 8  # + AdamW's step counters


@pytest.mark.parametrize("pruning", [False, True])
def test_tiny_saved_activations_match_the_decoder(pruning):
    """Bytes saved for the backward by every block, the final norm and the loss, as the decoder keeps them."""
    model = _model(TINY, TINY_TARGET if pruning else None, False, 32)
    tokens, masks = 8 * 64, frozenset(FAMILIES if pruning else ())
    measured = saved_bytes(model, {"input_ids": torch.randint(0, TINY.vocab_size, (8, 64))})
    dtypes = step_dtypes("fp32", None)
    estimate = (
        TINY.n_layers * mem.block_activation_bytes(TINY, tokens, dtypes, masks)
        + mem.outside_block_bytes(TINY, tokens, dtypes, masks)
        + tokens * TINY.vocab_size * 4  # the cross-entropy's log-probabilities
    )
    assert abs(estimate / measured - 1) <= 0.05, (estimate, measured)


def test_bf16_saved_activations_match():
    """Under FSDP's bf16 mixed precision the weights are bf16 and autocast runs the loss in fp32."""
    model = _model(TINY, None, False, 32).to(torch.bfloat16)
    tokens = 8 * 64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        measured = saved_bytes(model, {"input_ids": torch.randint(0, TINY.vocab_size, (8, 64))})
    dtypes = Dtypes(2, 2, 2, 2)
    estimate = (
        TINY.n_layers * mem.block_activation_bytes(TINY, tokens, dtypes)
        + mem.outside_block_bytes(TINY, tokens, dtypes, frozenset())
        + tokens * TINY.vocab_size * 4
    )
    assert abs(estimate / measured - 1) <= 0.05, (estimate, measured)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("batch", "seq", "checkpointing", "pruning", "teacher"),
    [(1, 128, False, False, False), (4, 256, False, True, False), (4, 256, True, True, True)],
)
def test_smollm2_shaped_step_peak_within_15_percent(batch, seq, checkpointing, pruning, teacher):
    measured, estimate, _ = _compare(
        SMOLLM2_2L, batch, seq, checkpointing, SMOLLM2_TARGET if pruning else None, teacher, chunk=256
    )
    ratio = estimate.total / measured.peak
    assert abs(ratio - 1) <= TOLERANCE, (ratio, estimate.phase, estimate.parts, measured)


def _fsdp2_local_elements(config: ModelConfig, ranks: int, rank: int = 0) -> int:
    """Elements FSDP2's fully_shard leaves on ``rank``: each parameter split by rows, padded to ``ranks`` chunks."""
    total = 0
    for shape in state_shapes(config).values():
        rows = math.ceil(shape[0] / ranks)
        mine = max(0, min(rows, shape[0] - rank * rows))
        total += mine * math.prod(shape[1:])
    return total


@pytest.mark.parametrize("ranks", [1, 2, 4])
@pytest.mark.parametrize("config", [TINY, SMOLLM2_2L], ids=["tiny", "smollm2"])
def test_sharded_weight_and_optimizer_shares(config, ranks):
    settings = StepSettings(1, 16, step_dtypes("amp_bf16", "DEFAULT"), shards=ranks, strategy="FULL_SHARD")
    parts = weight_bytes(config, settings)
    local = _fsdp2_local_elements(config, ranks)
    assert parts["weights (fp32 master)"] == pytest.approx(4 * local, rel=0.02)
    assert parts["optimizer (AdamW, 2 x fp32)"] == pytest.approx(8 * local, rel=0.02)
    assert parts["gradients (fp32)"] == pytest.approx(4 * local, rel=0.02)


@pytest.mark.parametrize("ranks", [2, 4])
def test_teacher_share_follows_shard_teacher(ranks):
    """Blocks sharded over the ranks, embeddings, final norm and head whole on every rank."""
    settings = StepSettings(1, 16, step_dtypes("amp_bf16", "DEFAULT"), shards=ranks, strategy="FULL_SHARD")
    estimate = step_memory(SMOLLM2_2L, settings, SMOLLM2_2L)
    shapes = state_shapes(SMOLLM2_2L)
    outside = sum(math.prod(s) for k, s in shapes.items() if not k.startswith("layers."))
    blocks = sum(
        math.ceil(s[0] / ranks) * math.prod(s[1:]) for k, s in shapes.items() if k.startswith("layers.")
    )
    assert estimate.parts["teacher weights"] == pytest.approx(2 * (outside + blocks), rel=0.02)


def test_checkpointing_and_micro_batch_lower_the_peak():
    base = StepSettings(4, 4096, step_dtypes("amp_bf16", "DEFAULT"), shards=8, strategy="FULL_SHARD")
    config = ModelConfig.from_dict(
        {
            "vocab_size": 32000,
            "d_model": 4096,
            "n_layers": 32,
            "n_heads": 32,
            "n_kv_heads": 32,
            "head_dim": 128,
            "intermediate_size": 11008,
        }
    )
    plain = step_memory(config, base).total
    checkpointed = step_memory(config, StepSettings(**{**base.__dict__, "checkpointing": True})).total
    smaller = step_memory(config, StepSettings(**{**base.__dict__, "micro_batch": 1})).total
    assert checkpointed < plain / 3 and smaller < plain / 2


def test_throughput_reuses_the_model_flops():
    shape = RunShape(
        stage="pruning",
        student=TINY,
        teacher=TINY,
        seq_len=64,
        global_batch=8,
        micro_batch=2,
        eval_batch=4,
        steps=100,
        precision="amp_bf16",
        fsdp=True,
        strategy="FULL_SHARD",
        mixed_precision="DEFAULT",
        checkpointing=True,
        flash=True,
        kd_chunk=64,
    )
    hardware = Hardware(gpus=2, gpu_memory=80 * 1024**3, gpu_flops=100e12, mfu=0.5)
    speed = throughput(shape, hardware)
    per_token = TINY.train_flops_per_token(64) + TINY.train_flops_per_token(64) // 3
    assert speed.flops_per_token == per_token
    assert speed.tokens_per_second == pytest.approx(0.5 * 100e12 * 2 / per_token)
    assert speed.hours == pytest.approx(100 * 8 * 64 / speed.tokens_per_second / 3600)


def _paper_shape() -> RunShape:
    from llmshearing.planning.commands import read_run

    shape, _ = read_run(PAPER_PRUNE, ["fsdp_config.activation_checkpointing=false"], 8, LLAMA2_7B, None)
    return shape


def test_fewest_gpus_is_the_boundary():
    shape = _paper_shape()
    hardware = Hardware(gpus=8, gpu_memory=80 * 1024**3)
    fewest = fewest_gpus(shape, hardware)
    assert fewest is not None and fewest > 1
    fitting = [
        all(s.total <= hardware.usable for s in stages(shape, Hardware(n, hardware.gpu_memory)))
        for n in (fewest,)
    ]
    assert fitting == [True]
    below = max(n for n in range(1, fewest) if shape.global_batch % n == 0)
    assert any(s.total > hardware.usable for s in stages(shape, Hardware(below, hardware.gpu_memory)))
    plan = make_plan(shape, Hardware(gpus=below, gpu_memory=80 * 1024**3))
    assert plan.failing and plan.fewest == fewest


def test_plan_command_paper_recipe(capsys):
    code = main(["plan", PAPER_PRUNE, "--gpus", "8", "--gpu-memory", "80GB", "--source-config", LLAMA2_7B])
    out = capsys.readouterr().out
    assert code == 0
    assert "(estimates)" in out and "pruning (training step)" in out and "fits" in out
    assert "6.74 B parameters" in out and "every rank reads the whole source" in out
    assert "tokens/s" in out and "3,200 steps" in out


def test_plan_does_not_import_composer():
    """The planner is a quick tool (seconds): it validates the recipe without Composer, whose classes only the
    callbacks' and loggers' settings need; the run checks those itself (tests/training/test_train_config.py)."""
    probe = (
        "import sys\n"
        "from llmshearing.cli import main\n"
        f"code = main(['plan', {PAPER_PRUNE!r}, '--gpus', '8', '--source-config', {LLAMA2_7B!r}])\n"
        "print('composer imported:', 'composer' in sys.modules)\n"
        "sys.exit(code)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "pruning (training step)" in done.stdout
    assert "composer imported: False" in done.stdout


def test_plan_command_json(capsys):
    code = main(
        ["plan", PAPER_PRUNE, "--gpus", "8", "--source-config", LLAMA2_7B, "--json", "--host-memory", "1TB"]
    )
    plan = json.loads(capsys.readouterr().out)
    assert code == 0 and plan["fits"] and plan["estimate"] and plan["host_fits"]
    assert plan["source"]["n_layers"] == 32 and plan["fewest_gpus"] <= 8
    train = plan["stages"][0]
    assert train["bytes"] == sum(train["parts"].values()) and train["fits"]
    assert plan["tokens_per_step"] == 32 * 4096


def test_plan_host_memory_with_rank0_loading(capsys):
    # model.init_device=mixed: rank 0 alone reads the source, so node 0 holds one copy instead of eight
    args = ["plan", PAPER_PRUNE, "--gpus", "8", "--source-config", LLAMA2_7B, "--json"]
    assert main(args) == 0
    every_rank = json.loads(capsys.readouterr().out)["host_bytes_per_node"]
    assert main([*args[:2], "model.init_device=mixed", *args[2:]]) == 0
    rank0 = json.loads(capsys.readouterr().out)["host_bytes_per_node"]
    assert every_rank == 8 * rank0 and rank0 == 4 * 6_738_415_616
    assert main([*args[:2], "model.init_device=mixed", *args[2:-1]]) == 0
    assert "rank 0 alone reads the whole source" in capsys.readouterr().out
    assert main([*args, "model.init_device=mixed"]) == 0  # overrides may follow the options too
    assert json.loads(capsys.readouterr().out)["host_bytes_per_node"] == rank0


def test_plan_refuses_an_unknown_option_after_the_overrides(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["plan", PAPER_PRUNE, "--gpus", "8", "--source-config", LLAMA2_7B, "seed=3", "--nodes", "4"])
    assert stop.value.code == 2
    assert "unrecognized arguments: --nodes 4" in capsys.readouterr().err


def test_plan_that_does_not_fit_exits_1_naming_stage_shortfall_and_gpus(capsys):
    code = main(
        [
            "plan",
            PAPER_PRUNE,
            "fsdp_config.activation_checkpointing=false",
            "--gpus",
            "8",
            "--gpu-memory",
            "40GB",
            "--source-config",
            LLAMA2_7B,
        ]
    )
    captured = capsys.readouterr()
    assert code == 1
    line = captured.err.strip().splitlines()[-1]
    assert line.startswith("llmshearing plan: error: pruning (training step) needs")
    assert "more than the" in line and ("fewest" in line or "no GPU count" in line)
    assert "DOES NOT FIT" in captured.out and "to fit, change one of:" in captured.out
    assert "fsdp_config.activation_checkpointing=true" in captured.out


def test_evaluation_that_does_not_fit_names_the_eval_batch(capsys):
    code = main(
        [
            "plan",
            PAPER_PRUNE,
            "device_eval_batch_size=32",
            "--gpus",
            "8",
            "--gpu-memory",
            "40GB",
            "--source-config",
            LLAMA2_7B,
        ]
    )
    captured = capsys.readouterr()
    assert code == 1 and "evaluation needs" in captured.err
    assert "device_eval_batch_size=" in captured.out


def test_plan_reads_the_source_checkpoint_config(tiny_source, capsys):
    code = main(
        ["plan", "yamls/tiny/prune.yaml", f"model.path={tiny_source}", "--gpus", "1", "--gpu-memory", "2GB"]
    )
    out = capsys.readouterr().out
    assert code == 0 and f"{tiny_source}/config.json" in out and "3L, 4 heads over 2 KV groups" in out


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        ([PAPER_PRUNE, "--gpus", "8"], "--source-config"),
        ([PAPER_PRUNE, "--gpus", "8", "--source-config", "nope.json"], "nope.json"),
        ([PAPER_PRUNE, "--gpus", "8", "--source-config", LLAMA2_7B, "--gpu-memory", "lots"], "--gpu-memory"),
        ([PAPER_PRUNE, "--gpus", "5", "--source-config", LLAMA2_7B], "global_train_batch_size"),
        ([PAPER_PRUNE, "--gpus", "8", "--source-config", "yamls/sources/llama3-8b.json"], "target"),
        ([PAPER_PRUNE, "--gpus", "8", "--source-config", LLAMA2_7B, "--mfu", "40"], "--mfu"),
    ],
)
def test_plan_bad_input_is_one_line_exit_2(argv, needle, capsys):
    code = main(["plan", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0] and "Traceback" not in err[0]
