"""Every entry point fed malformed recipes, paths and files: the answer is exit code 2 and one error line,
never a traceback.

Each case runs through the entry point's ``main`` in this process (the same error handler a user's
process runs); one case of each entry point also runs in a process of its own, as a user starts it, to
show that the exit code and the single line survive the process boundary."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TRAIN = [sys.executable, "-m", "llmshearing.train"]
CLI = [sys.executable, "-m", "llmshearing.cli"]
PREPARE = [sys.executable, str(REPO / "data_prep" / "prepare_mds.py")]
TINY = str(REPO / "yamls" / "tiny" / "prune.yaml")
NOISE = bytes(range(256)) * 8  # not text, not JSON, not YAML, not a checkpoint


def _file(tmp: Path, name: str, content: str | bytes) -> str:
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return str(path)


def _model_dir(tmp: Path, config: str | bytes, weights: bytes | None = None) -> str:
    _file(tmp, "model/config.json", config)
    if weights is not None:
        _file(tmp, "model/model.safetensors", weights)
    return str(tmp / "model")


def _raw(tmp: Path) -> str:
    _file(tmp, "raw/web/a.jsonl", '{"text": "one two three"}\n')
    return str(tmp / "raw")


def _train_args(src: str, data: str, tmp: Path) -> list[str]:
    return [
        TINY,
        f"model.path={src}",
        f"data_local={data}",
        f"save_folder={tmp / 'run'}",
        "max_duration=4ba",
        "eval_interval=4ba",
    ]


# name -> (command builder given the temporary folder and the tiny fixtures, substring of the error line)
Case = Callable[[Path, str, str], list[str]]
CASES: dict[str, tuple[Case, str]] = {
    "train: recipe is a list": (
        lambda t, s, d: [*TRAIN, _file(t, "r.yaml", "- a\n- b\n")],
        "not a mapping of keys",
    ),
    "train: recipe has a tab": (lambda t, s, d: [*TRAIN, _file(t, "r.yaml", "a:\n\tb: 1\n")], "not tabs"),
    "train: recipe is binary": (lambda t, s, d: [*TRAIN, _file(t, "r.yaml", NOISE)], "is not"),
    "train: recipe is a directory": (lambda t, s, d: [*TRAIN, str(t)], "does not exist"),
    "train: override without a value": (lambda t, s, d: [*TRAIN, TINY, "model.path"], "key=value"),
    "train: override that does not parse": (lambda t, s, d: [*TRAIN, TINY, "seed=[1"], "cannot be parsed"),
    "train: model.path is a text file": (
        lambda t, s, d: [*TRAIN, *_train_args(_file(t, "notes.pt", "hello\n"), d, t)],
        "notes.pt",
    ),
    "train: model.path holds broken JSON": (
        lambda t, s, d: [*TRAIN, *_train_args(_model_dir(t, "{oops", b""), d, t)],
        "config.json",
    ),
    "train: data_local is raw text": (lambda t, s, d: [*TRAIN, *_train_args(s, _raw(t), t)], "data_local"),
    "train: data_local is a file": (
        lambda t, s, d: [*TRAIN, *_train_args(s, _file(t, "data.txt", "x"), t)],
        "data_local",
    ),
    "prepare_mds.py: input is a file": (
        lambda t, s, d: [
            *PREPARE,
            "--input",
            _file(t, "in.jsonl", "{}"),
            "--output",
            str(t / "o"),
            "--tokenizer",
            "x",
            "--seq-len",
            "8",
        ],
        "in.jsonl",
    ),  # fmt: skip
    "prepare_mds.py: tokenizer is noise": (
        lambda t, s, d: [
            *PREPARE,
            "--input",
            _raw(t),
            "--output",
            str(t / "o"),
            "--tokenizer",
            _file(t, "tok.gguf", b"GGUF" + NOISE),
            "--seq-len",
            "8",
            "--workers",
            "1",
        ],
        "tok.gguf",
    ),  # fmt: skip
    "prepare_mds.py: output is a file": (
        lambda t, s, d: [
            *PREPARE,
            "--input",
            _raw(t),
            "--output",
            _file(t, "out", "x"),
            "--tokenizer",
            "x",
            "--seq-len",
            "8",
        ],
        "out",
    ),  # fmt: skip
    "prepare-data: seq-len is not a number": (
        lambda t, s, d: [
            *CLI,
            "prepare-data",
            "--input",
            _raw(t),
            "--output",
            str(t / "o"),
            "--tokenizer",
            "x",
            "--seq-len",
            "many",
        ],
        "--seq-len",
    ),  # fmt: skip
    "prepare-data: input holds no domains": (
        lambda t, s, d: [
            *CLI,
            "prepare-data",
            "--input",
            str(Path(_file(t, "empty/x.txt", "x")).parent),
            "--output",
            str(t / "o"),
            "--tokenizer",
            "x",
            "--seq-len",
            "8",
        ],
        "empty",
    ),  # fmt: skip
    "convert: config.json is a list": (
        lambda t, s, d: [*CLI, "convert", "hf-to-composer", _model_dir(t, "[]", b""), str(t / "o")],
        "config.json",
    ),
    "convert: weights are noise": (
        lambda t, s, d: [
            *CLI,
            "convert",
            "composer-to-hf",
            _model_dir(t, (Path(s) / "config.json").read_text(), NOISE),
            str(t / "o"),
        ],
        "model.safetensors",
    ),  # fmt: skip
    "convert: GGUF is noise": (
        lambda t, s, d: [
            *CLI,
            "convert",
            "hf-to-composer",
            _file(t, "m.gguf", b"GGUF" + NOISE),
            str(t / "o"),
        ],
        "truncated or damaged",
    ),
    "prune-model: checkpoint is noise": (
        lambda t, s, d: [*CLI, "prune-model", _file(t, "ep0-ba1-rank0.pt", NOISE), str(t / "o")],
        "ep0-ba1-rank0.pt",
    ),
    "prune-oneshot: data is a file": (
        lambda t, s, d: [
            *CLI,
            "prune-oneshot",
            s,
            str(t / "o"),
            "--data",
            _file(t, "d", "x"),
            "--target",
            "n_layers=2",
        ],
        "d",
    ),  # fmt: skip
    "prune-oneshot: target config is a tab-indented YAML": (
        lambda t, s, d: [
            *CLI,
            "prune-oneshot",
            s,
            str(t / "o"),
            "--data",
            d,
            "--target-config",
            _file(t, "t.yaml", "target_model:\n\tn_layers: 2\n"),
        ],
        "t.yaml",
    ),  # fmt: skip
    "search-shape: data is a file": (
        lambda t, s, d: [
            *CLI,
            "search-shape",
            s,
            "--budget",
            "params=2e4",
            "--data",
            _file(t, "d", "x"),
            "--out",
            str(t / "o"),
        ],
        "d",
    ),  # fmt: skip
    "evaluate: data is raw text": (lambda t, s, d: [*CLI, "evaluate", s, _raw(t)], "prepare-data"),
    "evaluate: model is noise": (lambda t, s, d: [*CLI, "evaluate", _file(t, "m.pt", NOISE), d], "m.pt"),
    "report: run folder is a file": (lambda t, s, d: [*CLI, "report", _file(t, "run.txt", "x")], "run.txt"),
    "reference-loss: losses file is noise": (
        lambda t, s, d: [
            *CLI,
            "reference-loss",
            "fit",
            "--sizes",
            "1",
            "2",
            "3",
            "--target-size",
            "1.3b",
            "--losses-file",
            _file(t, "l.json", NOISE),
        ],
        "l.json",
    ),  # fmt: skip
}


# one case per entry point that also runs as a process of its own
IN_A_PROCESS = (
    "train: model.path is a text file",
    "prepare_mds.py: tokenizer is noise",
    "evaluate: model is noise",
)


def _main_of(command: list[str]) -> tuple[Callable[[list[str]], int], list[str]]:
    """The ``main`` a command line starts, and the arguments it is given."""
    if command[:3] == TRAIN:
        from llmshearing.train import main

        return main, command[3:]
    if command[:3] == CLI:
        from llmshearing.cli import main

        return main, command[3:]
    assert command[:2] == PREPARE, command
    spec = importlib.util.spec_from_file_location("prepare_mds_script", PREPARE[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main, command[2:]


def _check(code: int, stderr: str, names: str, tmp_path: Path) -> None:
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert code == 2 and len(errors) == 1, (code, stderr[-3000:])
    assert names in errors[0], errors[0]
    assert not (tmp_path / "run").exists() and not (tmp_path / "o").exists()


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_input_is_one_line_and_exit_code_2(
    case, tmp_path, tiny_source, tiny_mds, capfd, monkeypatch
):
    build, names = CASES[case]
    main, argv = _main_of(build(tmp_path, tiny_source, tiny_mds))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.chdir(REPO)
    capfd.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's usage errors end the process with code 2
        code = exit_.code
    _check(code, capfd.readouterr().err, names, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("case", IN_A_PROCESS)
def test_malformed_input_in_a_process_of_its_own(case, tmp_path, tiny_source, tiny_mds):
    build, names = CASES[case]
    command = build(tmp_path, tiny_source, tiny_mds)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    _check(proc.returncode, proc.stderr, names, tmp_path)


def test_every_entry_point_and_command_has_cases():
    covered = {case.split(":")[0] for case in CASES}
    commands = {
        "convert",
        "prune-model",
        "prune-oneshot",
        "prepare-data",
        "evaluate",
        "report",
        "reference-loss",
        "search-shape",
    }
    assert commands | {"train", "prepare_mds.py"} <= covered, sorted(commands - covered)
    assert {case.split(":")[0] for case in IN_A_PROCESS} >= {"train", "prepare_mds.py", "evaluate"}
