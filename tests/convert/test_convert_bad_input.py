"""Bad input to ``llmshearing convert``: hub names without the hub, files that are not checkpoints,
a full disk; each a one-line error with exit code 2, at once, and nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import needs_tmpfs

from llmshearing.cli import main

MISSPELT = "HuggingFaceTB/SmolLM2-135M-Instrukt"


def _convert(args: list[str], tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``llmshearing convert`` in a fresh process with an empty Hugging Face cache."""
    environment = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "NO_PROXY": "", "no_proxy": "", **env}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "llmshearing.cli", "convert", *args],
        capture_output=True,
        text=True,
        env=environment,
    )
    return proc, time.perf_counter() - start


def _one_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return lines[0]


def test_hub_name_with_hf_hub_offline_fails_at_once_with_the_reason(tmp_path):
    proc, seconds = _convert(
        ["hf-to-composer", MISSPELT, str(tmp_path / "out")], tmp_path, HF_HUB_OFFLINE="1"
    )
    line = _one_error(proc)
    assert "HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache" in line and MISSPELT in line
    assert seconds < 30 and not (tmp_path / "out").exists()


def test_hub_name_without_network_fails_at_once_with_the_reason(tmp_path):
    closed = "http://127.0.0.1:9"  # the discard port: nothing listens, every connection is refused
    proc, seconds = _convert(
        ["hf-to-composer", MISSPELT, str(tmp_path / "out")],
        tmp_path,
        HTTPS_PROXY=closed,
        HTTP_PROXY=closed,
        https_proxy=closed,
        http_proxy=closed,
        HF_HUB_OFFLINE="0",
    )
    line = _one_error(proc)
    assert "the Hugging Face hub cannot be reached (no network?) and it is not cached" in line
    assert seconds < 30 and not (tmp_path / "out").exists()


def test_composer_to_hf_names_a_file_that_is_not_a_checkpoint(tiny_source, tmp_path, capsys):
    cases = {
        "notes.pt": (b"not a checkpoint\n", "it is a text file"),
        "cut.pt": (b"PK\x03\x04" + bytes(100), "is incomplete: it was cut off while being written"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        assert main(["convert", "composer-to-hf", str(path), str(tmp_path / "hf")]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "hf").exists()


@needs_tmpfs
def test_full_disk_is_one_line_and_leaves_nothing(tiny_source, tmp_path):
    hf = tmp_path / "hf"
    assert main(["convert", "composer-to-hf", tiny_source, str(hf), "--dtype", "fp32"]) == 0
    disk = tmp_path / "disk"
    disk.mkdir()
    command = (
        f"mount -t tmpfs -o size=16k none {disk} && {sys.executable} -m llmshearing.cli convert hf-to-composer "
        f"{hf} {disk / 'source'}; echo exit=$?; ls -A {disk}"
    )
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", command], capture_output=True, text=True)
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"no space left on {disk}" in errors[0]
    assert proc.stdout.split() == ["exit=2"], proc.stdout  # the staging was removed, nothing is left


def _with_nan(directory: Path, key: str) -> Path:
    from safetensors.torch import load_file, save_file

    weights = directory / "model.safetensors"
    tensors = load_file(weights)
    tensors[key].view(-1)[5] = float("nan")
    save_file(tensors, weights)
    return directory


def test_nan_weights_are_refused_naming_the_first_tensor_and_nothing_is_written(
    tiny_source, tmp_path, capsys
):
    import shutil

    hf = tmp_path / "hf"
    assert main(["convert", "composer-to-hf", tiny_source, str(hf), "--dtype", "fp32"]) == 0
    capsys.readouterr()
    _with_nan(hf, "model.layers.2.mlp.up_proj.weight")
    project = _with_nan(
        Path(shutil.copytree(tiny_source, tmp_path / "project")), "layers.0.attention.wq.weight"
    )
    cases = {
        ("hf-to-composer", hf): "tensor layers.2.feed_forward.w3.weight holds NaN or Inf values (1 of",
        ("composer-to-hf", project): "tensor layers.0.attention.wq.weight holds NaN or Inf values (1 of",
    }
    for (command, source), message in cases.items():
        out = tmp_path / f"out-{command}"
        assert main(["convert", command, str(source), str(out)]) == 2
        err = capsys.readouterr().err  # hf-to-composer streams: its progress bar stops at the tensor
        errors = [line for line in err.splitlines() if "error:" in line]
        assert len(errors) == 1 and f"{source}: {message}" in errors[0] and "Traceback" not in err, err
        assert not out.exists() and not list(tmp_path.glob(f".out-{command}*"))


def test_truncated_gguf_is_named_truncated(tmp_path, capsys):
    from llmshearing.hf.gguf import smollm2_gguf

    whole = smollm2_gguf().read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[:2])
    assert main(["convert", "hf-to-composer", str(cut), str(tmp_path / "out")]) == 2
    assert f"{cut} is truncated: it has 2 bytes; download it again" in capsys.readouterr().err
    for size in (10, 1000, len(whole) // 2, len(whole) - 10):  # in the header, the tensor table, the data
        cut = tmp_path / "cut.gguf"
        cut.write_bytes(whole[:size])
        assert main(["convert", "hf-to-composer", str(cut), str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.splitlines() == [
            f"llmshearing convert: error: {cut} is truncated or damaged: its {size:,} bytes do not hold the GGUF "
            "header and tensors it describes; download it again"
        ], err
        assert not (tmp_path / "out").exists()


@pytest.mark.slow
@needs_tmpfs
def test_read_only_output_is_one_line(tiny_source, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    command = (
        f"mount -t tmpfs -o size=64k,ro none {disk} && {sys.executable} -m llmshearing.cli convert composer-to-hf "
        f"{tiny_source} {disk / 'hf'}; echo exit=$?"
    )
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", command], capture_output=True, text=True)
    assert proc.stderr.strip().splitlines()[-1] == (
        f"llmshearing convert: error: {disk / 'hf'}: the file system is read-only; choose an output path on a "
        "writable disk"
    ), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and proc.stdout.split() == ["exit=2"]


def test_a_sharded_checkpoint_missing_shard_files_names_them_in_one_line(tiny_source, tmp_path, capsys):
    import torch
    from torch.distributed.checkpoint import FileSystemWriter, save

    from llmshearing.checkpoint.sharded import ShardedModelSource

    folder = tmp_path / "ep0-ba2"
    state = {"state.model.model.wte.weight": torch.ones(4, 3), "state.model.l0_module.x": torch.zeros(2)}
    save(state, storage_writer=FileSystemWriter(str(folder)), no_dist=True)
    assert sorted(ShardedModelSource(folder).keys()) == ["l0_module.x", "wte.weight"]
    shards = sorted(p.name for p in folder.glob("*.distcp"))
    assert shards
    (folder / shards[0]).unlink()
    with pytest.raises(ValueError, match=rf"is missing 1 of its {len(shards)} shard files \({shards[0]}\)"):
        ShardedModelSource(folder)
    capsys.readouterr()
    config = str(Path(tiny_source) / "config.json")
    assert main(["convert", "composer-to-hf", str(folder), str(tmp_path / "hf"), "--config", config]) == 2
    err = capsys.readouterr().err
    assert f"is missing 1 of its {len(shards)} shard files ({shards[0]})" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "hf").exists()
