"""Bad input to ``llmshearing prune-model``: a run description that does not describe the checkpoint,
files that are not checkpoints, a full disk; each a one-line error, exit code 2, nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import needs_tmpfs
from test_prune_model import ALL, TARGET, TIED, pruning_run

from llmshearing.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A pruning run toward the tests' target, with the run description beside its checkpoint."""
    folder = tmp_path_factory.mktemp("prune") / "run"
    pruning_run(
        folder,
        TIED,
        {"pruning_modules": ALL, "target_model": TARGET},
        1,
    )
    return folder


def _refused(capsys, args: list[str], out: Path) -> str:
    assert main(["prune-model", *args, str(out)]) == 2, args
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.*"))
    return err


def test_replaced_run_description_is_refused(run, tmp_path, capsys):
    ckpt = run / "checkpoints" / "ep0-ba1-rank0.pt"
    config = json.loads((run / "config.json").read_text())
    config["l0_module"]["target_model"] = {**TARGET, "n_layers": 2}  # a later start rewrote the target
    other = tmp_path / "config.json"
    other.write_text(json.dumps(config))
    err = _refused(capsys, [str(ckpt), "--config", str(other)], tmp_path / "pruned")
    assert "does not describe" in err and "l0_module.target_model" in err and "--config" in err


def test_other_model_shape_in_the_description_is_refused(run, tmp_path, capsys):
    config = json.loads((run / "config.json").read_text())
    config["model"]["rope_theta"] = 500000.0  # shapes of tensors agree; the model does not
    other = tmp_path / "config.json"
    other.write_text(json.dumps(config))
    err = _refused(
        capsys, [str(run / "checkpoints" / "ep0-ba1-rank0.pt"), "--config", str(other)], tmp_path / "p"
    )
    assert "model.rope_theta" in err


def _write_safetensors(path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(path))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda p: p.write_text("hello\n"),
            "is not a Composer checkpoint (.pt written by training): it is a text file",
        ),
        (lambda p: p.write_bytes(b""), "it is an empty file"),
        (lambda p: p.write_text('{"model": {}}'), "it is a JSON file"),
        (lambda p: p.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(32)), "it is a GGUF model file"),
        (_write_safetensors, "it is a safetensors file"),
        (lambda p: p.write_bytes(bytes(range(256))), "it is a binary file of another format"),
    ],
    ids=["text", "empty", "json", "gguf", "safetensors", "binary"],
)
def test_file_that_is_not_a_checkpoint_is_named(run, tmp_path, capsys, make, message):
    ckpt = run / "checkpoints" / "not-a-checkpoint.pt"
    make(ckpt)
    try:
        err = _refused(capsys, [str(ckpt)], tmp_path / "pruned")
    finally:
        ckpt.unlink()
    assert message in err and "prune-model needs the Composer checkpoint" in err


def test_checkpoint_cut_off_while_written_is_named(run, tmp_path, capsys):
    whole = (run / "checkpoints" / "ep0-ba1-rank0.pt").read_bytes()
    ckpt = run / "checkpoints" / "ep0-ba2-rank0.pt"
    ckpt.write_bytes(whole[: len(whole) // 2])
    try:
        err = _refused(capsys, [str(ckpt)], tmp_path / "pruned")
    finally:
        ckpt.unlink()
    assert "is incomplete: it was cut off while being written" in err


def test_torch_file_that_is_not_a_training_checkpoint(run, tmp_path, capsys):
    ckpt = run / "checkpoints" / "weights.pt"
    torch.save({"layers.0.w": torch.zeros(2)}, ckpt)
    try:
        err = _refused(capsys, [str(ckpt)], tmp_path / "pruned")
    finally:
        ckpt.unlink()
    assert "is not a Composer training checkpoint" in err


@needs_tmpfs
def test_full_disk_is_one_line_and_leaves_nothing(run, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    ckpt = run / "checkpoints" / "ep0-ba1-rank0.pt"
    command = (
        f"mount -t tmpfs -o size=8k none {disk} && {sys.executable} -m llmshearing.cli prune-model {ckpt} "
        f"{disk / 'pruned'}; echo exit=$?; ls -A {disk}"
    )
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", command], capture_output=True, text=True)
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"no space left on {disk}" in errors[0]
    assert proc.stdout.split() == ["exit=2"], proc.stdout  # nothing left on the full disk


def test_a_pruning_checkpoint_is_never_loaded_as_a_dense_model(run, tiny_mds, tmp_path, capsys):
    # one-shot pruning, evaluation and a distillation teacher all load a dense model: the masks of a
    # pruning checkpoint would be dropped, so each refuses it and points to prune-model
    from llmshearing.checkpoint.loading import from_pretrained, load_teacher

    checkpoint = str(run / "checkpoints" / "latest-rank0.pt")
    for load in (
        lambda: from_pretrained(checkpoint),
        lambda: load_teacher(checkpoint, torch.float32, "sdpa"),
    ):
        with pytest.raises(ValueError, match="prune-model"):
            load()
    out = tmp_path / "oneshot"
    code = main(["prune-oneshot", checkpoint, str(out), "--data", tiny_mds, "--target", "n_layers=3"])
    err = capsys.readouterr().err
    assert code == 2 and "prune-model" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("hf_out", ["pruned", "pruned/hf"])
def test_hf_out_that_is_out_or_inside_it_is_refused_before_writing(run, tmp_path, capsys, hf_out):
    out = tmp_path / "pruned"
    ckpt = str(run / "checkpoints" / "ep0-ba1-rank0.pt")
    err = _refused(capsys, [ckpt, "--hf-out", str(tmp_path / hf_out)], out)
    assert ("is the same path as OUT" if hf_out == "pruned" else "lies inside OUT") in err
    assert "each output needs its own directory" in err


def test_indivisible_target_is_refused_before_the_fold_unless_allowed(tmp_path, capsys):
    indivisible = {**TARGET, "n_heads": 4, "d_model": 30}  # 30 over 4 heads: transformers >= 5 refuses it
    pruning_run(tmp_path / "run", TIED, {"pruning_modules": ALL, "target_model": indivisible}, 1)
    ckpt = str(tmp_path / "run" / "checkpoints" / "ep0-ba1-rank0.pt")
    err = _refused(capsys, [ckpt], tmp_path / "pruned")
    assert "d_model=30 is not a multiple of n_heads=4; transformers >= 5 refuses to load" in err
    assert "choose d_model=28 or d_model=32" in err and "pass --allow-indivisible-d-model" in err
    assert main(["prune-model", ckpt, str(tmp_path / "pruned"), "--allow-indivisible-d-model"]) == 0
    written = json.loads((tmp_path / "pruned" / "config.json").read_text())["model"]
    assert (written["d_model"], written["n_heads"]) == (30, 4)
    capsys.readouterr()
    hf = tmp_path / "hf"  # the export says which loaders refuse it; transformers 4.x loads it
    assert main(["convert", "composer-to-hf", str(tmp_path / "pruned"), str(hf), "--dtype", "fp32"]) == 0
    assert (
        "hidden_size 30 over 4 attention heads (not a multiple): transformers >= 5 refuses"
        in capsys.readouterr().err
    )
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(hf).config.hidden_size == 30


def test_prune_oneshot_refuses_an_indivisible_target_unless_allowed(tiny_source, tiny_mds, tmp_path, capsys):
    out = tmp_path / "oneshot"
    args = [
        "prune-oneshot",
        tiny_source,
        str(out),
        "--data",
        tiny_mds,
        "--target",
        "d_model=30",
        "--samples",
        "8",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "llmshearing prune-oneshot: error: --target: d_model=30 is not a multiple of n_heads=4; transformers >= 5 "
        "refuses to load such a model (transformers 4.x loads it): choose d_model=28 or d_model=32, or pass "
        "--allow-indivisible-d-model to prune to it anyway (the export then loads in transformers < 5 only)"
    ]
    assert not out.exists()
    assert main([*args, "--allow-indivisible-d-model"]) == 0
    assert json.loads((out / "config.json").read_text())["model"]["d_model"] == 30
