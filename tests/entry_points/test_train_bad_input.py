"""Bad input and faults at the training entry point: each a one-line error naming the fix, no
traceback, nothing half-written, no run damaged; and a killed or finished run resumes or is reused."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import needs_tmpfs

from llmshearing.checkpoint.composer_files import (
    LATEST_NAME,
    is_complete_torch_file,
    repair_checkpoint_folder,
)
from llmshearing.train import build_trainer, main
from llmshearing.training.run_folder import is_finished

PRUNE = "yamls/tiny/prune.yaml"
CONTINUED = "yamls/tiny/continued.yaml"
SHORT = ["max_duration=4ba", "eval_interval=4ba", "save_interval=4ba"]


def _args(source: str, data: str, folder: Path, *extra: str) -> list[str]:
    return [f"model.path={source}", f"data_local={data}", f"save_folder={folder}", *extra]


def _digest(folder: Path) -> dict[str, str]:
    """Content hash of every file under ``folder`` (symlinks by their target)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            out[key] = "-> " + os.readlink(path)
        elif path.is_file():
            out[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(tiny_source, tiny_mds, tmp_path_factory) -> Path:
    """A tiny pruning run trained to its max_duration (4 batches)."""
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    folder = tmp_path_factory.mktemp("finished") / "run"
    assert main([PRUNE, *_args(tiny_source, tiny_mds, folder, *SHORT)]) == 0
    clean_stale_shared_memory()
    return folder


@pytest.fixture()
def run_copy(finished_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy, symlinks=True)
    return copy


def test_fresh_start_into_a_finished_run_is_refused_before_writing(
    tiny_source, tiny_mds, run_copy, capsys, clean_shm
):
    before = _digest(run_copy)
    other_target = "model.l0_module.target_model.n_layers=1"
    assert main([PRUNE, *_args(tiny_source, tiny_mds, run_copy, *SHORT, other_target)]) == 2
    line = _one_error_line(capsys)
    assert "already holds a run" in line and "autoresume=true" in line and "save_overwrite=true" in line
    assert _digest(run_copy) == before  # config.json and metrics.jsonl untouched


def test_resume_with_other_mask_settings_is_refused(tiny_source, tiny_mds, run_copy, capsys, clean_shm):
    before = _digest(run_copy)
    overrides = [*SHORT, "autoresume=true", "model.l0_module.target_model.n_layers=1"]
    assert main([PRUNE, *_args(tiny_source, tiny_mds, run_copy, *overrides)]) == 2
    line = _one_error_line(capsys)
    assert "holds a different run" in line and "l0_module.target_model" in line
    assert _digest(run_copy) == before


def test_resume_with_other_optimizer_settings_is_refused_before_loading(
    tiny_source, tiny_mds, run_copy, capsys, clean_shm
):
    """The checkpoint's optimizer state holds lr, betas and the mask and multiplier lrs: a resume would train on
    with those, so a recipe changing them is refused (naming each), before the model is read."""
    before = _digest(run_copy)
    overrides = ["max_duration=8ba", "autoresume=true", "optimizer.lr=0.002", "model.l0_module.mask_lr=0.25"]
    assert main([PRUNE, *_args(tiny_source, tiny_mds, run_copy, *overrides)]) == 2
    err = capsys.readouterr().err
    assert "source read" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert "optimizer.lr: 0.002 vs 0.001" in line and "model.l0_module.mask_lr: 0.25 vs " in line, line
    assert "load_weights_only=true" in line and "Traceback" not in err
    assert _digest(run_copy) == before


def test_finished_run_is_reused_not_retrained(tiny_source, tiny_mds, run_copy, capsys, clean_shm):
    checkpoints = _digest(run_copy / "checkpoints")
    assert is_finished(run_copy)
    assert main([PRUNE, *_args(tiny_source, tiny_mds, run_copy, *SHORT, "autoresume=true")]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert _digest(run_copy / "checkpoints") == checkpoints


def test_resume_past_a_shorter_max_duration_is_refused(tiny_source, tiny_mds, run_copy, capsys, clean_shm):
    overrides = ["max_duration=3ba", "eval_interval=4ba", "save_interval=4ba", "autoresume=true"]
    assert main([PRUNE, *_args(tiny_source, tiny_mds, run_copy, *overrides)]) == 2
    line = _one_error_line(capsys)
    assert "already trained for 4 batches" in line and "max_duration" in line


def test_save_overwrite_replaces_the_previous_run(tiny_source, tiny_mds, run_copy, clean_shm):
    from llmshearing.training.metrics_log import read_metrics

    (run_copy / "metrics.jsonl").write_text('{"step": 99, "loss/train/total": 7.0}\n')
    overrides = [*SHORT, "save_overwrite=true", "model.l0_module.target_model.n_layers=1"]
    assert main([PRUNE, *_args(tiny_source, tiny_mds, run_copy, *overrides)]) == 0
    steps = {step for series in read_metrics(str(run_copy / "metrics.jsonl")).values() for step, _ in series}
    assert 99 not in steps and max(steps) == 4  # the old run's records are gone, not mixed in
    assert '"n_layers": 1' in (run_copy / "config.json").read_text()


def test_continued_pretraining_from_a_pruning_checkpoint_is_refused(
    tiny_mds, finished_run, tmp_path, capsys, clean_shm
):
    ckpt = finished_run / "checkpoints" / "latest-rank0.pt"
    folder = tmp_path / "continued"
    assert main([CONTINUED, *_args(str(ckpt), tiny_mds, folder, *SHORT)]) == 2
    line = _one_error_line(capsys)
    assert "pruning run's checkpoint" in line and "llmshearing prune-model" in line
    assert not folder.exists()


def test_failed_start_leaves_no_stub_run_folder(tiny_source, tiny_mds, tmp_path, clean_shm):
    folder = tmp_path / "run"
    # the checkpoint to load is named only when the Trainer is built, after config.json was written
    overrides = [*SHORT, f"load_path={tmp_path / 'missing.pt'}"]
    with pytest.raises(FileNotFoundError):
        build_trainer(PRUNE, _args(tiny_source, tiny_mds, folder, *overrides))
    assert not folder.exists()
    # a folder that existed keeps what it held and loses only what the failed start wrote
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(FileNotFoundError):
        build_trainer(PRUNE, _args(tiny_source, tiny_mds, folder, *overrides))
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("callbacks.data_loading.target_loss=[.nan,2.0]", "callbacks.data_loading.target_loss[0] (alpha)"),
        ("optimizer.lr=nan", "optimizer.lr must be a finite number > 0"),
        ("scheduler.t_warmup=8ba", "scheduler.t_warmup (8ba) is not shorter than max_duration"),
    ],
)
def test_bad_recipe_value_is_refused_before_anything_runs(
    tiny_source, tiny_mds, tmp_path, capsys, override, message
):
    folder = tmp_path / "run"
    assert main([PRUNE, *_args(tiny_source, tiny_mds, folder, *SHORT, override)]) == 2
    assert message in _one_error_line(capsys)
    assert not folder.exists()


def test_recipe_mistakes_are_answered_before_composer_is_imported(tiny_source, tiny_mds, tmp_path):
    """Composer's import takes seconds; every mistake but a callback's or logger's setting (checked against
    Composer's classes, last) is answered without it, and that one still gets its line. One fresh process runs
    the entry point once per mistake, the Composer-free ones first."""
    folder = tmp_path / "run"
    cases = [
        ("model.l0_module.target_model.n_layers=99", False, "larger than the source model's n_layers=3"),
        ("model.l0_modul.lr=1", False, "did you mean model.l0_module?"),
        ("callbacks.data_loading.proportion=[1.0]", False, "has 1 values but there are 2 domains"),
        (
            "callbacks.data_loading.set_names=[alpha,web]",
            False,
            "domains ['web'] of callbacks.data_loading.set_names",
        ),
        ("train_loader.dataset.shufle=false", False, "did you mean train_loader.dataset.shuffle?"),
        ("eval_loader.num_worker=2", False, "did you mean eval_loader.num_workers?"),
        ("callbacks.speed_monitor.windw_size=5", True, "callbacks.speed_monitor.windw_size is not a setting"),
    ]
    runs = [[PRUNE, *_args(tiny_source, tiny_mds, folder, *SHORT, override)] for override, _, _ in cases]
    probe = textwrap.dedent(
        f"""
        import sys
        from llmshearing.train import main
        for args in {runs!r}:
            code = main(args)
            print("composer imported:", "composer" in sys.modules, "exit", code, flush=True)
            print("--", file=sys.stderr, flush=True)
        """
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    answers = done.stdout.splitlines()
    stderrs = done.stderr.split("--\n")[: len(cases)]
    assert len(answers) == len(cases) and "Traceback" not in done.stderr, (done.stdout, done.stderr)
    for (override, composer_needed, message), answer, err in zip(cases, answers, stderrs, strict=True):
        assert answer == f"composer imported: {composer_needed} exit 2", (override, answer)
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], (override, err)
    assert not folder.exists()


def test_eval_subset_that_leaves_out_a_domain_is_refused(tiny_source, tiny_mds, tmp_path, capsys):
    folder = tmp_path / "run"
    subset = ["device_eval_batch_size=1", "eval_subset_num_batches=1"]  # one sample: the first domain's
    assert main([PRUNE, *_args(tiny_source, tiny_mds, folder, *SHORT, *subset)]) == 2
    line = _one_error_line(capsys)
    assert "eval_subset_num_batches=1 evaluates the first 1 eval samples, which hold none of domains" in line
    assert "set eval_subset_num_batches=2 or more, or -1" in line
    assert not folder.exists()


def _save(path: Path, batch: int) -> None:
    torch.save({"state": {"timestamp": {"Timestamp": {"batch": batch}}}, "blob": torch.zeros(4096)}, path)


def test_checkpoint_folder_repair_sets_aside_cut_off_files_and_relinks_latest(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    _save(folder / "ep0-ba4-rank0.pt", 4)
    _save(folder / "ep0-ba8-rank0.pt", 8)
    whole = (folder / "ep0-ba8-rank0.pt").read_bytes()
    (folder / "ep0-ba12-rank0.pt").write_bytes(whole[: len(whole) // 2])  # cut off mid-write
    assert not is_complete_torch_file(folder / "ep0-ba12-rank0.pt")
    latest = folder / LATEST_NAME.format(rank=0)
    assert not latest.exists()  # killed between Composer's remove and re-create of the link

    changed = repair_checkpoint_folder(folder)
    assert (folder / "ep0-ba12-rank0.pt.incomplete").is_file() and not (folder / "ep0-ba12-rank0.pt").exists()
    assert os.readlink(latest) == "ep0-ba8-rank0.pt" and latest in changed
    assert repair_checkpoint_folder(folder) == []  # nothing left to repair


KILL_DURING_SAVE = textwrap.dedent(
    """
    import io, os, signal, sys
    import torch
    import composer.utils.checkpoint as checkpoint

    write = checkpoint._write_checkpoint_file

    def write_half_then_die(state_dict, filename):
        if "-ba{kill_at}-" in os.path.basename(filename):
            buffer = io.BytesIO()
            torch.save(state_dict, buffer)
            with open(filename, "wb") as handle:
                handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        return write(state_dict, filename)

    checkpoint._write_checkpoint_file = write_half_then_die
    from llmshearing.train import main
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.mark.slow
def test_run_killed_while_saving_a_checkpoint_resumes(tiny_source, tiny_mds, tmp_path, clean_shm):
    folder = tmp_path / "run"
    args = _args(tiny_source, tiny_mds, folder, "autoresume=true", "max_duration=8ba")
    script = tmp_path / "kill_during_save.py"
    script.write_text(KILL_DURING_SAVE.replace("{kill_at}", "8"))
    killed = subprocess.run([sys.executable, str(script), PRUNE, *args], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    cut_off = next((folder / "checkpoints").glob("*-ba8-rank0.pt"))
    assert not is_complete_torch_file(cut_off)  # Composer writes in place: a checkpoint name, half a file

    assert main([PRUNE, *args]) == 0  # resumed in this process
    assert (folder / "checkpoints" / (cut_off.name + ".incomplete")).is_file()
    assert is_complete_torch_file(cut_off) and is_finished(folder)


@pytest.mark.slow
@needs_tmpfs
def test_full_disk_while_saving_is_one_line_and_leaves_no_complete_looking_checkpoint(
    tiny_source, tiny_mds, tmp_path, clean_shm
):
    disk = tmp_path / "disk"
    disk.mkdir()
    folder = disk / "run"
    # room for the run description, the metrics and one checkpoint (~0.4 MB each), not for two
    command = " ".join(
        [
            f"mount -t tmpfs -o size=600k none {disk} &&",
            f"{sys.executable} -m llmshearing.train {PRUNE}",
            *_args(tiny_source, tiny_mds, folder, "max_duration=8ba"),
            f"; echo exit=$?; ls -1 {folder / 'checkpoints'}",
        ]
    )
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", command], capture_output=True, text=True)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"no space left on {disk}" in errors[0] and "checkpoints/ep" in errors[0]
    listing = proc.stdout.split()
    assert "exit=2" in listing, proc.stdout
    assert any(name.endswith(".pt.incomplete") for name in listing), listing
    complete_looking = [n for n in listing if n.endswith(".pt") and not n.startswith("latest")]
    assert len(complete_looking) == 1, listing  # only the checkpoint that fitted


def test_demo_reuses_a_finished_run_and_resumes_an_unfinished_one(
    tiny_source, tiny_mds, run_copy, tmp_path, capsys, clean_shm
):
    from llmshearing.demo import Steps, train_action, train_step

    assert train_action(tmp_path / "absent") == "start"
    (tmp_path / "empty").mkdir()
    assert train_action(tmp_path / "empty") == "start"
    assert train_action(run_copy) == "reuse"

    steps = Steps()
    command = [
        sys.executable,
        "-m",
        "llmshearing.train",
        PRUNE,
        f"model.path={tiny_source}",
        f"data_local={tiny_mds}",
    ]
    before = _digest(run_copy / "checkpoints")
    train_step(steps, "prune", run_copy, [*command, *SHORT, "autoresume=true"])
    assert (
        steps.timings == [("prune (reused)", 0.0)] and "reusing the finished run" in capsys.readouterr().out
    )
    assert _digest(run_copy / "checkpoints") == before

    longer = ["max_duration=8ba", "eval_interval=4ba", "save_interval=4ba", "autoresume=true"]
    description = run_copy / "config.json"  # the run as a demo killed half-way through would leave it
    description.write_text(description.read_text().replace('"max_duration": "4ba"', '"max_duration": "8ba"'))
    assert train_action(run_copy) == "resume"
    train_step(steps, "prune", run_copy, [*command, *longer])
    assert [title for title, _ in steps.timings][1:] == [f"prune (resuming the run in {run_copy})"]
    assert is_finished(run_copy) and (run_copy / "checkpoints" / "ep0-ba4-rank0.pt").is_file()


def test_save_folder_that_is_a_file_is_refused(tiny_source, tiny_mds, tmp_path, capsys):
    folder = tmp_path / "run"
    folder.write_text("a file")
    assert main([PRUNE, *_args(tiny_source, tiny_mds, folder, *SHORT)]) == 2
    assert "is a file, not a folder" in _one_error_line(capsys)
    assert folder.read_text() == "a file"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- a\n- b\n", "holds a list, not a mapping of keys"),
        (
            "model:\n\tpath: x\n",
            "is not valid YAML (found character that cannot start any token at line 2, column 1); indent with spaces, not tabs",
        ),
        ("a: [1, 2\n", "is not valid YAML"),
        ("", "holds no keys"),
    ],
)
def test_recipe_that_is_not_a_mapping_of_keys_is_one_line(tmp_path, capsys, text, message):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    assert main([str(recipe)]) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"error: {recipe}") and message in line


def test_override_that_does_not_parse_is_named(tiny_source, tiny_mds, tmp_path, capsys):
    assert main([PRUNE, *_args(tiny_source, tiny_mds, tmp_path / "run"), "optimizer.betas=[0.9"]) == 2
    assert "override 'optimizer.betas=[0.9' cannot be parsed" in _one_error_line(capsys)


def _with_nan(source: str, folder: Path) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, folder)
    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    tensors["layers.1.feed_forward.w2.weight"][3, 4] = float("inf")
    save_file(tensors, weights)
    return folder


def test_nan_weights_are_refused_at_load_naming_the_tensor_and_leave_no_run(
    tiny_source, tiny_mds, tmp_path, capsys, clean_shm
):
    source = _with_nan(tiny_source, tmp_path / "source")
    folder = tmp_path / "run"
    assert main([PRUNE, *_args(str(source), tiny_mds, folder, *SHORT)]) == 2
    line = _one_error_line(capsys)
    assert f"{source}: tensor layers.1.feed_forward.w2.weight holds NaN or Inf values (1 of" in line
    assert "use an earlier checkpoint or convert the source again" in line
    assert not folder.exists()  # no stub: the start failed before anything was written


def test_data_local_that_holds_raw_text_names_the_key_and_prepare_data(tiny_source, tmp_path, capsys):
    raw = tmp_path / "raw"
    (raw / "alpha").mkdir(parents=True)
    (raw / "alpha" / "part.jsonl").write_text('{"text": "a b c"}\n')
    assert main([PRUNE, *_args(tiny_source, str(raw), tmp_path / "run", *SHORT)]) == 2
    line = _one_error_line(capsys)
    assert (
        line.startswith("error: data_local (train_loader.dataset.local)") and "holds JSON-lines text" in line
    )
    assert f"llmshearing prepare-data --input {raw}" in line and "set data_local=DIR" in line


def test_data_without_an_eval_split_names_the_splits_it_has(tiny_source, tiny_mds, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_mds, data)
    shutil.rmtree(data / "eval")
    assert main([PRUNE, *_args(tiny_source, str(data), tmp_path / "run", *SHORT)]) == 2
    line = _one_error_line(capsys)
    assert "has no eval split" in line and "its splits: train, test" in line and "--eval-seqs N" in line


def test_domain_whose_index_lists_no_shards_is_named(tiny_source, tiny_mds, tmp_path, capsys):
    import json

    data = tmp_path / "data"
    shutil.copytree(tiny_mds, data)
    index = data / "train" / "beta" / "index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "shards": []}))
    assert main([PRUNE, *_args(tiny_source, str(data), tmp_path / "run", *SHORT)]) == 2
    line = _one_error_line(capsys)
    assert f"{index} lists no samples (no shards)" in line and "prepare that domain again" in line


def test_target_whose_d_model_heads_do_not_divide_is_refused_unless_allowed(
    tiny_source, tiny_mds, tmp_path, capsys
):
    from llmshearing.training.config import load_config, validate_config

    folder = tmp_path / "run"
    target = "model.l0_module.target_model.d_model=25"  # 2 heads
    assert main([PRUNE, *_args(tiny_source, tiny_mds, folder, *SHORT, target)]) == 2
    line = _one_error_line(capsys)
    assert "model.l0_module.target_model: d_model=25 is not a multiple of n_heads=2" in line
    assert "transformers >= 5 refuses to load" in line and "choose d_model=24 or d_model=26" in line
    assert "set model.l0_module.allow_indivisible_d_model=true" in line and not folder.exists()
    allowed = [
        *_args(tiny_source, tiny_mds, folder, *SHORT, target),
        "model.l0_module.allow_indivisible_d_model=true",
    ]
    assert validate_config(load_config(PRUNE, allowed)).model.l0_module.allow_indivisible_d_model is True


@pytest.mark.slow
@needs_tmpfs
def test_read_only_run_folder_is_one_line(tiny_source, tiny_mds, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    command = " ".join(
        [
            f"mount -t tmpfs -o size=64k,ro none {disk} &&",
            f"{sys.executable} -m llmshearing.train {PRUNE}",
            *_args(tiny_source, tiny_mds, disk / "run", *SHORT),
            "; echo exit=$?",
        ]
    )
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", command], capture_output=True, text=True)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: {disk / 'run'}: the file system is read-only; choose an output path on a writable disk"
    ], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "exit=2" in proc.stdout
