"""``bench/fsdp_gpu.py`` (the GPU check) and ``bench/host_memory.py``: the parts that run without a GPU
(the runs' overrides and FSDP version, the planner comparison, the tables) and, slow, the CPU check."""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_check():
    before = list(sys.path)
    yield _load("fsdp_gpu")
    sys.path[:] = before


def _args(**kw) -> argparse.Namespace:
    base = dict(seq_len=64, steps=8, batch_size=2, cpu_check=True, port=29900)
    return argparse.Namespace(**{**base, **kw})


def test_runs_load_on_rank0_under_the_version_asked(gpu_check, monkeypatch, tmp_path):
    spec = gpu_check.RECIPES["tiny"]
    run_args = gpu_check.overrides(spec, _args(), tmp_path / "src", tmp_path / "mds", tmp_path / "run")
    assert "model.init_device=mixed" in run_args
    seen = {}

    def fake_run(command, env, **kw):
        seen["version"], seen["command"] = env["FSDP_VERSION"], command
        return subprocess.CompletedProcess(command, 0, "llmshearing: ok\n", "")

    monkeypatch.setattr(gpu_check.subprocess, "run", fake_run)
    for version in (1, 2):
        output = gpu_check.launch(_args(), spec["yaml"], run_args, version=version)
        assert seen["version"] == str(version) and "llmshearing: ok" in output


def test_plan_beside_the_measured_peak(gpu_check, tmp_path):
    spec = gpu_check.RECIPES["tiny"]
    _, checkpoint, data = gpu_check.write_inputs(tmp_path, spec["source"], spec["domains"], 64, 4)
    run_args = gpu_check.overrides(spec, _args(), checkpoint, data, tmp_path / "run")
    plan = gpu_check.planned(spec["yaml"], run_args, 2, 80 * 10**9)
    assert set(plan["stages"]) == {"pruning (training step)", "evaluation"}
    assert plan["bytes"] == max(plan["stages"].values()) > 0 and plan["fits"]
    assert gpu_check.plan_error(plan["bytes"] / 1e9 / 1.25, plan["bytes"]) == pytest.approx(0.25)
    assert gpu_check.plan_error(None, plan["bytes"]) is None  # CPU: no GPU peak


def _run(version: int, peak: float | None, plan: float, error: float | None) -> dict:
    return {
        "tokens_per_sec": 1000.0,
        "mfu": 0.3 if peak else None,
        "peak_gb": peak,
        "teacher_time_share": None,
        "fsdp_version": version,
        "plan_gb": plan,
        "plan_stages_gb": {},
        "plan_error": error,
        "announced": ["llmshearing: source read in the one process"],
    }


def test_table_has_version_plan_and_error_columns(gpu_check):
    env = {
        "date": "2026-12-04",
        "device": "NVIDIA H200",
        "torch": "2.7.0",
        "composer": "0.32.1",
        "python": "3.12",
        "flash_attn": "imports",
        "peak_tflops": 989.0,
        "fsdp_versions": [1, 2],
        "plan_memory_gb": 150.0,
        "precision": "amp_bf16",
        "seq_len": 2048,
        "batch_size": 8,
        "steps": 12,
    }
    result = {
        "recipe": "yamls/tiny/prune.yaml",
        "target": {},
        "runs": {"auto": _run(1, 2.0, 2.2, 0.1), "fsdp2": _run(2, 2.0, 1.8, -0.1)},
        "resume": {"identical": True, "max_abs_diff": 0.0, "tensors": 10},
        "prune_model": {"sharded": True, "shape": {}, "matches_target": True, "seconds": 1.0},
    }
    text = gpu_check.report(env, {"tiny": result})
    assert "| run | FSDP | tokens/s | MFU | peak GB | plan GB | plan error |" in text
    assert "| auto | 1 |" in text and "| 2.20 | +10% |" in text
    assert "| fsdp2 | 2 |" in text and "| 1.80 | -10% |" in text
    assert "run 1 again under FSDP2 (`fsdp2`)" in text and "model.init_device=mixed" in text
    cpu = gpu_check.report(
        {**env, "device": "CPU", "fsdp_versions": [2], "peak_tflops": None},
        {"tiny": {**result, "runs": {"auto": _run(2, None, 0.05, None)}}},
    )
    assert "| auto | 2 |" in cpu and "| 0.05 | n/a |" in cpu and "n/a on CPU" in cpu


def test_cpu_check_refuses_fsdp1(gpu_check, capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["--cpu-check", "--fsdp-versions", "1", "2"])
    assert "FSDP2 only" in capsys.readouterr().err


@pytest.mark.slow
def test_cpu_check_runs_the_pipeline_with_the_plan(gpu_check, capsys):
    assert gpu_check.main(["--cpu-check"]) == 0
    out = capsys.readouterr().out
    assert "plan GB | plan error" in out and "| auto | 2 |" in out and "| n/a |" in out
    assert "RESULT fsdp_gpu skipped=cpu check passed" in out


def test_host_memory_ratios_against_one_process():
    host = _load("host_memory")
    mib = 1 << 20
    rows = host.summarise(
        [
            {
                "ranks": 1,
                "setting": "sharded",
                "startup": [1000 * mib],
                "training": [2000 * mib],
                "stack": [800 * mib],
            },
            {
                "ranks": 2,
                "setting": "sharded",
                "startup": [1000 * mib, 900 * mib],
                "training": [1500 * mib, 1500 * mib],
                "stack": [800 * mib, 850 * mib],
            },
        ]
    )
    assert rows[0]["startup_ratio"] == rows[0]["above_ratio"] == 1.0
    assert rows[1]["above"] == [200 * mib, 50 * mib]
    assert rows[1]["startup_ratio"] == pytest.approx(1.9)
    assert rows[1]["above_ratio"] == pytest.approx(1.25)
    assert rows[1]["training_ratio"] == pytest.approx(1.5)
    assert set(host.SETTINGS) == {"cpu", "mixed", "sharded"} and host.SETTINGS["sharded"] == ("mixed", True)
