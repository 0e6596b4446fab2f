"""Bad input to ``llmshearing evaluate``: NaN weights, data without the asked split, a domain whose index
lists no shards, raw text given as data, a read-only --json; each one line, exit code 2, nothing written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import needs_tmpfs

from llmshearing.cli import main


def _one_error(capsys) -> str:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def test_nan_weights_are_refused_for_both_loaders(tiny_source, tiny_mds, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    project = Path(shutil.copytree(tiny_source, tmp_path / "project"))
    tensors = load_file(project / "model.safetensors")
    tensors["norm.weight"][0] = float("nan")
    save_file(tensors, project / "model.safetensors")
    assert main(["evaluate", str(project), tiny_mds, "--json", str(tmp_path / "e.json")]) == 2
    assert f"{project}: tensor norm.weight holds NaN or Inf values (1 of 32)" in _one_error(capsys)
    hf = tmp_path / "hf"
    assert main(["convert", "composer-to-hf", tiny_source, str(hf), "--dtype", "fp32"]) == 0
    tensors = load_file(hf / "model.safetensors")
    tensors["model.norm.weight"][1] = float("inf")
    save_file(tensors, hf / "model.safetensors")
    capsys.readouterr()
    assert main(["evaluate", str(hf), tiny_mds, "--transformers"]) == 2
    assert f"{hf}: tensor model.norm.weight holds NaN or Inf values" in _one_error(capsys)
    assert not (tmp_path / "e.json").exists()


def test_data_prepared_without_an_eval_split_names_the_splits_it_has(tiny_source, tiny_mds, tmp_path, capsys):
    data = Path(shutil.copytree(tiny_mds, tmp_path / "data"))
    shutil.rmtree(data / "eval")
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["splits"]["eval"] = {domain: {"samples": 0} for domain in manifest["domains"]}  # --eval-seqs 0
    (data / "manifest.json").write_text(json.dumps(manifest))
    assert main(["evaluate", tiny_source, str(data)]) == 2
    line = _one_error(capsys)
    assert f"{data} has no eval split (it was prepared with --eval-seqs 0" in line
    assert "its splits: train, test" in line and "not an MDS root" not in line
    assert main(["evaluate", tiny_source, str(data), "--split", "test"]) == 0


def test_domain_without_shards_and_raw_text_are_named(tiny_source, tiny_mds, tmp_path, capsys):
    data = Path(shutil.copytree(tiny_mds, tmp_path / "data"))
    index = data / "eval" / "beta" / "index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "shards": []}))
    assert main(["evaluate", tiny_source, str(data)]) == 2
    assert f"{index} lists no samples (no shards)" in _one_error(capsys)
    raw = tmp_path / "raw" / "web"
    raw.mkdir(parents=True)
    (raw / "a.jsonl").write_text('{"text": "x"}\n')
    assert main(["evaluate", tiny_source, str(raw.parent)]) == 2
    assert "holds JSON-lines text, not prepared data: run `llmshearing prepare-data" in _one_error(capsys)


@pytest.mark.slow
@needs_tmpfs
def test_read_only_json_output_is_one_line(tiny_source, tiny_mds, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    command = (
        f"mount -t tmpfs -o size=64k,ro none {disk} && {sys.executable} -m llmshearing.cli evaluate {tiny_source} "
        f"{tiny_mds} --json {disk / 'e.json'}; echo exit=$?"
    )
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", command], capture_output=True, text=True)
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert errors == [
        f"llmshearing evaluate: error: {disk / 'e.json'}: the file system is read-only; choose an output path on "
        "a writable disk"
    ], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and proc.stdout.split()[-1] == "exit=2"
