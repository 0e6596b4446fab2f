"""Sharded training with Composer's FSDP2 on CPU (gloo, two ranks as ``composer -n 2`` starts them) against one process.

Pruning (dynamic loading, source reference, importance-ranked masks, the hidden family held at its ranked
cut, gradient clipping; FULL_SHARD, sharded checkpoints) and continued pretraining (train-loss mixing,
distillation from the source, whose blocks are sharded too; SHARD_GRAD_OP, activation checkpointing, full
checkpoints) run once per module in one process and under FSDP2 with the same global batch; the tests
compare masks, mix, losses and weights (fp32, 1e-5), resume a sharded run bit-identically, fold the sharded
checkpoint, and check the errors of a misconfigured ``fsdp_config``.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    PORTS,
    RANK0,
    SHARDED,
    checkpoint_tensors,
    icl_recipe_args,
    logged_metrics,
    run_args,
    run_two_ranks,
)

from llmshearing.callbacks.sample_log import read_sample_log
from llmshearing.checkpoint.loading import from_pretrained
from llmshearing.checkpoint.reading import open_checkpoint
from llmshearing.checkpoint.sharded import is_sharded_checkpoint
from llmshearing.cli import main as cli_main
from llmshearing.train import main as train_main
from llmshearing.training.config import load_config
from llmshearing.training.fsdp import shard_teacher
from llmshearing.training.fsdp_settings import FSDPConfigError, resolve_fsdp

PRUNE = "yamls/tiny/prune.yaml"
CONTINUED = "yamls/tiny/continued.yaml"
FULL = [
    "fsdp_config.sharding_strategy=SHARD_GRAD_OP",
    "fsdp_config.state_dict_type=full",
    "fsdp_config.activation_checkpointing=true",
]
PRUNE_EXTRA = [
    "callbacks.sample_log={}",
    "save_interval=2ba",
    "callbacks.data_loading.reference=source",
    "callbacks.data_loading.target_loss=null",
    "model.l0_module.init_from=importance",  # each rank calibrates on its share; the sums are all-reduced
    "model.l0_module.init_samples=8",
    "model.l0_module.lagrangian_warmup_steps=0ba",
    # held masks get a zero gradient on every rank, averaged like the learned ones: nothing may drift
    "model.l0_module.hold_ranked=[hidden]",
]
CONTINUED_EXTRA = ["callbacks.sample_log={}", "max_duration=8ba", "callbacks.data_loading.loss_source=train"]


def _single(recipe: str, args: list[str]) -> None:
    """The one-process run, in this process (a process of its own would spend seconds importing Composer)."""
    assert train_main([recipe, *args]) == 0


@pytest.fixture(scope="module")
def runs(tiny_source, tiny_mds, tmp_path_factory):
    """One-process and FSDP2 runs of the tiny pruning and continued recipes (and the FSDP2 launch log)."""
    from streaming.base.util import clean_stale_shared_memory

    root = tmp_path_factory.mktemp("fsdp")
    clean_stale_shared_memory()
    icl = icl_recipe_args(root / "tokenizer")  # downstream tasks at every evaluation (eval_tasks)
    _single(PRUNE, run_args(tiny_source, tiny_mds, root / "prune-one", *PRUNE_EXTRA, *icl))
    log = run_two_ranks(
        PRUNE, run_args(tiny_source, tiny_mds, root / "prune-fsdp", *PRUNE_EXTRA, *SHARDED, *icl)
    )
    distil = [f"model.distillation.teacher={tiny_source}", "model.distillation.alpha=0.5"]
    _single(CONTINUED, run_args(tiny_source, tiny_mds, root / "cont-one", *CONTINUED_EXTRA, *distil, *icl))
    distil_log = run_two_ranks(
        CONTINUED, run_args(tiny_source, tiny_mds, root / "cont-fsdp", *CONTINUED_EXTRA, *distil, *FULL, *icl)
    )
    # the same run with the source and the teacher read on rank 0 alone (no downstream tasks: they do not
    # touch the training, test_fsdp2_downstream_scores_match_one_process)
    mixed_log = run_two_ranks(
        CONTINUED,
        run_args(tiny_source, tiny_mds, root / "cont-mixed", *CONTINUED_EXTRA, *distil, *FULL, RANK0),
    )
    clean_stale_shared_memory()
    return {
        "root": root,
        "log": log,
        "distil_log": distil_log,
        "mixed_log": mixed_log,
        "teacher": tiny_source,
    }


def _assert_same_run(one: Path, fsdp: Path) -> None:
    a, b = logged_metrics(one), logged_metrics(fsdp)
    assert a.keys() == b.keys()
    for key, value in a.items():  # losses, per-domain metrics, mix weights, L0 statistics, downstream tasks
        if key[1].startswith(("distill/teacher_", "wall_clock/")):  # wall-clock time
            continue
        assert b[key] == pytest.approx(value, abs=1e-5 * max(1.0, abs(value))), key  # relative above 1
    weights_a, weights_b = checkpoint_tensors(one), checkpoint_tensors(fsdp)
    assert weights_a.keys() == weights_b.keys()
    for key, value in weights_a.items():
        torch.testing.assert_close(weights_b[key], value, rtol=0, atol=1e-5, msg=key)
    samples = read_sample_log(str(one / "samples-rank0.jsonl"))
    ranks = [read_sample_log(str(fsdp / f"samples-rank{r}.jsonl")) for r in (0, 1)]
    for batch, ids in samples.items():  # each global batch is split between the ranks
        assert sorted(ids) == sorted(ranks[0][batch] + ranks[1][batch]), batch


@pytest.mark.slow
def test_fsdp2_pruning_matches_one_process(runs):
    one, fsdp = runs["root"] / "prune-one", runs["root"] / "prune-fsdp"
    assert "FSDP2 (FULL_SHARD" in runs["log"] and "world size 2; per-rank batch 2" in runs["log"]
    assert "hidden held at the ranked cut" in runs["log"], runs["log"][-3000:]
    assert is_sharded_checkpoint((fsdp / "checkpoints" / "latest-rank0.pt").resolve())
    _assert_same_run(one, fsdp)
    for name in ("ba4.pt", "ba8.pt", "ba12.pt"):  # the same masks at every evaluation
        masks_a = torch.load(one / "masks" / name, weights_only=False)
        masks_b = torch.load(fsdp / "masks" / name, weights_only=False)
        assert masks_a["keep"] == masks_b["keep"]
        for family, mask in masks_a["masks"].items():
            assert torch.equal(mask != 0, masks_b["masks"][family] != 0), (name, family)
        held = masks_b["masks"]["hidden"]  # the ranked cut, at exactly 1, on both ranks' shared copy
        assert set(held.unique().tolist()) == {0.0, 1.0} and torch.equal(held, masks_a["masks"]["hidden"])
    init = json.loads((fsdp / "config.json").read_text())["l0_init"]  # calibrated once, cost recorded
    assert init["source"] == "importance" and init["device"] == "cpu" and init["seconds"] >= 0
    counts = [(k, v) for k, v in logged_metrics(one).items() if k[1].startswith("data/count/")]
    assert counts and all(
        logged_metrics(fsdp)[k] == v for k, v in counts
    )  # the same integer mix at every update


@pytest.mark.slow
def test_fsdp2_continued_pretraining_matches_one_process(runs):
    fsdp = runs["root"] / "cont-fsdp"
    assert (fsdp / "checkpoints" / "latest-rank0.pt").resolve().is_file()  # state_dict_type: full
    _assert_same_run(runs["root"] / "cont-one", fsdp)
    assert any(name == "loss/train/kd" for _, name in logged_metrics(fsdp))  # the teacher was in the loss
    # the teacher's blocks were sharded too: rank 0 holds half of them plus the whole embeddings and head
    found = re.search(
        r"teacher: blocks sharded over 2 ranks; .* ([\d,]+) of ([\d,]+) parameters", runs["distil_log"]
    )
    assert found, runs["distil_log"][-3000:]
    local, total = (int(n.replace(",", "")) for n in found.groups())
    params = dict(from_pretrained(runs["teacher"]).named_parameters())
    whole = sum(p.numel() for name, p in params.items() if not name.startswith("layers."))
    halves = sum(
        -(-p.shape[0] // 2) * p[0].numel() for name, p in params.items() if name.startswith("layers.")
    )
    assert (local, total) == (whole + halves, sum(p.numel() for p in params.values()))


@pytest.mark.slow
def test_fsdp2_downstream_scores_match_one_process(runs):
    """eval_tasks under FSDP2 (zero-shot documents shared between the ranks, the 2-shot task scored whole by
    each): the values of one process at every evaluation, the masked model in pruning and the dense one in
    continued pretraining (compared with the other metrics by _assert_same_run: relative 1e-5)."""
    for one, fsdp in (("prune-one", "prune-fsdp"), ("cont-one", "cont-fsdp")):
        a, b = logged_metrics(runs["root"] / one), logged_metrics(runs["root"] / fsdp)
        scored = {key for key in a if key[1].startswith("icl/")}
        assert {name for _, name in scored} == {
            "icl/local_mc/acc", "icl/local_mc/acc_norm", "icl/cloze/acc", "icl/cloze/perplexity"
        }  # fmt: skip
        assert {step for step, _ in scored} == ({0, 4, 8, 12} if one == "prune-one" else {4, 8})
        for key in scored:
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
    # and the training itself is untouched: the resumed run, which scores no tasks, ends bit-identical to
    # prune-fsdp (test_sharded_run_resumes_bit_identically)


def _assert_identical_training(every_rank: Path, rank0: Path) -> None:
    """Losses, mix, L0 statistics and the saved model of two runs bit for bit (the metrics ``rank0`` logs)."""
    a, b = logged_metrics(every_rank), logged_metrics(rank0)
    compared = [k for k in b if not k[1].startswith(("distill/teacher_", "wall_clock/", "time/"))]
    assert any(k[1].startswith("loss/train") for k in compared)
    assert not [k for k in compared if a.get(k) != b[k]], [
        (k, a.get(k), b[k]) for k in compared if a.get(k) != b[k]
    ][:5]
    weights_a, weights_b = checkpoint_tensors(every_rank), checkpoint_tensors(rank0)
    assert weights_a.keys() == weights_b.keys()
    for key, value in weights_a.items():
        assert torch.equal(weights_b[key], value), key


@pytest.mark.slow
def test_sharded_run_resumes_bit_identically(runs, tiny_source, tiny_mds):
    # the stopped-and-resumed run also reads the source on rank 0 alone (model.init_device=mixed), the
    # straight one on every rank: the masks, losses and checkpoints must not tell them apart
    from streaming.base.util import clean_stale_shared_memory

    straight, resumed = runs["root"] / "prune-fsdp", runs["root"] / "prune-resumed"
    args = run_args(tiny_source, tiny_mds, resumed, *PRUNE_EXTRA, *SHARDED, "autoresume=true", RANK0)
    clean_stale_shared_memory()
    first = run_two_ranks(
        PRUNE, args, script=["tests/scripts/train_until.py", "6"], expect=3
    )  # stops mid-interval
    assert "source read on rank 0 (1 of 2 ranks, model.init_device=mixed)" in first, first[-3000:]
    assert "calibrating on 8 train samples (on rank 0)" in first  # the other ranks hold no weights yet
    assert "source read on every rank (2 of 2 ranks" in runs["log"]
    assert os.readlink(resumed / "checkpoints" / "latest-rank0.pt") == "ep1-ba6"
    # the resumed start keeps two checkpoints, counting the three the first start saved
    second = run_two_ranks(PRUNE, [*args, "save_num_checkpoints_to_keep=2"])
    clean_stale_shared_memory()
    assert f"resumed from {resumed / 'checkpoints' / 'ep1-ba6'} at batch 6 of 12" in second
    assert "calibrating" not in second and "mask ranking not redone" in second  # the checkpoint holds them
    kept = sorted(p.name for p in (resumed / "checkpoints").iterdir() if not p.is_symlink())
    assert [re.sub(r"^ep\d+-", "", name) for name in kept] == ["ba10", "ba12"], kept
    _assert_identical_training(straight, resumed)  # losses, L0 statistics, weights, log-alphas, multipliers
    assert any(k.startswith("l0_module.multipliers") for k in checkpoint_tensors(resumed))
    for name in ("ba4.pt", "ba8.pt", "ba12.pt"):
        masks_a = torch.load(straight / "masks" / name, weights_only=False)["masks"]
        masks_b = torch.load(resumed / "masks" / name, weights_only=False)["masks"]
        assert all(torch.equal(masks_a[f], masks_b[f]) for f in masks_a), name
    mix = {k: v for k, v in logged_metrics(straight).items() if k[1].startswith("data/") and k[0] > 6}
    resumed_metrics = logged_metrics(resumed)
    assert mix and all(resumed_metrics[k] == v for k, v in mix.items())
    for rank in (0, 1):
        assert read_sample_log(str(straight / f"samples-rank{rank}.jsonl")) == read_sample_log(
            str(resumed / f"samples-rank{rank}.jsonl")
        )


@pytest.mark.slow
def test_rank0_loading_of_source_and_teacher_matches_every_rank_loading(runs):
    """Continued pretraining with distillation (SHARD_GRAD_OP, full checkpoints, tied embeddings) with the
    source and the teacher read on rank 0 alone: losses (the KD term included) and the saved checkpoint
    bit-identical to the run where every rank reads both (pruning: test_sharded_run_resumes_bit_identically)."""
    log = runs["mixed_log"]
    assert (
        "source and teacher read on rank 0 (1 of 2 ranks, model.init_device=mixed), the other ranks built on "
        "meta; broadcast to the shards once FSDP has wrapped the model"
    ) in log, log[-3000:]
    assert "source and teacher read on every rank (2 of 2 ranks, model.init_device=cpu)" in runs["distil_log"]
    assert "teacher: blocks sharded over 2 ranks" in log
    every_rank, rank0 = runs["root"] / "cont-fsdp", runs["root"] / "cont-mixed"
    assert any(name == "loss/train/kd" for _, name in logged_metrics(rank0))
    _assert_identical_training(every_rank, rank0)
    description = json.loads((rank0 / "config.json").read_text())
    assert description["loading"].startswith("source and teacher read on rank 0")


@pytest.mark.slow
def test_prune_model_reads_a_sharded_checkpoint(runs, tmp_path, capsys):
    one, fsdp = runs["root"] / "prune-one", runs["root"] / "prune-fsdp"
    for run, out in ((one, tmp_path / "from-pt"), (fsdp, tmp_path / "from-sharded")):
        assert cli_main(["prune-model", str(run / "checkpoints" / "latest-rank0.pt"), str(out)]) == 0
    with open_checkpoint(tmp_path / "from-pt") as a, open_checkpoint(tmp_path / "from-sharded") as b:
        assert a.config == b.config
        assert a.tensors.keys() == b.tensors.keys()
        for key in a.tensors.keys():
            torch.testing.assert_close(b.tensors.get(key), a.tensors.get(key), rtol=0, atol=1e-5, msg=key)
    # the exporter opens the sharded directory too, and points a pruning checkpoint to prune-model
    sharded = str(fsdp / "checkpoints" / "latest-rank0.pt")
    assert cli_main(["convert", "composer-to-hf", sharded, str(tmp_path / "refused")]) == 2
    assert "prune-model" in capsys.readouterr().err and not (tmp_path / "refused").exists()
    hf = tmp_path / "hf"
    assert cli_main(["convert", "composer-to-hf", str(tmp_path / "from-sharded"), str(hf)]) == 0
    assert (hf / "config.json").is_file()


# ------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("override", "environ", "expected"),
    [
        ("fsdp_config.sharding_strategy=HALF_SHARD", {"FSDP_VERSION": "2"}, "fsdp_config.sharding_strategy"),
        ("fsdp_config.sharding_strategy=FULL_SHARD", {"FSDP_VERSION": "1"}, "FSDP_VERSION=2"),
        ("fsdp_config.mixed_precision=HALF", {"FSDP_VERSION": "2"}, "fsdp_config.mixed_precision"),
        (
            "fsdp_config.state_dict_typ=full",
            {"FSDP_VERSION": "2"},
            "did you mean fsdp_config.state_dict_type",
        ),
        ("fsdp_config.sharding_strategy=HYBRID_SHARD", {"FSDP_VERSION": "2"}, "FULL_SHARD or SHARD_GRAD_OP"),
        (
            "fsdp_config.sharding_strategy=FULL_SHARD",
            {"FSDP_VERSION": "3"},
            "FSDP_VERSION=1 or FSDP_VERSION=2",
        ),
        ("fsdp_config.use_orig_params=false", {}, "fsdp_config.use_orig_params: false"),
        (
            "fsdp_config.activation_checkpointing_reentrant=true",
            {"FSDP_VERSION": "2"},
            "fsdp_config.activation_checkpointing_reentrant: true",
        ),
    ],
)
def test_misconfigured_fsdp_is_a_clear_error_before_anything_runs(
    tiny_source, tiny_mds, tmp_path, capsys, monkeypatch, override, environ, expected
):
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    folder = tmp_path / "run"
    assert train_main([PRUNE, *run_args(tiny_source, tiny_mds, folder), override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and "Traceback" not in err
    assert not folder.exists()


def test_fsdp1_is_chosen_on_gpus_and_fsdp2_translates_the_strategy():
    plan = resolve_fsdp({"sharding_strategy": "full_shard", "mixed_precision": "PURE"}, cuda=True, environ={})
    assert plan.version == 1 and plan.parallelism == {
        "fsdp": {
            "sharding_strategy": "FULL_SHARD",
            "mixed_precision": "PURE",
            "activation_checkpointing_reentrant": False,
        }
    }
    plan = resolve_fsdp(
        {"sharding_strategy": "SHARD_GRAD_OP", "limit_all_gathers": True},
        cuda=False,
        environ={"FSDP_VERSION": "2"},
    )
    assert plan.version == 2 and plan.parallelism["fsdp"].reshard_after_forward is False
    assert plan.state_dict_type == "sharded"
    assert resolve_fsdp(None, cuda=True, environ={}) is None
    with pytest.raises(FSDPConfigError, match="must be a mapping"):
        resolve_fsdp("FULL_SHARD", cuda=True, environ={})


def test_rank0_loading_turns_on_sync_module_states_for_both_fsdp_versions():
    from composer.utils.parallelism import FSDPConfig

    from llmshearing.training.fsdp_settings import with_rank0_loading

    fsdp1 = with_rank0_loading(resolve_fsdp({"sharding_strategy": "FULL_SHARD"}, cuda=True, environ={}))
    handed = FSDPConfig(**fsdp1.parallelism["fsdp"])  # Composer refuses meta ranks without it
    assert handed.sync_module_states and not handed.activation_checkpointing_reentrant
    fsdp2 = with_rank0_loading(
        resolve_fsdp({"sharding_strategy": "FULL_SHARD"}, environ={"FSDP_VERSION": "2"})
    )
    assert fsdp2.parallelism["fsdp"].sync_module_states


def test_a_teacher_on_meta_reads_no_weights(tiny_source):
    from llmshearing.checkpoint.loading import load_teacher

    teacher = load_teacher(tiny_source, torch.float32, "sdpa", on_meta=True)
    decoder = teacher.module()
    assert all(p.is_meta and not p.requires_grad for p in decoder.parameters())
    assert decoder.inv_freq.device.type == "cpu" and torch.isfinite(decoder.inv_freq).all()  # RoPE is real


def test_a_teacher_stays_whole_in_one_process_and_with_no_shard(tiny_source):
    from torch.distributed.tensor import DTensor

    from llmshearing.checkpoint.loading import load_teacher

    teacher = load_teacher(tiny_source, torch.float32, "sdpa")
    total = sum(p.numel() for p in teacher.module().parameters())
    for strategy in ("FULL_SHARD", "NO_SHARD"):
        plan = resolve_fsdp({"sharding_strategy": strategy}, cuda=True, environ={})
        summary = shard_teacher(teacher, plan, torch.device("cpu"))
        assert summary == f"distillation teacher: whole on every rank ({total:,} parameters)"
    assert not any(isinstance(p, DTensor) for p in teacher.module().parameters())


def test_sharded_checkpoint_cut_off_while_written_is_set_aside(tmp_path):
    # a sharded checkpoint is a directory whose .metadata index is written last; one without it was
    # cut off, and autoresume must fall back to the newest complete one
    from torch.distributed.checkpoint import FileSystemWriter, save

    from llmshearing.checkpoint.composer_files import repair_checkpoint_folder

    folder = tmp_path / "checkpoints"
    save(
        {"state.model.model.w": torch.ones(2)},
        storage_writer=FileSystemWriter(str(folder / "ep0-ba4")),
        no_dist=True,
    )
    (folder / "ep1-ba8").mkdir()
    (folder / "ep1-ba8" / "__0_0.distcp").write_bytes(b"partial")
    os.symlink("ep1-ba8", folder / "latest-rank0.pt")
    changed = repair_checkpoint_folder(folder)
    assert (folder / "ep1-ba8.incomplete").is_dir() and not (folder / "ep1-ba8").exists()
    assert os.readlink(folder / "latest-rank0.pt") == "ep0-ba4" and len(changed) == 2


# ------------------------------------------------------------------- what FSDP1 is handed on GPUs
def _masked_gradients(checkpoint_impl=None) -> dict[str, torch.Tensor]:
    """Gradients of one masked pruning step of a small model; with ``checkpoint_impl`` its decoder blocks
    are wrapped for activation checkpointing as Composer's FSDP1 wraps them (``apply_activation_checkpointing``
    with ``checkpoint_wrapper(block, checkpoint_impl=...)``, selected by ``activation_checkpointing_fn``)."""
    from conftest import PRUNABLE_MODEL, PRUNABLE_TARGET
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    from llmshearing.models.composer_model import ComposerLlama
    from llmshearing.models.config import ModelConfig
    from llmshearing.pruning import attach_l0_module

    torch.manual_seed(0)
    model = ComposerLlama(ModelConfig(**PRUNABLE_MODEL, attn_impl="sdpa"), domains=["a"])
    families = ["layer", "head", "kv_head", "intermediate", "hidden"]
    attach_l0_module(model, {"pruning_modules": families, "target_model": PRUNABLE_TARGET})
    if checkpoint_impl is not None:
        decoder = model.model
        apply_activation_checkpointing(
            decoder,
            checkpoint_wrapper_fn=lambda block: checkpoint_wrapper(block, checkpoint_impl=checkpoint_impl),
            check_fn=decoder.activation_checkpointing_fn,
        )
        assert (
            sum(type(m).__name__ == "CheckpointWrapper" for m in decoder.modules())
            == PRUNABLE_MODEL["n_layers"]
        )
    ids = torch.randint(0, PRUNABLE_MODEL["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))
    batch = {
        "input_ids": ids,
        "labels": ids,
        "domain": torch.zeros(2, dtype=torch.long),
        "idx": torch.arange(2),
    }
    torch.manual_seed(5)  # the same mask sample in every variant
    model.loss(model(batch), batch)["total"].backward()
    return {name.replace("._checkpoint_wrapped_module", ""): p.grad for name, p in model.named_parameters()}


def _checkpoint_impl(fsdp1: dict):
    """The checkpoint wrapper Composer 0.32.1's FSDP1 picks for these settings (its default is reentrant)."""
    from composer.utils.parallelism import FSDPConfig
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl

    config = FSDPConfig(**fsdp1)
    return (
        CheckpointImpl.REENTRANT if config.activation_checkpointing_reentrant else CheckpointImpl.NO_REENTRANT
    )


def test_activation_checkpointing_as_handed_to_fsdp1_keeps_mask_and_weight_gradients():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl

    plan = resolve_fsdp({"activation_checkpointing": True}, cuda=True, environ={})
    impl = _checkpoint_impl(plan.parallelism["fsdp"])
    assert impl is CheckpointImpl.NO_REENTRANT
    plain, checkpointed = _masked_gradients(), _masked_gradients(impl)
    assert plain.keys() == checkpointed.keys()
    assert any(k.startswith("l0_module.log_alpha") for k in plain)
    for name, grad in plain.items():
        assert grad is not None and checkpointed[name] is not None, name
        torch.testing.assert_close(checkpointed[name], grad, rtol=0, atol=1e-7, msg=name)
    assert plain["l0_module.log_alpha.head"].abs().sum() > 0  # the masks do receive gradients
    # Composer's default (reentrant) is what the recipe would get without resolve_fsdp: it cannot backpropagate
    assert _checkpoint_impl({"activation_checkpointing": True}) is CheckpointImpl.REENTRANT
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        _masked_gradients(CheckpointImpl.REENTRANT)


@pytest.mark.parametrize(
    "settings",
    [
        {"activation_checkpointing": True},
        {"activation_checkpointing": True, "activation_checkpointing_reentrant": False},
        {"activation_cpu_offload": True, "sharding_strategy": "SHARD_GRAD_OP"},
        {"sharding_strategy": "HYBRID_SHARD", "activation_checkpointing": True},
        {},
    ],
)
def test_resolve_fsdp_never_hands_out_reentrant_checkpointing(settings):
    for environ in ({}, {"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}):
        plan = resolve_fsdp(settings, cuda=True, environ=environ)
        assert plan.parallelism["fsdp"]["activation_checkpointing_reentrant"] is False
        assert _checkpoint_impl(plan.parallelism["fsdp"]).name == "NO_REENTRANT"


def test_hybrid_shard_gets_a_two_dimensional_mesh_from_the_node_count():
    two_nodes = {"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "NODE_RANK": "1", "LOCAL_RANK": "3"}
    plan = resolve_fsdp({"sharding_strategy": "HYBRID_SHARD"}, cuda=True, environ=two_nodes)
    handed = plan.parallelism["fsdp"]
    assert handed["sharding_strategy"] == "HYBRID_SHARD"
    assert (handed["data_parallel_replicate_degree"], handed["data_parallel_shard_degree"]) == (2, 8)
    assert plan.mesh == (2, 8) and plan.runs_as == "HYBRID_SHARD"
    assert plan.describe().startswith(
        "FSDP1 (HYBRID_SHARD over a 2 x 8 mesh: sharded within each node, replicated across 2 nodes"
    )
    zero2 = resolve_fsdp({"sharding_strategy": "_HYBRID_SHARD_ZERO2"}, cuda=True, environ=two_nodes)
    assert zero2.parallelism["fsdp"]["sharding_strategy"] == "_HYBRID_SHARD_ZERO2" and zero2.mesh == (2, 8)

    # Composer builds its mesh from exactly these degrees, and keeps HYBRID_SHARD only on a 2-D mesh
    from composer.utils.parallelism import FSDPConfig

    config = FSDPConfig(**handed)
    assert (config.data_parallel_replicate_degree, config.data_parallel_shard_degree) == (2, 8)

    # one node: nothing to replicate across; the start-up line says what runs
    one_node = resolve_fsdp({"sharding_strategy": "HYBRID_SHARD"}, cuda=True, environ={"WORLD_SIZE": "8"})
    assert one_node.parallelism["fsdp"]["sharding_strategy"] == "FULL_SHARD" and one_node.mesh is None
    assert "data_parallel_replicate_degree" not in one_node.parallelism["fsdp"]
    assert one_node.describe().startswith("FSDP1 (FULL_SHARD; HYBRID_SHARD on one node,")

    with pytest.raises(FSDPConfigError, match="same number of ranks on every node"):
        resolve_fsdp(
            {"sharding_strategy": "HYBRID_SHARD"},
            cuda=True,
            environ={"WORLD_SIZE": "12", "LOCAL_WORLD_SIZE": "8"},
        )
    with pytest.raises(FSDPConfigError, match="data_parallel_replicate_degree"):
        resolve_fsdp(
            {"sharding_strategy": "HYBRID_SHARD", "data_parallel_replicate_degree": 3},
            cuda=True,
            environ=two_nodes,
        )
    # a mesh the recipe states is kept when it fills the ranks (4 replicas of 4 shards here)
    for stated in ({"data_parallel_shard_degree": 4}, {"data_parallel_replicate_degree": 4}):
        chosen = resolve_fsdp({"sharding_strategy": "HYBRID_SHARD", **stated}, cuda=True, environ=two_nodes)
        assert chosen.mesh == (4, 4) and chosen.parallelism["fsdp"]["data_parallel_replicate_degree"] == 4
        assert chosen.describe().startswith(
            "FSDP1 (HYBRID_SHARD over a 4 x 4 mesh: sharded over 4 ranks, 4 replicas,"
        )


def test_orig_params_off_and_reentrant_checkpointing_are_refused_naming_the_key():
    for version in ({}, {"FSDP_VERSION": "2"}):
        with pytest.raises(
            FSDPConfigError, match=r"fsdp_config.use_orig_params: false .* three parameter groups"
        ):
            resolve_fsdp({"use_orig_params": False}, cuda=True, environ=version)
        with pytest.raises(FSDPConfigError, match="fsdp_config.activation_checkpointing_reentrant: true"):
            resolve_fsdp({"activation_checkpointing_reentrant": True}, cuda=True, environ=version)
    assert resolve_fsdp({"use_orig_params": True}, cuda=True, environ={}).parallelism["fsdp"][
        "use_orig_params"
    ]
    with pytest.raises(FSDPConfigError, match="must be true or false"):
        resolve_fsdp({"use_orig_params": "no"}, cuda=True, environ={})


# ------------------------------------------------------------------- calibration under FSDP
def _compressed_remote(source_root: str, root: Path, per_shard: int = 4) -> Path:
    """The tiny data as a remote root of zstd-compressed shards of ``per_shard`` samples (no raw shards)."""
    from streaming import MDSWriter

    from llmshearing.data.layout import TokenSamples, domain_dir

    for split in ("train", "eval"):
        for domain in ("alpha", "beta"):
            with TokenSamples(domain_dir(source_root, split, domain)) as samples:
                rows = [samples.row(i) for i in range(len(samples))]
            out = root / split / domain
            size = per_shard * 230  # an MDS shard of one 16-token sample takes 229 bytes
            with MDSWriter(
                out=str(out), columns={"tokens": "ndarray:uint16"}, compression="zstd", size_limit=size
            ) as writer:
                for row in rows:
                    writer.write({"tokens": row.astype("uint16")})
            assert not list(out.glob("*.mds")) and list(out.glob("*.mds.zstd"))
    return root


@pytest.mark.slow
def test_two_ranks_calibrate_their_shares_through_the_training_stream(tiny_source, tiny_mds, tmp_path):
    # compressed-only remote data and an empty local cache; every rank calibrates 4 of the 8 samples
    # and the sums are all-reduced inside a short dist_timeout: the ranking equals one process's
    from streaming.base.util import clean_stale_shared_memory

    from llmshearing.pruning.importance import calibration_batches, compute_importance
    from llmshearing.pruning.ranking import importance_log_alpha
    from llmshearing.pruning.targets import L0Config

    remote = _compressed_remote(tiny_mds, tmp_path / "remote")
    cache = tmp_path / "cache"
    out = tmp_path / "log_alpha.pt"
    args = [
        f"model.path={tiny_source}",
        f"data_local={cache}",
        f"data_remote={remote}",
        f"save_folder={tmp_path / 'run'}",
        "dist_timeout=20",
        "model.l0_module.init_from=importance",
        "model.l0_module.init_samples=8",
        "model.l0_module.lagrangian_warmup_steps=0ba",
        *SHARDED,
    ]
    clean_stale_shared_memory()
    log = run_two_ranks(PRUNE, args, script=["tests/scripts/build_only.py", str(out)])
    clean_stale_shared_memory()
    assert "calibrating on 8 train samples (up to 4 per rank on 2 ranks)" in log, log[-3000:]
    assert re.search(r"mask ranking calibrated in [\d.]+ s", log)

    # only the shards holding samples 0-3 of each domain were fetched into the cache, and decompressed
    for domain in ("alpha", "beta"):
        shards = json.loads((remote / "train" / domain / "index.json").read_text())["shards"]
        needed, seen = [], 0
        for shard in shards:
            if seen < 4 and shard["samples"]:
                needed.append(shard["raw_data"]["basename"])
            seen += shard["samples"]
        fetched = sorted(p.name for p in (cache / "train" / domain).iterdir() if p.name != "index.json")
        assert fetched == needed and len(needed) < len(shards) // 2, (fetched, needed)

    decoder = from_pretrained(tiny_source)
    total, batches = calibration_batches(tiny_mds, 8, 4, split="train")
    values = load_config(PRUNE, [f"model.path={tiny_source}", f"data_local={tiny_mds}"]).model.l0_module
    l0 = L0Config.from_dict(
        {**values, "init_from": "importance", "init_samples": 8, "lagrangian_warmup_steps": "0ba"}
    )
    expected = importance_log_alpha(
        compute_importance(decoder, batches, total, progress=False), decoder.config, l0
    )
    got = torch.load(out)
    for family, value in expected.items():
        assert torch.equal(got[family], value), family


@pytest.mark.slow
def test_ctrl_c_to_the_launcher_stops_every_rank_with_one_line(tiny_source, tiny_mds, tmp_path):
    """Ctrl-C in the terminal of ``composer -n 2`` (SIGINT to its process group) mid-run: the launcher then
    sends SIGTERM to ranks still stopping, and a rank's process group may close under it. Every rank prints its
    one line (what stopped it, where the run continues) and exits; none has to be killed, none prints a
    traceback (the launcher prints its own report, not the project's to change)."""
    import signal
    import subprocess
    import time

    from streaming.base.util import clean_stale_shared_memory

    folder = tmp_path / "run"
    args = run_args(tiny_source, tiny_mds, folder, *CONTINUED_EXTRA, *SHARDED, "max_duration=400ba")
    launcher = [str(Path(sys.executable).parent / "composer"), "-n", "2", "--master_port", str(next(PORTS))]
    clean_stale_shared_memory()
    proc = subprocess.Popen(
        [*launcher, "llmshearing/train.py", CONTINUED, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "FSDP_VERSION": "2"},
        start_new_session=True,  # its own process group, as a terminal gives it
    )
    try:
        samples = [folder / f"samples-rank{rank}.jsonl" for rank in (0, 1)]
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if all(log.exists() and len(read_sample_log(str(log))) >= 3 for log in samples):
                break
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        output = proc.communicate(timeout=120)[0].decode()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        clean_stale_shared_memory()
    assert proc.returncode in (130, 143), output[-4000:]
    assert output.count(f"autoresume=true continues {folder}") == 2, output[-4000:]  # a line per rank
    assert "SIGKILL" not in output and "RuntimeError" not in output, output[-4000:]
    assert output.count("Traceback") == output.count('composer/cli/launcher.py", line 575, in main')


# --------------------------------------------------------------------- several nodes, one run folder
def test_autoresume_refuses_a_run_folder_the_nodes_do_not_share(tmp_path):
    import shutil

    from torch.distributed.checkpoint import FileSystemWriter, save

    from llmshearing.training.fsdp import run_folder_view, unshared_run_folder_error

    node0 = tmp_path / "node0" / "run"  # what rank 0 wrote: config.json, a sharded checkpoint, the link
    (node0 / "checkpoints").mkdir(parents=True)
    (node0 / "config.json").write_text("{}")
    state = {"state.model.w": torch.ones(4), "state.model.v": torch.zeros(3)}
    save(state, storage_writer=FileSystemWriter(str(node0 / "checkpoints" / "ep1-ba6")), no_dist=True)
    os.symlink("ep1-ba6", node0 / "checkpoints" / "latest-rank0.pt")
    shared = run_folder_view(str(node0), {"NODE_RANK": "0"})
    assert shared == {"node": "0", "config": True, "latest": "ep1-ba6", "missing": None}
    assert unshared_run_folder_error(str(node0), [shared, {**shared, "node": "1"}]) is None

    # another node's local disk: its own shard files only (no config.json, no link, no .metadata)
    node1 = tmp_path / "node1" / "run"
    (node1 / "checkpoints" / "ep1-ba6").mkdir(parents=True)
    for shard in (node0 / "checkpoints" / "ep1-ba6").glob("*.distcp"):
        shutil.copy(shard, node1 / "checkpoints" / "ep1-ba6" / shard.name)
    local = run_folder_view(str(node1), {"NODE_RANK": "1"})
    assert local == {"node": "1", "config": False, "latest": None, "missing": None}
    error = unshared_run_folder_error("runs/x", [shared, shared, local, local])
    assert error.startswith(
        "autoresume: save_folder runs/x is not the same on every node: node 0 (rank 0) sees config.json and "
        "checkpoint ep1-ba6 (complete), node 1 (rank 2) sees no config.json and no checkpoint;"
    )
    assert "save_folder must be shared storage" in error

    # the link and config.json copied, the index not: named as what is missing
    shutil.copy(node0 / "config.json", node1 / "config.json")
    os.symlink("ep1-ba6", node1 / "checkpoints" / "latest-rank0.pt")
    assert run_folder_view(str(node1))["missing"] == ".metadata"
    shutil.copy(
        node0 / "checkpoints" / "ep1-ba6" / ".metadata", node1 / "checkpoints" / "ep1-ba6" / ".metadata"
    )
    assert run_folder_view(str(node1))["missing"] is None
    for shard in (node1 / "checkpoints" / "ep1-ba6").glob("*.distcp"):
        shard.unlink()
    missing = run_folder_view(str(node1), {"NODE_RANK": "1"})
    assert missing["missing"] and missing["missing"].endswith(".distcp")
    assert "without __0_0.distcp" in unshared_run_folder_error("runs/x", [shared, missing])


# ------------------------------------------------------------- the shipped GPU recipes under FSDP1
GPU_RECIPES = [
    "yamls/pruning/llama2-7b-to-1.3b.yaml",
    "yamls/pruning/llama2-7b-to-2.7b.yaml",
    "yamls/pruning/llama3-8b-to-3b.yaml",
    "yamls/continued/sheared-llama-1.3b.yaml",
    "yamls/continued/sheared-llama-2.7b.yaml",
]
ONE_NODE = {"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "8", "NODE_RANK": "0"}
TWO_NODES = {"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "NODE_RANK": "1"}


@pytest.mark.parametrize("recipe", GPU_RECIPES)
def test_what_fsdp1_is_handed_for_each_shipped_gpu_recipe(recipe):
    from composer.distributed.mosaic_parallelism import get_mixed_precision
    from composer.utils.parallelism import FSDPConfig
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(recipe)
    settings = OmegaConf.to_container(cfg.fsdp_config)
    for environ in (ONE_NODE, TWO_NODES):
        plan = resolve_fsdp(settings, cuda=True, environ=environ)
        assert plan.version == 1 and plan.mesh is None
        handed = FSDPConfig(**plan.parallelism["fsdp"])  # what Composer's Trainer builds from it
        assert handed.activation_checkpointing and not handed.activation_checkpointing_reentrant
        assert handed.sharding_strategy == "FULL_SHARD" and handed.data_parallel_replicate_degree is None
        assert handed.state_dict_type == "sharded"  # every rank reads only its shard at resume
        assert handed.use_orig_params  # three optimizer groups
        assert handed.mixed_precision == "DEFAULT" and cfg.precision == "amp_bf16"
        _, param, reduce, buffers = get_mixed_precision(cfg.precision, handed.mixed_precision)
        assert (param, reduce, buffers) == (
            torch.bfloat16,
            torch.float32,
            torch.bfloat16,
        )  # RoPE is no buffer
        assert plan.describe() == (
            "FSDP1 (FULL_SHARD, mixed precision DEFAULT, sharded checkpoints, "
            "non-reentrant activation checkpointing per block)"
        )
    hybrid = resolve_fsdp({**settings, "sharding_strategy": "HYBRID_SHARD"}, cuda=True, environ=TWO_NODES)
    handed = FSDPConfig(**hybrid.parallelism["fsdp"])
    assert (handed.data_parallel_replicate_degree, handed.data_parallel_shard_degree) == (2, 8)
    assert handed.sharding_strategy == "HYBRID_SHARD" and not handed.activation_checkpointing_reentrant
