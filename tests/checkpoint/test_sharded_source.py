"""Sources with sharded weights (``convert hf-to-composer --sharded``: ``model.dcp/``, a
``torch.distributed.checkpoint`` directory): written one tensor at a time, read by everything that reads
a project checkpoint, trained bit-identically to the safetensors source, and refused in one line when
their shard files or index are missing or damaged."""

from __future__ import annotations

import json
import os
import re
import weakref
from pathlib import Path

import pytest
import torch
from conftest import (
    RANK0,
    SHARDED,
    checkpoint_tensors,
    hf_test_config,
    logged_metrics,
    run_args,
    run_two_ranks,
    write_word_tokenizer,
)

from llmshearing.checkpoint.format import write_project_checkpoint
from llmshearing.checkpoint.reading import open_checkpoint
from llmshearing.checkpoint.sharded import SHARDED_WEIGHTS, write_sharded_weights
from llmshearing.checkpoint.tensor_io import TensorMeta
from llmshearing.cli import main as cli_main
from llmshearing.train import build_trainer, run

PRUNE = "yamls/tiny/prune.yaml"
TIMINGS = ("time/", "wall_clock/", "distill/teacher_")  # wall-clock measurements differ between runs
SHORT = ["max_duration=4ba", "eval_interval=2ba", "save_interval=4ba", "model.distillation.alpha=0.5"]


def _teacher(source: str | Path) -> str:
    """The pruning runs distil from their own source (under FSDP2 on several ranks a teacher with sharded
    weights is read in slices, as the source is)."""
    return f"model.distillation.teacher={source}"


def shard_copy(source: str | Path, out: Path) -> Path:
    """``source`` (a project checkpoint) written again with sharded weights."""
    with open_checkpoint(source) as ckpt:
        return write_project_checkpoint(
            out,
            ckpt.config,
            ckpt.tensors,
            ckpt.hf_config,
            tokenizer_dir=ckpt.tokenizer_dir,
            progress=False,
            sharded=True,
        )


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM

    directory = tmp_path_factory.mktemp("hf") / "llama"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(hf_test_config("llama_gqa_llama3")).save_pretrained(directory)
    write_word_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def sharded_tiny(tiny_source, tmp_path_factory) -> Path:
    return shard_copy(tiny_source, tmp_path_factory.mktemp("sharded") / "source")


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(path) as ckpt:
        return {key: ckpt.tensors.get(key) for key in ckpt.tensors.keys()}


@pytest.mark.parametrize("dtype", [[], ["--dtype", "bf16"]])
def test_cli_writes_sharded_weights_equal_to_the_safetensors_ones(hf_model, tmp_path, capsys, dtype):
    plain, sharded = tmp_path / "plain", tmp_path / "sharded"
    assert cli_main(["convert", "hf-to-composer", str(hf_model), str(plain), *dtype]) == 0
    assert cli_main(["convert", "hf-to-composer", str(hf_model), str(sharded), "--sharded", *dtype]) == 0
    names = sorted(p.name for p in sharded.iterdir())
    assert sorted(p.name for p in plain.iterdir()) == sorted(
        "model.safetensors" if n == SHARDED_WEIGHTS else n for n in names
    )
    for name in names:  # config.json and the tokenizer files, byte for byte
        if name != SHARDED_WEIGHTS:
            assert (plain / name).read_bytes() == (sharded / name).read_bytes(), name
    weights = sharded / SHARDED_WEIGHTS
    assert (weights / ".metadata").is_file() and len(list(weights.glob("__0_*.distcp"))) > 10
    a, b = _tensors(plain), _tensors(sharded)
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert all(t.dtype == (torch.bfloat16 if dtype else torch.float32) for t in b.values())
    hf_a, hf_b = tmp_path / "hf-a", tmp_path / "hf-b"  # the export reads both alike
    assert cli_main(["convert", "composer-to-hf", str(plain), str(hf_a)]) == 0
    assert cli_main(["convert", "composer-to-hf", str(sharded), str(hf_b)]) == 0
    assert (hf_a / "model.safetensors").read_bytes() == (hf_b / "model.safetensors").read_bytes()
    capsys.readouterr()
    assert cli_main(["convert", "hf-to-composer", str(hf_model), str(sharded), "--sharded"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (
        cli_main(["convert", "hf-to-composer", str(hf_model), str(sharded), "--sharded", "--overwrite"]) == 0
    )


def test_the_writer_holds_at_most_two_tensors(tmp_path):
    """Each tensor is made when the writer reaches it; all but the last one are gone by then."""
    metas = {f"layers.{i}.w": TensorMeta(torch.float32, (64, 32)) for i in range(6)}
    made: list[weakref.ref] = []
    alive_at_each_call: list[int] = []

    def produce(key: str) -> torch.Tensor:
        alive_at_each_call.append(sum(ref() is not None for ref in made))
        tensor = torch.full((64, 32), float(len(made)))
        made.append(weakref.ref(tensor))
        return tensor

    target = write_sharded_weights(tmp_path, metas, produce)
    assert len(made) == 6 and max(alive_at_each_call) <= 1, alive_at_each_call
    assert len(list(target.glob("*.distcp"))) == 6


@pytest.fixture(scope="module")
def plain_run(tiny_source, tiny_mds, tmp_path_factory) -> Path:
    """A short one-process pruning run from the safetensors source."""
    from streaming.base.util import clean_stale_shared_memory

    folder = tmp_path_factory.mktemp("runs") / "plain"
    clean_stale_shared_memory()
    trainer, values = build_trainer(
        PRUNE, run_args(tiny_source, tiny_mds, folder, *SHORT, _teacher(tiny_source))
    )
    run(trainer, values)
    clean_stale_shared_memory()
    return folder


def test_a_pruning_run_from_sharded_weights_matches_the_safetensors_source(
    plain_run, sharded_tiny, tiny_mds, tmp_path, clean_shm, capsys
):
    folder = tmp_path / "sharded"
    args = run_args(str(sharded_tiny), tiny_mds, folder, *SHORT, _teacher(sharded_tiny))
    trainer, values = build_trainer(PRUNE, args)
    run(trainer, values)
    captured = capsys.readouterr()
    assert "the source's sharded weights (model.dcp/) are read one tensor at a time" in captured.out
    assert "does not fit" not in captured.err  # the tiny run fits this machine: no planner warning
    a, b = logged_metrics(plain_run), logged_metrics(folder)
    losses = [k for k in a if k[1].startswith("loss/train")]
    assert losses and a.keys() == b.keys() and any(k[1] == "loss/train/kd" for k in losses)
    assert all(a[k] == b[k] for k in a if not k[1].startswith(TIMINGS)), [
        (k, a[k], b[k]) for k in a if a[k] != b.get(k)
    ][:5]
    weights_a, weights_b = checkpoint_tensors(plain_run), checkpoint_tensors(folder)
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_oneshot_evaluate_and_the_loader_read_sharded_weights(
    tiny_source, sharded_tiny, tiny_mds, tmp_path, capsys
):
    from llmshearing.checkpoint.loading import from_pretrained

    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        assert torch.equal(from_pretrained(str(sharded_tiny))(ids), from_pretrained(tiny_source)(ids))
    target = ["--target", "n_layers=2,n_heads=2,n_kv_heads=1,d_model=16,intermediate_size=24"]
    common = ["--data", tiny_mds, "--samples", "4", "--split", "eval", *target]
    for name, source in (("plain", tiny_source), ("sharded", sharded_tiny)):
        assert cli_main(["prune-oneshot", str(source), str(tmp_path / name), *common]) == 0
    assert _tensors(tmp_path / "plain").keys() == _tensors(tmp_path / "sharded").keys()
    assert all(
        torch.equal(t, _tensors(tmp_path / "sharded")[k]) for k, t in _tensors(tmp_path / "plain").items()
    )
    capsys.readouterr()
    reports = []
    for name, source in (("plain", tiny_source), ("sharded", sharded_tiny)):
        out = tmp_path / f"eval-{name}.json"
        assert cli_main(["evaluate", str(source), tiny_mds, "--json", str(out)]) == 0
        reports.append(json.loads(out.read_text()))
    assert reports[0] == reports[1] and all(r["loss"] > 0 for r in reports[0].values())


@pytest.mark.parametrize(
    "damage", ["missing shard", "damaged index", "missing index", "cut short", "corrupt"]
)
def test_damaged_sharded_weights_are_one_line_naming_the_file(sharded_tiny, tmp_path, capsys, damage):
    import shutil

    source = tmp_path / "source"
    shutil.copytree(sharded_tiny, source)
    weights = source / SHARDED_WEIGHTS
    shard = sorted(p.name for p in weights.glob("*.distcp"))[3]
    if damage == "missing shard":
        (weights / shard).unlink()
        expected, named = "is missing 1 of its", shard
    elif damage == "damaged index":
        (weights / ".metadata").write_bytes((weights / ".metadata").read_bytes()[:40])
        expected, named = "could not be read as a sharded checkpoint", str(weights)
    elif damage == "missing index":
        (weights / ".metadata").unlink()
        expected, named = "could not be read as a sharded checkpoint", str(weights / ".metadata")
    elif damage == "cut short":
        (weights / shard).write_bytes((weights / shard).read_bytes()[:50])
        expected, named = "1 of its", f"{shard} (50 of"
    else:  # the right length, wrong bytes
        (weights / shard).write_bytes(bytes((weights / shard).stat().st_size))
        expected, named = "could not be read from", shard
    capsys.readouterr()
    assert cli_main(["convert", "composer-to-hf", str(source), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert expected in err and named in err, err
    errors = [
        line for line in err.splitlines() if "error:" in line
    ]  # a damaged file shows after the progress bar
    assert len(errors) == 1 and "Traceback" not in err and not (tmp_path / "hf").exists()


def _fsdp_run(
    source: str | Path, teacher: str | Path, data: str, folder: Path, *extra: str
) -> tuple[str, Path]:
    """A two-rank FSDP2 pruning run that saves the model (and teacher) as it starts: (log, saved)."""
    from streaming.base.util import clean_stale_shared_memory

    initial = folder.parent / f"{folder.name}-initial.pt"
    clean_stale_shared_memory()
    script = ["tests/scripts/initial_model.py", str(initial)]
    log = run_two_ranks(
        PRUNE, run_args(str(source), data, folder, *SHORT, _teacher(teacher), *SHARDED, *extra), script=script
    )
    clean_stale_shared_memory()
    return log, initial


@pytest.fixture(scope="module")
def sliced_run(sharded_tiny, tiny_mds, tmp_path_factory) -> tuple[Path, str, Path]:
    """FSDP2 on 2 ranks from the sharded source, distilling from it: student and teacher read in slices."""
    folder = tmp_path_factory.mktemp("sliced") / "fsdp"
    log, initial = _fsdp_run(sharded_tiny, sharded_tiny, tiny_mds, folder, RANK0)
    return folder, log, initial


def _assert_saved_equal_the_source(saved: Path, source: str | Path) -> None:
    started = torch.load(saved, weights_only=True)
    with open_checkpoint(source) as ckpt:
        assert set(ckpt.tensors.keys()) <= set(started)
        for key in ckpt.tensors.keys():
            assert torch.equal(started[key], ckpt.tensors.get(key).to(torch.float32)), key


@pytest.mark.slow
def test_fsdp2_ranks_read_their_own_slices_of_sharded_weights(
    plain_run, tiny_source, sharded_tiny, sliced_run
):
    """Two ranks under FSDP2 from the sharded source: each rank fills its shards of the student and of
    the teacher (no rank reads either whole); both as the run starts are the source's, bit for bit, and training
    follows the one-process run from the safetensors source (to the FSDP tests' 1e-5)."""
    folder, log, initial = sliced_run
    assert "source read in slices: each of the 2 ranks reads its own shards" in log, log[-3000:]
    assert "teacher read in slices: each of the 2 ranks builds it on meta and reads its own shards" in log
    assert "the teacher read whole" not in log
    assert "teacher: blocks sharded over 2 ranks" in log and "each rank filled its own slices" in log
    _assert_saved_equal_the_source(initial, tiny_source)
    _assert_saved_equal_the_source(Path(f"{initial}.teacher"), tiny_source)
    a, b = logged_metrics(plain_run), logged_metrics(folder)
    compared = [k for k in a if not k[1].startswith(TIMINGS)]
    assert any(k[1].startswith("loss/train") for k in compared) and a.keys() == b.keys()
    for key in compared:
        assert b[key] == pytest.approx(a[key], abs=1e-5 * max(1.0, abs(a[key]))), key
    weights_a, weights_b = checkpoint_tensors(plain_run), checkpoint_tensors(folder)
    assert weights_a.keys() == weights_b.keys()
    for key, value in weights_a.items():
        torch.testing.assert_close(weights_b[key], value, rtol=0, atol=1e-5, msg=key)
    assert json.loads((folder / "config.json").read_text())["source"]["path"] == os.path.abspath(sharded_tiny)


@pytest.mark.slow
def test_a_teacher_read_in_slices_trains_as_the_teacher_read_whole(
    tiny_source, sharded_tiny, tiny_mds, sliced_run, tmp_path
):
    """The same 2-rank FSDP2 run with the teacher read whole on rank 0 (its safetensors copy) and broadcast:
    every logged value, the KD term included, and the saved model are bit-identical to the run whose ranks
    read their own slices of the teacher."""
    sliced, _, _ = sliced_run
    folder = tmp_path / "whole"
    log, initial = _fsdp_run(sharded_tiny, tiny_source, tiny_mds, folder, RANK0)
    assert "source read in slices" in log and "the teacher read whole on rank 0" in log, log[-3000:]
    assert "each rank filled its own slices" not in log
    _assert_saved_equal_the_source(Path(f"{initial}.teacher"), tiny_source)
    a, b = logged_metrics(folder), logged_metrics(sliced)
    compared = [k for k in a if not k[1].startswith(TIMINGS)]
    assert any(k[1] == "loss/train/kd" for k in compared) and a.keys() == b.keys()
    assert all(a[k] == b[k] for k in compared), [(k, a[k], b[k]) for k in compared if a[k] != b[k]][:5]
    weights_a, weights_b = checkpoint_tensors(folder), checkpoint_tensors(sliced)
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_the_plan_counts_only_each_ranks_shards_of_a_sharded_source(
    tiny_source, sharded_tiny, capsys, monkeypatch
):
    monkeypatch.setenv("FSDP_VERSION", "2")
    fsdp = ["fsdp_config.sharding_strategy=FULL_SHARD", "--gpus", "2", "--gpus-per-node", "2", "--json"]
    host = {}
    for name, source in (("plain", tiny_source), ("sharded", sharded_tiny)):
        assert cli_main(["plan", PRUNE, f"model.path={source}", *fsdp]) == 0
        plan = json.loads(capsys.readouterr().out)
        host[name] = plan["host_bytes_per_node"]
        assert plan["settings"]["sliced_source"] == (name == "sharded")
    with open_checkpoint(tiny_source) as ckpt:
        params = ckpt.config.num_params()
    assert host["plain"] == 2 * 4 * params and host["sharded"] == 4 * params  # two fp32 copies, then one


def test_filling_a_model_from_sharded_weights_casts_like_the_safetensors_path_and_refuses_nan(
    tiny_source, tmp_path
):
    from llmshearing.checkpoint.sharded import fill_from_sharded_weights, sharded_weights_dir
    from llmshearing.models.decoder import Decoder

    with open_checkpoint(tiny_source) as ckpt:
        config, state = ckpt.config, {k: ckpt.tensors.get(k) for k in ckpt.tensors.keys()}
    bf16 = {k: t.to(torch.bfloat16) for k, t in state.items()}
    metas = {k: TensorMeta(t.dtype, tuple(t.shape)) for k, t in bf16.items()}
    write_sharded_weights(tmp_path, metas, bf16.__getitem__)
    decoder = Decoder(config)
    assert fill_from_sharded_weights(decoder, sharded_weights_dir(tmp_path)) == len(state)
    filled = decoder.state_dict()
    assert all(
        torch.equal(filled[k], t.to(torch.float32)) and filled[k].dtype == torch.float32
        for k, t in bf16.items()
    )
    key = next(k for k in bf16 if k.endswith("wq.weight"))
    bf16[key] = bf16[key].clone()
    bf16[key][0, 0] = float("nan")
    write_sharded_weights(tmp_path / "nan", metas, bf16.__getitem__)
    with pytest.raises(ValueError, match=rf"NaN or Inf in {re.escape(key)}; the source is damaged"):
        fill_from_sharded_weights(Decoder(config), sharded_weights_dir(tmp_path / "nan"))


def test_a_teacher_on_meta_is_filled_from_sharded_weights_as_read_whole(tiny_source, sharded_tiny):
    """``shard_teacher`` with the teacher's sharded weights (one process: the teacher stays whole) fills the
    meta teacher with the values the whole read gives, in the teacher's dtype."""
    from llmshearing.checkpoint.loading import load_teacher
    from llmshearing.checkpoint.sharded import sharded_weights_dir
    from llmshearing.training.fsdp import shard_teacher
    from llmshearing.training.fsdp_settings import resolve_fsdp

    plan = resolve_fsdp({"sharding_strategy": "FULL_SHARD"}, environ={"FSDP_VERSION": "2"})
    for dtype in (torch.float32, torch.bfloat16):
        whole = load_teacher(tiny_source, dtype, "sdpa").module().state_dict()
        teacher = load_teacher(str(sharded_tiny), dtype, "sdpa", on_meta=True)
        weights = str(sharded_weights_dir(sharded_tiny))
        assert "whole on every rank" in shard_teacher(teacher, plan, torch.device("cpu"), weights=weights)
        filled = teacher.module().state_dict()
        assert filled.keys() == whole.keys()
        assert all(torch.equal(filled[k], t) and filled[k].dtype == dtype for k, t in whole.items())
        assert not any(p.requires_grad for p in teacher.module().parameters())


def test_the_plan_counts_only_each_ranks_shards_of_a_sharded_teacher(
    tiny_source, sharded_tiny, capsys, monkeypatch
):
    import math

    from llmshearing.models.schema import state_shapes

    monkeypatch.setenv("FSDP_VERSION", "2")
    fsdp = ["fsdp_config.sharding_strategy=FULL_SHARD", "--gpus", "2", "--gpus-per-node", "2", "--json"]
    plans = {}
    for name, teacher in (("plain", tiny_source), ("sharded", sharded_tiny)):
        args = [f"model.path={tiny_source}", f"model.distillation.teacher={teacher}"]
        assert cli_main(["plan", PRUNE, *args, *fsdp]) == 0
        plans[name] = json.loads(capsys.readouterr().out)
        assert plans[name]["settings"]["sliced_teacher"] == (name == "sharded")
        assert not plans[name]["settings"]["sliced_source"]
    with open_checkpoint(tiny_source) as ckpt:
        config = ckpt.config
    shapes = state_shapes(config)
    outside = sum(math.prod(s) for k, s in shapes.items() if not k.startswith("layers."))
    blocks = sum(math.prod(s) for k, s in shapes.items() if k.startswith("layers."))
    saved = 2 * 4 * (config.num_params() - (blocks // 2 + outside))  # fp32 on CPU, on each of 2 ranks
    assert plans["plain"]["host_bytes_per_node"] - plans["sharded"]["host_bytes_per_node"] == saved
