"""The data root's layout (llmshearing.data.layout): manifest, domains of a split, token-sample readers."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_DOMAINS, TINY_SEQ_LEN

from llmshearing.data.layout import (
    MANIFEST_NAME,
    TokenSamples,
    domain_dir,
    read_manifest,
    split_domains,
    token_batches,
    write_manifest,
    write_token_root,
)


def write_split(
    directory: Path, rows: list[np.ndarray], compression: str | None = None, column: str = "tokens"
):
    from streaming import MDSWriter

    with MDSWriter(out=str(directory), columns={column: "ndarray:uint16"}, compression=compression) as writer:
        for row in rows:
            writer.write({column: np.asarray(row, dtype=np.uint16)})


def eval_rows(root: str, domain: str) -> list[np.ndarray]:
    with TokenSamples(domain_dir(root, "eval", domain)) as samples:
        return [samples.row(i) for i in range(len(samples))]


def test_manifest_round_trip_and_absent_or_broken_manifests(tmp_path):
    manifest = {"format": "llmshearing-mds", "domains": ["a"], "seq_len": 8}
    write_manifest(tmp_path, manifest)
    assert (tmp_path / MANIFEST_NAME).is_file()
    assert read_manifest(tmp_path) == manifest
    assert read_manifest(None) is None and read_manifest(tmp_path / "elsewhere") is None
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(
        ValueError, match=rf"{MANIFEST_NAME} is not valid JSON .*re-run llmshearing prepare-data"
    ):
        read_manifest(tmp_path)


def test_split_domains_lists_mds_directories_only(tiny_mds, tmp_path):
    assert split_domains(tiny_mds, "eval") == sorted(TINY_DOMAINS)
    (tmp_path / "train" / "no-index").mkdir(parents=True)
    with pytest.raises(
        FileNotFoundError, match=r"--data x: .* is not an MDS root prepared by llmshearing prepare-data"
    ):
        split_domains(tmp_path, "train", label="--data x: ")


def test_a_missing_split_names_the_splits_the_data_has(tiny_mds, tmp_path):
    root = tmp_path / "mds"
    shutil.copytree(tiny_mds, root)
    shutil.rmtree(root / "eval")
    manifest = read_manifest(root)
    manifest["splits"]["eval"] = {d: {"samples": 0} for d in TINY_DOMAINS}  # as --eval-seqs 0 writes it
    write_manifest(root, manifest)
    with pytest.raises(
        FileNotFoundError, match=r"has no eval split .*--eval-seqs 0.*its splits: train, test"
    ):
        split_domains(root, "eval")
    (root / "manifest.json").unlink()  # the directories tell the same
    with pytest.raises(FileNotFoundError, match=r"has no eval split .*its splits: train, test"):
        split_domains(root, "eval")


def test_raw_text_given_as_data_says_prepare_data(tmp_path):
    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "part.jsonl").write_text('{"text": "a"}\n')
    with pytest.raises(
        FileNotFoundError,
        match=r"holds JSON-lines text, not prepared data: run `llmshearing prepare-data --input",
    ):
        split_domains(tmp_path, "eval")


def test_compressed_shards_read_as_the_plain_ones_and_the_copy_is_removed(tiny_mds, tmp_path):
    plain = eval_rows(tiny_mds, TINY_DOMAINS[0])
    write_split(tmp_path / "eval" / "z", plain, compression="zstd")
    assert not list((tmp_path / "eval" / "z").glob("*.mds")), "only compressed shards are stored"
    samples = TokenSamples(tmp_path / "eval" / "z")
    copy = Path(samples._copy.name)
    assert [samples.row(i).tolist() for i in range(len(samples))] == [r.tolist() for r in plain]
    assert samples.row(0).dtype == np.int64
    samples.close()
    assert not copy.exists()


def test_token_batches_follow_the_order_and_refuse_mixed_lengths(tiny_mds, tmp_path):
    sources = [TokenSamples(domain_dir(tiny_mds, "eval", d)) for d in TINY_DOMAINS]
    order = [(1, 0), (0, 3), (0, 0)]
    batches = list(token_batches(sources, order, batch_size=2))
    assert [b.shape for b in batches] == [(2, TINY_SEQ_LEN), (1, TINY_SEQ_LEN)]
    expected = np.stack([sources[k].row(j) for k, j in order])
    assert np.array_equal(np.concatenate(batches), expected)
    write_split(tmp_path / "short", [np.arange(4)])
    mixed = [sources[0], TokenSamples(tmp_path / "short")]
    with pytest.raises(ValueError, match=r"--data d: samples have different lengths \[4, 16\]"):
        list(token_batches(mixed, [(0, 0), (1, 0)], batch_size=2, label="--data d: "))


def test_a_sample_without_a_tokens_column_is_named(tmp_path):
    write_split(tmp_path / "ids", [np.arange(4)], column="ids")
    with pytest.raises(KeyError, match=r"ids: samples have no 'tokens' column"):
        TokenSamples(tmp_path / "ids").row(0)


def test_calibration_reads_compressed_data_like_plain_data(tiny_mds, tmp_path):
    from llmshearing.pruning.importance import calibration_batches

    for domain in TINY_DOMAINS:
        with TokenSamples(domain_dir(tiny_mds, "train", domain)) as samples:
            rows = [samples.row(i) for i in range(6)]
        write_split(tmp_path / "train" / domain, rows, compression="zstd")
    plain_total, plain = calibration_batches(tiny_mds, 10, 4)
    zstd_total, zstd = calibration_batches(tmp_path, 10, 4)
    assert plain_total == zstd_total == 3
    assert [b.tolist() for b in zstd] == [b.tolist() for b in plain]


def test_write_token_root_writes_a_root_the_readers_accept(tmp_path):
    rng = np.random.default_rng(0)
    rows = {
        split: {d: [rng.integers(0, 70_000, 6) for _ in range(3)] for d in ("b", "a")}
        for split in ("train", "eval")
    }
    manifest = write_token_root(tmp_path / "root", rows, vocab_size=70_000)
    assert read_manifest(tmp_path / "root") == manifest
    assert (
        manifest["token_dtype"] == "uint32" and manifest["seq_len"] == 6 and manifest["domains"] == ["a", "b"]
    )
    assert manifest["splits"]["eval"]["b"] == {"files": 1, "documents": 3, "tokens": 18, "samples": 3}
    assert split_domains(tmp_path / "root", "train") == ["a", "b"]
    with TokenSamples(domain_dir(str(tmp_path / "root"), "eval", "b")) as samples:
        assert [samples.row(i).tolist() for i in range(len(samples))] == [
            r.tolist() for r in rows["eval"]["b"]
        ]
    with pytest.raises(ValueError, match="share one length"):
        write_token_root(tmp_path / "bad", {"train": {"a": [np.arange(4), np.arange(5)]}}, vocab_size=97)
