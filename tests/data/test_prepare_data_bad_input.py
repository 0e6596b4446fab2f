"""Faults while preparing data, through both entry points (``llmshearing prepare-data`` and
``data_prep/prepare_mds.py``): Ctrl-C, a full or read-only disk, a tokenizer hub name without the hub, a
truncated GGUF tokenizer; each one line (exit code 2, or 130 for Ctrl-C) and nothing half-written."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import needs_tmpfs
from test_prepare_mds import WORDS, tokenizer_dir, write_corpus  # noqa: F401 (tokenizer_dir: a fixture)

from llmshearing.cli import main

REPO = Path(__file__).resolve().parents[2]
ENTRY_POINTS = {
    "cli": ([sys.executable, "-m", "llmshearing.cli", "prepare-data"], "llmshearing prepare-data: "),
    "script": ([sys.executable, str(REPO / "data_prep" / "prepare_mds.py")], ""),
}


def _options(raw: Path, out: Path, tokenizer: str | Path, *extra: str) -> list[str]:
    return [
        "--input",
        str(raw),
        "--output",
        str(out),
        "--tokenizer",
        str(tokenizer),
        "--seq-len",
        "16",
        *extra,
    ]


@pytest.mark.slow
@needs_tmpfs
# both disks through the CLI; the script shares its error handler, so one disk case shows it is wired
@pytest.mark.parametrize(
    ("entry", "mount"), [("cli", "size=16k"), ("cli", "size=64k,ro"), ("script", "size=16k")]
)
def test_full_or_read_only_disk_is_one_line_naming_the_output(tmp_path, tokenizer_dir, entry, mount):  # noqa: F811
    raw = write_corpus(tmp_path / "raw")
    disk = tmp_path / "disk"
    disk.mkdir()
    command, prefix = ENTRY_POINTS[entry]
    options = _options(
        raw, disk / "mds", tokenizer_dir, "--eval-seqs", "2", "--workers", "1", "--no-progress"
    )
    script = f"mount -t tmpfs -o {mount} none {disk} && {' '.join([*command, *options])}; echo exit=$?; ls -A {disk}"
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    if "ro" in mount:
        expected = f"{disk / 'mds'}: the file system is read-only; choose an output path on a writable disk"
    else:
        expected = f"no space left on {disk} while writing {disk / 'mds'}"
    assert len(errors) == 1 and errors[0].startswith(f"{prefix}error: {expected}"), proc.stderr[-3000:]
    assert proc.stdout.split() == ["exit=2"], proc.stdout  # nothing left on the disk


@pytest.mark.slow
@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_ctrl_c_stops_every_process_with_one_line_and_leaves_nothing(tmp_path, tokenizer_dir, entry):  # noqa: F811
    rng = random.Random(0)
    raw = tmp_path / "raw"
    for domain in ("alpha", "beta"):
        (raw / domain).mkdir(parents=True)
        lines = (json.dumps({"text": " ".join(rng.choices(WORDS, k=200))}) for _ in range(40_000))
        (raw / domain / "part.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "mds"
    command, prefix = ENTRY_POINTS[entry]
    proc = subprocess.Popen(
        [*command, *_options(raw, out, tokenizer_dir, "--workers", "2", "--no-progress")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # Ctrl-C reaches the whole process group, workers included
    )
    deadline = time.monotonic() + 240
    while not list(tmp_path.glob(".mds.tmp-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)  # interrupt once the output is being written
    time.sleep(1.0)
    assert proc.poll() is None, "prepare-data finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err[-3000:]
    assert err.splitlines() == [
        f"{prefix}interrupted before {out} was complete; nothing half-written was left (run the command again "
        "to redo it)"
    ], err[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


@pytest.mark.slow
def test_tokenizer_hub_name_without_network_fails_at_once(tmp_path):
    raw = write_corpus(tmp_path / "raw")
    closed = "http://127.0.0.1:9"  # the discard port: every connection is refused
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf-home"),
        "NO_PROXY": "",
        "no_proxy": "",
        "HF_HUB_OFFLINE": "0",
    }
    env.update({name: closed for name in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy")})
    name = "HuggingFaceTB/SmolLM2-135M"
    started = time.perf_counter()
    proc = subprocess.run(
        [*ENTRY_POINTS["cli"][0], *_options(raw, tmp_path / "mds", name, "--workers", "1")],
        capture_output=True,
        text=True,
        env=env,
    )
    seconds = time.perf_counter() - started
    assert proc.returncode == 2 and "Retry" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines() == [
        f"llmshearing prepare-data: error: tokenizer {name!r} is not a local directory, and the Hugging Face hub "
        "cannot be reached (no network?) and it is not in the local Hugging Face cache; pass a tokenizer "
        "directory saved with save_pretrained, or a .gguf file"
    ]
    assert seconds < 90 and not (tmp_path / "mds").exists()  # no minutes of retries (imports aside)


def test_truncated_gguf_tokenizer_is_named_truncated(tmp_path, capsys):
    from llmshearing.hf.gguf import smollm2_gguf

    raw = write_corpus(tmp_path / "raw")
    cut = tmp_path / "tokenizer.gguf"
    with open(smollm2_gguf(), "rb") as handle:
        cut.write_bytes(handle.read(100_000))
    assert main(["prepare-data", *_options(raw, tmp_path / "mds", cut)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"llmshearing prepare-data: error: {cut} is truncated or damaged: its 100,000 bytes do not hold the GGUF "
        "header and tensors it describes; download it again"
    ]
    assert not (tmp_path / "mds").exists()
