"""A training run whose plan does not fit the devices it finds warns, in one line, before anything is loaded
(``llmshearing.planning.preflight``); ``LLMSHEARING_DEVICE_MEMORY`` stands for smaller devices."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from llmshearing.planning.plan import GIB, USABLE_FRACTION, run_shape, train_stage
from llmshearing.planning.preflight import MEMORY_ENV, fit_warning, host_memory_bytes
from llmshearing.train import build_trainer
from llmshearing.train import main as train_main
from llmshearing.training.config import load_config, validate_config

PRUNE = "yamls/tiny/prune.yaml"
BIG_BATCH = ["global_train_batch_size=64", "device_train_microbatch_size=64", "max_seq_len=64"]


def _values(source: str, data: str, folder: Path, *extra: str) -> dict:
    overrides = [f"model.path={source}", f"data_local={data}", f"save_folder={folder}", *extra]
    return validate_config(load_config(PRUNE, overrides), 1, check_paths=False)


def test_a_step_that_does_not_fit_names_the_stage_the_shortfall_and_the_key(tiny_source, tiny_mds, tmp_path):
    from llmshearing.checkpoint.reading import read_any_config

    values = _values(tiny_source, tiny_mds, tmp_path / "run", *BIG_BATCH)
    shape = run_shape(values, read_any_config(Path(tiny_source) / "config.json")[0], None)
    whole, single = train_stage(shape, 1, 1).total, train_stage(shape, 1, 1, micro_batch=1).total
    assert single < whole
    memory = math.ceil((GIB + (whole + single) // 2) / USABLE_FRACTION)  # micro-batch 64 no, 1 yes
    line = fit_warning(values, 1, 1, {MEMORY_ENV: str(memory)})
    assert line is not None and line.startswith("warning: the plan (an estimate) does not fit"), line
    assert f"host memory ({MEMORY_ENV}) for 1 CPU rank" in line
    assert "pruning (training step) needs" in line and "more than the" in line
    assert "set device_train_microbatch_size=" in line and "\n" not in line
    assert fit_warning(values, 1, 1, {MEMORY_ENV: "1TB"}) is None  # the same run on a big machine


def test_the_tiny_recipe_fits_this_machine(tiny_source, tiny_mds, tmp_path):
    assert host_memory_bytes() > GIB
    assert fit_warning(_values(tiny_source, tiny_mds, tmp_path / "run"), 1, 1, {}) is None


def test_the_warning_comes_before_the_source_is_read(tiny_source, tiny_mds, tmp_path, capsys, monkeypatch):
    """The run goes on after the warning; with damaged weights it fails at the load, after the warning."""
    monkeypatch.setenv(MEMORY_ENV, "100MB")
    args = [f"model.path={tiny_source}", f"data_local={tiny_mds}", f"save_folder={tmp_path / 'run'}"]
    trainer, _ = build_trainer(PRUNE, args)  # a warning, not an error
    trainer.close()
    err = capsys.readouterr().err
    assert (
        f"llmshearing: warning: the plan (an estimate) does not fit 100.0 MiB of host memory ({MEMORY_ENV})"
        in err
    )
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_source, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    args = [f"model.path={damaged}", f"data_local={tiny_mds}", f"save_folder={tmp_path / 'run2'}"]
    assert train_main([PRUNE, *args]) != 0
    err = capsys.readouterr().err
    warned = err.find("the plan (an estimate) does not fit")
    refused = err.find("model.safetensors")
    assert 0 <= warned < refused, err[-3000:]


@pytest.mark.parametrize("text", ["", "MemTotal: x kB"])
def test_host_memory_falls_back_to_sysconf(tmp_path, text):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(text)
    assert host_memory_bytes(meminfo) == host_memory_bytes(tmp_path / "absent") > GIB


def test_a_bad_memory_setting_is_a_warning_not_an_error(tiny_source, tiny_mds, tmp_path, monkeypatch, capsys):
    from llmshearing.planning.preflight import warn_if_plan_does_not_fit

    monkeypatch.setenv(MEMORY_ENV, "lots")
    line = warn_if_plan_does_not_fit(_values(tiny_source, tiny_mds, tmp_path / "run"), 1, 1)
    assert line is not None and "the run's plan was not checked" in line and MEMORY_ENV in line
    assert capsys.readouterr().err.strip() == f"llmshearing: {line}"
