"""Master weights and the run's source: whatever dtype a source checkpoint stores (Hugging Face's Llamas are
bf16), training steps fp32 parameters, the run says so, and a resumed run keeps the source it started from."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import run_two_ranks, write_tiny_source

from llmshearing.checkpoint.format import save_checkpoint
from llmshearing.checkpoint.reading import load_checkpoint
from llmshearing.train import main

PRUNE = "yamls/tiny/prune.yaml"
CONTINUED = "yamls/tiny/continued.yaml"
# the lr at which a bf16 parameter loses most Adam updates (steps of ~1e-4 against a resolution of 2^-8 |w|)
SHORT = ["max_duration=4ba", "eval_interval=4ba", "save_interval=4ba", "optimizer.lr=1.0e-4"]


def _args(source: str | Path, data: str, folder: Path, *extra: str) -> list[str]:
    return [f"model.path={source}", f"data_local={data}", f"save_folder={folder}", *extra]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    """The trained decoder's weights of a run's final checkpoint (project key names)."""
    payload = torch.load(folder / "checkpoints" / "latest-rank0.pt", map_location="cpu", weights_only=False)
    return {
        key.removeprefix("model."): value
        for key, value in payload["state"]["model"].items()
        if key.startswith("model.") and not key.startswith("model.l0_module.")
    }


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> tuple[str, str]:
    """One tiny model stored twice: in fp32, and rounded to bf16 (as a Hugging Face Llama is stored)."""
    root = tmp_path_factory.mktemp("sources")
    fp32 = write_tiny_source(str(root / "fp32"), seed=3)
    config, state, _ = load_checkpoint(fp32)
    bf16 = str(save_checkpoint(root / "bf16", config, state, dtype="bf16", progress=False))
    return fp32, bf16


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [PRUNE, CONTINUED])
def test_a_bf16_source_trains_fp32_weights_and_every_weight_moves(
    recipe, sources, tiny_mds, tmp_path, capsys, clean_shm
):
    _, bf16 = sources
    folder = tmp_path / "run"
    assert main([recipe, *_args(bf16, tiny_mds, folder, *SHORT)]) == 0
    out = capsys.readouterr().out
    assert "llmshearing: weights fp32 (source bf16, upcast), compute fp32, checkpoints fp32" in out
    _, start, _ = load_checkpoint(bf16)
    trained = _weights(folder)
    assert set(trained) == set(start)
    for key, weight in trained.items():
        assert weight.dtype == torch.float32, key
        if weight.dim() == 2 and "embed" not in key:  # every token is seen, but keep to the layers' matrices
            unchanged = (weight == start[key].float()).float().mean().item()
            assert unchanged < 0.001, f"{key}: {unchanged:.1%} of its entries never moved"
    description = json.loads((folder / "config.json").read_text())
    assert description["precision"] == {
        "source": "bf16",
        "weights": "fp32",
        "compute": "fp32",
        "checkpoint": "fp32",
    }
    assert description["source"] == {"path": os.path.abspath(bf16), "dtype": "bf16"}


@pytest.mark.slow
def test_the_fp32_and_bf16_copies_of_a_source_train_to_within_bf16_rounding(
    sources, tiny_mds, tmp_path, clean_shm
):
    fp32, bf16 = sources
    runs = {}
    for name, source in (("fp32", fp32), ("bf16", bf16)):
        runs[name] = tmp_path / name
        assert main([PRUNE, *_args(source, tiny_mds, runs[name], *SHORT)]) == 0
    _, start, _ = load_checkpoint(fp32)
    a, b = _weights(runs["fp32"]), _weights(runs["bf16"])
    for key in a:
        rounding = start[key] - start[key].bfloat16().float()  # where the bf16 copy starts, entry by entry
        moved = (a[key] - start[key]).abs().mean().item()
        # the runs start one bf16 rounding apart and take (nearly) the same Adam steps, so they end that
        # same rounding apart; steps lost to bf16 resolution would leave them a step's size apart
        drift = (a[key] - b[key] - rounding).abs().mean().item()
        assert drift < 0.05 * moved, f"{key}: the runs drifted {drift:.2e} apart, training moved {moved:.2e}"


@pytest.fixture(scope="module")
def finished(sources, tiny_mds, tmp_path_factory) -> Path:
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    folder = tmp_path_factory.mktemp("finished") / "run"
    assert main([PRUNE, *_args(sources[0], tiny_mds, folder, *SHORT)]) == 0
    clean_stale_shared_memory()
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("which", ["bf16 copy", "moved copy"])
def test_resuming_from_another_source_is_refused_unless_asked(
    which, sources, finished, tiny_mds, tmp_path, capsys, clean_shm
):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished, run, symlinks=True)
    if which == "bf16 copy":
        other = sources[1]
    else:  # the same checkpoint at another path
        other = str(tmp_path / "moved")
        shutil.copytree(sources[0], other)
    before = _digest(run)
    longer = [
        "max_duration=8ba",
        "eval_interval=4ba",
        "save_interval=4ba",
        "optimizer.lr=1.0e-4",
        "autoresume=true",
    ]
    assert main([PRUNE, *_args(other, tiny_mds, run, *longer)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "source.path" in lines[0] and os.path.abspath(sources[0]) in lines[0] and other in lines[0]
    if which == "bf16 copy":
        assert "source.dtype: 'bf16' vs 'fp32'" in lines[0]
    assert "model.allow_new_source=true" in lines[0]
    assert _digest(run) == before  # config.json, checkpoints and metrics untouched

    assert main([PRUNE, *_args(other, tiny_mds, run, *longer, "model.allow_new_source=true")]) == 0
    description = json.loads((run / "config.json").read_text())
    assert description["source"]["path"] == os.path.abspath(other)
    assert all(w.dtype == torch.float32 for w in _weights(run).values())


def test_allow_new_source_must_be_a_boolean(sources, tiny_mds, tmp_path, capsys):
    assert main([PRUNE, *_args(sources[0], tiny_mds, tmp_path / "run", "model.allow_new_source=maybe")]) == 2
    err = capsys.readouterr().err
    assert "model.allow_new_source must be true or false" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_bf16_source_trains_fp32_weights_under_fsdp2(sources, tiny_mds, tmp_path):
    folder = tmp_path / "run"
    sharding = ["fsdp_config.sharding_strategy=FULL_SHARD", "fsdp_config.state_dict_type=full"]
    output = run_two_ranks(CONTINUED, _args(sources[1], tiny_mds, folder, *SHORT, *sharding))
    assert "weights fp32 (source bf16, upcast)" in output
    _, start, _ = load_checkpoint(sources[1])
    for key, weight in _weights(folder).items():
        assert weight.dtype == torch.float32, key
        assert not torch.equal(weight, start[key].float()), key


@pytest.mark.slow
def test_loading_a_checkpoint_of_a_run_from_another_source_is_refused(
    sources, finished, tiny_mds, tmp_path, capsys, clean_shm
):
    checkpoint = finished / "checkpoints" / "latest-rank0.pt"
    overrides = [*SHORT, f"load_path={checkpoint}"]
    assert main([PRUNE, *_args(sources[1], tiny_mds, tmp_path / "run", *overrides)]) == 2
    err = capsys.readouterr().err
    assert "belongs to a different run" in err and "source.dtype: 'bf16' vs 'fp32'" in err, err
    assert "model.allow_new_source=true" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "config.json").exists()
