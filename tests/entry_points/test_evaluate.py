"""`llmshearing evaluate`: per-domain losses on each split, and every bad input as one clear error."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_DOMAINS, TINY_SEQ_LEN, write_tiny_source

from llmshearing.cli import main as cli_main
from llmshearing.data.checks import check_shards, check_vocab
from llmshearing.evaluate import domain_losses, load_model_fn


def evaluate(capsys, *args: str) -> tuple[int, str, str]:
    code = cli_main(["evaluate", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def copy_data(tiny_mds: str, tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(tiny_mds, data)
    return data


def edit_manifest(data: Path, **changes) -> None:
    manifest = json.loads((data / "manifest.json").read_text())
    for key, value in changes.items():
        if value is None:
            manifest.pop(key, None)
        else:
            manifest[key] = value
    (data / "manifest.json").write_text(json.dumps(manifest))


def test_test_split_is_evaluated_and_written(tiny_source, tiny_mds, tmp_path, capsys, clean_shm):
    out = tmp_path / "results.json"
    code, stdout, _ = evaluate(capsys, tiny_source, tiny_mds, "--split", "test", "--json", str(out))
    assert code == 0
    results = json.loads(out.read_text())
    assert sorted(results) == sorted(TINY_DOMAINS) and "average" in stdout
    model_fn = load_model_fn(tiny_source)
    for split in ("eval", "test"):  # same sample count (8 per domain), different samples
        assert {r.domain: r.tokens for r in domain_losses(model_fn, tiny_mds, split, progress=False)} == {
            d: 8 * (TINY_SEQ_LEN - 1) for d in TINY_DOMAINS
        }
    test = {r.domain: r.loss for r in domain_losses(model_fn, tiny_mds, "test", batch_size=3, progress=False)}
    evaluation = {r.domain: r.loss for r in domain_losses(model_fn, tiny_mds, "eval", progress=False)}
    for domain in TINY_DOMAINS:
        assert results[domain]["loss"] == pytest.approx(test[domain], rel=1e-5)  # batch size does not matter
        assert results[domain]["perplexity"] == pytest.approx(math.exp(test[domain]))
        assert results[domain]["loss"] != pytest.approx(evaluation[domain], rel=1e-6)
    assert not list(tmp_path.glob(".results.json.*")), "the JSON file is written through a staging file"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--max-samples", "0"], "--max-samples must be at least 1 (or left out for every sample), got 0"),
        (["--max-samples", "-1"], "--max-samples must be at least 1 (or left out for every sample), got -1"),
        (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["--batch-size", "-4"], "--batch-size must be at least 1, got -4"),
    ],
)
def test_bad_counts_are_refused_before_anything_runs(
    tiny_source, tiny_mds, tmp_path, capsys, options, message
):
    out = tmp_path / "results.json"
    code, stdout, stderr = evaluate(capsys, tiny_source, tiny_mds, *options, "--json", str(out))
    assert code == 2 and stdout == ""
    assert stderr.strip().splitlines() == [f"llmshearing evaluate: error: {message}"]
    assert not out.exists(), "no result is reported over zero tokens"


def test_library_call_refuses_zero_samples(tiny_source, tiny_mds):
    with pytest.raises(ValueError, match="--max-samples must be at least 1"):
        domain_losses(load_model_fn(tiny_source), tiny_mds, max_samples=0, progress=False)


def test_unknown_split_is_refused(tiny_source, tiny_mds, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["evaluate", tiny_source, tiny_mds, "--split", "validation"])
    assert exit_info.value.code == 2
    assert "argument --split: invalid choice: 'validation'" in capsys.readouterr().err


def test_a_truncated_shard_is_named(tiny_source, tiny_mds, tmp_path, capsys):
    data = copy_data(tiny_mds, tmp_path)
    shard = next((data / "test" / "beta").glob("shard.*.mds"))
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size - 7])
    code, _, stderr = evaluate(capsys, tiny_source, str(data), "--split", "test")
    assert code == 2
    assert stderr.strip().splitlines() == [
        f"llmshearing evaluate: error: {shard} has {size - 7:,} bytes, but {data / 'test' / 'beta' / 'index.json'} "
        f"records {size:,} bytes: the shard is truncated or was not copied completely; copy the data again "
        "or re-run llmshearing prepare-data"
    ]
    shard.unlink()
    with pytest.raises(ValueError, match=rf"{shard.name} is missing, but .* records {size:,} bytes"):
        check_shards(data / "test" / "beta")
    (data / "test" / "beta" / "index.json").write_text("{not json")
    with pytest.raises(ValueError, match="index.json is not a readable MDS index"):
        check_shards(data / "test" / "beta")


def test_token_ids_beyond_the_model_vocabulary_are_refused(tiny_mds, tmp_path, capsys):
    small = write_tiny_source(str(tmp_path / "small"), vocab_size=50)
    data = copy_data(tiny_mds, tmp_path)
    out = tmp_path / "results.json"
    code, _, stderr = evaluate(capsys, small, str(data), "--json", str(out))  # manifest without max_token_id
    assert code == 2 and not out.exists()
    assert stderr.strip().splitlines() == [
        f"llmshearing evaluate: error: the data in {data} was tokenised with a 97-token vocabulary "
        f"(tokenizer 'synthetic', vocabulary 97), but model {small} has 50 token embeddings (ids 0 to 49): "
        "prepare the data with the model's own tokenizer (llmshearing prepare-data --tokenizer MODEL_DIR) "
        "or use a model with this tokenizer's vocabulary"
    ]
    edit_manifest(data, max_token_id=96)
    code, _, stderr = evaluate(capsys, small, str(data))
    assert code == 2 and f"the data in {data} holds token ids up to 96 (tokenizer 'synthetic'" in stderr


def test_check_vocab_reads_the_recorded_ids(tiny_mds, tmp_path):
    data = copy_data(tiny_mds, tmp_path)
    check_vocab(data, 97, "m")  # vocabulary 97, no max_token_id: fits exactly
    with pytest.raises(ValueError, match="was tokenised with a 97-token vocabulary.*model m has 96"):
        check_vocab(data, 96, "m")
    edit_manifest(data, max_token_id=40)  # ids actually written fit a smaller model
    check_vocab(data, 41, "m")
    with pytest.raises(ValueError, match="holds token ids up to 40 .* model m has 40 token embeddings"):
        check_vocab(data, 40, "m")
    edit_manifest(data, max_token_id="40")
    with pytest.raises(ValueError, match=r"manifest.json: 'max_token_id' must be an integer, got '40'"):
        check_vocab(data, 97, "m")
    (data / "manifest.json").unlink()
    check_vocab(data, 2, "m")  # data without a manifest is not checked


def composer_checkpoint(source: str, path: Path, l0_state: bool) -> Path:
    """A Composer-format training checkpoint of the source's weights, with L0 state when asked."""
    from safetensors.torch import load_file

    weights = {}
    for file in Path(source).glob("*.safetensors"):
        weights.update(load_file(file))
    state = {f"model.{key}": value for key, value in weights.items()}
    if l0_state:
        state["l0_module.log_alpha.head"] = torch.zeros(4)
    path.parent.mkdir(parents=True)
    torch.save({"state": {"model": state}}, path)
    shutil.copy(Path(source) / "config.json", path.parent / "config.json")
    return path


def test_a_pruning_checkpoint_is_not_evaluated_as_the_unpruned_model(tiny_source, tiny_mds, tmp_path, capsys):
    plain = composer_checkpoint(tiny_source, tmp_path / "plain" / "latest-rank0.pt", l0_state=False)
    code, stdout, _ = evaluate(capsys, str(plain), tiny_mds, "--max-samples", "2")
    assert code == 0 and "average" in stdout
    pruning = composer_checkpoint(tiny_source, tmp_path / "pruning" / "latest-rank0.pt", l0_state=True)
    code, stdout, stderr = evaluate(capsys, str(pruning), tiny_mds)
    assert code == 2 and stdout == ""
    assert f"{pruning} is a pruning checkpoint" in stderr and "llmshearing prune-model CKPT OUT" in stderr


def test_the_training_eval_set_names_a_truncated_shard(tiny_mds, tmp_path, clean_shm):
    from streaming import Stream

    from llmshearing.data.eval_dataset import DomainEvalDataset

    data = copy_data(tiny_mds, tmp_path)
    streams = [Stream(local=str(data / "eval" / domain)) for domain in TINY_DOMAINS]
    assert len(DomainEvalDataset(streams=streams, set_names=TINY_DOMAINS)) == 16
    shard = next((data / "eval" / "alpha").glob("shard.*.mds"))
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(ValueError, match=rf"{shard} has .* bytes, but .* records .* the shard is truncated"):
        DomainEvalDataset(streams=streams, set_names=TINY_DOMAINS)


def test_compressed_shards_give_the_same_losses(tiny_source, tiny_mds, tmp_path):
    import numpy as np
    from streaming import LocalDataset, MDSWriter

    data = tmp_path / "zstd"
    for domain in TINY_DOMAINS:
        plain = LocalDataset(str(Path(tiny_mds) / "eval" / domain))
        columns = {"tokens": "ndarray:uint16"}
        with MDSWriter(out=str(data / "eval" / domain), columns=columns, compression="zstd") as writer:
            for i in range(len(plain)):
                writer.write({"tokens": np.asarray(plain[i]["tokens"], dtype=np.uint16)})
    before = sorted(p.name for p in data.rglob("*"))
    assert any(name.endswith(".mds.zstd") for name in before) and not any(n.endswith(".mds") for n in before)
    model_fn = load_model_fn(tiny_source)
    expected = domain_losses(model_fn, tiny_mds, progress=False)
    assert domain_losses(model_fn, str(data), progress=False) == expected
    assert sorted(p.name for p in data.rglob("*")) == before, "the data directory is read, not written"


def test_json_path_that_is_a_directory_is_refused_first(tiny_source, tiny_mds, tmp_path, capsys):
    code, stdout, stderr = evaluate(capsys, tiny_source, tiny_mds, "--json", str(tmp_path))
    assert code == 2 and stdout == ""
    assert (
        stderr.strip()
        == f"llmshearing evaluate: error: --json {tmp_path} is a directory; give the path of the JSON file to write"
    )


def test_an_existing_results_file_is_replaced_only_when_asked(
    tiny_source, tiny_mds, tmp_path, capsys, clean_shm
):
    out = tmp_path / "results.json"
    out.write_text("{}")
    for options in (["--json", str(out)], ["--tasks", "local_mc", "--output", str(out)]):
        data = [tiny_mds] if "--json" in options else []
        code, stdout, stderr = evaluate(capsys, tiny_source, *data, *options)
        assert code == 2 and stdout == "" and out.read_text() == "{}", stderr
        assert stderr.strip() == (
            f"llmshearing evaluate: error: {out} already exists; remove it, choose another output path, "
            "or replace it with --overwrite"
        )
    code, _, _ = evaluate(capsys, tiny_source, tiny_mds, "--json", str(out), "--overwrite")
    assert code == 0 and sorted(json.loads(out.read_text())) == sorted(TINY_DOMAINS)
